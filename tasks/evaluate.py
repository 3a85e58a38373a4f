"""Stage evaluate: a checkpoint's avg@k, pass@k and lengths per benchmark (``jobs.evaluate``).

Two steps. ``evaluate`` (a cached task) runs the job: keyed by the ``eval`` section, the ``model``
section, the rollout fields the engine reads, ``grading``, the checkpoint and the problems; not by
what the checkpoint is called, so the RLVR checkpoint evaluated as ``rlvr`` and as
``opsd-baseline`` is sampled once. ``record_evaluation`` (bookkeeping in the flow, not a task: it
runs every time and has no output of its own) logs the result as a nested MLflow run of *this*
flow run with the contract's tags (``stage=eval``, ``model``, ``condition``, ``policy_ref``,
``eval_dir``, ``train_run_id``, ``seed``) and the ``eval/<bench>/<name>`` metrics, so every flow
run, also a fully cached one, holds the rows a report compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compaction.params import Params
from tasks.cache import StagePolicy, call, stage_key, stage_task
from tasks.launch import grader_for, launch
from compaction.tracking import git_commit

SECTIONS = ("eval", "model", "rollout.backend", "rollout.hf_decoder", "rollout.batch_size", "rollout.seed",
            "rollout.vllm_gpu_memory_utilization", "rollout.vllm_tensor_parallel_size", "grading")


def eval_dir(params: Params, checkpoint: str, problems: str | None) -> Path:
    key = stage_key(params, SECTIONS, {"checkpoint": checkpoint, "problems": problems})
    return params.stage_dir("eval", key)


def _valid(inputs: dict[str, Any]) -> bool:
    return (eval_dir(inputs["params"], inputs["checkpoint"], inputs["problems"]) / "metrics.json").is_file()


@stage_task("evaluate", StagePolicy(sections=SECTIONS, job="jobs.evaluate", valid=_valid))
def evaluate_task(params: Params, checkpoint: str, problems: str | None) -> dict:
    from jobs import evaluate as job

    out = eval_dir(params, checkpoint, problems)
    args = ["--checkpoint", checkpoint, "--out", str(out), *(["--problems", problems] if problems else [])]
    # No MLflow run here: record_evaluation logs the result into each flow run that uses it.
    seconds = launch(params, "jobs.evaluate", args,
                     lambda: job.run(params, checkpoint, problems, out, grader=grader_for(params)), None, "eval",
                     distributed=False)
    metrics = out / "metrics.json"
    if not metrics.is_file():
        raise RuntimeError(f"evaluate: the job ended without writing {metrics}")
    return {"eval_dir": str(out), "metrics_path": str(metrics), "checkpoint": checkpoint, "seconds": seconds}


def evaluate(params: Params, checkpoint: str, problems: str | None) -> dict:
    """``{"eval_dir", "metrics_path"}`` of ``checkpoint`` evaluated on every benchmark."""
    return call(evaluate_task, params, checkpoint=checkpoint, problems=problems)


def record_evaluation(params: Params, result: dict, model: str, condition: str | None, policy_ref: str,
                      parent_run_id: str | None, train_run_id: str | None = None) -> dict:
    """Log an evaluation as the nested run ``eval-<model>`` of the flow's MLflow run; returns
    ``{"run_id", "metrics"}`` (metrics ``eval/<bench>/<name>``). ``train_run_id``: the stage run
    that trained the checkpoint (tag ``train_run_id``), from an earlier flow run when the stage
    was cached in this one, so the report still finds its training curves."""
    from compaction import tracking
    from tasks.cache import section_payload

    metrics = json.loads(Path(result["metrics_path"]).read_text())
    tags = {"stage": "eval", "model": model, "policy_ref": policy_ref, "eval_dir": result["eval_dir"],
            "seed": str(params.seed), "git_commit": git_commit()}
    if condition:
        tags["condition"] = condition
    if train_run_id:
        tags["train_run_id"] = train_run_id
    with tracking.start_run(params.tracking, f"eval-{model}", nested=True, tags=tags,
                            parent_run_id=parent_run_id) as run:
        tracking.log_params(section_payload(params, ("eval",)), metrics=metrics)  # one log_batch
    return {"run_id": run.info.run_id, "metrics": metrics, "model": model, "condition": condition,
            "policy_ref": policy_ref, "eval_dir": result["eval_dir"]}
