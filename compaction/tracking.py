"""MLflow tracking basics: an absolute SQLite store, (nested) runs, flattened params, step metrics.

MLflow's defaults are relative to the working directory (``./mlflow.db``, ``./mlruns``),
and Prefect workers and accelerate processes change directory, so the store and the
artifact root are always absolute (the params loader resolves them). The URI is also put
in ``MLFLOW_TRACKING_URI`` because accelerate's MLflow tracker reads it only from there.

A SQLite store is switched to write-ahead logging with ``synchronous=NORMAL`` on our connections
(:func:`use_write_ahead_log`): in SQLite's default rollback journal every commit waits for several
fsyncs, 10-50 ms each on a VM disk, and a flow makes hundreds of small MLflow commits. In WAL mode
a commit is an append; readers (``mlflow ui``) no longer block writers. A committed write survives
a killed process; only an OS crash or power cut can lose the last commits, never corrupt the file.
The store is then three files (``mlflow.db``, ``-wal``, ``-shm``): copy it with
``sqlite3 mlflow.db ".backup copy.db"`` or while nothing writes, not with ``cp mlflow.db`` alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from compaction.params import TrackingParams, flatten

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
BATCH = 100  # MLflow accepts at most 100 params per log_batch call

#: The run that :func:`attach_run` attached to: :func:`log_metrics` writes there, before MLflow's
#: active run (which, inside a flow, is the flow's parent run).
_attached_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("compaction_attached_run", default=None)
#: Experiment ids by (tracking URI, name): an experiment is never renamed, and looking it up costs
#: a query per stage run.
_experiment_ids: dict[tuple[str, str], str] = {}
#: SQLite store files put in WAL mode by this process (see the module docstring).
_wal_databases: set[str] = set()


def _relax_sync_on_wal_databases(dbapi_connection, connection_record) -> None:
    """SQLAlchemy ``connect`` hook: ``synchronous=NORMAL`` (a per-connection setting) on new
    connections to one of :data:`_wal_databases`; any other database is left alone."""
    if type(dbapi_connection).__module__ != "sqlite3":
        return
    files = {os.path.realpath(row[2]) for row in dbapi_connection.execute("PRAGMA database_list") if row[2]}
    if files & _wal_databases:
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def use_write_ahead_log(db: Path) -> None:
    """Put the SQLite file ``db`` in WAL mode (persistent, in the file) and have this process's
    SQLAlchemy connections to it commit with ``synchronous=NORMAL``; once per file and process."""
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    key = os.path.realpath(db)
    if key in _wal_databases:
        return
    if not _wal_databases:
        event.listen(Engine, "connect", _relax_sync_on_wal_databases)
    con = sqlite3.connect(key, timeout=30)
    try:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        con.close()
    if mode.lower() == "wal":  # a file system without shared memory keeps the rollback journal
        _wal_databases.add(key)


def configure(tracking: TrackingParams) -> str:
    """Point MLflow at the project store (creating its folder); returns the tracking URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking.tracking_uri
    if not uri:
        raise ValueError("tracking.tracking_uri is empty: load params with compaction.params.load_params")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_absolute():
            raise ValueError(f"tracking.tracking_uri must be an absolute sqlite path, got {uri!r}")
        db.parent.mkdir(parents=True, exist_ok=True)
        use_write_ahead_log(db)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(tracking: TrackingParams, name: str | None = None) -> str:
    """Get or create the experiment (artifacts under the absolute artifact root); returns its id."""
    import mlflow

    uri = configure(tracking)
    name = name or tracking.experiment
    if (uri, name) in _experiment_ids:
        return _experiment_ids[uri, name]
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        _experiment_ids[uri, name] = exp.experiment_id
        return exp.experiment_id
    root = Path(tracking.artifact_root or "mlartifacts").resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.create_experiment(name, artifact_location=(root / name).as_uri())
    except Exception:
        # Another process created it between our lookup and create.
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def start_run(
    tracking: TrackingParams, run_name: str, nested: bool = False, tags: Mapping[str, str] | None = None,
    experiment: str | None = None, parent_run_id: str | None = None,
) -> Iterator[Any]:
    """Start an MLflow run in the study's experiment; nested under the active (or given) parent."""
    import mlflow

    exp_id = ensure_experiment(tracking, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, nested=nested or parent_run_id is not None, tags=all_tags,
        log_system_metrics=tracking.system_metrics,
    ) as run:
        yield run


@contextlib.contextmanager
def attach_run(tracking: TrackingParams, run_id: str) -> Iterator[str]:
    """Log into the existing run ``run_id`` for the duration (:func:`log_metrics` writes there)
    without reopening it as MLflow's active run: ``mlflow.start_run(run_id=...)`` reads the whole
    run and writes its status twice, ~40 ms for each round of a stage. At the end the run is
    marked finished (or failed) again, so its end time is the last round's; system metrics, when
    ``tracking.system_metrics`` is on, continue where the run's last round left them."""
    import mlflow

    configure(tracking)
    client = mlflow.MlflowClient()
    client.update_run(run_id, status="RUNNING")  # what the UI shows while the round runs
    monitor = None
    if tracking.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True)
        monitor.start()
    token = _attached_run.set(run_id)
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        _attached_run.reset(token)
        if monitor is not None:
            monitor.finish()
        client.set_terminated(run_id, status=status)


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log a nested mapping as flattened ``a.b.c`` params (values cut to MLflow's limit)."""
    import mlflow
    from mlflow.entities import Param

    flat = flatten(dict(params), prefix)
    items = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in flat.items()]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for i in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[i: i + BATCH])


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses ``@`` in metric names: ``eval/<bench>/pass@k`` is logged as ``pass_at_k``."""
    return name.replace("@", "_at_")


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log ``{"<stage>/<name>": value}`` at ``step``; non-finite and non-numeric values are skipped."""
    import math

    import mlflow

    clean = {mlflow_metric_name(k): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    if not clean:
        return
    attached = _attached_run.get()
    if attached is None:
        mlflow.log_metrics(clean, step=step)
        return
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(attached, metrics=[Metric(k, v, now_ms, step or 0) for k, v in clean.items()])


def log_metrics_if_active(metrics: Mapping[str, float], step: int | None = None) -> None:
    """``log_metrics`` when an MLflow run is active (a job launched by a task, inline or, through
    ``MLFLOW_RUN_ID``, in a subprocess); never raises, because tracking must not kill training."""
    try:
        import mlflow

        if mlflow.active_run() is None and os.environ.get("MLFLOW_RUN_ID"):
            # A job launched by a task in a subprocess (accelerate): the task put its stage run's
            # id in MLFLOW_RUN_ID (with MLFLOW_TRACKING_URI); attach to it once.
            mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
        if _attached_run.get() is not None or mlflow.active_run() is not None:
            log_metrics(metrics, step=step)
    except Exception:
        pass
