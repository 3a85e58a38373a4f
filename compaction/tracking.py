"""MLflow tracking basics: an absolute SQLite store, (nested) runs, flattened params, step metrics.

MLflow's defaults are relative to the working directory (``./mlflow.db``, ``./mlruns``),
and Prefect workers and accelerate processes change directory, so the store and the
artifact root are always absolute (the params loader resolves them). The URI is also put
in ``MLFLOW_TRACKING_URI`` because accelerate's MLflow tracker reads it only from there.

A SQLite store is switched to write-ahead logging with ``synchronous=NORMAL`` on our connections
(:func:`use_write_ahead_log`): in SQLite's default rollback journal every commit waits for several
fsyncs (slow on a VM disk), and a flow makes hundreds of small MLflow commits. In WAL mode
a commit is an append; readers (``mlflow ui``) no longer block writers. A committed write survives
a killed process; only an OS crash or power cut can lose the last commits, never corrupt the file.
The store is then three files (``mlflow.db``, ``-wal``, ``-shm``): copy it with
``sqlite3 mlflow.db ".backup copy.db"`` or while nothing writes, not with ``cp mlflow.db`` alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from compaction.params import TrackingParams, flatten

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
BATCH = 100  # MLflow accepts at most 100 params per log_batch call

#: The run that :func:`start_run` made current: :func:`log_params` and
#: :func:`log_metrics` write there, before MLflow's active run (a job in an accelerate process).
_current_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("compaction_current_run", default=None)
#: Experiment ids by (tracking URI, name): an experiment is never renamed, and looking it up costs
#: a query per stage run.
_experiment_ids: dict[tuple[str, str], str] = {}
#: Runs created by :func:`start_run` in this process (:func:`created_here`).
_created_runs: set[str] = set()
#: Artifact URIs by run id (:func:`artifact_uri`): fixed when a run is created.
_artifact_uris: dict[str, str] = {}
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


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """The commit of this checkout (the ``git_commit`` tag of every run); ``unknown`` outside git."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout.strip() if out.returncode == 0 else "") or "unknown"


def eval_runs_url(tracking: TrackingParams, ui: str = "http://127.0.0.1:5000") -> str | None:
    """The MLflow UI's runs page of the study's experiment filtered to its evaluation runs (tag
    ``stage = 'eval'``): where a person compares accuracy and length, one click from nothing.
    None when the store has no such experiment yet."""
    import urllib.parse

    import mlflow

    experiment = mlflow.MlflowClient(tracking.tracking_uri).get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return None
    query = urllib.parse.quote("tags.stage = 'eval'")
    return f"{ui.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs?searchFilter={query}"


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


def created_here(run_id: str | None) -> bool:
    """Whether :func:`start_run` created ``run_id`` in this process: it exists, and (runs are
    never deleted by the pipeline) a caller need not read it back to check."""
    return run_id in _created_runs


def artifact_uri(run_id: str) -> str:
    """The artifact URI of ``run_id`` (read from the store once per process; a run's is never changed)."""
    if run_id not in _artifact_uris:
        import mlflow

        _artifact_uris[run_id] = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
    return _artifact_uris[run_id]


@functools.lru_cache(maxsize=None)
def _context_tags() -> dict[str, str]:
    """MLflow's tags for this process's runs (``context_registry.resolve_tags``: user, source,
    git commit of the entry point): the same for every run of a process, so resolved once."""
    from mlflow.tracking.context import registry as context_registry

    return dict(context_registry.resolve_tags())


def current_run_id() -> str | None:
    """The run that :func:`start_run` made current in this context (None: none)."""
    return _current_run.get()


@contextlib.contextmanager
def start_run(
    tracking: TrackingParams, run_name: str, nested: bool = False, tags: Mapping[str, str] | None = None,
    experiment: str | None = None, parent_run_id: str | None = None,
) -> Iterator[Any]:
    """Create a run in the study's experiment, nested under ``parent_run_id`` (or, with ``nested``,
    under the current run), and make it current: :func:`log_params` and :func:`log_metrics` write
    there. Yields MLflow's ``Run``; at the end the run is marked FINISHED (FAILED on an exception).

    Not ``mlflow.start_run``: that reads the parent run back (its params, tags and metrics) to check
    it, a store round trip per run, and a flow starts one run per stage and evaluation. The tags are
    MLflow's own (``context_registry.resolve_tags``: user, source, git commit) plus ours.
    """
    import mlflow

    exp_id = ensure_experiment(tracking, experiment)
    parent = parent_run_id or (current_run_id() if nested else None)
    all_tags = {**_context_tags(), **(tags or {}), "mlflow.runName": run_name}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = mlflow.MlflowClient().create_run(exp_id, tags=all_tags, run_name=run_name)
    _created_runs.add(run.info.run_id)
    _artifact_uris[run.info.run_id] = run.info.artifact_uri
    with _current(tracking, run.info.run_id):
        yield run


@contextlib.contextmanager
def _current(tracking: TrackingParams, run_id: str) -> Iterator[None]:
    """``run_id`` as the current run, with system metrics when asked; terminated at the end."""
    import mlflow

    monitor = None
    if tracking.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id)
        monitor.start()
    token = _current_run.set(run_id)
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        _current_run.reset(token)
        if monitor is not None:
            monitor.finish()
        mlflow.MlflowClient().set_terminated(run_id, status=status)


def log_params(params: Mapping[str, Any], prefix: str = "",
               metrics: Mapping[str, float] | None = None, step: int | None = None) -> None:
    """Log a nested mapping as flattened ``a.b.c`` params (values cut to MLflow's limit), and
    ``metrics`` (as :func:`log_metrics`) in the first of the same ``log_batch`` calls."""
    import mlflow
    from mlflow.entities import Param

    flat = flatten(dict(params), prefix)
    items = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in flat.items()]
    client = mlflow.MlflowClient()
    run_id = current_run_id() or mlflow.active_run().info.run_id
    metric_items = _metric_items(metrics or {}, step)
    if not items and not metric_items:
        return
    for i in range(0, max(len(items), 1), BATCH):
        client.log_batch(run_id, params=items[i: i + BATCH], metrics=metric_items if i == 0 else [])


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses ``@`` in metric names: ``eval/<bench>/pass@k`` is logged as ``pass_at_k``."""
    return name.replace("@", "_at_")


def _metric_items(metrics: Mapping[str, float], step: int | None) -> list:
    """MLflow ``Metric`` entities for the finite numeric values of ``metrics`` (names made legal)."""
    import math

    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    return [Metric(mlflow_metric_name(k), float(v), now_ms, step or 0) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log ``{"<stage>/<name>": value}`` at ``step``; non-finite and non-numeric values are skipped."""
    import mlflow

    items = _metric_items(metrics, step)
    if not items:
        return
    run_id = current_run_id()
    if run_id is None:
        mlflow.log_metrics({m.key: m.value for m in items}, step=step)
        return
    mlflow.MlflowClient().log_batch(run_id, metrics=items)


def log_metrics_if_active(metrics: Mapping[str, float], step: int | None = None) -> None:
    """``log_metrics`` when an MLflow run is active (a job launched by a task, inline or, through
    ``MLFLOW_RUN_ID``, in a subprocess); never raises, because tracking must not kill training."""
    try:
        import mlflow

        if current_run_id() is None and mlflow.active_run() is None and os.environ.get("MLFLOW_RUN_ID"):
            # A job launched by a task in a subprocess (accelerate): the task put its stage run's
            # id in MLFLOW_RUN_ID (with MLFLOW_TRACKING_URI); attach to it once.
            mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
        if current_run_id() is not None or mlflow.active_run() is not None:
            log_metrics(metrics, step=step)
    except Exception:
        pass
