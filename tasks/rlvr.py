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

SECTIONS = ("rlvr", "model", "rollout.backend", "rollout.batch_size", "rollout.hf_decoder", "grading",
            "eval.temperature", "eval.max_new_tokens", "eval.seed")  # eval.*: the held-out curve
#: Fields that do not change the stage's result (checkpoints are bitwise-neutral).
EXCLUDE = {"rlvr": ("save_every", "keep_checkpoints")}


def rlvr_dir(params: Params, policy: str, problems: str, stage: str = "rlvr") -> Path:
    """``<artifacts>/<stage>/<key>/``; ``stage`` = ``lenpen`` for the length-penalty baseline."""
    key = stage_key(params, SECTIONS, {"policy": policy, "problems": problems}, EXCLUDE)
    return params.stage_dir(stage, key)


def _valid(inputs: dict[str, Any]) -> bool:
    return inputs["params"].rlvr.rounds == 0 or stage_finished(
        rlvr_dir(inputs["params"], inputs["policy"], inputs["problems"]))


def run_rlvr_job(params: Params, policy: str, problems: str, parent_run_id: str | None, stage: str,
                 tags: dict[str, str], title: str) -> dict:
    """The RLVR job of ``params.rlvr`` from ``policy`` into ``<artifacts>/<stage>/<key>/``, logged as
    the nested MLflow run ``tags["model"]`` (tags + ``stage_dir``, ``policy_ref``) with a progress
    artifact; ``{"checkpoint", "stage_dir", "rounds", "seconds", "run_id"}``."""
    from jobs import rlvr as job

    out = rlvr_dir(params, policy, problems, stage)
    if params.rlvr.rounds == 0:
        return {"checkpoint": policy, "stage_dir": str(out), "rounds": 0, "seconds": 0.0, "run_id": None}
    tags = {**tags, "policy_ref": policy, "stage_dir": str(out)}
    args = ["--policy", policy, "--problems", problems, "--out", str(out)]
    with stage_run(params, parent_run_id, tags["model"], tags, log_sections=SECTIONS) as run_id:
        progress = StageProgress(f"{stage}-rounds", f"{title}: {params.rlvr.rounds} rounds -> {out}")
        seconds = launch(params, "jobs.rlvr", args,
                         lambda: job.run(params, policy, problems, out, grader=grader_for(params), on_round=progress),
                         run_id, stage, progress=progress)
    if not stage_finished(out):
        raise RuntimeError(f"{stage}: the job ended without writing {final_dir(out)}")
    return {"checkpoint": str(final_dir(out)), "stage_dir": str(out), "rounds": params.rlvr.rounds,
            "seconds": seconds, "run_id": run_id}


@stage_task("rlvr", StagePolicy(sections=SECTIONS, exclude=EXCLUDE, job="jobs.rlvr", valid=_valid),
            task_run_name="rlvr")
def rlvr_task(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    return run_rlvr_job(params, policy, problems, parent_run_id, "rlvr", {"stage": "rlvr", "model": "rlvr"}, "RLVR")


def rlvr(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    """``{"checkpoint": <rlvr folder>/final, "stage_dir", "run_id"}`` after ``rlvr.rounds`` rounds
    (``checkpoint`` = ``policy`` for 0 rounds)."""
    return call(rlvr_task, params, policy=policy, problems=problems, parent_run_id=parent_run_id)
