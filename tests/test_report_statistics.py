"""compaction.report.statistics: hand-worked values, and the single-seed percentile interval
against scipy.stats.bootstrap (an independent implementation) on the same data."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from compaction.report.statistics import (
    bootstrap_delta, bootstrap_row, cell_sums, percentile_interval, ratio_of_sums, resample_counts, seeded_rng,
)


def frame(problem_ids, correct, tokens):
    return pd.DataFrame({"problem_id": problem_ids, "correct": correct, "response_tokens": tokens})


def test_cells_and_ratio_by_hand():
    seeds = [frame(["a", "a", "b"], [True, False, True], [10, 20, 30]), frame(["b"], [False], [40])]
    sums, counts = cell_sums(seeds, ["a", "b"], "correct")
    assert sums.tolist() == [[1, 1], [0, 0]] and counts.tolist() == [[2, 1], [0, 1]]
    assert ratio_of_sums(sums, counts) == pytest.approx(2 / 4)  # avg@k over every sample
    # Resample 0: seed 0 twice, problem b only -> (1 + 1) / (1 + 1) = 1. Resample 1: seed 1, problem a -> 0/0.
    w_seed, w_prob = np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [2.0, 0.0]])
    got = ratio_of_sums(sums, counts, w_seed, w_prob)
    assert got[0] == pytest.approx(1.0) and np.isnan(got[1])
    tok_sums, _ = cell_sums(seeds, ["a", "b"], "response_tokens")
    assert ratio_of_sums(tok_sums, counts) == pytest.approx(100 / 4)


def test_resample_counts_interval_and_rng():
    rng = np.random.default_rng(0)
    w = resample_counts(rng, 5, 1000)
    assert w.shape == (1000, 5) and (w.sum(1) == 5).all()  # n draws with replacement each
    assert resample_counts(rng, 1, 3).tolist() == [[1.0], [1.0], [1.0]]  # one item: always itself
    assert percentile_interval(np.array([np.nan, 1.0, 2.0, 3.0]), 1.0) == [1.0, 3.0]  # NaN resamples dropped
    assert percentile_interval(np.array([np.nan]), 0.95) is None
    a, b = seeded_rng(3, "row", "rlvr"), seeded_rng(3, "row", "rlvr")
    assert a.integers(1 << 30) == b.integers(1 << 30)
    assert seeded_rng(3, "row", "rlvr").integers(1 << 30) != seeded_rng(3, "row", "opsd-all").integers(1 << 30)


@pytest.mark.parametrize("samples_per_problem", [1, 4])
def test_single_seed_interval_matches_scipy_bootstrap(samples_per_problem):
    """One seed, equal samples per problem: avg@k = the mean over problems of each problem's mean,
    so our problem resampling is scipy's percentile bootstrap of that mean."""
    gen = np.random.default_rng(7)
    n = 150
    ease = gen.uniform(0, 1, n)
    ids = np.repeat([f"p{i}" for i in range(n)], samples_per_problem)
    correct = gen.uniform(size=ids.size) < np.repeat(ease, samples_per_problem)
    tokens = gen.integers(20, 400, ids.size)
    row = bootstrap_row([frame(ids, correct, tokens)], 20_000, 0.95, np.random.default_rng(0))
    per_problem = pd.DataFrame({"p": ids, "c": correct.astype(float), "t": tokens}).groupby("p").mean()
    for name, column in (("accuracy", "c"), ("mean_response_tokens", "t")):
        x = per_problem[column].to_numpy()
        ref = stats.bootstrap((x,), np.mean, n_resamples=20_000, confidence_level=0.95, method="percentile",
                              rng=np.random.default_rng(1)).confidence_interval
        assert row[name] == pytest.approx(x.mean())
        width = ref.high - ref.low
        # Two independent Monte-Carlo runs of the same interval: endpoints within 3% of its width.
        assert row[f"{name}_ci"][0] == pytest.approx(ref.low, abs=0.03 * width)
        assert row[f"{name}_ci"][1] == pytest.approx(ref.high, abs=0.03 * width)


def test_paired_delta_of_a_model_with_itself_is_exactly_zero():
    f = frame(["a", "b", "c"], [True, False, True], [5, 6, 7])
    out = bootstrap_delta([f], [f], 500, 0.9, np.random.default_rng(0))
    assert out["accuracy_delta"] == 0 and out["accuracy_delta_ci"] == [0.0, 0.0]  # pairing cancels the problems
    assert out["delta_problems"] == 3
    shorter = f.assign(response_tokens=f["response_tokens"] - 2)
    out = bootstrap_delta([shorter], [f], 500, 0.9, np.random.default_rng(0))
    assert out["mean_response_tokens_delta"] == pytest.approx(-2)
    assert out["mean_response_tokens_delta_ci"] == pytest.approx([-2, -2])
    disjoint = frame(["z"], [True], [1])
    assert bootstrap_delta([disjoint], [f], 10, 0.9, np.random.default_rng(0))["accuracy_delta"] is None


def test_deltas_paired_by_seed_remove_the_seed_effect_both_models_share():
    """Two models evaluated under the same seeds, where each seed moves both by the same amount (a
    shared evaluation seed): paired by seed, the delta's interval is narrower than unpaired, and
    it still covers the true difference."""
    rng = np.random.default_rng(0)
    problems = [f"p{i}" for i in range(40)]
    model, base = [], []
    for shift in (-0.3, 0.0, 0.3):  # the seed's effect on both models' lengths
        noise = rng.normal(0, 0.5, len(problems))
        base.append(pd.DataFrame({"problem_id": problems, "correct": True,
                                  "response_tokens": 50 + 40 * shift + noise}))
        model.append(pd.DataFrame({"problem_id": problems, "correct": True,
                                   "response_tokens": 45 + 40 * shift + noise + rng.normal(0, 0.5, len(problems))}))
    paired = bootstrap_delta(model, base, 2000, 0.95, seeded_rng(0, "d"), paired_seeds=True)
    unpaired = bootstrap_delta(model, base, 2000, 0.95, seeded_rng(0, "d"), paired_seeds=False)
    lo_p, hi_p = paired["mean_response_tokens_delta_ci"]
    lo_u, hi_u = unpaired["mean_response_tokens_delta_ci"]
    assert paired["mean_response_tokens_delta"] == pytest.approx(unpaired["mean_response_tokens_delta"])
    assert lo_p <= -5 <= hi_p
    assert (hi_p - lo_p) < 0.5 * (hi_u - lo_u)


def test_verdict_reads_the_papers_three_directions_off_the_rows():
    from compaction.report.table import verdict

    def row(model, acc, delta, ci_hi, change):
        return {"model": model, "benchmark": "b", "accuracy": acc, "accuracy_delta": delta,
                "accuracy_delta_ci": [delta - 0.02, ci_hi], "mean_response_tokens": 100 * (1 + change),
                "mean_response_tokens_change": change, "mean_response_tokens_delta": 100 * change,
                "mean_response_tokens_delta_ci": [100 * change - 1, 100 * change + 1]}

    rows = [row("opsd-correct", 0.55, -0.01, 0.01, -0.25), row("opsd-incorrect", 0.45, -0.10, -0.01, -0.40),
            row("opsd-all", 0.50, -0.05, 0.0, -0.30), row("rlvr-lenpen", 0.54, -0.02, 0.0, -0.28)]
    v = {x["claim"]: x for x in verdict(rows, "rlvr")}
    assert v["correct-only is >=20% shorter and within 2 pt"]["holds"] is True
    assert v["incorrect-only loses accuracy"]["holds"] is True
    assert v["all sits in between"]["holds"] is True
    assert "rlvr-lenpen vs rlvr: -2.0 pt" in v["(baseline) the length penalty, for comparison"]["evidence"]
    # Each direction can fail: only 15% shorter; an interval reaching 0; all above correct-only.
    rows = [row("opsd-correct", 0.55, -0.01, 0.01, -0.15), row("opsd-incorrect", 0.45, -0.10, 0.001, -0.40),
            row("opsd-all", 0.60, 0.04, 0.06, -0.30)]
    assert [x["holds"] for x in verdict(rows, "rlvr")] == [False, False, False]
    assert [x["holds"] for x in verdict(rows[:1], "rlvr")] == [False, None, None]  # missing models: not tested
