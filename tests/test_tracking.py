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


def test_a_stage_run_nests_under_its_flow_run_takes_the_round_metrics_and_ends_with_them(params):
    """One stage task = one nested run: the rounds' metrics go there (step = round), not to the
    flow's run; it ends FINISHED, or FAILED when the stage raises."""
    from tasks.runs import flow_run, stage_run

    client = mlflow.MlflowClient(params.tracking.tracking_uri)
    with flow_run(params, "post-train") as parent:
        with stage_run(params, parent, "rlvr", {"stage": "rlvr"}, log_sections=("rlvr",)) as stage:
            assert client.get_run(stage).info.status == "RUNNING"
            for k in range(3):
                tracking.log_metrics_if_active({"rlvr/reward_mean": k}, step=k)
        with pytest.raises(RuntimeError), stage_run(params, parent, "opsd-all", {"stage": "opsd"}) as failed:
            raise RuntimeError("the job failed")
    run = client.get_run(stage)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.params["rlvr.rounds"] == str(params.rlvr.rounds)
    assert [m.step for m in client.get_metric_history(stage, "rlvr/reward_mean")] == [0, 1, 2]
    assert "rlvr/reward_mean" not in client.get_run(parent).data.metrics
    assert run.info.status == "FINISHED" and client.get_run(failed).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FINISHED"


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
