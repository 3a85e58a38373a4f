"""Stage rlvr: one cached task, one job for every round (jobs/rlvr.py).

Keyed by the ``rlvr`` section (without ``save_every`` and ``keep_checkpoints``, which do not
change the result), ``model``, the rollout fields the job reads, ``grading``, the starting policy
and the problems. The job writes ``artifacts/rlvr/<key>/`` (round records, checkpoints,
``final/``); a task run again after a crash relaunches it, and it resumes from its newest
checkpoint. The rounds log into the nested MLflow run ``rlvr`` (step = round), and a Prefect
progress artifact advances every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compaction.params import Params
from compaction.rounds import final_dir, stage_finished
from tasks.cache import StagePolicy, call, stage_key, stage_task
from tasks.launch import StageProgress, grader_for, launch
from tasks.runs import stage_run

SECTIONS = ("rlvr", "model", "rollout.backend", "rollout.batch_size", "rollout.hf_decoder", "grading")
#: Fields that do not change the stage's result (checkpoints are bitwise-neutral).
EXCLUDE = {"rlvr": ("save_every", "keep_checkpoints")}


def rlvr_dir(params: Params, policy: str, problems: str) -> Path:
    key = stage_key(params, SECTIONS, {"policy": policy, "problems": problems}, EXCLUDE)
    return params.stage_dir("rlvr", key)


def _valid(inputs: dict[str, Any]) -> bool:
    return inputs["params"].rlvr.rounds == 0 or stage_finished(
        rlvr_dir(inputs["params"], inputs["policy"], inputs["problems"]))


@stage_task("rlvr", StagePolicy(sections=SECTIONS, exclude=EXCLUDE, job="jobs.rlvr", valid=_valid),
            task_run_name="rlvr")
def rlvr_task(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    from jobs import rlvr as job

    out = rlvr_dir(params, policy, problems)
    if params.rlvr.rounds == 0:
        return {"checkpoint": policy, "stage_dir": str(out), "rounds": 0, "seconds": 0.0, "run_id": None}
    tags = {"stage": "rlvr", "model": "rlvr", "policy_ref": policy, "stage_dir": str(out)}
    args = ["--policy", policy, "--problems", problems, "--out", str(out)]
    with stage_run(params, parent_run_id, "rlvr", tags, log_sections=SECTIONS) as run_id:
        progress = StageProgress("rlvr-rounds", f"RLVR: {params.rlvr.rounds} rounds -> {out}")
        seconds = launch(params, "jobs.rlvr", args,
                         lambda: job.run(params, policy, problems, out, grader=grader_for(params), on_round=progress),
                         run_id, "rlvr", progress=progress)
    if not stage_finished(out):
        raise RuntimeError(f"rlvr: the job ended without writing {final_dir(out)}")
    return {"checkpoint": str(final_dir(out)), "stage_dir": str(out), "rounds": params.rlvr.rounds,
            "seconds": seconds, "run_id": run_id}


def rlvr(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    """``{"checkpoint": <rlvr folder>/final, "stage_dir", "run_id"}`` after ``rlvr.rounds`` rounds
    (``checkpoint`` = ``policy`` for 0 rounds)."""
    return call(rlvr_task, params, policy=policy, problems=problems, parent_run_id=parent_run_id)
