"""Response-level metrics shared by rollouts, RLVR, OPSD and evaluation."""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import pandas as pd


def response_length_stats(rollouts: pd.DataFrame) -> dict[str, float]:
    """Mean / median / p90 response tokens and the truncation rate (finish_reason == length)."""
    tokens = rollouts["response_tokens"].to_numpy(dtype=float)
    if tokens.size == 0:
        return {"mean_response_tokens": float("nan"), "median_response_tokens": float("nan"),
                "p90_response_tokens": float("nan"), "truncation_rate": float("nan")}
    return {
        "mean_response_tokens": float(tokens.mean()),
        "median_response_tokens": float(np.median(tokens)),
        "p90_response_tokens": float(np.percentile(tokens, 90)),
        "truncation_rate": float((rollouts["finish_reason"] == "length").mean()),
    }


def marker_pattern(markers: Iterable[str]) -> re.Pattern[str]:
    """Case-insensitive, word-bounded alternation of the epistemic markers (longest first)."""
    alts = sorted({m.strip().lower() for m in markers if m.strip()}, key=len, reverse=True)
    if not alts:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(r"\b(?:" + "|".join(re.escape(a) for a in alts) + r")\b", re.IGNORECASE)


def epistemic_rate(responses: Iterable[str], total_tokens: float, markers: Iterable[str]) -> float:
    """Epistemic markers ("wait", "hmm", ...) per 1k response tokens."""
    pattern = marker_pattern(markers)
    count = sum(len(pattern.findall(r)) for r in responses)
    return 1000.0 * count / total_tokens if total_tokens > 0 else float("nan")
