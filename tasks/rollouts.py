"""Stages rollouts, grade and filter as tasks of their own (the RLVR / OPSD rounds do the same
steps inside their jobs; these serve flows that sample, grade or select outside a round).

All three run in-process: none of them trains, and ``jobs.rollouts`` is not a distributed job.
"""

from __future__ import annotations

from pathlib import Path

from compaction.params import Params
from tasks.base import StagePolicy, call, stage_key, stage_task, timed_job

ROLLOUT_SECTIONS = ("rollout", "model")
GRADE_SECTIONS = ("grading",)
FILTER_SECTIONS = ("opsd.unit", "opsd.group_threshold")


# ------------------------------------------------------------------------------ rollouts
def rollouts_path(params: Params, policy: str, problems: str, split: str) -> Path:
    key = stage_key(params, ROLLOUT_SECTIONS, {"policy": policy, "problems": problems, "split": split})
    return Path(params.paths.artifacts) / "rollouts" / key / "rollouts.parquet"


@stage_task("rollouts", StagePolicy(sections=ROLLOUT_SECTIONS, job="jobs.rollouts",
                                    valid=lambda i: rollouts_path(i["params"], i["policy"], i["problems"],
                                                                  i["split"]).is_file()))
def rollouts_task(params: Params, policy: str, problems: str, split: str) -> dict:
    from jobs import rollouts as job

    out = rollouts_path(params, policy, problems, split)
    _, seconds = timed_job("rollouts", lambda: job.run(params, policy, problems, split, out, progress=False))
    return {"rollouts": str(out), "seconds": seconds}


def rollouts(params: Params, policy: str, problems: str, split: str = "eval") -> dict:
    """``{"rollouts": path}``: ``rollout.n`` samples of ``policy`` per problem of ``split``."""
    return call(rollouts_task, params, policy=policy, problems=problems, split=split)


# --------------------------------------------------------------------------------- grade
def grades_path(params: Params, rollouts_file: str, problems: str | None) -> Path:
    key = stage_key(params, GRADE_SECTIONS, {"rollouts": rollouts_file, "problems": problems})
    return Path(params.paths.artifacts) / "grade" / key / "grades.parquet"


@stage_task("grade", StagePolicy(sections=GRADE_SECTIONS, job="jobs.grade",
                                 valid=lambda i: grades_path(i["params"], i["rollouts_file"], i["problems"]).is_file()))
def grade_task(params: Params, rollouts_file: str, problems: str | None) -> dict:
    from jobs import grade as job

    out = grades_path(params, rollouts_file, problems)
    _, seconds = timed_job("grade", lambda: job.run(params, rollouts_file, problems, out))
    return {"grades": str(out), "seconds": seconds}


def grade(params: Params, rollouts_file: str, problems: str | None) -> dict:
    """``{"grades": path}``: math-verify verdicts of a rollouts file."""
    return call(grade_task, params, rollouts_file=rollouts_file, problems=problems)


# -------------------------------------------------------------------------------- filter
def selected_path(params: Params, rollouts_file: str, grades_file: str, condition: str) -> Path:
    key = stage_key(params, FILTER_SECTIONS, {"rollouts": rollouts_file, "grades": grades_file,
                                              "condition": condition})
    return Path(params.paths.artifacts) / "filter" / key / "selected.parquet"


@stage_task("filter", StagePolicy(sections=FILTER_SECTIONS, job="compaction.selection",
                                  valid=lambda i: selected_path(i["params"], i["rollouts_file"], i["grades_file"],
                                                                i["condition"]).is_file()))
def filter_task(params: Params, rollouts_file: str, grades_file: str, condition: str) -> dict:
    from compaction.artifacts import read_parquet, write_parquet
    from compaction.selection import select_rollouts

    out = selected_path(params, rollouts_file, grades_file, condition)

    def run() -> int:
        selected = select_rollouts(read_parquet(rollouts_file), read_parquet(grades_file), condition,
                                   params.opsd.unit, params.opsd.group_threshold)
        write_parquet(selected, out)
        return len(selected)

    n, seconds = timed_job("filter", run)
    return {"selected": str(out), "rows": n, "seconds": seconds}


def filter_rollouts(params: Params, rollouts_file: str, grades_file: str, condition: str) -> dict:
    """``{"selected": path}``: the rollouts that enter the OPSD loss under ``condition``."""
    return call(filter_task, params, rollouts_file=rollouts_file, grades_file=grades_file, condition=condition)
