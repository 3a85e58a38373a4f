"""The study flow on params/smoke.yaml, for real (Prefect server, MLflow on SQLite, the tiny model
trained per seed): two seeds, one report over them, and a rerun that runs no job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import reduce
from pathlib import Path

import mlflow
import pytest
import torch

from tests.test_flows import SMOKE, run_flow, stage_states

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, mlflow_db_template, prefect_server):
    root = tmp_path_factory.mktemp("study-project")
    shutil.copy(mlflow_db_template, root / "mlflow.db")
    mp = pytest.MonkeyPatch()
    mp.setenv("COMPACTION_HOME", str(root))
    from flows.study import study

    first = run_flow(study, params=SMOKE, seeds=SEEDS)
    yield {"root": root, "first": first, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    mp.undo()


def test_study_trains_every_seed_and_reports_over_them(study_run):
    result, tree, jobs, _ = study_run["first"]
    assert result["seeds"] == SEEDS
    # Every seed trains its own pipeline; the problems are made once (the seeds share them).
    assert jobs.count("prepare_data") == 1 and jobs.count("sft") == 2 and jobs.count("rlvr") == 2
    assert jobs.count("lenpen") == 2 and jobs.count("opsd") == 6
    runs = result["post_train"]
    assert runs[0]["sft"] != runs[1]["sft"]
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(runs[s]["sft"]) / "model.safetensors")) for s in SEEDS)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # another initialisation and order: other weights

    payload = json.loads((Path(result["report"]["out_dir"]) / "report.json").read_text())
    assert payload["seeds"] == SEEDS
    models = [r["model"] for r in payload["rows"]]
    assert models == ["sft", "rlvr", "rlvr-lenpen", "opsd-baseline", "opsd-all", "opsd-correct", "opsd-incorrect"]
    by_model = {r["model"]: r for r in payload["rows"]}
    for r in payload["rows"]:
        assert r["seeds"] == 2 and [s["seed"] for s in r["per_seed"]] == SEEDS, r["model"]
        assert len(set(r["eval_runs"])) == 2
        # The row pools its seeds: its accuracy is the mean of theirs (same problems and samples each).
        assert r["accuracy"] == pytest.approx(sum(s["accuracy"] for s in r["per_seed"]) / 2)
    # Per seed, deltas are against the baseline's run of the same seed.
    rlvr = {s["seed"]: s for s in by_model["rlvr"]["per_seed"]}
    for s in by_model["opsd-all"]["per_seed"]:
        assert s["accuracy_delta"] == pytest.approx(s["accuracy"] - rlvr[s["seed"]]["accuracy"])
        assert s["mean_response_tokens_delta"] == pytest.approx(
            s["mean_response_tokens"] - rlvr[s["seed"]]["mean_response_tokens"])
    assert all(s["accuracy_delta"] is None for s in by_model["rlvr"]["per_seed"])
    claims = [v["claim"] for v in payload["verdict"]]
    assert claims[:3] == ["correct-only is >=20% shorter and within 2 pt", "incorrect-only loses accuracy",
                          "all sits in between"]
    assert all(v["holds"] in (True, False) for v in payload["verdict"][:3])
    assert "rlvr-lenpen vs rlvr" in payload["verdict"][3]["evidence"]
    assert "rlvr-lenpen" in payload["promotion"]
    assert {"accuracy_vs_tokens.png", "heldout_vs_round.png"} <= set(payload["files"])
    md = (Path(result["report"]["out_dir"]) / "report.md").read_text()
    assert "## Verdict" in md and md.count("seed 1 |") == len(models)

    # Each seed's own report (its compaction flow) covers that seed only.
    for s in SEEDS:
        own = json.loads((study_run["root"] / "artifacts" / "reports" / f"smoke-seed{s}" / "report.json").read_text())
        assert own["seeds"] == [s] and {r["seeds"] for r in own["rows"]} == {1}

    # MLflow: the study's run holds one post-train run per seed, each tagged with its seed.
    client = mlflow.MlflowClient(study_run["tracking_uri"])
    exp = client.get_experiment_by_name("compaction-smoke")
    flows = client.search_runs([exp.experiment_id], "tags.flow = 'post-train'")
    (top,) = client.search_runs([exp.experiment_id], "tags.flow = 'study'")
    assert sorted(r.data.tags["seed"] for r in flows) == ["0", "1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in flows} == {top.info.run_id}


def test_report_json_from_the_command_line_has_seeds_and_per_seed(study_run):
    root = study_run["root"]
    out = subprocess.run([sys.executable, "-m", "cli", "report", "--params", SMOKE, "--json", "--no-mlflow",
                          "--out", str(root / "cli-report")], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "COMPACTION_HOME": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    payload = json.loads(out.stdout)
    assert payload["seeds"] == SEEDS  # the latest flow run: the study, every seed
    assert all(r["seeds"] == 2 and len(r["per_seed"]) == 2 for r in payload["rows"])


def test_study_rerun_reuses_every_seed(study_run):
    from flows.study import study

    result, tree, jobs, _ = run_flow(study, params=SMOKE, seeds=SEEDS)
    assert jobs == ["report"] * 3  # each seed's report and the study's: never cached
    states = stage_states(tree)
    assert states and all(state == "Cached" for _, state in states), states
    payload = json.loads((Path(result["report"]["out_dir"]) / "report.json").read_text())
    assert payload["seeds"] == SEEDS and all(r["seeds"] == 2 for r in payload["rows"])


# ------------------------------------------------------------------------------ seeds
def test_seed_zero_is_the_params_file_and_other_seeds_move_every_seed_field():
    from compaction.params import load_params
    from flows.study import SEED_FIELDS, seed_overrides

    base = load_params(SMOKE)
    zero = load_params(SMOKE, seed_overrides(base, 0))
    assert zero.model_dump(exclude={"study", "seed"}) == base.model_dump(exclude={"study", "seed"})
    two = load_params(SMOKE, seed_overrides(base, 2))
    assert two.seed == 2 and two.study == "smoke-seed2"
    for field in SEED_FIELDS:
        assert reduce(getattr, field.split("."), two) == reduce(getattr, field.split("."), base) + 2, field
    assert two.data == base.data  # the same problems: deltas stay paired


def test_bad_seeds_fail_before_any_job():
    from flows.study import parse_seeds

    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad, match in (("0,0", "repeated"), ("a,1", "integers"), ("", "integers"), ("-1", "negative")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)
    out = subprocess.run([sys.executable, "-m", "cli", "run", "study", "--params", SMOKE, "--seeds", "1,1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "seeds: repeated seed in [1, 1]" in out.stderr
