"""Stage sft: supervised fine-tuning from the base model on the traces.

Keyed by the ``sft`` and ``model`` sections and the base model and traces references; the
output folder ``artifacts/sft/<key>/`` holds the job's step checkpoints, so a killed SFT resumes
from its last checkpoint when the task runs again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compaction.params import Params
from tasks.cache import StagePolicy, call, stage_key, stage_task
from tasks.launch import launch
from tasks.runs import stage_run

SECTIONS = ("sft", "model")


def sft_dir(params: Params, base: str, traces: str) -> Path:
    return params.stage_dir("sft", stage_key(params, SECTIONS, {"base": base, "traces": traces}))


def _valid(inputs: dict[str, Any]) -> bool:
    return (sft_dir(inputs["params"], inputs["base"], inputs["traces"]) / "final" / "config.json").is_file()


@stage_task("sft", StagePolicy(sections=SECTIONS, job="jobs.sft", valid=_valid))
def sft_task(params: Params, base: str, traces: str, parent_run_id: str | None = None) -> dict:
    from jobs import sft as job

    out = sft_dir(params, base, traces)
    tags = {"stage": "sft", "model": "sft", "policy_ref": base}
    with stage_run(params, parent_run_id, "sft", tags, log_sections=SECTIONS) as run_id:
        seconds = launch(params, "jobs.sft", ["--base", base, "--traces", traces, "--out", str(out)],
                         lambda: job.run(params, base, traces, out), run_id, "sft")
    final = out / "final"
    if not (final / "config.json").is_file():
        raise RuntimeError(f"sft: the job ended without writing {final}")
    return {"checkpoint": str(final), "seconds": seconds, "run_id": run_id}


def sft(params: Params, base: str, traces: str, parent_run_id: str | None = None) -> dict:
    """``{"checkpoint": <sft folder>/final}``."""
    return call(sft_task, params, base=base, traces=traces, parent_run_id=parent_run_id)
