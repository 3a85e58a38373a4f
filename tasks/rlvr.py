"""Stage rlvr, one task per round: a crash resumes at the first round without a cache record.

Keyed by the ``rlvr`` section (without ``rounds``: adding rounds continues from the last one),
``model``, ``rollout.batch_size`` (generation chunks), ``grading``, the starting policy and the
problems; a round's key adds its index and the previous round's folder. All rounds of a flow
run log into one nested MLflow run ``rlvr`` (step = round).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compaction.params import Params
from compaction.rounds import round_completed, round_dir
from tasks.base import StagePolicy, call_rounds, grader_for, launch, stage_key, stage_run, stage_task

SECTIONS = ("rlvr", "model", "rollout.batch_size", "rollout.hf_decoder", "grading")
EXCLUDE = {"rlvr": ("rounds",)}


def rlvr_dir(params: Params, policy: str, problems: str) -> Path:
    key = stage_key(params, SECTIONS, {"policy": policy, "problems": problems}, EXCLUDE)
    return Path(params.paths.artifacts) / "rlvr" / key


def _valid(inputs: dict[str, Any]) -> bool:
    return round_completed(rlvr_dir(inputs["params"], inputs["policy"], inputs["problems"]), inputs["round_"])


@stage_task("rlvr_round", StagePolicy(sections=SECTIONS, exclude=EXCLUDE, job="jobs.rlvr", valid=_valid),
            task_run_name="rlvr_round-{round_}")
def rlvr_round_task(params: Params, policy: str, prev: str, problems: str, round_: int,
                    parent_run_id: str | None = None) -> dict:
    from jobs import rlvr as job

    out = rlvr_dir(params, policy, problems)
    tags = {"stage": "rlvr", "model": "rlvr", "policy_ref": policy, "stage_dir": str(out)}
    args = ["--policy", policy, "--problems", problems, "--out", str(out), "--round", str(round_)]
    with stage_run(params, parent_run_id, "rlvr", tags, log_sections=SECTIONS,
                   last_round=round_ >= params.rlvr.rounds - 1) as run_id:
        seconds = launch(params, "jobs.rlvr", args,
                         lambda: job.run_round(params, prev, policy, problems, out, round_, grader=grader_for(params)),
                         run_id, "rlvr")
    if not round_completed(out, round_):
        raise RuntimeError(f"rlvr round {round_}: the job ended without completing {round_dir(out, round_)}")
    folder = round_dir(out, round_)
    return {"round_dir": str(folder), "checkpoint": str(folder / "model"), "round": round_, "seconds": seconds,
            "run_id": run_id}


def rlvr_rounds(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict | None:
    """The ``rlvr.rounds`` rounds of RLVR from ``policy``, each from the previous round's folder:
    the last one's ``{"round_dir", "checkpoint": <round>/model, "run_id"}`` (None for 0 rounds)."""
    return call_rounds(rlvr_round_task, params, params.rlvr.rounds, rlvr_dir(params, policy, problems), policy,
                       policy=policy, problems=problems, parent_run_id=parent_run_id)
