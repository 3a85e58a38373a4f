"""The Prefect flows on params/smoke.yaml, for real: a Prefect server, MLflow on SQLite in a temp
project, the tiny model trained and evaluated.

- a second run with the same inputs executes no job (every stage task is Cached; the report,
  never cached, renders again);
- a changed OPSD learning rate re-runs OPSD and its evaluation, nothing upstream;
- a compaction flow killed (SIGKILL) during OPSD and run again relaunches the OPSD job, which
  resumes from its checkpoint and ends with the weights of a run never killed;
- the MLflow layout and registry of docs/decisions.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import json

import mlflow
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "params" / "smoke.yaml")
STAGE_TASKS = ("prepare_data", "prepare_model", "sft", "evaluate", "rlvr", "rollout_grading", "group_filtering",
               "opsd")


def flow_run_ids(flow_run_id) -> list:
    """A flow run and its subflows."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return [flow_run_id, *[f.id for f in subflows]]


def flow_run_tree(flow_run_id) -> list:
    """Task runs of a flow run and of its subflows: [(task name, state name)]."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids(flow_run_id))),
                                     limit=200)
    return [(r.name, r.state.name) for r in runs]


def progress_artifacts(flow_run_id) -> dict[str, float]:
    """The progress artifacts of a flow run and its subflows: {key: final percent}."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids(flow_run_id)),
            type=ArtifactFilterType(any_=["progress"])))
    return {a.key: float(a.data) for a in found}


def stage_states(tree) -> list[tuple[str, str]]:
    return sorted((name, state) for name, state in tree if name.startswith(STAGE_TASKS))


def trained_conditions(result) -> list[str]:
    """The conditions whose prompt pool is not empty (the smoke model's `correct` pool is empty:
    its rounds are empty, with no redundancy map)."""
    pools = result["compaction"]["pools"]
    return [c for c in ("all", "correct", "incorrect") if len(pd.read_parquet(pools[c]))]


def run_flow(flow_fn, **kwargs):
    """Run a flow in-process; returns (result, task states, job stages executed in this call)."""
    from tasks.launch import JOB_SECONDS

    JOB_SECONDS.clear()
    state = flow_fn(**kwargs, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    return state.result(), flow_run_tree(flow_run_id), [s for s, _ in JOB_SECONDS], flow_run_id


@pytest.fixture(scope="module")
def project(tmp_path_factory, mlflow_db_template, prefect_server):
    """A project folder (COMPACTION_HOME) with a migrated MLflow store, after one post-train run."""
    root = tmp_path_factory.mktemp("flows-project")
    shutil.copy(mlflow_db_template, root / "mlflow.db")
    mp = pytest.MonkeyPatch()
    mp.setenv("COMPACTION_HOME", str(root))
    from flows.post_train import post_train

    first = run_flow(post_train, params=SMOKE)
    yield {"root": root, "first": first, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    mp.undo()


def test_post_train_runs_every_stage_and_tracks_it(project):
    result, tree, jobs, flow_run_id = project["first"]
    states = stage_states(tree)
    # Within the run, the subflow's prepare_data and the baseline evaluation (the RLVR checkpoint,
    # already evaluated as `rlvr`) come from the cache; every other stage ran.
    assert sorted(n.split("-")[0] for n, s in states if s == "Cached") == ["evaluate", "prepare_data"]
    assert all(s in ("Completed", "Cached") for _, s in states)
    assert sorted(set(jobs)) == ["eval", "group_filtering", "lenpen", "opsd", "prepare_data", "prepare_model", "report",
                                 "rlvr", "rollout_grading", "sft"]
    # One job per stage: RLVR once, OPSD once per condition, the length-penalty baseline once, whatever the rounds.
    assert jobs.count("rlvr") == 1 and jobs.count("opsd") == 3 and jobs.count("rollout_grading") == 1
    assert jobs.count("lenpen") == 1
    # The design card's DAG, as the Prefect API shows it: rollout grading, group filtering and one
    # OPSD task per condition.
    names = sorted(n for n, _ in tree)
    assert names.count("rollout_grading") == 1
    assert [n for n in names if n.startswith(("group_filtering", "opsd"))] == [
        "group_filtering-all", "group_filtering-correct", "group_filtering-incorrect",
        "opsd-all", "opsd-correct", "opsd-incorrect"]
    pools = {c: pd.read_parquet(p) for c, p in result["compaction"]["pools"].items()}
    graded = pd.read_parquet(result["compaction"]["rollout_grading"]["grades"])
    assert set(pools["all"]["problem_id"]) == set(graded["problem_id"])
    assert set(pools["correct"]["problem_id"]).isdisjoint(pools["incorrect"]["problem_id"])
    assert set(pools["correct"]["problem_id"]) | set(pools["incorrect"]["problem_id"]) == set(pools["all"]["problem_id"])
    assert (pools["correct"]["pass_rate"] >= 0.5).all() and (pools["incorrect"]["pass_rate"] < 0.5).all()
    # Each stage's progress artifact reached 100% (one per RLVR / OPSD task run, advanced every round).
    progress = progress_artifacts(flow_run_id)
    assert sorted(k for k in progress) == ["lenpen-rounds", "opsd-all-rounds", "opsd-correct-rounds",
                                           "opsd-incorrect-rounds", "rlvr-rounds"]
    assert set(progress.values()) == {100.0}

    client = mlflow.MlflowClient(project["tracking_uri"])
    exp = client.get_experiment_by_name("compaction-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_id = {r.info.run_id: r for r in runs}
    parents = [r for r in runs if "flow" in r.data.tags]
    assert sorted(r.data.tags["flow"] for r in parents) == ["compaction", "post-train"]
    post = next(r for r in parents if r.data.tags["flow"] == "post-train")
    comp = next(r for r in parents if r.data.tags["flow"] == "compaction")
    assert comp.data.tags["mlflow.parentRunId"] == post.info.run_id  # the subflow's run nests
    for r in parents:
        assert {"study", "prefect_flow_run_id", "git_commit"} <= set(r.data.tags)
        assert "opsd.lr" in r.data.params and "sft.lr" in r.data.params

    evals = {r.data.tags["model"]: r for r in runs if r.data.tags.get("stage") == "eval"}
    assert set(evals) == {"sft", "rlvr", "rlvr-lenpen", "opsd-baseline", "opsd-all", "opsd-correct", "opsd-incorrect"}
    for label, r in evals.items():
        assert Path(r.data.tags["eval_dir"], "synthetic", "grades.parquet").is_file()
        assert {"eval/synthetic/accuracy", "eval/synthetic/pass_at_k", "eval/synthetic/mean_response_tokens"} \
            <= set(r.data.metrics)
        assert r.data.tags["mlflow.parentRunId"] == (post if label in ("sft", "rlvr") else comp).info.run_id
    assert evals["opsd-correct"].data.tags["condition"] == "correct"
    assert evals["rlvr"].data.tags["policy_ref"] == "models:/rlvr/1"
    # The RLVR checkpoint and the baseline are the same evaluation (one job, two labelled runs).
    assert evals["rlvr"].data.tags["eval_dir"] == evals["opsd-baseline"].data.tags["eval_dir"]

    # Training stages: one nested run per stage, rounds as steps, live metrics from the jobs.
    rlvr = [r for r in runs if r.data.tags.get("stage") == "rlvr" and r.data.tags["model"] == "rlvr"]
    assert len(rlvr) == 1 and by_id[rlvr[0].data.tags["mlflow.parentRunId"]].data.tags["flow"] == "post-train"
    history = client.get_metric_history(rlvr[0].info.run_id, "rlvr/reward_mean")
    assert sorted(m.step for m in history) == [0, 1]
    opsd = {r.data.tags["condition"]: r for r in runs if r.data.tags.get("stage") == "opsd"}
    assert set(opsd) == {"all", "correct", "incorrect"}
    assert sorted(m.step for m in client.get_metric_history(opsd["all"].info.run_id, "opsd/loss")) == [0, 1]
    # The held-out curve (opsd.eval_every 2 of 2 rounds): a point before the first round and after the last,
    # step = rounds done;
    # the length-penalty baseline has the same one (its rounds are OPSD's).
    (lenpen,) = [r for r in runs if r.data.tags.get("model") == "rlvr-lenpen" and r.data.tags.get("stage") == "rlvr"]
    assert lenpen.data.tags["condition"] == "lenpen"
    assert by_id[lenpen.data.tags["mlflow.parentRunId"]].data.tags["flow"] == "compaction"
    for run, prefix in ((opsd["all"], "opsd"), (opsd["incorrect"], "opsd"), (lenpen, "rlvr")):
        for name in ("heldout_accuracy", "heldout_mean_response_tokens"):
            points = client.get_metric_history(run.info.run_id, f"{prefix}/{name}")
            assert sorted(m.step for m in points) == [0, 2], (run.data.tags["model"], name)
        assert sorted(p.name for p in Path(run.data.tags["stage_dir"], "heldout").iterdir()) == [
            "after-0000.json", "after-0002.json"]
    assert sorted(m.step for m in client.get_metric_history(lenpen.info.run_id, "rlvr/reward_mean")) == [0, 1]
    # The stages trained: every RLVR round took optimizer steps with a gradient, and so did OPSD.
    for metric in ("rlvr/optimizer_steps", "rlvr/grad_norm"):
        values = [m.value for m in client.get_metric_history(rlvr[0].info.run_id, metric)]
        assert len(values) == 2 and all(v > 0 for v in values), (metric, values)
    assert all(m.value > 0 for m in client.get_metric_history(opsd["all"].info.run_id, "opsd/grad_norm"))
    from safetensors.torch import load_file

    sft_weights = load_file(str(Path(result["sft"]) / "model.safetensors"))
    rlvr_weights = load_file(str(Path(result["rlvr"]["path"]) / "model.safetensors"))
    opsd_weights = load_file(str(Path(result["compaction"]["evaluations"]["all"]["policy_ref"]) / "model.safetensors"))
    assert any(not torch.equal(sft_weights[k], rlvr_weights[k]) for k in sft_weights)
    assert any(not torch.equal(rlvr_weights[k], opsd_weights[k]) for k in rlvr_weights)
    sft = [r for r in runs if r.data.tags.get("stage") == "sft"]
    assert len(sft) == 1 and client.get_metric_history(sft[0].info.run_id, "sft/loss")

    # Registry: models:/rlvr@latest is the RLVR checkpoint, logged under checkpoint/ of the rlvr run.
    from compaction import registry
    from compaction.params import load_params

    params = load_params(SMOKE, base=project["root"])
    latest = registry.get_version(params.tracking, "models:/rlvr@latest")
    assert latest.version == "1" and latest.run_id == rlvr[0].info.run_id
    assert latest.source == f"runs:/{latest.run_id}/checkpoint"
    local = registry.resolve_checkpoint(params.tracking, "models:/rlvr/1")
    assert Path(local, "config.json").is_file() and local == result["rlvr"]["path"]
    compacted = registry.list_versions(params.tracking, "compacted")
    assert sorted(v.tags["condition"] for v in compacted) == ["all", "correct", "incorrect", "lenpen"]
    assert {v.tags["policy_ref"] for v in compacted} == {"models:/rlvr/1"}
    assert {v.tags["model"]: v.tags["eval_run_id"] for v in compacted} == {
        m: evals[m].info.run_id for m in ("opsd-all", "opsd-correct", "opsd-incorrect", "rlvr-lenpen")}

    # The promotion gate ran in registration: each version carries its verdict, the flow returns
    # it, and alias `candidate` is on a version that passed (none when none passed).
    verdicts = {r["condition"]: r["promoted"] for r in result["compaction"]["registered"]}
    assert {v.tags["condition"]: v.tags["promotion_passed"] for v in compacted} == {
        c: "true" if ok else "false" for c, ok in verdicts.items()}
    assert all(v.tags["promotion"].startswith("promoted" if v.tags["promotion_passed"] == "true" else "not promoted")
               for v in compacted)
    passed = [v.version for v in compacted if v.tags["promotion_passed"] == "true"]
    if passed:
        assert registry.get_version(params.tracking, "models:/compacted@candidate").version in passed
    else:
        with pytest.raises(LookupError):
            registry.get_version(params.tracking, "models:/compacted@candidate")
    # No run is left RUNNING: a stage's run stays RUNNING between its rounds, the last one ends it.
    assert {r.info.status for r in client.search_runs([exp.experiment_id], max_results=500)} == {"FINISHED"}

    # The report found each OPSD run's rounds (its stage_dir tag): one redundancy map per condition.
    report_dir = Path(result["compaction"]["report"]["out_dir"])
    assert {p.name for p in report_dir.glob("redundancy_map_*.html")} == {
        f"redundancy_map_{c}.html" for c in trained_conditions(result)}


def test_second_run_with_the_same_inputs_executes_no_job(project):
    from flows.post_train import post_train

    result, tree, jobs, _ = run_flow(post_train, params=SMOKE)
    states = stage_states(tree)
    assert jobs == ["report"]  # never cached: it reads what this flow run recorded
    assert states and all(state == "Cached" for _, state in states), states
    assert {n.split("-")[0] for n, _ in states} == set(STAGE_TASKS)
    # One cached task per training stage.
    assert sorted(n for n, _ in states if n.startswith(("rlvr", "opsd"))) == [
        "opsd-all", "opsd-correct", "opsd-incorrect", "rlvr", "rlvr-lenpen"]
    # Registration is idempotent: the same folders are the same versions.
    assert result["rlvr"]["uri"] == "models:/rlvr/1"
    assert sorted(r["version"] for r in result["compaction"]["registered"]) == ["1", "2", "3", "4"]
    # ... and each version's eval_run_id now names this flow run's evaluation of it.
    from compaction import registry
    from compaction.params import load_params

    params = load_params(SMOKE, base=project["root"])
    evaluations = result["compaction"]["evaluations"]
    assert {v.tags["condition"]: v.tags["eval_run_id"] for v in registry.list_versions(params.tracking, "compacted")} \
        == {c: evaluations[c]["run_id"] for c in ("all", "correct", "incorrect", "lenpen")}
    # Its report, which replaces the first one, still has the training curves and redundancy maps:
    # its evaluations name the earlier flow run's training runs (tag train_run_id).
    report_dir = Path(result["compaction"]["report"]["out_dir"])
    assert (report_dir / "training_curves.png").is_file() and (report_dir / "heldout_vs_round.png").is_file()
    assert {p.name for p in report_dir.glob("redundancy_map_*.html")} == {
        f"redundancy_map_{c}.html" for c in trained_conditions(result)}


def test_changed_opsd_lr_reruns_opsd_and_its_evaluation_only(project):
    from flows.compact import compaction

    result, tree, jobs, _ = run_flow(compaction, params=SMOKE, overrides=["opsd.lr=3e-4"], conditions=["all"])
    states = dict(stage_states(tree))
    assert result["checkpoint"]["version_uri"] == "models:/rlvr/1"  # the default: models:/rlvr@latest
    assert states["opsd-all"] == "Completed" and states["rollout_grading"] == "Cached"
    assert states["group_filtering-all"] == "Cached"  # the pools do not depend on the learning rate
    assert sorted(jobs) == ["eval", "opsd", "report"]
    assert [s for n, s in states.items() if n.startswith("prepare_data")] == ["Cached"]
    evaluate = sorted(s for n, s in states.items() if n.startswith("evaluate"))
    assert evaluate == ["Cached", "Completed"]  # the baseline from the cache, the new model evaluated
    assert [r["version"] for r in result["registered"]] == ["5"]


def test_missing_output_invalidates_its_cache_record(project):
    """A cache record whose folder was deleted is not used: the stage runs again."""
    from flows.compact import compaction

    result, _, _, _ = run_flow(compaction, params=SMOKE, conditions=["baseline"])
    eval_dir = Path(result["evaluations"]["baseline"]["eval_dir"])
    shutil.rmtree(eval_dir)
    _, tree, jobs, _ = run_flow(compaction, params=SMOKE, conditions=["baseline"])
    assert jobs == ["eval", "report"] and (eval_dir / "metrics.json").is_file()
    assert sorted(s for _, s in stage_states(tree)) == ["Cached", "Completed"]  # prepare_data, evaluate


def test_bad_checkpoint_and_conditions_fail_before_any_job(project):
    from flows.compact import compaction
    from tasks.launch import JOB_SECONDS

    JOB_SECONDS.clear()
    state = compaction(params=SMOKE, checkpoint=str(project["root"] / "no-such-ckpt"), return_state=True)
    assert state.is_failed() and "no-such-ckpt" in state.message
    state = compaction(params=SMOKE, conditions=["corect"], return_state=True)
    assert state.is_failed() and "corect" in state.message
    state = compaction(params=SMOKE, checkpoint="models:/rlvr/99", return_state=True)
    assert state.is_failed() and "models:/rlvr/99" in state.message
    assert JOB_SECONDS == []


# ------------------------------------------------------------------------------ resume
def test_compaction_killed_during_opsd_resumes_from_its_checkpoint(project, prefect_server, tmp_path):
    """Killed (SIGKILL, the whole process) during OPSD round 2 of 4, after its checkpoint at round
    2: the flow run again takes rollout grading and group filtering from the cache, relaunches the
    OPSD job, which resumes from that checkpoint, and ends with the weights of a job never killed."""
    from safetensors.torch import load_file

    root = project["root"]
    checkpoint = project["first"][0]["rlvr"]["path"]
    # A new OPSD (new folder); the pools' inputs are the first post-train's, so its rollout grading is reused.
    sets = ["opsd.lr=2e-4", "opsd.rounds=4", "opsd.save_every=2"]
    cmd = [sys.executable, "-m", "cli", "run", "compaction", "--params", SMOKE, "--condition", "all",
           "--checkpoint", checkpoint, *[a for s in sets for a in ("--set", s)]]
    env = {**prefect_server["env"], "COMPACTION_HOME": str(root)}
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen: list[str] = []
    started = threading.Event()

    def watch():
        for line in proc.stdout:
            seen.append(line)
            if "opsd round 2 of 4 [all]" in line:  # round 2 recorded; the next checkpoint comes after round 3
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    assert started.wait(240), "".join(seen[-40:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    (stage,) = [p.parents[1] for p in (root / "artifacts" / "opsd").glob("*/all/checkpoints/step-00000002")
                if not (p.parents[1] / "final").exists()]
    assert sorted(c.name for c in (stage / "checkpoints").iterdir()) == ["step-00000002"]

    from flows.compact import compaction

    result, tree, jobs, _ = run_flow(compaction, params=SMOKE, overrides=sets, conditions=["all"],
                                     checkpoint=checkpoint)
    states = dict(stage_states(tree))
    assert states["rollout_grading"] == "Cached" and states["group_filtering-all"] == "Cached"
    assert states["opsd-all"] == "Completed" and jobs.count("opsd") == 1
    assert Path(result["evaluations"]["all"]["policy_ref"]) == stage / "final"
    assert sorted(c.name for c in (stage / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert json.loads((stage / "timings.json").read_text())["resumed_at"] == 2

    # The same job never killed, in this process as the rerun: the same weights, bitwise.
    from compaction.params import load_params
    from jobs import opsd

    params = load_params(SMOKE, sets, base=root)
    (problems,) = (root / "artifacts" / "prepare_data").glob("*/problems.parquet")
    ref = opsd.run(params, checkpoint, str(problems), tmp_path / "ref", "all", pool_path=result["pools"]["all"])
    a, b = load_file(f"{ref}/model.safetensors"), load_file(str(stage / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- launcher
def test_failing_job_output_is_quoted_and_its_process_tree_killed(tmp_path):
    """run_subprocess: a failure raises with the last lines; an exception in the launching task
    (here: the logger) kills the job's whole process group, grandchildren included."""
    import logging

    from tasks.launch import JobFailed, run_subprocess

    log = logging.getLogger("test-launcher")
    with pytest.raises(JobFailed, match=r"(?s)exited with status 3.*line 2\nline 3"):
        run_subprocess(["bash", "-c", "echo line 1; echo line 2; echo line 3; exit 3"], os.environ, tmp_path, log)

    class Boom(logging.Logger):
        def info(self, msg, *args, **kwargs):
            if "launch" not in msg and args and str(args[0]).startswith("child"):
                raise KeyboardInterrupt("task cancelled")

    pid_file = tmp_path / "child.pid"
    with pytest.raises(KeyboardInterrupt):
        run_subprocess(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; sleep 0.2; echo child; wait"], os.environ,
                       tmp_path, Boom("boom"))
    grandchild = int(pid_file.read_text())
    time.sleep(0.5)
    status = Path(f"/proc/{grandchild}/status")
    # Gone, or a zombie waiting for an init that does not reap (containers): either way, not running.
    assert not status.exists() or "\nState:\tZ" in status.read_text(), status.read_text()


def _fresh_project(tmp_path, mlflow_db_template, monkeypatch) -> Path:
    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("COMPACTION_HOME", str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_accelerate_launcher_runs_rounds_in_two_processes(tmp_path, mlflow_db_template, prefect_server, tiny_model,
                                                          monkeypatch):
    """launcher.kind=accelerate with params/accelerate/cpu-2proc.yaml: OPSD rounds run as
    `accelerate launch --num_processes 2 -m jobs.opsd`, their lines reach the Prefect run log, their
    metrics the stage's MLflow run (MLFLOW_RUN_ID)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.compact import compaction

    root = _fresh_project(tmp_path, mlflow_db_template, monkeypatch)
    sets = ["launcher.kind=accelerate", "launcher.accelerate_config=" + str(REPO / "params/accelerate/cpu-2proc.yaml"),
            "launcher.num_processes=2", "opsd.rounds=1", "opsd.unit=rollout"]  # no pool: one job fewer to launch
    state = compaction(params=SMOKE, overrides=sets, checkpoint=tiny_model, conditions=["all"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])), limit=200)
    text = "\n".join(entry.message for entry in logs)
    assert "--num_processes 2 -m jobs.opsd" in text and "--num_processes 1 -m jobs.evaluate" in text
    assert "opsd round 0 of 1 [all]: acc" in text  # the job's own line, streamed from the subprocess
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("compaction-smoke")
    (opsd_run,) = client.search_runs([exp.experiment_id], "tags.stage = 'opsd'")
    assert [m.step for m in client.get_metric_history(opsd_run.info.run_id, "opsd/loss")] == [0]
    assert Path(result["registered"][0]["uri"]) and (Path(result["evaluations"]["all"]["eval_dir"]) /
                                                     "metrics.json").is_file()


@pytest.mark.slow
def test_accelerate_job_failure_fails_the_flow_with_its_output(tmp_path, mlflow_db_template, prefect_server,
                                                               monkeypatch):
    from flows.compact import compaction

    root = _fresh_project(tmp_path, mlflow_db_template, monkeypatch)
    bad = root / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    state = compaction(params=SMOKE, overrides=["launcher.kind=accelerate"], checkpoint=str(bad),
                       conditions=["baseline"], return_state=True)
    assert state.is_failed()
    assert "jobs.evaluate exited with status" in state.message and "last lines of its output" in state.message


def test_direct_runs_turn_heartbeats_off_only_in_ephemeral_mode():
    """A flow run directly against the in-process ephemeral server needs no heartbeats (and each
    flow run would wait up to 1 s for the heartbeat thread); against a real server they stay on."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.direct import direct_run_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with direct_run_settings():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
    default = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with direct_run_settings():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == default is not None


def test_job_slots_bound_concurrent_jobs_and_devices_are_disjoint(prefect_server, smoke_params):
    """launcher.max_concurrent_jobs slots of the Prefect limit `compaction-jobs`: with 1, jobs of
    concurrent branches never overlap; with 2 they do. Each accelerate job's GPUs are its own."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.launch import DevicePool, ensure_job_limit, job_slot

    def spans(limit: int) -> list[tuple[float, float]]:
        params = smoke_params.model_copy(deep=True)
        params.launcher.kind, params.launcher.max_concurrent_jobs = "accelerate", limit
        ensure_job_limit(params)

        def job(_):
            with job_slot(params):
                t0 = time.monotonic()
                time.sleep(0.5)
                return t0, time.monotonic()

        with ThreadPoolExecutor(3) as pool:
            return sorted(pool.map(job, range(3)))

    one = spans(1)
    assert all(a[1] <= b[0] for a, b in zip(one, one[1:])), one  # one after another
    two = spans(2)
    assert two[1][0] < two[0][1], two  # the first two overlap

    pool = DevicePool(["0", "1", "2", "3", "4", "5", "6", "7"], 2)
    held = []
    with pool.take() as a, pool.take() as b, pool.take() as c:
        held = [a, b, c]
    assert sorted(d for g in held for d in g) == ["0", "1", "2", "3", "4", "5"] and all(len(g) == 2 for g in held)
    with pytest.raises(ValueError, match="devices_per_job=3: only 2"):
        DevicePool(["0", "1"], 3)


# ------------------------------------------------------------------------------ study
# Last in this module: the study registers more versions and flow runs in the project's store.
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def study_run(project):
    """The study over seeds 0 and 1 in the project where post-train already ran on the same params:
    seed 0 is that run (the params file itself), seed 1 trains."""
    from flows.study import study

    return run_flow(study, params=SMOKE, seeds=SEEDS)


def test_study_trains_every_new_seed_and_reports_over_them(project, study_run):
    result, tree, jobs, _ = study_run
    assert result["seeds"] == SEEDS
    # Seed 0 is the post-train run of this project, from the cache; seed 1 trains its own pipeline
    # on the same problems.
    assert jobs.count("sft") == 1 and jobs.count("rlvr") == 1 and jobs.count("lenpen") == 1
    assert jobs.count("opsd") == 3 and "prepare_data" not in jobs
    runs = result["post_train"]
    assert runs[0]["sft"] == project["first"][0]["sft"] != runs[1]["sft"]
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
        own = json.loads((project["root"] / "artifacts" / "reports" / f"smoke-seed{s}" / "report.json").read_text())
        assert own["seeds"] == [s] and {r["seeds"] for r in own["rows"]} == {1}

    # MLflow: the study's run holds one post-train run per seed, each tagged with its seed.
    client = mlflow.MlflowClient(project["tracking_uri"])
    exp = client.get_experiment_by_name("compaction-smoke")
    (top,) = client.search_runs([exp.experiment_id], "tags.flow = 'study'")
    flows = client.search_runs([exp.experiment_id], f"tags.flow = 'post-train' and tags.mlflow.parentRunId = "
                                                    f"'{top.info.run_id}'")
    assert sorted(r.data.tags["seed"] for r in flows) == ["0", "1"]


def test_report_json_from_the_command_line_has_seeds_and_per_seed(project, study_run, capsys):
    from cli.main import main

    capsys.readouterr()
    assert main(["report", "--params", SMOKE, "--json", "--no-mlflow", "--out", str(project["root"] / "cli")]) == 0
    payload = json.loads(capsys.readouterr().out)
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


def test_seed_zero_is_the_params_file_and_other_seeds_move_every_seed_field():
    from functools import reduce

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


def test_bad_seeds_fail_before_any_job(capsys):
    from cli.main import main
    from flows.study import parse_seeds
    from tasks.launch import JOB_SECONDS

    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad, match in (("0,0", "repeated"), ("a,1", "integers"), ("", "integers"), ("-1", "negative")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)
    JOB_SECONDS.clear()
    assert main(["run", "study", "--params", SMOKE, "--seeds", "1,1"]) == 2
    assert "seeds: repeated seed in [1, 1]" in capsys.readouterr().err and JOB_SECONDS == []
