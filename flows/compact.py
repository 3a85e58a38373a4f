"""Flow ``compaction`` (module ``compact``: a file named compaction.py would shadow the package
when Prefect loads it as a script): from an RLVR checkpoint to evaluated, registered, compacted models.

    checkpoint (path | models:/ URI, default models:/rlvr@latest) -> evaluate (opsd-baseline)
    -> rollout grading (the checkpoint x opsd.group_samples on the OPSD prompts)
    -> group filtering (a prompt pool per condition)
    -> per condition, the branches submitted together: OPSD (one job, every round) -> evaluate
       -> register a `compacted` version (tag condition) through the promotion gate
       (compacted@candidate on a pass); branch `lenpen`, the length-penalty baseline, trains
       RLVR with a length penalty instead of OPSD (tasks/lenpen.py, model `rlvr-lenpen`)
    -> report (artifacts/reports/<study>/)

Rollout grading and group filtering run with ``opsd.unit: pool`` (the default); with ``rollout`` or
``group`` each OPSD round selects among its own rollouts instead, over every prompt. The branches
run in threads of this flow run; each job holds a slot of the ``compaction-jobs`` concurrency
limit (``launcher.max_concurrent_jobs``, 1 on CPU), so they overlap only where the machine has room.

Deployments ``opsd-correct``, ``opsd-all``, ``opsd-incorrect`` (prefect.yaml) run it with one
condition each; ``opsd-correct`` is triggered by ``rlvr.checkpoint.landed``.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from prefect import flow

from compaction.enums import BRANCHES, LENPEN, LENPEN_MODEL
from tasks.data import prepare_data
from tasks.evaluate import evaluate, record_evaluation
from tasks.launch import ensure_job_limit
from tasks.lenpen import lenpen
from tasks.opsd import opsd
from tasks.pools import group_filtering, rollout_grading
from tasks.registry import register_compacted, resolve_checkpoint
from tasks.report import report
from tasks.runs import flow_run, load_flow_params


def run_branches(branch: Callable[[Any], Any], items: Sequence[Any], max_workers: int | None = None) -> list[Any]:
    """``branch(x)`` for every item (condition, seed), submitted together, at most ``max_workers``
    at once (threads sharing this flow run's context: its Prefect flow run and MLflow parent run);
    results in the items' order. The first failure is raised after every branch has ended."""
    workers = min(len(items), max_workers or len(items))
    if workers <= 1:
        return [branch(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="branch") as pool:
        futures = [pool.submit(contextvars.copy_context().run, branch, x) for x in items]
    return [f.result() for f in futures]


def check_conditions(conditions: list[str] | None, default: list[str]) -> list[str]:
    chosen = list(default if conditions is None else conditions)
    bad = [c for c in chosen if c not in BRANCHES]
    if bad:
        raise ValueError(f"conditions: unknown {bad}; expected some of {list(BRANCHES)}")
    if not chosen:
        raise ValueError("conditions: empty; expected some of " + str(list(BRANCHES)))
    return chosen


@flow(name="compaction", log_prints=True)
def compaction(params: str = "params/demo.yaml", overrides: list[str] = [],  # noqa: B006 (Prefect parameter)
               checkpoint: str | None = None, conditions: list[str] | None = None) -> dict:
    p = load_flow_params(params, overrides)
    chosen = check_conditions(conditions, p.opsd.conditions)
    ensure_job_limit(p)
    with flow_run(p, "compaction") as parent:
        ckpt = resolve_checkpoint(p, checkpoint)
        policy_ref = ckpt["version_uri"] or ckpt["path"]  # what the runs' policy_ref tags name
        problems = prepare_data(p, parent)["problems"]

        # The comparison point: the checkpoint as OPSD finds it (condition `baseline`).
        baseline = record_evaluation(p, evaluate(p, ckpt["path"], problems), "opsd-baseline", "baseline",
                                     policy_ref, parent)
        training = [c for c in chosen if c != "baseline"]
        distilled = [c for c in training if c != LENPEN]
        pools: dict[str, str | None] = {c: None for c in distilled}
        graded = None
        if distilled and p.opsd.unit == "pool" and p.opsd.rounds > 0:
            graded = rollout_grading(p, ckpt["path"], problems, parent)
            pools = {c: group_filtering(p, graded["grades"], c)["pool"] for c in distilled}

        def branch(condition: str) -> tuple[dict, dict | None]:
            if condition == LENPEN:
                trained, label = lenpen(p, ckpt["path"], problems, parent), LENPEN_MODEL
            else:
                trained, label = opsd(p, ckpt["path"], problems, condition, pools[condition], parent), f"opsd-{condition}"
            model = trained["checkpoint"]
            evaluation = record_evaluation(p, evaluate(p, model, problems), label, condition, model,
                                           parent, train_run_id=trained["run_id"])
            registered = None
            if trained["run_id"]:
                registered = register_compacted(p, model, trained["run_id"], condition, policy_ref, evaluation,
                                                baseline, parent, model=label)
            return evaluation, registered

        results = run_branches(branch, training)
        evaluations = {"baseline": baseline, **{c: ev for c, (ev, _) in zip(training, results)}}
        registered = [r for _, r in results if r is not None]
        summary = report(p, parent)
        return {"checkpoint": ckpt, "rollout_grading": graded, "pools": pools, "evaluations": evaluations,
                "registered": registered, "report": summary, "mlflow_run_id": parent}
