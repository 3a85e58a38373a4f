"""The report's table: one row per (model, benchmark) in pipeline order, with its bootstrap
intervals and deltas against the baseline, and the promotion gate's verdict on each OPSD model."""

from __future__ import annotations

from typing import Any

import pandas as pd

from compaction.enums import BASELINE, CONDITIONS
from compaction.params import Params
from compaction.report.runs import EvalRun
from compaction.report.statistics import bootstrap_delta, bootstrap_row, seeded_rng

#: Table order of the model labels: the stages, then one `opsd-<condition>` per OPSD condition.
MODEL_ORDER = ["sft", "rlvr", *(f"opsd-{c}" for c in CONDITIONS)]
CURVE_METRICS = ["rlvr/reward_mean", "rlvr/mean_response_tokens", "opsd/loss", "opsd/accuracy",
                 "opsd/mean_response_tokens"]


#: The compaction flow's evaluation of its starting checkpoint (condition `baseline`).
SAME_AS_RLVR = f"opsd-{BASELINE}"


def model_order_key(model: str) -> tuple:
    return (MODEL_ORDER.index(model), "") if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def build_rows(data: dict[str, list[tuple[EvalRun, dict[str, pd.DataFrame]]]], baseline: str, b: int,
               confidence: float, seed: int) -> list[dict[str, Any]]:
    """One row per (model, benchmark), models in pipeline order."""
    rows = []
    for model in sorted(data, key=model_order_key):
        runs = data[model]
        benches = sorted(set().union(*(set(frames) for _, frames in runs)))
        for bench in benches:
            frames = [frames[bench] for _, frames in runs if bench in frames]
            used = [r for r, frames in runs if bench in frames]
            pooled = pd.concat(frames, ignore_index=True)
            row: dict[str, Any] = {
                "model": model, "benchmark": bench,
                "condition": next((r.condition for r in used if r.condition), None),
                "policy_ref": used[-1].policy_ref,
                "eval_runs": [r.run_id for r in used], "seeds": len(frames),
                "problems": int(pooled["problem_id"].nunique()), "samples": int(len(pooled)),
            }
            row.update(bootstrap_row(frames, b, confidence, seeded_rng(seed, "row", model, bench)))
            row["median_response_tokens"] = float(pooled["response_tokens"].median())
            row["truncation_rate"] = float((pooled["finish_reason"] == "length").mean())
            if model != baseline and baseline in data and any(bench in f for _, f in data[baseline]):
                base = [f[bench] for _, f in data[baseline] if bench in f]
                row.update(bootstrap_delta(frames, base, b, confidence, seeded_rng(seed, "delta", model, bench)))
            else:
                row.update({"accuracy_delta": None, "accuracy_delta_ci": None, "mean_response_tokens_delta": None,
                            "mean_response_tokens_delta_ci": None, "delta_problems": None})
            rows.append(row)
    return rows


def promotion_verdicts(rows: list[dict[str, Any]], baseline: str, params: Params) -> dict[str, dict[str, Any]]:
    """The promotion gate of each OPSD model against the baseline, on the report's own numbers."""
    from compaction.promotion import decide_promotion

    def metrics(model: str) -> dict[str, float]:
        m = {}
        for r in rows:
            if r["model"] == model:
                m[f"eval/{r['benchmark']}/accuracy"] = r["accuracy"]
                m[f"eval/{r['benchmark']}/mean_response_tokens"] = r["mean_response_tokens"]
        return m

    base = metrics(baseline)
    if not base:
        return {}
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        if model.startswith("opsd-") and model != SAME_AS_RLVR:
            ok, reason = decide_promotion(base, metrics(model), params.promotion.benchmarks,
                                          params.promotion.max_accuracy_drop)
            out[model] = {"promote": ok, "reason": reason}
    return out
