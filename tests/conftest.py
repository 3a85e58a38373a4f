"""Shared fixtures: offline environment, a tiny embedded model built once per session."""

from __future__ import annotations

import os

# Offline and quiet before any of the stack is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_params(tmp_path_factory):
    """params/smoke.yaml with the project folder in a temp dir (artifacts and MLflow store there)."""
    from compaction.params import load_params

    return load_params(REPO / "params" / "smoke.yaml", base=tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="session")
def smoke_data(smoke_params):
    from jobs import prepare_data

    return prepare_data.run(smoke_params)


@pytest.fixture(scope="session")
def tiny_model(smoke_params, smoke_data) -> str:
    """Path of the embedded tiny Qwen3 (random weights) built from the smoke params."""
    from jobs import prepare_model

    return prepare_model.run(smoke_params, smoke_data["problems"], smoke_data["traces"])


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store (migrating one takes ~6 s): copy it, don't migrate again."""
    import mlflow

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def project(tmp_path, mlflow_db_template) -> Path:
    """A project folder (COMPACTION_HOME) whose mlflow.db is a copy of the migrated template."""
    import shutil

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    return tmp_path
