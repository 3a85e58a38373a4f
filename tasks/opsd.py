"""Stage opsd, one task per round and condition (``all``, ``correct``, ``incorrect``).

Keyed by the ``opsd`` section (without ``rounds`` and ``conditions``), ``model``,
``rollout.batch_size``, ``grading``, ``eval.epistemic_markers`` (a round metric), the starting
policy (the RLVR checkpoint, also the frozen teacher), the problems and the condition. Each
condition's rounds log into one nested MLflow run ``opsd-<condition>`` (step = round).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compaction.params import Params
from compaction.rounds import round_completed, round_dir
from tasks.base import StagePolicy, call_rounds, grader_for, launch, stage_key, stage_run, stage_task

SECTIONS = ("opsd", "model", "rollout.batch_size", "rollout.hf_decoder", "grading", "eval.epistemic_markers")
EXCLUDE = {"opsd": ("rounds", "conditions")}


def opsd_dir(params: Params, policy: str, problems: str, condition: str) -> Path:
    key = stage_key(params, SECTIONS, {"policy": policy, "problems": problems, "condition": condition}, EXCLUDE)
    return Path(params.paths.artifacts) / "opsd" / key / condition


def _valid(inputs: dict[str, Any]) -> bool:
    out = opsd_dir(inputs["params"], inputs["policy"], inputs["problems"], inputs["condition"])
    return round_completed(out, inputs["round_"])


@stage_task("opsd_round", StagePolicy(sections=SECTIONS, exclude=EXCLUDE, job="jobs.opsd", valid=_valid),
            task_run_name="opsd_round-{condition}-{round_}")
def opsd_round_task(params: Params, policy: str, prev: str, problems: str, condition: str, round_: int,
                    parent_run_id: str | None = None) -> dict:
    from jobs import opsd as job

    out = opsd_dir(params, policy, problems, condition)
    tags = {"stage": "opsd", "condition": condition, "model": f"opsd-{condition}", "policy_ref": policy,
            "stage_dir": str(out)}
    args = ["--policy", policy, "--problems", problems, "--out", str(out), "--condition", condition,
            "--round", str(round_)]

    def inline() -> None:
        job.check_job(params, problems, condition)
        job.run_round(params, prev, policy, problems, out, round_, condition, grader=grader_for(params))

    with stage_run(params, parent_run_id, f"opsd-{condition}", tags, log_sections=SECTIONS,
                   last_round=round_ >= params.opsd.rounds - 1) as run_id:
        seconds = launch(params, "jobs.opsd", args, inline, run_id, "opsd")
    if not round_completed(out, round_):
        raise RuntimeError(f"opsd round {round_} [{condition}]: the job ended without completing "
                           f"{round_dir(out, round_)}")
    folder = round_dir(out, round_)
    return {"round_dir": str(folder), "checkpoint": str(folder / "model"), "round": round_, "condition": condition,
            "seconds": seconds, "run_id": run_id}


def opsd_rounds(params: Params, policy: str, problems: str, condition: str,
                parent_run_id: str | None = None) -> dict | None:
    """The ``opsd.rounds`` rounds of OPSD under ``condition`` from ``policy``: the last one's
    ``{"round_dir", "checkpoint", "run_id"}`` (None for 0 rounds)."""
    return call_rounds(opsd_round_task, params, params.opsd.rounds, opsd_dir(params, policy, problems, condition),
                       policy, policy=policy, problems=problems, condition=condition, parent_run_id=parent_run_id)
