"""compaction report: a real MLflow store, real Parquet graded by math-verify, numbers checked by hand."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from compaction.artifacts import write_parquet
from cli.main import main
from compaction.params import load_params

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "params" / "smoke.yaml")
STUDY = "rep"
EXPERIMENT = f"compaction-{STUDY}"
# model label -> (probability of a correct sample, filler phrases per sample, eval seeds)
MODELS = {
    "sft": (0.45, 12, [0]),
    "rlvr": (0.70, 10, [0, 1]),
    "opsd-correct": (0.68, 2, [0]),
    "opsd-incorrect": (0.40, 3, [0]),
}
K = 4


def _rollouts(problems: pd.DataFrame, model: str, seed: int, p_correct: float, filler: int, bench: str) -> pd.DataFrame:
    """Samples that are either the reference solution padded with redundant phrases, or a wrong box."""
    rng = np.random.default_rng([seed, len(model), len(bench)])
    rows = []
    for _, pr in problems.iterrows():
        for k in range(K):
            n_fill = int(rng.integers(0, 2 * filler + 1))
            if rng.random() < p_correct:
                text = " ".join(["Wait, let me check this step again."] * n_fill + [pr["solution"]])
            else:
                text = " ".join(["Hmm, maybe."] * n_fill + ["So the answer is \\boxed{-9999}."])
            rows.append({"rollout_id": f"{bench}-{model}-{seed}-{pr['problem_id']}-{k}", "problem_id": pr["problem_id"],
                         "sample_index": k, "policy_ref": f"/ckpt/{model}", "prompt": pr["problem"],
                         "response": text, "response_tokens": len(text.split()),
                         "finish_reason": "length" if n_fill > 2 * filler - 1 else "stop",
                         "temperature": 0.6, "seed": seed, "round": 0})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory, mlflow_db_template):
    """A project with two flow runs in experiment compaction-rep: an old one (a decoy) and the latest,
    whose eval runs have real rollouts/grades Parquet graded by math-verify."""
    from compaction import tracking
    from compaction.data.synthetic import generate_problems
    from compaction.grading import grade_rollouts
    from jobs.evaluate import benchmark_metrics

    root = tmp_path_factory.mktemp("report-project")
    shutil.copy(mlflow_db_template, root / "mlflow.db")
    params = load_params(SMOKE, [f"study={STUDY}", f"tracking.experiment={EXPERIMENT}"], base=root)
    problems = generate_problems(n_train=1, n_eval=10, seed=5).query("split == 'eval'").reset_index(drop=True)
    benches = {"synthetic": problems, "mini": problems.head(4)}

    # Every sample of every model graded in one math-verify pool.
    frames = {(m, s, b): _rollouts(benches[b], m, s, p, f, b) for m, (p, f, seeds) in MODELS.items()
              for s in seeds for b in benches}
    frames[("rlvr", 7, "synthetic")] = _rollouts(problems, "old", 7, 1.0, 0, "synthetic")  # the decoy: all correct
    allr = pd.concat(frames.values(), ignore_index=True)
    grades = grade_rollouts(allr, problems[["problem_id", "answer"]], workers=1).set_index("rollout_id")

    def write_eval(model, seed, dirname):
        out = root / "artifacts" / "eval" / dirname
        metrics = {}
        for (m, s, b), r in frames.items():
            if (m, s) == (model, seed):
                g = grades.loc[r["rollout_id"]].reset_index()
                write_parquet(r, out / b / "rollouts.parquet")
                write_parquet(g, out / b / "grades.parquet")
                metrics.update(benchmark_metrics(b, r, g, params.eval.epistemic_markers))
        return out, {k.replace("@", "_at_"): v for k, v in metrics.items()}

    def eval_run(model, seed, dirname):
        out, metrics = write_eval(model, seed, dirname)
        tags = {"stage": "eval", "model": model, "policy_ref": f"/ckpt/{model}", "eval_dir": str(out)}
        if model.startswith("opsd-"):
            tags["condition"] = model.split("-", 1)[1]
        with tracking.start_run(params.tracking, f"eval-{model}-{seed}", nested=True, tags=tags) as run:
            tracking.log_metrics(metrics)
        return run.info.run_id

    with tracking.start_run(params.tracking, "post-train-old", tags={"study": STUDY, "flow": "post-train"}):
        eval_run("rlvr", 7, "old")
    time.sleep(0.05)
    # The OPSD job's redundancy maps: rounds 0 and 1, the report must render the last one.
    opsd_out = root / "artifacts" / "opsd" / "correct"
    for rnd, token in ((0, "early"), (1, "<script>alert(1)</script>")):
        write_parquet(pd.DataFrame({"rollout_id": ["r0", "r0", "r1"], "position": [0, 1, 0],
                                    "token": ["Wait", token, "\\boxed{3}"], "divergence": [2.5, 0.1, 0.0],
                                    "correct": [True, True, False]}),
                      opsd_out / f"round-{rnd:04d}" / "redundancy_map.parquet")
    eval_ids = []
    with tracking.start_run(params.tracking, "post-train-new", tags={"study": STUDY, "flow": "post-train"}) as parent:
        with tracking.start_run(params.tracking, "rlvr", nested=True, tags={"stage": "rlvr", "model": "rlvr"}):
            for step, v in enumerate([0.2, 0.4, 0.5]):
                tracking.log_metrics({"rlvr/reward_mean": v}, step=step)
        with tracking.start_run(params.tracking, "opsd-correct", nested=True,
                                tags={"stage": "opsd", "condition": "correct", "model": "opsd-correct",
                                      "stage_dir": str(opsd_out)}):
            for step, v in enumerate([0.9, 0.6]):
                tracking.log_metrics({"opsd/loss": v, "opsd/mean_response_tokens": 40 - 10 * step}, step=step)
        for model, (_, _, seeds) in MODELS.items():
            for seed in seeds:
                eval_ids.append(eval_run(model, seed, f"{model}-{seed}"))
    return {"root": root, "params": params, "parent": parent.info.run_id, "eval_ids": eval_ids,
            "grades": grades, "frames": frames}


def _report_json(root, monkeypatch, capsys, *extra) -> dict:
    monkeypatch.setenv("COMPACTION_HOME", str(root))
    assert main(["report", "--params", SMOKE, "--study", STUDY, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _by_hand(study, model: str, bench: str) -> pd.DataFrame:
    """What a user computes from the Parquet files of the model's eval folders in the latest flow run."""
    root = study["root"] / "artifacts" / "eval"
    parts = []
    for seed in MODELS[model][2]:
        r = pd.read_parquet(root / f"{model}-{seed}" / bench / "rollouts.parquet")
        g = pd.read_parquet(root / f"{model}-{seed}" / bench / "grades.parquet")
        parts.append(r.merge(g[["rollout_id", "correct"]], on="rollout_id"))
    return pd.concat(parts)


def test_report_json_matches_the_parquet_files(study, monkeypatch, capsys):
    payload = _report_json(study["root"], monkeypatch, capsys)
    assert payload["study"] == STUDY and payload["experiment"] == EXPERIMENT
    assert payload["parent_run_id"] == study["parent"]
    rows = payload["rows"]
    assert [(r["model"], r["benchmark"]) for r in rows] == [
        (m, b) for m in MODELS for b in ("mini", "synthetic")]
    # Only the latest flow run's eval runs: the old all-correct rlvr evaluation is not in.
    assert sorted(i for r in rows for i in r["eval_runs"]) == sorted(study["eval_ids"] * 2)

    for r in rows:
        for key in ("model", "benchmark", "accuracy", "accuracy_ci", "mean_response_tokens", "mean_response_tokens_ci"):
            assert key in r
        df = _by_hand(study, r["model"], r["benchmark"])
        assert r["accuracy"] == pytest.approx(df["correct"].mean())
        assert r["mean_response_tokens"] == pytest.approx(df["response_tokens"].mean())
        assert r["truncation_rate"] == pytest.approx((df["finish_reason"] == "length").mean())
        assert r["problems"] == df["problem_id"].nunique() and r["samples"] == len(df)
        assert r["seeds"] == len(MODELS[r["model"]][2])
        for name in ("accuracy", "mean_response_tokens"):
            lo, hi = r[f"{name}_ci"]
            assert lo <= r[name] <= hi and lo < hi, (r["model"], r["benchmark"], name, r[f"{name}_ci"])
        base = next(b for b in rows if b["model"] == "rlvr" and b["benchmark"] == r["benchmark"])
        if r["model"] == "rlvr":
            assert r["accuracy_delta"] is None
            continue
        assert r["accuracy_delta"] == pytest.approx(r["accuracy"] - base["accuracy"])
        assert r["mean_response_tokens_delta"] == pytest.approx(r["mean_response_tokens"] - base["mean_response_tokens"])
        for name in ("accuracy_delta", "mean_response_tokens_delta"):
            lo, hi = r[f"{name}_ci"]
            assert lo <= r[name] <= hi and lo < hi
    # The compacted model is much shorter than RLVR: its paired interval excludes 0.
    oc = next(r for r in rows if r["model"] == "opsd-correct" and r["benchmark"] == "synthetic")
    assert oc["mean_response_tokens_delta_ci"][1] < 0
    # The MLflow metrics the evaluate job logged agree with the report (one seed).
    run = mlflow.MlflowClient(payload["tracking_uri"]).get_run(oc["eval_runs"][0])
    assert run.data.metrics["eval/synthetic/accuracy"] == pytest.approx(oc["accuracy"])
    # The gate's verdict follows from the row: promoted iff the accuracy drop is within the
    # tolerance and the responses are shorter.
    expected = (-100 * oc["accuracy_delta"] <= payload["max_accuracy_drop"] + 1e-9
                and oc["mean_response_tokens_delta"] < 0)
    verdict = payload["promotion"]["opsd-correct"]
    assert verdict["promote"] == expected
    assert verdict["reason"].startswith("promoted" if expected else "not promoted")


def test_report_files_and_mlflow_run(study, monkeypatch, capsys):
    payload = _report_json(study["root"], monkeypatch, capsys)
    out = study["root"] / "artifacts" / "reports" / STUDY
    for name in ("report.md", "report.json", "accuracy_vs_tokens.png", "length_histograms.png",
                 "training_curves.png", "redundancy_map_correct.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert name in payload["files"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == payload
    md = (out / "report.md").read_text()
    assert "| opsd-correct | synthetic |" in md and "![training_curves](training_curves.png)" in md
    page = (out / "redundancy_map_correct.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page  # last round, escaped
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # nothing half-written beside it

    client = mlflow.MlflowClient(payload["tracking_uri"])
    run = client.get_run(payload["report_run_id"])
    assert run.data.tags["stage"] == "report" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == study["parent"]
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert {f"report/{n}" for n in payload["files"]} <= logged
    # The flow's own run, where a person looks first, has the figure and the table too.
    on_parent = {f.path for f in client.list_artifacts(study["parent"], "report")}
    assert {"report/accuracy_vs_tokens.png", "report/report.md"} <= on_parent


def test_report_is_deterministic_and_seeds_are_resampled(study, monkeypatch, capsys):
    a = _report_json(study["root"], monkeypatch, capsys)
    b = _report_json(study["root"], monkeypatch, capsys)
    assert a["rows"] == b["rows"]
    c = _report_json(study["root"], monkeypatch, capsys, "--set", "report.seed=1")
    assert [r["accuracy"] for r in c["rows"]] == [r["accuracy"] for r in a["rows"]]
    assert [r["accuracy_ci"] for r in c["rows"]] != [r["accuracy_ci"] for r in a["rows"]]


def test_scope_experiment_takes_the_latest_policy_per_model(study, monkeypatch, capsys):
    payload = _report_json(study["root"], monkeypatch, capsys, "--set", "report.scope=experiment", "--no-mlflow")
    rlvr = next(r for r in payload["rows"] if r["model"] == "rlvr" and r["benchmark"] == "synthetic")
    # The old rlvr eval shares policy_ref /ckpt/rlvr with the new ones, so it counts as a third seed.
    assert rlvr["seeds"] == 3
    df = pd.concat([_by_hand(study, "rlvr", "synthetic"),
                    pd.read_parquet(study["root"] / "artifacts/eval/old/synthetic/grades.parquet")])
    assert rlvr["accuracy"] == pytest.approx(df["correct"].mean())


def test_study_without_eval_runs_is_a_clear_error(project, monkeypatch, capsys):
    from compaction import tracking

    params = load_params(SMOKE, ["study=empty", "tracking.experiment=compaction-empty"], base=project)
    with tracking.start_run(params.tracking, "post-train-x", tags={"study": "empty"}):
        pass
    monkeypatch.setenv("COMPACTION_HOME", str(project))
    assert main(["report", "--params", SMOKE, "--study", "empty"]) == 2
    err = capsys.readouterr().err
    assert "compaction-empty" in err and params.tracking.tracking_uri in err and "no finished eval runs" in err
    assert main(["report", "--params", SMOKE, "--study", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment 'compaction-nosuch'" in err and params.tracking.tracking_uri in err


def test_latest_study_is_the_store_s_newest_eval(study, monkeypatch, capsys):
    monkeypatch.setenv("COMPACTION_HOME", str(study["root"]))
    assert main(["report", "--params", SMOKE, "--study", "latest", "--json", "--no-mlflow",
                 "--out", str(study["root"] / "latest-report")]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["experiment"] == EXPERIMENT and payload["study"] == STUDY
    assert (study["root"] / "latest-report" / "report.json").is_file()
