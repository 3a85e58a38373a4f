"""Stages prepare_data and prepare_model: the problems (and SFT traces) and the base model.

Both run in-process whatever the launcher (no accelerator: a table and a tokenizer), and are
keyed by the sections the jobs key their folders by (``data``; ``data`` + ``model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compaction.params import Params
from tasks.cache import StagePolicy, call, stage_task
from tasks.launch import timed_job
from tasks.runs import stage_run


def _data_dir(params: Params) -> Path:
    return params.stage_dir("prepare_data", params.section_hash("data"))


def _data_valid(inputs: dict[str, Any]) -> bool:
    return (_data_dir(inputs["params"]) / "problems.parquet").is_file()


@stage_task("prepare_data", StagePolicy(sections=("data",), job="jobs.prepare_data", valid=_data_valid))
def prepare_data_task(params: Params, parent_run_id: str | None = None) -> dict:
    import pandas as pd

    from jobs import prepare_data as job
    from compaction import tracking

    with stage_run(params, parent_run_id, "data", {"stage": "data"}, log_sections=("data",)) as run_id:
        refs, seconds = timed_job("prepare_data", lambda: job.run(params))
        counts = pd.read_parquet(refs["problems"], columns=["split"])["split"].value_counts()
        tracking.log_metrics({"data/train_problems": float(counts.get("train", 0)),
                              "data/eval_problems": float(counts.get("eval", 0))})
    return {**refs, "seconds": seconds, "run_id": run_id}


def prepare_data(params: Params, parent_run_id: str | None = None) -> dict:
    """``{"problems": path, "traces": path | None}`` for the params' data section."""
    return call(prepare_data_task, params, parent_run_id=parent_run_id)


def _model_valid(inputs: dict[str, Any]) -> bool:
    params: Params = inputs["params"]
    if params.model.name_or_path != "embedded":
        return True  # a hub id or a local checkpoint: nothing is built
    out = params.stage_dir("base_model", params.section_hash("data", "model"))
    return (out / "config.json").is_file()


@stage_task("prepare_model", StagePolicy(sections=("data", "model"), job="jobs.prepare_model", valid=_model_valid))
def prepare_model_task(params: Params, problems: str, traces: str | None) -> dict:
    from jobs import prepare_model as job

    base, seconds = timed_job("prepare_model", lambda: job.run(params, problems, traces))
    return {"checkpoint": base, "seconds": seconds}


def prepare_model(params: Params, problems: str, traces: str | None) -> dict:
    """``{"checkpoint": ref}``: the embedded tiny Qwen3 (built here) or ``model.name_or_path``."""
    return call(prepare_model_task, params, problems=problems, traces=traces)
