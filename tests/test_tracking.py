import mlflow
import pytest

from compaction import tracking
from compaction.params import load_params


@pytest.fixture
def params(tmp_path):
    return load_params(None, ["tracking.experiment=t", "tracking.system_metrics=false"], base=tmp_path)


def test_runs_params_and_metrics_land_in_absolute_sqlite_store(params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # the store must not depend on the working directory
    with tracking.start_run(params.tracking, "parent", tags={"stage": "flow"}) as parent:
        tracking.log_params({"sft": {"lr": 0.1, "sizes": [1, 2]}})
        with tracking.start_run(params.tracking, "child", nested=True, tags={"stage": "sft"}) as child:
            for step in range(3):
                tracking.log_metrics({"sft/loss": 1.0 / (step + 1), "sft/bad": float("nan")}, step=step)
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    p = client.get_run(parent.info.run_id)
    c = client.get_run(child.info.run_id)
    assert p.data.params == {"sft.lr": "0.1", "sft.sizes": "[1, 2]"}
    assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.data.tags["stage"] == "sft"
    history = client.get_metric_history(child.info.run_id, "sft/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert "sft/bad" not in c.data.metrics
    exp = client.get_experiment_by_name("t")
    assert exp.artifact_location.startswith(f"file://{tmp_path.resolve()}/mlartifacts")


def test_many_params_are_batched(params):
    with tracking.start_run(params.tracking, "many") as run:
        tracking.log_params({f"k{i}": i for i in range(250)})
    assert len(mlflow.MlflowClient(params.tracking.tracking_uri).get_run(run.info.run_id).data.params) == 250


def test_relative_sqlite_uri_is_refused(params):
    params.tracking.tracking_uri = "sqlite:///rel/mlflow.db"
    with pytest.raises(ValueError, match="absolute"):
        tracking.configure(params.tracking)


def test_attached_run_gets_the_metrics_and_its_status_back(params):
    """A stage's later rounds attach to its run (tasks.base.stage_run): metrics go there, not to the
    active (parent) run, and the run ends FINISHED, or FAILED when the round raises."""
    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    with tracking.start_run(params.tracking, "flow") as parent:
        with tracking.start_run(params.tracking, "stage", nested=True) as stage:
            tracking.log_metrics({"opsd/loss": 1.0}, step=0)
        with tracking.attach_run(params.tracking, stage.info.run_id):
            assert client.get_run(stage.info.run_id).info.status == "RUNNING"
            tracking.log_metrics_if_active({"opsd/loss": 0.5}, step=1)
        with pytest.raises(RuntimeError), tracking.attach_run(params.tracking, stage.info.run_id):
            tracking.log_metrics({"opsd/loss": 0.25}, step=2)
            raise RuntimeError("round failed")
    history = client.get_metric_history(stage.info.run_id, "opsd/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert "opsd/loss" not in client.get_run(parent.info.run_id).data.metrics
    assert client.get_run(stage.info.run_id).info.status == "FAILED"
    with tracking.attach_run(params.tracking, stage.info.run_id):
        pass
    assert client.get_run(stage.info.run_id).info.status == "FINISHED"


def test_a_stage_run_stays_running_between_rounds_and_ends_with_the_last_or_with_its_flow(params):
    """Rounds that are not the stage's last leave its run RUNNING (the stage is running); the last
    round finishes it; a flow that fails between two rounds marks it FAILED, not RUNNING forever."""
    from tasks.base import flow_run, stage_run

    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    status = lambda run_id: client.get_run(run_id).info.status  # noqa: E731
    with flow_run(params, "post-train") as parent:
        for k in range(3):
            with stage_run(params, parent, "rlvr", {"stage": "rlvr"}, last_round=k == 2) as stage:
                tracking.log_metrics({"rlvr/reward_mean": k}, step=k)
            assert status(stage) == ("FINISHED" if k == 2 else "RUNNING")
    assert [m.step for m in client.get_metric_history(stage, "rlvr/reward_mean")] == [0, 1, 2]
    assert status(parent) == "FINISHED"

    with pytest.raises(RuntimeError), flow_run(params, "post-train") as parent:
        with stage_run(params, parent, "rlvr", {"stage": "rlvr"}, last_round=False) as stage:
            pass
        assert status(stage) == "RUNNING"
        raise RuntimeError("the next round failed")
    assert status(stage) == "FAILED" and status(parent) == "FAILED"


def test_sqlite_store_in_wal_mode_lets_a_reader_and_a_writer_work_at_once(params, tmp_path):
    """``mlflow ui`` reading the store while a job logs: in WAL mode the write commits at once
    (in SQLite's default rollback journal it waits for the reader, then fails "database is locked")."""
    import sqlite3

    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    with tracking.start_run(params.tracking, "r") as run:
        tracking.log_metrics({"sft/loss": 1.0}, step=0)
        reader = sqlite3.connect(tmp_path / "mlflow.db")
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM metrics").fetchone()[0] == 1  # holds its snapshot
            tracking.log_metrics({"sft/loss": 0.5}, step=1)
            assert reader.execute("SELECT count(*) FROM metrics").fetchone()[0] == 1
        finally:
            reader.close()
    assert [m.value for m in client.get_metric_history(run.info.run_id, "sft/loss")] == [1.0, 0.5]
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_two_checkpoints_registered_from_one_run_keep_their_own_weights(params, tmp_path):
    """One stage run can make two registered checkpoints: a flow run that asks for fewer rounds
    registers an earlier round of a run whose last round was registered before. The second must
    not be logged over the first version's files."""
    from pathlib import Path

    from compaction import registry

    late, early = tmp_path / "round-0095" / "model", tmp_path / "round-0063" / "model"
    for folder, weights in ((late, "round 95"), (early, "round 63")):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "weights.txt").write_text(weights)
    with tracking.start_run(params.tracking, "rlvr") as run:
        pass
    first = registry.register_checkpoint(params.tracking, "rlvr", late, run.info.run_id)
    second = registry.register_checkpoint(params.tracking, "rlvr", early, run.info.run_id)
    assert (first.version, second.version) == ("1", "2")
    assert first.source == f"runs:/{run.info.run_id}/checkpoint"
    assert second.source == f"runs:/{run.info.run_id}/checkpoint-2"
    first_dir = registry.resolve_checkpoint(params.tracking, first.uri)
    second_dir = registry.resolve_checkpoint(params.tracking, second.uri)
    assert Path(first_dir, "weights.txt").read_text() == "round 95"
    assert Path(second_dir, "weights.txt").read_text() == "round 63"
    # A folder registered before is its version again, with no new files.
    assert registry.register_checkpoint(params.tracking, "rlvr", early, run.info.run_id).version == "2"
    assert sorted(Path(f.path).name for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)) == [
        "checkpoint", "checkpoint-2"]
