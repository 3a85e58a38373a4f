"""Stages rollout_grading and group_filtering: the design card's steps between the checkpoint and OPSD.

``rollout_grading`` (one cached task) samples the checkpoint ``opsd.group_samples`` times per
candidate training prompt and grades every sample (jobs/rollout_grading.py). ``group_filtering``
(one cached task per condition) turns those verdicts into the condition's prompt pool
(compaction.selection.prompt_pool): `correct` = prompts with pass rate >= ``opsd.group_threshold``,
`incorrect` = below it, `all` = every candidate. Both return their Parquet paths; OPSD then trains
each condition on its own pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compaction.params import Params
from tasks.cache import StagePolicy, call, stage_key, stage_task
from tasks.launch import grader_for, launch, timed_job
from tasks.runs import stage_run

GRADING_SECTIONS = ("opsd.group_samples", "opsd.pool_prompts", "opsd.sample_temperature", "opsd.max_new_tokens",
                    "opsd.seed", "model", "rollout.backend", "rollout.batch_size", "rollout.hf_decoder",
                    "rollout.vllm_gpu_memory_utilization", "rollout.vllm_tensor_parallel_size", "grading")
FILTER_SECTIONS = ("opsd.group_threshold",)


# ------------------------------------------------------------------------ rollout grading
def grading_dir(params: Params, policy: str, problems: str) -> Path:
    key = stage_key(params, GRADING_SECTIONS, {"policy": policy, "problems": problems})
    return params.stage_dir("rollout_grading", key)


def _grading_valid(inputs: dict[str, Any]) -> bool:
    return (grading_dir(inputs["params"], inputs["policy"], inputs["problems"]) / "metrics.json").is_file()


@stage_task("rollout_grading", StagePolicy(sections=GRADING_SECTIONS, job="jobs.rollout_grading",
                                           valid=_grading_valid), task_run_name="rollout_grading")
def rollout_grading_task(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    import json

    from compaction import tracking
    from jobs import rollout_grading as job

    out = grading_dir(params, policy, problems)
    args = ["--policy", policy, "--problems", problems, "--out", str(out)]
    with stage_run(params, parent_run_id, "rollout_grading", {"stage": "rollout_grading", "policy_ref": policy,
                                                                 "stage_dir": str(out)}) as run_id:
        seconds = launch(params, "jobs.rollout_grading", args,
                         lambda: job.run(params, policy, problems, out, grader=grader_for(params)), run_id,
                         "rollout_grading", distributed=False)
        metrics_file = out / "metrics.json"
        if not metrics_file.is_file():
            raise RuntimeError(f"rollout_grading: the job ended without writing {metrics_file}")
        tracking.log_metrics(json.loads(metrics_file.read_text()))
    return {"rollouts": str(out / "rollouts.parquet"), "grades": str(out / "grades.parquet"), "seconds": seconds,
            "run_id": run_id}


def rollout_grading(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    """``{"rollouts", "grades"}``: Parquet paths of the checkpoint's graded samples."""
    return call(rollout_grading_task, params, policy=policy, problems=problems, parent_run_id=parent_run_id)


# ------------------------------------------------------------------------ group filtering
def pool_path(params: Params, grades: str, condition: str) -> Path:
    key = stage_key(params, FILTER_SECTIONS, {"grades": grades, "condition": condition})
    return params.stage_dir("group_filtering", key) / f"pool-{condition}.parquet"


@stage_task("group_filtering", StagePolicy(sections=FILTER_SECTIONS, job="compaction.selection",
                                           valid=lambda i: pool_path(i["params"], i["grades"], i["condition"]).is_file()),
            task_run_name="group_filtering-{condition}")
def group_filtering_task(params: Params, grades: str, condition: str) -> dict:
    from prefect import get_run_logger

    from compaction.artifacts import read_parquet, write_parquet
    from compaction.selection import prompt_pool

    out = pool_path(params, grades, condition)

    def run():
        pool = prompt_pool(read_parquet(grades, required=["problem_id", "correct"]), condition,
                           params.opsd.group_threshold)
        write_parquet(pool, out)
        return pool

    pool, seconds = timed_job("group_filtering", run)
    candidates = len(read_parquet(grades, required=["problem_id"])["problem_id"].unique())
    get_run_logger().info("group filtering [%s]: %d of %d prompts (threshold %.2f) -> %s", condition, len(pool),
                          candidates, params.opsd.group_threshold, out)
    return {"pool": str(out), "condition": condition, "prompts": len(pool), "candidates": candidates,
            "seconds": seconds}


def group_filtering(params: Params, grades: str, condition: str) -> dict:
    """``{"pool": path, "prompts": n}``: the prompts ``condition`` trains on."""
    return call(group_filtering_task, params, grades=grades, condition=condition)
