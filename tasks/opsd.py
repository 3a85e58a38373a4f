"""Stage opsd: one cached task per condition (``all``, ``correct``, ``incorrect``), one job for
every round of it (jobs/opsd.py).

Keyed by the ``opsd`` section (without ``conditions``, ``save_every`` and ``keep_checkpoints``),
``model``, the rollout fields the job reads, ``grading``, ``eval.epistemic_markers`` (a round
metric), the starting policy (the RLVR checkpoint, also the frozen teacher), the problems, the
condition and its prompt pool (group filtering's Parquet). The job writes
``artifacts/opsd/<key>/<condition>/`` (round records, checkpoints, ``final/``); a task run again
after a crash relaunches it, and it resumes from its newest checkpoint. Each condition's rounds
log into the nested MLflow run ``opsd-<condition>`` (step = round), and a Prefect progress
artifact advances every round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compaction.params import Params
from compaction.rounds import final_dir, stage_finished
from tasks.cache import StagePolicy, call, stage_key, stage_task
from tasks.launch import StageProgress, grader_for, launch
from tasks.runs import stage_run

SECTIONS = ("opsd", "model", "rollout.backend", "rollout.batch_size", "rollout.hf_decoder", "grading",
            "eval.epistemic_markers", "eval.temperature", "eval.max_new_tokens", "eval.seed")  # the held-out curve
EXCLUDE = {"opsd": ("conditions", "save_every", "keep_checkpoints")}


def opsd_dir(params: Params, policy: str, problems: str, condition: str, pool: str | None) -> Path:
    refs = {"policy": policy, "problems": problems, "condition": condition, "pool": pool}
    return params.stage_dir("opsd", stage_key(params, SECTIONS, refs, EXCLUDE)) / condition


def _valid(inputs: dict[str, Any]) -> bool:
    return inputs["params"].opsd.rounds == 0 or stage_finished(
        opsd_dir(inputs["params"], inputs["policy"], inputs["problems"], inputs["condition"], inputs["pool"]))


@stage_task("opsd", StagePolicy(sections=SECTIONS, exclude=EXCLUDE, job="jobs.opsd", valid=_valid),
            task_run_name="opsd-{condition}")
def opsd_task(params: Params, policy: str, problems: str, condition: str, pool: str | None = None,
              parent_run_id: str | None = None) -> dict:
    from jobs import opsd as job

    out = opsd_dir(params, policy, problems, condition, pool)
    if params.opsd.rounds == 0:
        return {"checkpoint": policy, "stage_dir": str(out), "condition": condition, "seconds": 0.0, "run_id": None}
    tags = {"stage": "opsd", "condition": condition, "model": f"opsd-{condition}", "policy_ref": policy,
            "stage_dir": str(out), **({"pool": pool} if pool else {})}
    args = ["--policy", policy, "--problems", problems, "--out", str(out), "--condition", condition,
            *(["--pool", pool] if pool else [])]
    job.check_job(params, problems, condition, pool)  # before the run and the slot: bad input fails at once
    with stage_run(params, parent_run_id, f"opsd-{condition}", tags, log_sections=SECTIONS) as run_id:
        progress = StageProgress(f"opsd-{condition}-rounds", f"OPSD [{condition}]: {params.opsd.rounds} rounds -> {out}")
        seconds = launch(params, "jobs.opsd", args,
                         lambda: job.run(params, policy, problems, out, condition, pool, grader=grader_for(params),
                                         on_round=progress),
                         run_id, "opsd", progress=progress)
    if not stage_finished(out):
        raise RuntimeError(f"opsd [{condition}]: the job ended without writing {final_dir(out)}")
    return {"checkpoint": str(final_dir(out)), "stage_dir": str(out), "condition": condition, "seconds": seconds,
            "run_id": run_id}


def opsd(params: Params, policy: str, problems: str, condition: str, pool: str | None = None,
         parent_run_id: str | None = None) -> dict:
    """``{"checkpoint": <opsd folder>/final, "stage_dir", "run_id"}`` of ``condition`` trained on its
    pool (``checkpoint`` = ``policy`` for 0 rounds)."""
    return call(opsd_task, params, policy=policy, problems=problems, condition=condition, pool=pool,
                parent_run_id=parent_run_id)
