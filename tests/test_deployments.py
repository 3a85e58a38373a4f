"""prefect.yaml for real: a `prefect server start` on a free loopback port, the process work pool,
`prefect deploy --all`, `prefect deployment run compaction/opsd-correct` executed by a worker
with `--run-once`; the `rlvr.checkpoint.landed` trigger; the watch-rlvr flow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "params" / "smoke.yaml")
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "compaction-pool"

pytestmark = pytest.mark.slow


def prefect_cli(args, env, cwd=REPO, timeout=180) -> str:
    r = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def flow_runs_of(deployment: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    flow_name, name = deployment.split("/")
    with get_client(sync_client=True) as client:
        return [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[name])), limit=200)]


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory, mlflow_db_template):
    """The work pool and every deployment of prefect.yaml on the session's server; a project
    folder (COMPACTION_HOME) for the worker's flow runs."""
    project = tmp_path_factory.mktemp("deploy-project")
    shutil.copy(mlflow_db_template, project / "mlflow.db")
    env = {**prefect_server["env"], "PWD": str(REPO)}  # the pull step's {{ $PWD }}: run flows from the repo
    prefect_cli(["work-pool", "create", POOL, "--type", "process"], env)
    out = prefect_cli(["deploy", "--all", "--no-prompt"], env)
    for name in ("compaction/opsd-correct", "compaction/opsd-all", "compaction/opsd-incorrect",
                 "post-train/post-train", "watch-rlvr/watch-rlvr"):
        assert name in out, out[-3000:]
    return {"env": {**env, "COMPACTION_HOME": str(project)}, "project": project}


def test_deployments_carry_the_trigger_schedule_and_pull_step(deployed):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("compaction/opsd-correct")
        assert d.parameters["conditions"] == ["correct"] and d.work_pool_name == POOL
        assert d.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
        watch = client.read_deployment_by_name("watch-rlvr/watch-rlvr")
        assert watch.schedules and watch.schedules[0].schedule.interval.total_seconds() == 300
        assert watch.work_queue_name == "watch"


def test_opsd_correct_deployment_run_completes_on_a_worker(deployed, tiny_model):
    """`prefect deployment run compaction/opsd-correct` + `prefect worker start --run-once`."""
    env = deployed["env"]
    out = prefect_cli(["deployment", "run", "compaction/opsd-correct", "--param", f"params={SMOKE}",
                       "--param", f"checkpoint={tiny_model}"], env)
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    worker_log = prefect_cli(["worker", "start", "--pool", POOL, "--work-queue", "default", "--run-once"], env,
                             timeout=420)

    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_completed(), f"{run.state}\n{worker_log[-4000:]}"
    assert run.parameters["checkpoint"] == tiny_model and run.parameters["conditions"] == ["correct"]
    # It ran from the repo (pull step) and wrote into the worker's COMPACTION_HOME project.
    assert list((deployed["project"] / "artifacts" / "opsd").glob("*/correct/round-0001/metrics.json"))
    import mlflow

    versions = mlflow.MlflowClient(f"sqlite:///{deployed['project'] / 'mlflow.db'}").search_model_versions(
        "name = 'compacted'")
    assert [v.tags["condition"] for v in versions] == ["correct"]


def test_landed_event_triggers_an_opsd_correct_run_with_its_checkpoint(deployed):
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    uri = f"models:/rlvr/{int(time.time()) % 100000}"
    emit_event(event="rlvr.checkpoint.landed", resource={"prefect.resource.id": f"rlvr.checkpoint.rlvr.{uri[-5:]}"},
               payload={"checkpoint": uri})
    EventsWorker.drain_all(timeout=30)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        runs = [r for r in flow_runs_of("compaction/opsd-correct") if r.parameters.get("checkpoint") == uri]
        if runs:
            break
        time.sleep(1)
    assert runs, "no opsd-correct flow run was created by the rlvr.checkpoint.landed trigger"
    assert runs[0].parameters["conditions"] == ["correct"]
    # No study in the payload (a version registered by something else): the documented default.
    assert runs[0].parameters["params"] == "params/demo.yaml" and runs[0].parameters["overrides"] == []
    other = [r for r in flow_runs_of("compaction/opsd-all") if r.parameters.get("checkpoint") == uri]
    assert other == []  # only opsd-correct listens


def test_announced_checkpoint_is_compacted_with_its_own_studys_params(deployed, tiny_model):
    """The event post-train emits (tasks.registry.announce_checkpoint, the real emitter) carries
    the study's params file and overrides; the trigger passes them on, and the worker compacts
    the checkpoint with the smoke params, into the smoke study's MLflow experiment."""
    from prefect import flow, get_client
    from prefect.events.worker import EventsWorker
    from prefect.states import Cancelled

    from tasks.registry import announce_checkpoint

    overrides = ["opsd.seed=5"]

    @flow
    def announce():
        announce_checkpoint({"name": "rlvr", "version": 7, "uri": tiny_model}, SMOKE, overrides)

    announce()
    EventsWorker.drain_all(timeout=30)
    deadline, runs = time.monotonic() + 90, []
    while time.monotonic() < deadline and not runs:
        runs = [r for r in flow_runs_of("compaction/opsd-correct") if r.parameters.get("checkpoint") == tiny_model
                and r.state.is_scheduled()]
        time.sleep(1)
    assert runs, "no opsd-correct flow run was created by the rlvr.checkpoint.landed trigger"
    assert runs[0].parameters["params"] == SMOKE and runs[0].parameters["overrides"] == overrides
    with get_client(sync_client=True) as client:  # the worker below runs this one only
        for other in flow_runs_of("compaction/opsd-correct"):
            if other.id != runs[0].id and other.state.is_scheduled():
                client.set_flow_run_state(other.id, Cancelled(), force=True)
    worker_log = prefect_cli(["worker", "start", "--pool", POOL, "--work-queue", "default", "--run-once"],
                             deployed["env"], timeout=420)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(runs[0].id)
    assert run.state.is_completed(), f"{run.state}\n{worker_log[-4000:]}"
    import mlflow

    store = mlflow.MlflowClient(f"sqlite:///{deployed['project'] / 'mlflow.db'}")
    smoke = store.get_experiment_by_name("compaction-smoke")
    assert smoke is not None
    opsd_runs = store.search_runs([smoke.experiment_id], "tags.stage = 'opsd'")
    assert any(r.data.params.get("opsd.seed") == "5" for r in opsd_runs), [r.data.params for r in opsd_runs]
    assert store.get_experiment_by_name("compaction-demo") is None


def test_watch_rlvr_starts_opsd_correct_once_per_new_version(deployed, tiny_model, monkeypatch):
    """Registry versions the watcher has not seen start compaction/opsd-correct; the Variable
    remembers the last one."""
    import mlflow
    from prefect.variables import Variable

    from compaction import registry, tracking
    from compaction.params import load_params
    from flows.watch_rlvr import LAST_SEEN, watch_rlvr

    project = deployed["project"]
    monkeypatch.setenv("COMPACTION_HOME", str(project))
    params = load_params(SMOKE, ["registry.rlvr_model=rlvr-watched"], base=project)
    Variable.unset(LAST_SEEN)

    def register(folder: Path) -> str:
        with tracking.start_run(params.tracking, "rlvr") as run:
            pass
        return registry.register_checkpoint(params.tracking, "rlvr-watched", folder, run.info.run_id).uri

    first = register(Path(tiny_model))
    overrides = ["registry.rlvr_model=rlvr-watched"]
    started = watch_rlvr(params=SMOKE, overrides=overrides)
    assert len(started) == 1 and Variable.get(LAST_SEEN) == first.rsplit("/", 1)[1]
    assert watch_rlvr(params=SMOKE, overrides=overrides) == []  # nothing new
    copy = project / "ckpt-copy"
    shutil.copytree(tiny_model, copy)
    second = register(copy)
    started = watch_rlvr(params=SMOKE, overrides=overrides)
    assert len(started) == 1
    runs = {r.parameters.get("checkpoint") for r in flow_runs_of("compaction/opsd-correct")}
    assert {first, second} <= runs
    mlflow.end_run()
