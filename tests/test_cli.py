"""The `compaction` console script, run as a user runs it (a subprocess of the installed entry point)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "compaction"


def run_cli(*args, home: Path, timeout=300):
    env = {**os.environ, "COMPACTION_HOME": str(home)}
    return subprocess.run([str(EXE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands(tmp_path):
    r = run_cli("--help", home=tmp_path)
    assert r.returncode == 0
    for cmd in ("demo", "grade", "params"):
        assert cmd in r.stdout


def test_params_error_names_key_and_file_before_work(tmp_path):
    r = run_cli("demo", "--params", "params/smoke.yaml", "--set", "sft.lrr=1", home=tmp_path)
    assert r.returncode == 2
    assert "params/smoke.yaml: --set sft.lrr: unknown key" in r.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing started


def test_params_prints_resolved_values(tmp_path):
    r = run_cli("params", "--params", "params/smoke.yaml", "--set", "rollout.n=5", home=tmp_path)
    assert r.returncode == 0
    assert "n: 5" in r.stdout and str(tmp_path.resolve()) in r.stdout


def test_grade_cli_with_problems_join(tmp_path):
    problems = pd.DataFrame({"problem_id": ["p1", "p2"], "answer": ["\\frac{1}{2}", "7"]})
    rollouts = pd.DataFrame({
        "rollout_id": ["r1", "r2", "r3"], "problem_id": ["p1", "p2", "p2"],
        "response": ["<think>x</think> so \\boxed{0.5}", "\\boxed{8}", "no answer here"],
    })
    problems.to_parquet(tmp_path / "problems.parquet")
    rollouts.to_parquet(tmp_path / "rollouts.parquet")
    r = run_cli("grade", str(tmp_path / "rollouts.parquet"), str(tmp_path / "grades.parquet"),
                "--problems", str(tmp_path / "problems.parquet"), "--workers", "1", home=tmp_path)
    assert r.returncode == 0, r.stderr
    grades = pd.read_parquet(tmp_path / "grades.parquet").set_index("rollout_id")
    assert grades.loc["r1", "correct"] and not grades.loc["r2", "correct"]
    assert grades.loc["r3", "status"] == "no_answer"
    assert "graded 3 rows" in r.stdout


def test_grade_cli_missing_column_is_a_clear_error(tmp_path):
    pd.DataFrame({"rollout_id": ["r1"], "response": ["\\boxed{1}"]}).to_parquet(tmp_path / "in.parquet")
    r = run_cli("grade", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), home=tmp_path)
    assert r.returncode == 2
    assert "in.parquet" in r.stderr and "answer" in r.stderr
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("which", ["input", "problems"])
def test_grade_cli_corrupt_parquet_is_named(tmp_path, which):
    """pyarrow says "magic bytes not found" without the file: the error must name it."""
    good = tmp_path / "good.parquet"
    pd.DataFrame({"rollout_id": ["r1"], "problem_id": ["p1"], "response": ["\\boxed{1}"],
                  "answer": ["1"]}).to_parquet(good)
    bad = tmp_path / "not-a-parquet.parquet"
    bad.write_text("rollout_id,response\nr1,1\n")
    args = [str(bad), str(tmp_path / "out.parquet")] if which == "input" else [
        str(good), str(tmp_path / "out.parquet"), "--problems", str(bad)]
    r = run_cli("grade", *args, home=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"{bad}: not a readable Parquet file" in r.stderr
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.slow
def test_demo_runs_the_post_train_flow_and_prints_the_report_table(tmp_path):
    r = run_cli("demo", "--params", "params/smoke.yaml", home=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "artifacts" / "reports" / "smoke" / "report.json").read_text())
    models = {row["model"] for row in report["rows"]}
    assert {"sft", "rlvr", "opsd-all", "opsd-correct", "opsd-incorrect"} <= models
    for model in ("sft", "rlvr", "opsd-all", "opsd-correct", "opsd-incorrect"):
        assert model in r.stdout  # the printed table has a row per model
    assert "make ui" in r.stdout
    # One ephemeral server, started early by the CLI (flows/direct.py) and used by the flow runs.
    assert (r.stdout + r.stderr).count("Stopping temporary server") == 1
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    # Accuracy and length in the table are what the eval run's own grades and rollouts say.
    for row in report["rows"]:
        folder = Path(client.get_run(row["eval_runs"][0]).data.tags["eval_dir"]) / row["benchmark"]
        grades, rollouts = pd.read_parquet(folder / "grades.parquet"), pd.read_parquet(folder / "rollouts.parquet")
        assert row["accuracy"] == pytest.approx(grades["correct"].astype(float).mean()), row["model"]
        assert row["mean_response_tokens"] == pytest.approx(rollouts["response_tokens"].mean()), row["model"]
    exp = client.get_experiment_by_name("compaction-smoke")
    evals = client.search_runs([exp.experiment_id], "tags.stage = 'eval'")
    assert {"sft", "rlvr", "opsd-correct"} <= {e.data.tags["model"] for e in evals}
