"""The promotion gate's rule (its verdicts in a real registry: tests/test_flows.py, post-train)."""

from __future__ import annotations

import math

import pytest

from compaction.promotion import benchmarks_of, decide_promotion


def m(**benches):
    """{"eval/<b>/accuracy": acc, "eval/<b>/mean_response_tokens": tokens} from b=(acc, tokens)."""
    out = {}
    for b, (acc, tok) in benches.items():
        out[f"eval/{b}/accuracy"], out[f"eval/{b}/mean_response_tokens"] = acc, tok
    return out


BASE = m(math500=(0.80, 1000.0), aime=(0.30, 4000.0))


def test_shorter_at_the_same_accuracy_is_promoted():
    ok, reason = decide_promotion(BASE, m(math500=(0.79, 700.0), aime=(0.31, 3000.0)), max_accuracy_drop=2.0)
    assert ok and reason.startswith("promoted:")
    assert "math500: accuracy 0.8000 -> 0.7900 (drop +1.00 pt" in reason and "(-30.0%)" in reason


@pytest.mark.parametrize("candidate, why", [
    (m(math500=(0.77, 700.0), aime=(0.31, 3000.0)), "math500: accuracy 0.8000 -> 0.7700 (drop +3.00 pt, tolerance 2), "
     "mean tokens 1000.0 -> 700.0 (-30.0%): accuracy drop 3.00 pt > 2"),
    (m(math500=(0.80, 1000.0), aime=(0.31, 3000.0)), "responses not shorter"),  # equal is not shorter
    (m(math500=(0.85, 1200.0), aime=(0.31, 3000.0)), "responses not shorter"),
    (m(math500=(0.80, 700.0)), "aime: missing or non-finite candidate eval/aime/accuracy, "
     "candidate eval/aime/mean_response_tokens"),
    (m(math500=(0.80, 700.0), aime=(math.nan, 3000.0)), "aime: missing or non-finite candidate eval/aime/accuracy"),
])
def test_a_failing_benchmark_blocks_promotion_and_is_named(candidate, why):
    ok, reason = decide_promotion(BASE, candidate, max_accuracy_drop=2.0)
    assert not ok and reason.startswith("not promoted:") and why in reason


def test_tolerance_boundary_and_benchmark_subset():
    assert decide_promotion(BASE, m(math500=(0.78, 900.0), aime=(0.28, 3900.0)), max_accuracy_drop=2.0)[0]
    assert not decide_promotion(BASE, m(math500=(0.78, 900.0), aime=(0.28, 3900.0)), max_accuracy_drop=1.9)[0]
    # Gate only math500: aime may drop.
    cand = m(math500=(0.80, 900.0), aime=(0.10, 3900.0))
    assert not decide_promotion(BASE, cand)[0]
    assert decide_promotion(BASE, cand, benchmarks=["math500"])[0]
    assert benchmarks_of(BASE) == ["aime", "math500"]
    assert decide_promotion({}, cand) == (False, "not promoted: no benchmark to compare (the baseline has no "
                                                 "eval/<bench>/accuracy metric)")
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        decide_promotion(BASE, cand, max_accuracy_drop=-1)


@pytest.mark.parametrize("side", ["baseline", "candidate"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_non_finite_or_missing_metric_on_either_side_blocks_promotion(side, bad):
    good = m(math500=(0.79, 600.0))
    broken = {"eval/math500/accuracy": bad, "eval/math500/mean_response_tokens": 600.0}
    if bad is None:
        del broken["eval/math500/accuracy"]
    base, cand = (broken, good) if side == "baseline" else (BASE, broken)
    ok, reason = decide_promotion(base, cand, benchmarks=["math500"])
    assert not ok and f"non-finite {side} eval/math500/accuracy" in reason
