"""The report's statistics, pure functions of per-rollout frames: avg@k accuracy and mean length of a
model, with percentile-bootstrap intervals over problems (and seeds), and paired deltas against a
baseline. Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13 (percentile
intervals); a paired resample of the problems both models saw removes the between-problem
variance from a difference.

A frame has one row per rollout: ``problem_id``, ``correct`` (bool), ``response_tokens``. A
statistic is a ratio of sums over (seed, problem) cells, so a resample is a pair of multiplicity
vectors (seeds, problems), and every resample is computed at once (``einsum``).
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import pandas as pd


def cell_sums(frames: Sequence[pd.DataFrame], problems: Sequence[str], column: str) -> tuple[np.ndarray, np.ndarray]:
    """Per (seed, problem) sums of ``column`` and sample counts."""
    index = {p: i for i, p in enumerate(problems)}
    sums = np.zeros((len(frames), len(problems)))
    counts = np.zeros((len(frames), len(problems)))
    for s, df in enumerate(frames):
        df = df[df["problem_id"].isin(index)]
        cols = df["problem_id"].map(index).to_numpy(dtype=int)
        np.add.at(sums[s], cols, df[column].to_numpy(dtype=float))
        np.add.at(counts[s], cols, 1.0)
    return sums, counts


def ratio_of_sums(sums, counts, w_seed=None, w_prob=None) -> np.ndarray | float:
    """sum(sums) / sum(counts) over every (seed, problem) cell: the point estimate; with
    multiplicities ``w_seed`` [B, seeds] and ``w_prob`` [B, problems], the B resampled estimates
    (a cell counts w_seed[b, s] * w_prob[b, p] times). NaN where a resample has no sample."""
    if w_seed is None:
        den = counts.sum()
        return float(sums.sum() / den) if den else float("nan")
    num = np.einsum("bs,sp,bp->b", w_seed, sums, w_prob)
    den = np.einsum("bs,sp,bp->b", w_seed, counts, w_prob)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def resample_counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """Bootstrap multiplicities: ``b`` resamples of ``n`` items with replacement."""
    if n == 1:
        return np.ones((b, 1))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)


def seeded_rng(seed: int, *labels: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(label.encode()) for label in labels)])


def percentile_interval(samples: np.ndarray, confidence: float) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    a = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [a, 100 - a])
    return [float(lo), float(hi)]


def bootstrap_row(frames: Sequence[pd.DataFrame], b: int, confidence: float, rng) -> dict[str, Any]:
    """Point estimates and intervals of accuracy and mean tokens over problems (and seeds)."""
    problems = sorted(set().union(*(set(f["problem_id"]) for f in frames)))
    w_seed, w_prob = resample_counts(rng, len(frames), b), resample_counts(rng, len(problems), b)
    row: dict[str, Any] = {}
    for name, column in (("accuracy", "correct"), ("mean_response_tokens", "response_tokens")):
        sums, counts = cell_sums(frames, problems, column)
        row[name] = ratio_of_sums(sums, counts)
        row[f"{name}_ci"] = percentile_interval(ratio_of_sums(sums, counts, w_seed, w_prob), confidence)
    return row


def bootstrap_delta(frames: Sequence[pd.DataFrame], base: Sequence[pd.DataFrame], b: int, confidence: float,
                    rng, paired_seeds: bool = False) -> dict[str, Any]:
    """Paired deltas (model - baseline) over the problems both were evaluated on. With
    ``paired_seeds`` (``frames[i]`` and ``base[i]`` come from the same seed) one seed resample is
    applied to both, as one problem resample is: the between-seed variance leaves the difference too."""
    problems = sorted(set().union(*(set(f["problem_id"]) for f in frames))
                      & set().union(*(set(f["problem_id"]) for f in base)))
    out: dict[str, Any] = {"delta_problems": len(problems)}
    if not problems:
        for name in ("accuracy", "mean_response_tokens"):
            out[f"{name}_delta"], out[f"{name}_delta_ci"] = None, None
        return out
    w_prob = resample_counts(rng, len(problems), b)
    w_m = resample_counts(rng, len(frames), b)
    w_b = w_m if paired_seeds and len(frames) == len(base) else resample_counts(rng, len(base), b)
    for name, column in (("accuracy", "correct"), ("mean_response_tokens", "response_tokens")):
        sm, cm = cell_sums(frames, problems, column)
        sb, cb = cell_sums(base, problems, column)
        out[f"{name}_delta"] = ratio_of_sums(sm, cm) - ratio_of_sums(sb, cb)
        out[f"{name}_delta_ci"] = percentile_interval(ratio_of_sums(sm, cm, w_m, w_prob) - ratio_of_sums(sb, cb, w_b, w_prob), confidence)
    return out
