"""Overhead of the Prefect + MLflow orchestration layer on the smoke pipeline.

    python bench/orchestration.py [--params params/smoke.yaml] [--set key=value ...] [--keep DIR]

1. In one process, in Prefect's ephemeral mode (no server): start the ephemeral server (timed
   apart), then run the ``post-train`` flow on a fresh project folder whose MLflow store is
   already migrated (a one-off per project, timed apart), after the process's first-use imports
   and GC freeze (``flows.direct.prepare_process``, timed apart; the fraction with them counted is
   printed too). Overhead = flow wall time minus the
   seconds inside jobs (each task records the time of its job call), as a fraction of the flow
   wall time. Target <= 10%. The report counts as stage work (a stage in docs/design.md that is never
   cached); the flows run as ``compaction run`` runs them (flows.direct: no heartbeats in
   ephemeral mode). It also prints where the overhead goes: per layer (MLflow store calls and
   Prefect API calls made by the main thread outside jobs; the rest is Prefect's engine and our
   task code) and per task name. Baseline, side by side: the same flow shape (task runs in the
   same flows, persisted or not) with no-op tasks and no MLflow (:func:`prefect_floor`), which is
   what Prefect alone costs for it.
2. A fully cached rerun, as a user runs it: a new process ``compaction run post-train`` (imports,
   ephemeral server, every stage a cache hit). Target <= 30 s.

``--set rlvr.rounds=80 --set opsd.rounds=30`` gives the round count of params/demo.yaml (80 RLVR
rounds, 3 x 30 OPSD rounds) at smoke sizes, for the cached rerun of a demo-shaped flow.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The repo first: bench/kernels.py would shadow the kernels package (the script's folder is sys.path[0]).
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(k, v)


class CallTimer:
    """Wall time of the public methods of some classes, called by the main thread outside jobs
    (``tasks.launch.in_job``), per layer; a call inside another timed call counts once, as the outer."""

    def __init__(self, in_job) -> None:
        self.in_job, self.main = in_job, threading.main_thread().ident
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()
        self.by_name: dict[str, list[float]] = collections.defaultdict(list)  # "layer: method" -> seconds
        self.depth, self.on, self._undo = 0, False, []

    def wrap(self, cls, layer: str) -> None:
        for name in dir(cls):  # inherited too: Prefect's client gets its methods from mixins
            fn = inspect.getattr_static(cls, name)
            if name.startswith("_") or not inspect.isfunction(fn):
                continue
            setattr(cls, name, self._timed(fn, layer))
            self._undo.append((cls, name, name in vars(cls) and fn))

    def _timed(self, fn, layer: str):
        @functools.wraps(fn)
        def timed(*a, **k):
            if not self.on or self.depth or self.in_job() or threading.get_ident() != self.main:
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
                dt = time.perf_counter() - t0
                self.seconds[layer] += dt
                self.calls[layer] += 1
                self.by_name[f"{layer}: {fn.__name__}"].append(dt)
        return timed

    def restore(self) -> None:
        for cls, name, own in self._undo:
            if own:
                setattr(cls, name, own)
            else:
                delattr(cls, name)


def _noop(key: str) -> dict:
    return {"key": key}


def prefect_floor(shape: list[tuple[str, bool]], storage: Path) -> float:
    """Wall time of a flow of ``shape`` (the measured flow's task runs in call order: the flow that
    called each, and whether it persists its result) where every task is a no-op and nothing is
    tracked in MLflow: what Prefect itself costs for this flow, the floor of the overhead.

    Stage tasks become no-op tasks with a cache key and a persisted result (each a cache miss, as
    in a first run), the others no-op tasks without cache; the tasks of ``compaction`` run in a
    subflow, started as ``post-train`` starts it (after ``wait_until_recorded``)."""
    import uuid

    from prefect import flow, task
    from prefect.cache_policies import INPUTS, NO_CACHE

    from flows.direct import direct_run_settings
    from flows.post_train import wait_until_recorded

    stage = task(name="noop_stage", cache_policy=INPUTS, persist_result=True, result_storage=storage)(_noop)
    bookkeeping = task(name="noop_bookkeeping", cache_policy=NO_CACHE)(_noop)
    nonce = uuid.uuid4().hex

    def replay(flow_name: str):
        state = None
        for i, (_, persisted) in enumerate(x for x in shape if x[0] == flow_name):
            state = (stage if persisted else bookkeeping)(f"{nonce}-{flow_name}-{i}", return_state=True)
        return state

    @flow(name="noop-compaction")
    def sub() -> None:
        replay("compaction")

    @flow(name="noop-post-train")
    def top() -> None:
        last = replay("post-train")
        wait_until_recorded(last.state_details.task_run_id if last else None)
        sub()

    t = time.perf_counter()
    with direct_run_settings():
        top()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params" / "smoke.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", default=None, help="project folder to use and keep (default: a temp folder)")
    args = ap.parse_args()
    project = Path(args.keep or tempfile.mkdtemp(prefix="bench-orchestration-"))
    project.mkdir(parents=True, exist_ok=True)
    os.environ["COMPACTION_HOME"] = str(project)
    os.environ["PREFECT_HOME"] = str(project / ".prefect")
    params_file = str(Path(args.params).resolve())

    import mlflow
    from prefect import flow

    t = time.perf_counter()
    mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_experiments()
    migrate_s = time.perf_counter() - t

    @flow(name="warmup")
    def warmup() -> None:
        pass

    t = time.perf_counter()
    warmup()  # starts the ephemeral server: a fixed cost per process, not per stage
    server_s = time.perf_counter() - t

    import prefect.tasks

    from flows.direct import direct_run_settings, prepare_process

    t = time.perf_counter()
    prepare_process()  # first-use imports and the GC freeze: once per process, as `compaction run` does
    prepare_s = time.perf_counter() - t
    from flows.post_train import post_train
    from tasks.launch import JOB_SECONDS

    # Where the overhead goes: each task call's wall time, and the stage work inside it; and the
    # flow's shape (which flow called which kind of task) for the Prefect-only baseline.
    from prefect.context import FlowRunContext

    task_calls: list[tuple[str, float, float]] = []
    shape: list[tuple[str, bool]] = []
    task_call = prefect.tasks.Task.__call__

    def timed_task_call(self, *a, **k):
        ctx = FlowRunContext.get()
        shape.append((ctx.flow.name if ctx else "", bool(self.persist_result)))
        n0, t0 = len(JOB_SECONDS), time.perf_counter()
        try:
            return task_call(self, *a, **k)
        finally:
            task_calls.append((self.name, time.perf_counter() - t0, sum(s for _, s in JOB_SECONDS[n0:])))

    prefect.tasks.Task.__call__ = timed_task_call
    # Which layer the time outside jobs goes to: MLflow's stores (tracking and registry, SQLite)
    # and Prefect's API client (to the ephemeral server); the rest is Prefect's engine and our code.
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from prefect.client.orchestration import SyncPrefectClient

    from tasks.launch import in_job

    calls = CallTimer(in_job)
    calls.wrap(TrackingStore, "MLflow store")
    calls.wrap(RegistryStore, "MLflow store")
    calls.wrap(SyncPrefectClient, "Prefect API")
    JOB_SECONDS.clear()
    calls.on = True
    t = time.perf_counter()
    with direct_run_settings():  # as `compaction run` runs it
        state = post_train(params=params_file, overrides=args.overrides, return_state=True)
    flow_s = time.perf_counter() - t
    calls.on = False
    calls.restore()
    assert state.is_completed(), state.message
    prefect.tasks.Task.__call__ = task_call
    jobs_s = sum(s for _, s in JOB_SECONDS)
    overhead = flow_s - jobs_s
    in_tasks_s = sum(dt for _, dt, _ in task_calls)
    per_task = collections.defaultdict(list)
    for name, dt, job in task_calls:
        per_task[name].append(dt - job)

    floor_s = prefect_floor(shape, project / "artifacts" / "prefect-results-floor")

    cmd = [sys.executable, "-m", "cli", "run", "post-train", "--params", params_file,
           *[a for o in args.overrides for a in ("--set", o)]]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=project, env=os.environ.copy(), capture_output=True, text=True)
    cached_s = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-3000:]
    cached_lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "Finished in state" in ln]
    cached = sum("Cached" in ln for ln in cached_lines)

    print(f"project: {project}   params: {params_file} {' '.join(args.overrides)}")
    print(f"MLflow store migration (once per project):     {migrate_s:6.1f} s")
    print(f"Prefect ephemeral server start (once per run): {server_s:6.1f} s")
    print(f"first-use imports + GC freeze (once per run):  {prepare_s:6.1f} s")
    print(f"post-train flow wall time:                     {flow_s:6.1f} s   ({len(JOB_SECONDS)} jobs)")
    print(f"  inside jobs:                                 {jobs_s:6.1f} s")
    print(f"  orchestration overhead:                      {overhead:6.1f} s = {overhead / flow_s:.1%} of the flow "
          f"(target <= 10%); {(overhead + prepare_s) / (flow_s + prepare_s):.1%} with the imports and GC freeze")
    print(f"    in {len(task_calls)} task runs, around their jobs:   {in_tasks_s - jobs_s:6.1f} s "
          f"(mean {1000 * (in_tasks_s - jobs_s) / max(len(task_calls), 1):.0f} ms per task run)")
    print(f"    between task runs (flow runs, MLflow parent runs): {flow_s - in_tasks_s:6.1f} s")
    for layer in ("MLflow store", "Prefect API"):
        print(f"    {layer + ' calls:':<46} {calls.seconds[layer]:6.1f} s = {calls.seconds[layer] / flow_s:.1%} "
              f"({calls.calls[layer]} calls, mean {1000 * calls.seconds[layer] / max(calls.calls[layer], 1):.1f} ms)")
        top = sorted(((n, v) for n, v in calls.by_name.items() if n.startswith(layer)), key=lambda nv: -sum(nv[1]))[:6]
        print("      " + ", ".join(f"{n.split(': ')[1]} {1000 * sum(v):.0f} ms x{len(v)}" for n, v in top))
    rest = overhead - sum(calls.seconds.values())
    print(f"    {'the rest (Prefect engine, our task code):':<46} {rest:6.1f} s = {rest / flow_s:.1%}")
    print(f"  baseline, Prefect alone: this flow's shape with no-op tasks ({len(shape)} task runs, a subflow): "
          f"{floor_s:.1f} s = {floor_s / flow_s:.1%} of the flow; the overhead is {overhead / floor_s:.1f}x it")
    print("    per task, ms around the job (mean x runs): " + ", ".join(
        f"{name} {1000 * sum(v) / len(v):.0f} x{len(v)}" for name, v in sorted(per_task.items(), key=lambda kv: -sum(kv[1]))))
    print(f"fully cached rerun, new process (compaction run post-train): {cached_s:.1f} s (target <= 30 s); "
          f"{cached} cache hits among {len(cached_lines)} task and flow runs")


if __name__ == "__main__":
    main()
