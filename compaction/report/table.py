"""The report's table: one row per (model, benchmark) in pipeline order, with its bootstrap
intervals and deltas against the baseline, and the promotion gate's verdict on each OPSD model."""

from __future__ import annotations

from typing import Any

import pandas as pd

from compaction.enums import BASELINE, CONDITIONS, LENPEN_MODEL
from compaction.params import Params
from compaction.report.runs import EvalRun
from compaction.report.statistics import bootstrap_delta, bootstrap_row, seeded_rng

#: Table order of the model labels: the stages, the length-penalty baseline, then one
#: `opsd-<condition>` per OPSD condition.
MODEL_ORDER = ["sft", "rlvr", LENPEN_MODEL, *(f"opsd-{c}" for c in CONDITIONS)]
CURVE_METRICS = ["rlvr/reward_mean", "rlvr/mean_response_tokens", "opsd/loss", "opsd/accuracy",
                 "opsd/mean_response_tokens"]
#: The held-out curve of a round-based stage (compaction.rounds.RoundStage.evaluate_heldout), step = rounds done.
HELDOUT_METRICS = ("heldout_accuracy", "heldout_mean_response_tokens")


#: The compaction flow's evaluation of its starting checkpoint (condition `baseline`).
SAME_AS_RLVR = f"opsd-{BASELINE}"


def model_order_key(model: str) -> tuple:
    return (MODEL_ORDER.index(model), "") if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def build_rows(data: dict[str, list[tuple[EvalRun, dict[str, pd.DataFrame]]]], baseline: str, b: int,
               confidence: float, seed: int) -> list[dict[str, Any]]:
    """One row per (model, benchmark), models in pipeline order. A model's eval runs are its seeds
    (tag ``seed``); ``per_seed`` holds each seed's point values and its deltas against the baseline's
    run of the same seed."""
    rows = []
    for model in sorted(data, key=model_order_key):
        runs = sorted(data[model], key=lambda rf: (rf[0].seed, rf[0].start_time))
        benches = sorted(set().union(*(set(frames) for _, frames in runs)))
        for bench in benches:
            used = [(r, frames[bench]) for r, frames in runs if bench in frames]
            frames = [f for _, f in used]
            pooled = pd.concat(frames, ignore_index=True)
            row: dict[str, Any] = {
                "model": model, "benchmark": bench,
                "condition": next((r.condition for r, _ in used if r.condition), None),
                "policy_ref": used[-1][0].policy_ref,
                "eval_runs": [r.run_id for r, _ in used], "seeds": len(frames),
                "problems": int(pooled["problem_id"].nunique()), "samples": int(len(pooled)),
            }
            row.update(bootstrap_row(frames, b, confidence, seeded_rng(seed, "row", model, bench)))
            row["median_response_tokens"] = float(pooled["response_tokens"].median())
            row["truncation_rate"] = float((pooled["finish_reason"] == "length").mean())
            base_used = sorted(((r, f[bench]) for r, f in data.get(baseline, []) if bench in f),
                               key=lambda rf: (rf[0].seed, rf[0].start_time))
            if model != baseline and base_used:
                # Paired by seed too when both models have the same seeds (a study): one seed resample.
                paired = [r.seed for r, _ in used] == [r.seed for r, _ in base_used]
                row.update(bootstrap_delta(frames, [f for _, f in base_used], b, confidence,
                                           seeded_rng(seed, "delta", model, bench), paired_seeds=paired))
            else:
                row.update({"accuracy_delta": None, "accuracy_delta_ci": None, "mean_response_tokens_delta": None,
                            "mean_response_tokens_delta_ci": None, "delta_problems": None})
            row["per_seed"] = per_seed(used, base_used if model != baseline else [])
            rows.append(row)
    return rows


def per_seed(used: list[tuple[EvalRun, pd.DataFrame]], base: list[tuple[EvalRun, pd.DataFrame]]) -> list[dict]:
    """Each seed's accuracy and mean tokens, and its deltas against the baseline's run of that seed
    (on the problems both were evaluated on); None where the baseline has no run of the seed."""
    base_by_seed = {r.seed: f for r, f in base}
    out = []
    for r, f in used:
        item = {"seed": r.seed, "eval_run": r.run_id, "accuracy": float(f["correct"].mean()),
                "mean_response_tokens": float(f["response_tokens"].mean()),
                "accuracy_delta": None, "mean_response_tokens_delta": None}
        bf = base_by_seed.get(r.seed)
        if bf is not None:
            common = set(f["problem_id"]) & set(bf["problem_id"])
            mf, mb = f[f["problem_id"].isin(common)], bf[bf["problem_id"].isin(common)]
            if len(mf) and len(mb):
                item["accuracy_delta"] = float(mf["correct"].mean() - mb["correct"].mean())
                item["mean_response_tokens_delta"] = float(mf["response_tokens"].mean() - mb["response_tokens"].mean())
        out.append(item)
    return out


def promotion_verdicts(rows: list[dict[str, Any]], baseline: str, params: Params) -> dict[str, dict[str, Any]]:
    """The promotion gate of each OPSD model and of the length-penalty baseline against the
    baseline, on the report's own numbers."""
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
        if (model.startswith("opsd-") and model != SAME_AS_RLVR) or model == LENPEN_MODEL:
            ok, reason = decide_promotion(base, metrics(model), params.promotion.benchmarks,
                                          params.promotion.max_accuracy_drop)
            out[model] = {"promote": ok, "reason": reason}
    return out


#: The paper's three directions, as the verdict checks them (docs/design.md, "The study").
MIN_SHORTENING = 0.20  # correct-only: at least 20% fewer mean tokens than RLVR ...
MAX_DROP_PT = 2.0  # ... at most 2 points less accurate


def verdict(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per benchmark, whether each of the paper's directions holds in these rows (point estimates
    against ``baseline``, the intervals quoted beside them); ``holds`` None where a model is missing:

    1. correct-only is >= 20% shorter than RLVR and within 2 pt of its accuracy (a gain counts as within);
    2. incorrect-only loses accuracy: the whole interval of its paired delta is below 0;
    3. all sits in between: its accuracy lies between incorrect-only's and correct-only's.
    """
    out = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        by = {r["model"]: r for r in rows if r["benchmark"] == bench}
        c, i, a = by.get("opsd-correct"), by.get("opsd-incorrect"), by.get("opsd-all")

        def deltas(r: dict) -> str:
            return (f"{100 * r['accuracy_delta']:+.1f} pt {_interval(r['accuracy_delta_ci'], 100)}, "
                    f"{100 * r['mean_response_tokens_change']:+.1f}% tokens "
                    f"({r['mean_response_tokens_delta']:+.1f} {_interval(r['mean_response_tokens_delta_ci'])})")

        items = []
        if c is None or c.get("accuracy_delta") is None or c.get("mean_response_tokens_change") is None:
            items.append(("correct-only is >=20% shorter and within 2 pt", None, "no opsd-correct row with deltas"))
        else:
            ok = c["mean_response_tokens_change"] <= -MIN_SHORTENING and c["accuracy_delta"] >= -MAX_DROP_PT / 100
            items.append(("correct-only is >=20% shorter and within 2 pt", ok, f"opsd-correct vs {baseline}: {deltas(c)}"))
        if i is None or i.get("accuracy_delta_ci") is None:
            items.append(("incorrect-only loses accuracy", None, "no opsd-incorrect row with an interval"))
        else:
            ok = i["accuracy_delta_ci"][1] < 0
            items.append(("incorrect-only loses accuracy", ok, f"opsd-incorrect vs {baseline}: {deltas(i)}"))
        if a is None or c is None or i is None:
            items.append(("all sits in between", None, "needs opsd-all, opsd-correct and opsd-incorrect"))
        else:
            lo, hi = sorted((i["accuracy"], c["accuracy"]))
            ok = lo <= a["accuracy"] <= hi and i["accuracy"] <= c["accuracy"]
            items.append(("all sits in between", ok,
                          f"accuracy incorrect {100 * i['accuracy']:.1f}%, all {100 * a['accuracy']:.1f}%, correct "
                          f"{100 * c['accuracy']:.1f}%; mean tokens {i['mean_response_tokens']:.1f}, "
                          f"{a['mean_response_tokens']:.1f}, {c['mean_response_tokens']:.1f}"))
        lp = by.get(LENPEN_MODEL)
        if lp is not None and lp.get("accuracy_delta") is not None and lp.get("mean_response_tokens_change") is not None:
            items.append(("(baseline) the length penalty, for comparison", None, f"{LENPEN_MODEL} vs {baseline}: {deltas(lp)}"))
        out += [{"benchmark": bench, "claim": claim, "holds": holds, "evidence": ev} for claim, holds, ev in items]
    return out


def _interval(ci: list[float] | None, scale: float = 1.0) -> str:
    return "[n/a]" if ci is None else f"[{scale * ci[0]:+.1f}, {scale * ci[1]:+.1f}]"
