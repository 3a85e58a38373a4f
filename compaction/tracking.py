"""MLflow tracking basics: an absolute SQLite store, (nested) runs, flattened params, step metrics.

MLflow's defaults are relative to the working directory (``./mlflow.db``, ``./mlruns``),
and Prefect workers and accelerate processes change directory, so the store and the
artifact root are always absolute (the params loader resolves them). The URI is also put
in ``MLFLOW_TRACKING_URI`` because accelerate's MLflow tracker reads it only from there.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from compaction.params import TrackingParams, flatten

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
BATCH = 100  # MLflow accepts at most 100 params per log_batch call


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
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(tracking: TrackingParams, name: str | None = None) -> str:
    """Get or create the experiment (artifacts under the absolute artifact root); returns its id."""
    import mlflow

    configure(tracking)
    name = name or tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
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
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_metrics_if_active(metrics: Mapping[str, float], step: int | None = None) -> None:
    """``log_metrics`` when an MLflow run is active (a job launched by a task, inline or, through
    ``MLFLOW_RUN_ID``, in a subprocess); never raises, because tracking must not kill training."""
    try:
        import mlflow

        if mlflow.active_run() is None and os.environ.get("MLFLOW_RUN_ID"):
            # A job launched by a task in a subprocess (accelerate): the task put its stage run's
            # id in MLFLOW_RUN_ID (with MLFLOW_TRACKING_URI); attach to it once.
            mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
        if mlflow.active_run() is not None:
            log_metrics(metrics, step=step)
    except Exception:
        pass
