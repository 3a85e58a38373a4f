"""Flow ``compaction`` (module ``compact``: a file named compaction.py would shadow the package
when Prefect loads it as a script): from an RLVR checkpoint to evaluated, registered, compacted models.

    checkpoint (path | models:/ URI, default models:/rlvr@latest) -> evaluate (opsd-baseline)
    per condition: OPSD rounds -> evaluate -> register a `compacted` version (tag condition)
    through the promotion gate (compacted@candidate on a pass) -> report (artifacts/reports/<study>/)

Deployments ``opsd-correct``, ``opsd-all``, ``opsd-incorrect`` (prefect.yaml) run it with one
condition each; ``opsd-correct`` is triggered by ``rlvr.checkpoint.landed``.
"""

from __future__ import annotations

from prefect import flow

from compaction.selection import CONDITIONS
from tasks.base import flow_run, load_flow_params
from tasks.data import prepare_data
from tasks.evaluate import evaluate, record_evaluation
from tasks.opsd import opsd_rounds
from tasks.registry import register_compacted, resolve_checkpoint
from tasks.report import report


def check_conditions(conditions: list[str] | None, default: list[str]) -> list[str]:
    chosen = list(default if conditions is None else conditions)
    bad = [c for c in chosen if c not in CONDITIONS]
    if bad:
        raise ValueError(f"conditions: unknown {bad}; expected some of {list(CONDITIONS)}")
    if not chosen:
        raise ValueError("conditions: empty; expected some of " + str(list(CONDITIONS)))
    return chosen


@flow(name="compaction", log_prints=True)
def compaction(params: str = "params/demo.yaml", overrides: list[str] = [],  # noqa: B006 (Prefect parameter)
               checkpoint: str | None = None, conditions: list[str] | None = None) -> dict:
    p = load_flow_params(params, overrides)
    chosen = check_conditions(conditions, p.opsd.conditions)
    with flow_run(p, "compaction") as parent:
        ckpt = resolve_checkpoint(p, checkpoint)
        policy_ref = ckpt["version_uri"] or ckpt["path"]  # what the runs' policy_ref tags name
        problems = prepare_data(p, parent)["problems"]

        # The comparison point: the checkpoint as OPSD finds it (condition `baseline`).
        baseline = record_evaluation(p, evaluate(p, ckpt["path"], problems), "opsd-baseline", "baseline",
                                     policy_ref, parent)
        evaluations, registered = {"baseline": baseline}, []
        for condition in (c for c in chosen if c != "baseline"):
            last = opsd_rounds(p, ckpt["path"], problems, condition, parent)
            model = last["checkpoint"] if last else ckpt["path"]
            evaluations[condition] = record_evaluation(p, evaluate(p, model, problems), f"opsd-{condition}",
                                                       condition, model, parent,
                                                       train_run_id=last["run_id"] if last else None)
            if last:
                registered.append(register_compacted(p, model, last["run_id"], condition, policy_ref,
                                                      evaluations[condition], baseline, parent))
        summary = report(p, parent)
        return {"checkpoint": ckpt, "evaluations": evaluations, "registered": registered, "report": summary,
                "mlflow_run_id": parent}
