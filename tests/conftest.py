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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port with its own PREFECT_HOME, shared by
    the flow and deployment tests (one ~10 s start per session), and made the API of this process.

    Yields ``{"url", "env"}``: ``env`` is the environment for subprocesses (CLI, workers, flows)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": url, "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    prefect = str(Path(sys.executable).parent / "prefect")
    log = open(home / "server.log", "w")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    with temporary_settings({PREFECT_API_URL: url}):
        yield {"url": url, "env": env, "home": home}
        # Send buffered logs and events while the server is up: at exit they would retry for a minute.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
@pytest.fixture
def project(tmp_path, mlflow_db_template) -> Path:
    """A project folder (COMPACTION_HOME) whose mlflow.db is a copy of the migrated template."""
    import shutil

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    return tmp_path
