"""Branch lenpen: the length-penalty baseline (model ``rlvr-lenpen``), one cached task, one RLVR job.

RLVR (jobs/rlvr.py) continues from the checkpoint OPSD starts from, with the reward
``1[correct] * (1 - a * L / max_new_tokens)`` (``lenpen.coefficient`` = a; compaction.rl.length_penalty),
for the rounds, prompts per round and samples per prompt that each OPSD condition gets
(:func:`lenpen_params`). Keyed like stage rlvr, by the derived ``rlvr`` section; the job writes
``artifacts/lenpen/<key>/`` and logs into the nested MLflow run ``rlvr-lenpen`` (tags ``stage=rlvr``,
``condition=lenpen``), step = round.
"""

from __future__ import annotations

from typing import Any

from compaction.enums import LENPEN, LENPEN_MODEL
from compaction.params import Params
from compaction.rounds import stage_finished
from tasks.cache import StagePolicy, call, stage_task
from tasks.rlvr import EXCLUDE, SECTIONS, rlvr_dir, run_rlvr_job

def lenpen_params(params: Params) -> Params:
    """``params`` with the ``rlvr`` section of the baseline: the RLVR algorithm, lr and temperature,
    the ``opsd`` section's rounds, prompts per round, samples per prompt (at least 2: a group needs
    two), response length, prompt-order seed, checkpoint cadence and held-out curve, and
    ``length_penalty = lenpen.coefficient``."""
    o = params.opsd
    rlvr = params.rlvr.model_copy(update=dict(
        rounds=o.rounds, prompts_per_round=o.prompts_per_round, samples_per_prompt=max(o.samples_per_prompt, 2),
        max_new_tokens=o.max_new_tokens, save_every=o.save_every, keep_checkpoints=o.keep_checkpoints, seed=o.seed,
        eval_every=o.eval_every, eval_problems=o.eval_problems, eval_samples=o.eval_samples,
        length_penalty=params.lenpen.coefficient))
    return params.model_copy(update={"rlvr": rlvr})


def _valid(inputs: dict[str, Any]) -> bool:
    return inputs["params"].rlvr.rounds == 0 or stage_finished(
        rlvr_dir(inputs["params"], inputs["policy"], inputs["problems"], LENPEN))


@stage_task(LENPEN, StagePolicy(sections=SECTIONS, exclude=EXCLUDE, job="jobs.rlvr", valid=_valid),
            task_run_name=LENPEN_MODEL)
def lenpen_task(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    tags = {"stage": "rlvr", "model": LENPEN_MODEL, "condition": LENPEN}
    return run_rlvr_job(params, policy, problems, parent_run_id, LENPEN, tags, "RLVR with a length penalty")


def lenpen(params: Params, policy: str, problems: str, parent_run_id: str | None = None) -> dict:
    """``{"checkpoint", "stage_dir", "run_id"}`` of the length-penalty baseline from ``policy``
    (the RLVR checkpoint); ``checkpoint`` = ``policy`` for 0 OPSD rounds."""
    return call(lenpen_task, lenpen_params(params), policy=policy, problems=problems, parent_run_id=parent_run_id)
