"""Flow ``study``: the pipeline once per seed, then one report over the seeds.

    for each seed s of ``seeds`` (concurrently, up to ``launcher.max_concurrent_jobs``):
        post-train(params, overrides + seed_overrides(params, s))   as a subflow, study `<study>-seed<s>`
    -> report over every seed's evaluations (artifacts/reports/<study>/)

Each seed-dependent knob derives from the study seed (:data:`SEED_FIELDS`: initialisation, SFT
order, RLVR and OPSD prompt order and sampling, evaluation sampling, the rollouts' seed): the
params file's value plus the seed, so seed 0 is the params file itself (a `make demo` already
ran it) and seeds differ from each other in every such knob. The problems (``data``) stay the
same, so the deltas between models are paired by problem, and by seed. Every stage is a cached
task keyed by its sections, so a rerun of the study reuses every finished seed.
"""

from __future__ import annotations

from typing import Sequence

from prefect import flow

from compaction.params import Params
from flows.compact import check_conditions, run_branches
from flows.post_train import post_train
from tasks.launch import ensure_job_limit
from tasks.report import report
from tasks.runs import flow_run, load_flow_params

#: The params fields a study seed moves (each: the file's value + the study seed).
SEED_FIELDS = ("model.tiny.seed", "sft.seed", "rlvr.seed", "opsd.seed", "eval.seed", "rollout.seed")


def seed_overrides(params: Params, seed: int) -> list[str]:
    """``--set`` overrides of one study seed: every :data:`SEED_FIELDS` field, ``seed`` (the tag
    of its runs) and ``study=<study>-seed<s>`` (its own report folder)."""
    out = []
    for field in SEED_FIELDS:
        node = params
        for part in field.split("."):
            node = getattr(node, part)
        out.append(f"{field}={int(node) + seed}")
    return [*out, f"seed={seed}", f"study={params.study}-seed{seed}"]


def parse_seeds(seeds: str | Sequence[int]) -> list[int]:
    """``"0,1,2"`` or ``[0, 1, 2]`` -> ``[0, 1, 2]``; empty, repeated or non-integer seeds are errors."""
    items = [s.strip() for s in seeds.split(",")] if isinstance(seeds, str) else list(seeds)
    try:
        out = [int(s) for s in items]
    except (TypeError, ValueError):
        raise ValueError(f"seeds: expected comma-separated integers, got {seeds!r}") from None
    if not out:
        raise ValueError("seeds: empty")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: repeated seed in {out}")
    if any(s < 0 for s in out):
        raise ValueError(f"seeds: negative seed in {out}")
    return out


@flow(name="study", log_prints=True)
def study(params: str = "params/demo.yaml", overrides: list[str] = [],  # noqa: B006 (Prefect parameter)
          seeds: list[int] = [0, 1, 2], conditions: list[str] | None = None) -> dict:  # noqa: B006
    p = load_flow_params(params, overrides)
    chosen = parse_seeds(seeds)
    check_conditions(conditions, p.opsd.conditions)  # fail before training, not after
    for s in chosen:  # every seed's params load (and fail) before any work
        load_flow_params(params, [*overrides, *seed_overrides(p, s)])
    ensure_job_limit(p)
    with flow_run(p, "study") as parent:
        def one_seed(seed: int) -> dict:
            return post_train(params=params, overrides=[*overrides, *seed_overrides(p, seed)], conditions=conditions)

        # Seeds share the job limit's slots: they overlap only where the machine has room.
        results = run_branches(one_seed, chosen, p.launcher.max_concurrent_jobs)
        summary = report(p, parent)
        return {"seeds": chosen, "post_train": dict(zip(chosen, results)), "report": summary,
                "mlflow_run_id": parent}
