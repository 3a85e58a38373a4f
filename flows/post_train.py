"""Flow ``post-train``: data -> base model -> SFT -> RLVR -> register -> compaction.

    prepare_data -> prepare_model -> sft -> evaluate (sft)
    -> rlvr (one job, every round) -> register models:/rlvr/N (alias latest) -> evaluate (rlvr)
    -> emit rlvr.checkpoint.landed -> compaction(checkpoint=models:/rlvr/N) as a subflow

Every stage is a cached task: a rerun after a crash takes completed stages from the cache, and
relaunches the stage that was running, whose job resumes from its newest checkpoint.
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect import flow

from flows.compact import check_conditions, compaction
from tasks.runs import flow_params_file, flow_run, load_flow_params
from tasks.data import prepare_data, prepare_model
from tasks.evaluate import evaluate, record_evaluation
from tasks.registry import announce_checkpoint, register_rlvr
from tasks.launch import ensure_job_limit
from tasks.rlvr import rlvr
from tasks.sft import sft


def wait_until_recorded(task_run_id: UUID | None, timeout_s: float = 2.0) -> None:
    """Wait (up to ``timeout_s``) until the server has recorded the final state of ``task_run_id``.

    Task runs reach the server as events, written one by one by its task-run recorder, while a
    subflow's tracking task run is created by a direct API call that reads, then writes. On
    SQLite, a recorder commit between that read and write fails the call ("database is locked",
    HTTP 503) and the client retries only after 2 s. Starting the subflow once the previous task
    is on record (a few 20 ms polls) avoids that collision in nearly every run.
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    if task_run_id is None:
        return
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                state = client.read_task_run(task_run_id).state
                if state is not None and state.is_final():
                    return
            except ObjectNotFound:
                pass
            time.sleep(0.02)


@flow(name="post-train", log_prints=True)
def post_train(params: str = "params/demo.yaml", overrides: list[str] = [],  # noqa: B006 (Prefect parameter)
               conditions: list[str] | None = None) -> dict:
    p = load_flow_params(params, overrides)
    check_conditions(conditions, p.opsd.conditions)  # fail before training, not after
    ensure_job_limit(p)
    with flow_run(p, "post-train") as parent:
        data = prepare_data(p, parent)
        base = prepare_model(p, data["problems"], data["traces"])["checkpoint"]
        if data["traces"] is None:
            raise ValueError(f"data.source={p.data.source!r} has no SFT traces; post-train needs them")
        trained = sft(p, base, data["traces"], parent)
        sft_ckpt = trained["checkpoint"]
        record_evaluation(p, evaluate(p, sft_ckpt, data["problems"]), "sft", None, sft_ckpt, parent,
                          train_run_id=trained["run_id"])

        trained_rlvr = rlvr(p, sft_ckpt, data["problems"], parent)
        rlvr_ckpt = trained_rlvr["checkpoint"]
        registered = register_rlvr(p, rlvr_ckpt, trained_rlvr["run_id"], sft_ckpt, parent)
        # Evaluate the registered copy: the path compaction resolves models:/rlvr/N to, so its
        # baseline evaluation is this one, from the cache.
        record_evaluation(p, evaluate(p, registered["path"], data["problems"]), "rlvr", None, registered["uri"], parent,
                          train_run_id=trained_rlvr["run_id"])
        announced = announce_checkpoint(registered, str(flow_params_file(params).resolve()), list(overrides),
                                        return_state=True)
        wait_until_recorded(announced.state_details.task_run_id)
        result = compaction(params=params, overrides=overrides, checkpoint=registered["uri"], conditions=conditions)
        return {"sft": sft_ckpt, "rlvr": registered, "compaction": result, "mlflow_run_id": parent}
