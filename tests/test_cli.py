"""The `compaction` console script, run as a user runs it (a subprocess of the installed entry point)."""

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


@pytest.mark.slow
def test_demo_runs_end_to_end_on_smoke_params(tmp_path):
    r = run_cli("demo", "--params", "params/smoke.yaml", home=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "demo summary (smoke)" in r.stdout
    assert "reference_solution_accuracy" in r.stdout
    # Outputs exist, in the schemas, under the project folder.
    rollouts = list((tmp_path / "artifacts" / "rollouts").glob("*/rollouts.parquet"))
    grades = list((tmp_path / "artifacts" / "rollouts").glob("*/grades.parquet"))
    assert len(rollouts) == 1 and len(grades) == 1
    r_df, g_df = pd.read_parquet(rollouts[0]), pd.read_parquet(grades[0])
    assert len(r_df) == 16 * 2 and set(g_df.rollout_id) == set(r_df.rollout_id)
    assert (tmp_path / "mlflow.db").is_file()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("compaction-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    m = runs[0].data.metrics
    assert m["demo/reference_solution_accuracy"] == 1.0
    assert m["demo/rollouts"] == 32
