"""The MLflow model registry as the pipeline uses it: checkpoints in, ``models:/`` URIs out.

A checkpoint is logged with ``log_artifacts`` under ``checkpoint/`` of a run and registered with
``MlflowClient.create_model_version(name, source="runs:/<id>/checkpoint", run_id=id)``
(``mlflow.register_model`` and ``mlflow.transformers.log_model`` both fail here, see
FIELD-NOTES). Registration is idempotent: a version remembers the folder it was made from
(tag ``source_dir``), and registering the same folder again returns that version, so a cached
rerun of a flow does not mint a new version (whose new path would change every downstream
cache key).

``resolve_checkpoint`` turns ``models:/name/version`` or ``models:/name@alias`` into a local
checkpoint folder: the artifact folder itself when the store is local (``file://``), else a
download under ``<artifacts>/registry/<name>/<version>/`` (renamed into place when complete).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from compaction.artifacts import atomic_dir
from compaction.params import TrackingParams

URI_PATTERN = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")
SOURCE_TAG = "source_dir"
CHECKPOINT_ARTIFACT = "checkpoint"


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    run_id: str | None
    source: str
    tags: Mapping[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def is_model_uri(ref: str) -> bool:
    return ref.startswith("models:/")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@alias`` -> (name, None, alias)."""
    m = URI_PATTERN.match(uri)
    if not m:
        raise ValueError(f"{uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return m["name"], m["version"], m["alias"]


#: (tracking URI, name) of the registered models this process created or found: a registered model
#: is only deleted by hand, so it is not created again (one registry call per registration less).
_registered_names: set[tuple[str, str]] = set()


def _client(tracking: TrackingParams):
    from compaction.tracking import configure

    import mlflow

    return mlflow.MlflowClient(configure(tracking))


def _ref(mv) -> ModelVersionRef:
    return ModelVersionRef(mv.name, str(mv.version), mv.run_id, mv.source, dict(mv.tags or {}))


def find_version(tracking: TrackingParams, name: str, source_dir: str | Path) -> ModelVersionRef | None:
    """The version of ``name`` registered from ``source_dir``, if any."""
    client = _client(tracking)
    src = str(Path(source_dir).resolve())
    for mv in client.search_model_versions(f"name = '{name}'"):
        if (mv.tags or {}).get(SOURCE_TAG) == src:
            return _ref(mv)
    return None


def register_checkpoint(tracking: TrackingParams, name: str, checkpoint_dir: str | Path, run_id: str,
                        tags: Mapping[str, str] | None = None, description: str | None = None,
                        check_existing: bool = True) -> ModelVersionRef:
    """Log ``checkpoint_dir`` under ``checkpoint/`` of run ``run_id`` (``checkpoint-2/``, ... when the
    run already holds one) and register it as a version of ``name``; returns the existing version
    when this folder was registered before
    (``check_existing=False``: the caller has just looked, with :func:`find_version`)."""
    ckpt = Path(checkpoint_dir).resolve()
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: not a checkpoint folder (no config.json)")
    existing = find_version(tracking, name, ckpt) if check_existing else None
    if existing is not None:
        return existing
    client = _client(tracking)
    repo = _artifact_repo(client, run_id)
    artifact_path = _free_artifact_path(repo, CHECKPOINT_ARTIFACT)
    repo.log_artifacts(str(ckpt), artifact_path)
    if (client.tracking_uri, name) not in _registered_names:
        try:
            client.create_registered_model(name)
        except Exception:  # already exists (RESOURCE_ALREADY_EXISTS)
            pass
        _registered_names.add((client.tracking_uri, name))
    all_tags = {SOURCE_TAG: str(ckpt), **(tags or {})}
    mv = client.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                     tags=all_tags, description=description)
    return _ref(mv)


def _artifact_repo(client, run_id: str):
    """The run's artifact repository, for listing and logging: ``MlflowClient.list_artifacts`` and
    ``log_artifacts`` each read the whole run back to find its artifact URI."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from compaction.tracking import artifact_uri

    return get_artifact_repository(artifact_uri(run_id), tracking_uri=client.tracking_uri)


def _free_artifact_path(repo, base: str) -> str:
    """``base``, else ``base-2``, ``base-3``, ...: the first artifact folder the run does not have.

    One run can make several registered checkpoints: the rounds of a stage run are cached, so a
    later flow run that asks for fewer rounds registers an earlier round of the same run. Logging
    it over the run's ``checkpoint/`` would change the weights behind a version registered before.
    """
    taken = {Path(f.path).name for f in repo.list_artifacts() if f.is_dir}
    path, k = base, 1
    while path in taken:
        k += 1
        path = f"{base}-{k}"
    return path


def set_alias(tracking: TrackingParams, name: str, alias: str, version: str) -> None:
    _client(tracking).set_registered_model_alias(name, alias, str(version))


def set_version_tag(tracking: TrackingParams, name: str, version: str, key: str, value: str) -> None:
    _client(tracking).set_model_version_tag(name, str(version), key, value)


def get_version(tracking: TrackingParams, uri: str) -> ModelVersionRef:
    """The registry entry behind ``models:/name/version`` or ``models:/name@alias``."""
    name, version, alias = parse_model_uri(uri)
    client = _client(tracking)
    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        raise LookupError(f"{uri}: not in the registry at {tracking.tracking_uri} ({exc})") from None
    return _ref(mv)


def list_versions(tracking: TrackingParams, name: str) -> list[ModelVersionRef]:
    """Every version of ``name``, oldest first (empty when the model is not registered)."""
    client = _client(tracking)
    versions = [_ref(mv) for mv in client.search_model_versions(f"name = '{name}'")]
    return sorted(versions, key=lambda v: int(v.version))


def resolve_checkpoint(tracking: TrackingParams, ref: str, download_root: str | Path | None = None) -> str:
    """A local checkpoint folder for ``ref``: a ``models:/`` URI through the registry, or a path that
    must exist."""
    if not is_model_uri(ref):
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {ref}: no such folder")
        return str(path.resolve())
    from compaction.tracking import artifact_uri

    mv = get_version(tracking, ref)
    location = mv.source
    if location.startswith("runs:/"):  # runs:/<id>/<path> -> the run's artifact folder + path
        run_id, _, sub = location[len("runs:/"):].partition("/")
        location = artifact_uri(run_id).rstrip("/") + "/" + sub
    if location.startswith("file://") or location.startswith("/"):
        local = Path(location[len("file://"):] if location.startswith("file://") else location)
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{ref} (version {mv.version}): artifact folder {local} is missing or incomplete")
        return str(local)
    if download_root is None:
        raise ValueError(f"{ref}: remote artifact store ({location}) needs a download_root")
    import mlflow

    dest = Path(download_root) / mv.name / mv.version
    if not (dest / "config.json").is_file():
        with atomic_dir(dest) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp)))
            if got != tmp:  # the artifact folder lands inside dst_path under its own name
                for item in got.iterdir():
                    shutil.move(str(item), tmp / item.name)
                shutil.rmtree(got, ignore_errors=True)
    return str(dest)
