"""`compaction demo`: the pipeline on the embedded default, ending with a printed summary.

Today it runs data -> base model -> rollouts -> grading; later stages (SFT, RLVR, OPSD,
evaluation, report) join it as they land. Each stage's output goes under
``artifacts/<stage>/<key>/`` and the summary metrics are logged to MLflow.
"""

from __future__ import annotations

import time

import pandas as pd
from rich.console import Console
from rich.table import Table

from compaction import tracking
from compaction.artifacts import read_parquet
from compaction.metrics import epistemic_rate, response_length_stats
from compaction.params import Params


def run_demo(params: Params, console: Console | None = None) -> dict[str, float]:
    from jobs import grade, prepare_data, prepare_model, rollouts
    from jobs.common import stage_dir

    console = console or Console()
    t0 = time.perf_counter()
    refs = prepare_data.run(params)
    console.print(f"[bold]data[/]: {refs['problems']}  ({time.perf_counter() - t0:.1f}s)")

    t = time.perf_counter()
    policy = prepare_model.run(params, refs["problems"], refs["traces"])
    console.print(f"[bold]model[/]: {policy}  ({time.perf_counter() - t:.1f}s)")

    out = stage_dir(params, "rollouts", params.section_hash("data", "model", "rollout"))
    t = time.perf_counter()
    rollouts_path = rollouts.run(params, policy, refs["problems"], "eval", out / "rollouts.parquet")
    console.print(f"[bold]rollouts[/]: {rollouts_path}  ({time.perf_counter() - t:.1f}s)")

    t = time.perf_counter()
    grades_path = grade.run(params, rollouts_path, refs["problems"], out / "grades.parquet")
    console.print(f"[bold]grade[/]: {grades_path}  ({time.perf_counter() - t:.1f}s)")

    # The domain's own check: the reference solutions of the eval split must all grade correct.
    problems = read_parquet(refs["problems"])
    eval_problems = problems[problems["split"] == "eval"]
    from compaction.grading import grade_responses

    oracle = grade_responses(list(eval_problems["solution"]), list(eval_problems["answer"]),
                             workers=params.grading.workers, timeout_s=params.grading.timeout_s)

    summary = summarize(problems, read_parquet(rollouts_path), read_parquet(grades_path),
                        params.eval.epistemic_markers)
    summary["reference_solution_accuracy"] = sum(g.correct for g in oracle) / max(len(oracle), 1)
    summary["wall_seconds"] = time.perf_counter() - t0
    with tracking.start_run(params.tracking, f"demo-{params.study}", tags={"stage": "demo"}):
        tracking.log_params(params.model_dump(mode="json"))
        tracking.log_metrics({f"demo/{k}": v for k, v in summary.items()})
    print_summary(console, params, problems, read_parquet(refs["traces"]) if refs["traces"] else None, summary)
    return summary


def summarize(problems: pd.DataFrame, rollouts: pd.DataFrame, grades: pd.DataFrame,
              markers: list[str]) -> dict[str, float]:
    merged = rollouts.merge(grades[["rollout_id", "correct", "status"]], on="rollout_id", how="left")
    lengths = response_length_stats(rollouts)
    status = merged["status"].value_counts(normalize=True)
    return {
        "train_problems": float((problems["split"] == "train").sum()),
        "eval_problems": float((problems["split"] == "eval").sum()),
        "rollouts": float(len(rollouts)),
        "accuracy": float(merged["correct"].mean()),
        **lengths,
        "epistemic_rate": epistemic_rate(rollouts["response"], float(rollouts["response_tokens"].sum()),
                                         markers),
        **{f"status_{s}": float(status.get(s, 0.0)) for s in ("ok", "no_answer", "parse_error", "timeout")},
    }


def print_summary(console: Console, params: Params, problems: pd.DataFrame, traces: pd.DataFrame | None,
                  summary: dict[str, float]) -> None:
    example = problems[problems["split"] == "eval"].iloc[0]
    console.rule("[bold]embedded domain")
    console.print(f"problem: {example['problem']}\nanswer: {example['answer']}\nreference solution: {example['solution']}")
    if traces is not None and len(traces):
        console.print(f"SFT trace (redundancy rate {params.data.synthetic.redundancy_rate}):\n{traces.iloc[0]['response']}")
    table = Table(title=f"demo summary ({params.study})",
                  caption="policy: the base model (random weights, so accuracy ~0); "
                          "SFT, RLVR and OPSD join the demo as they land")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) and not v.is_integer() else f"{v:g}")
    console.print(table)
