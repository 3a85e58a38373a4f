"""Registry steps of the flows: resolve the checkpoint, register RLVR and compacted checkpoints
(the latter through the promotion gate), announce a new RLVR checkpoint. None is cached: each is
a few registry calls, and registration is idempotent (compaction.registry: one version per
checkpoint folder).
"""

from __future__ import annotations

from typing import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from compaction import registry
from compaction.params import Params
from tasks.cache import results_dir
from compaction.tracking import git_commit

LANDED_EVENT = "rlvr.checkpoint.landed"
LATEST_ALIAS = "latest"


def default_checkpoint(params: Params) -> str:
    return f"models:/{params.registry.rlvr_model}@{LATEST_ALIAS}"


@task(name="resolve_checkpoint", cache_policy=NO_CACHE)
def resolve_checkpoint(params: Params, checkpoint: str | None) -> dict:
    """``{"uri": what was asked (default models:/rlvr@latest), "version_uri": models:/name/N or None,
    "path": local checkpoint folder}``; a missing path or unknown version fails here, at once."""
    uri = checkpoint or default_checkpoint(params)
    version_uri = registry.get_version(params.tracking, uri).uri if registry.is_model_uri(uri) else None
    path = registry.resolve_checkpoint(params.tracking, uri, download_root=results_dir(params).parent / "registry")
    get_run_logger().info("checkpoint %s -> %s", uri, path)
    return {"uri": uri, "version_uri": version_uri, "path": path}


def _register(params: Params, name: str, checkpoint: str, run_id: str | None, stage_tags: dict[str, str],
              parent_run_id: str | None, extra_tags: dict[str, str]) -> registry.ModelVersionRef:
    """Register ``checkpoint`` under ``name``, logging it in ``run_id`` (the stage run that made it)
    or, when that run is not in this store (made by a flow run whose store was reset), in a new
    nested run with the stage's tags."""
    import mlflow

    from compaction import tracking

    existing = registry.find_version(params.tracking, name, checkpoint)
    if existing is not None:
        return existing
    tracking.configure(params.tracking)
    if run_id and not tracking.created_here(run_id):
        try:
            mlflow.MlflowClient().get_run(run_id)
        except Exception:
            run_id = None
    if run_id is None:
        with tracking.start_run(params.tracking, f"register-{name}", nested=True, parent_run_id=parent_run_id,
                                tags={**stage_tags, "git_commit": git_commit()}) as run:
            run_id = run.info.run_id
    return registry.register_checkpoint(params.tracking, name, checkpoint, run_id,
                                        tags={**extra_tags, "git_commit": git_commit()}, check_existing=False)


@task(name="register_rlvr", cache_policy=NO_CACHE)
def register_rlvr(params: Params, checkpoint: str, run_id: str | None, policy_ref: str,
                  parent_run_id: str | None) -> dict:
    """Register the RLVR checkpoint as a version of ``registry.rlvr_model`` (``models:/rlvr@latest``):
    ``{"name", "version", "uri": models:/name/N, "path": the registered copy, as compaction resolves it}``."""
    name = params.registry.rlvr_model
    mv = _register(params, name, checkpoint, run_id, {"stage": "rlvr", "model": "rlvr", "policy_ref": policy_ref},
                   parent_run_id, {"study": params.study})
    # No set_alias: MLflow reserves `latest` and resolves models:/name@latest to the newest version.
    path = registry.resolve_checkpoint(params.tracking, mv.uri, download_root=results_dir(params).parent / "registry")
    get_run_logger().info("registered %s as %s", checkpoint, mv.uri)
    return {"name": name, "version": mv.version, "uri": mv.uri, "path": path}


@task(name="register_compacted", cache_policy=NO_CACHE, task_run_name="register_compacted-{condition}")
def register_compacted(params: Params, checkpoint: str, run_id: str | None, condition: str, policy_ref: str,
                       evaluation: dict, baseline: dict, parent_run_id: str | None, model: str | None = None) -> dict:
    """Register an OPSD result as a version of ``registry.compacted_model`` (tags ``condition``,
    ``policy_ref``, ``eval_run_id``; ``model``: its label, default ``opsd-<condition>``, or the
    length-penalty baseline ``rlvr-lenpen``) through the promotion gate (compaction.promotion): alias
    ``candidate`` when, on every gated benchmark, accuracy drops by at most
    ``promotion.max_accuracy_drop`` points and responses are shorter; in every case the version
    tags ``promotion`` (the reason) and ``promotion_passed``.

    The verdict is decided before registering, so a new version is created with it; a version
    registered earlier (a rerun) gets the tags that changed (``eval_run_id``: this evaluation)."""
    from compaction.promotion import CANDIDATE_ALIAS, decide_promotion, verdict_tags

    name = params.registry.compacted_model
    promote, reason = decide_promotion(baseline["metrics"], evaluation["metrics"], params.promotion.benchmarks,
                                       params.promotion.max_accuracy_drop)
    model = model or f"opsd-{condition}"
    version_tags = {"condition": condition, "model": model, "policy_ref": policy_ref, "study": params.study,
                    "eval_run_id": evaluation["run_id"], **verdict_tags(promote, reason)}
    stage = "opsd" if model.startswith("opsd-") else "rlvr"
    mv = _register(params, name, checkpoint, run_id,
                   {"stage": stage, "condition": condition, "model": model, "policy_ref": policy_ref},
                   parent_run_id, version_tags)
    for key, value in version_tags.items():  # registered before: bring its tags up to date
        if mv.tags.get(key) != value:
            registry.set_version_tag(params.tracking, name, mv.version, key, value)
    if promote:  # a version that fails never takes the alias: an earlier one that passed keeps it
        registry.set_alias(params.tracking, name, CANDIDATE_ALIAS, mv.version)
    logger = get_run_logger()
    logger.info("registered %s [%s] as %s", checkpoint, condition, mv.uri)
    logger.info("%s: %s", mv.uri, reason)
    return {"name": name, "version": mv.version, "uri": mv.uri, "condition": condition,
            "metrics": evaluation["metrics"], "baseline_metrics": baseline["metrics"],
            "promoted": promote, "promotion": reason}


def landed_payload(registered: dict, params_file: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """The ``rlvr.checkpoint.landed`` payload: the checkpoint, and the study that made it (its
    params file, absolute, and overrides), which the ``opsd-correct`` trigger passes on so that the
    checkpoint is compacted with its own study's params (prefect.yaml). Without ``params_file`` the
    trigger falls back to the deployment's default, ``params/demo.yaml``."""
    payload = {"checkpoint": registered["uri"], "name": registered["name"], "version": registered["version"]}
    if params_file is not None:
        payload.update(params=str(params_file), overrides=list(overrides))
    return payload


@task(name="announce_checkpoint", cache_policy=NO_CACHE)
def announce_checkpoint(registered: dict, params_file: str | None = None, overrides: Sequence[str] = ()) -> str | None:
    """Emit ``rlvr.checkpoint.landed`` (resource ``rlvr.checkpoint.<name>.<version>``, payload
    :func:`landed_payload`): the trigger of the ``opsd-correct`` deployment."""
    from prefect.events import emit_event

    event = emit_event(
        event=LANDED_EVENT,
        resource={"prefect.resource.id": f"rlvr.checkpoint.{registered['name']}.{registered['version']}",
                  "prefect.resource.name": registered["uri"]},
        payload=landed_payload(registered, params_file, overrides),
    )
    get_run_logger().info("emitted %s for %s", LANDED_EVENT, registered["uri"])
    return str(event.id) if event else None
