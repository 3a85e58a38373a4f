"""The promotion gate: does a compacted model earn alias ``compacted@candidate``?

A candidate (an OPSD model) is promoted only when, on **every** gated benchmark, against the
RLVR baseline it started from:

- its accuracy (avg@k, ``eval/<bench>/accuracy``, a fraction) dropped by at most
  ``max_accuracy_drop`` percentage points (``promotion.max_accuracy_drop``, default 2.0), and
- its mean response length (``eval/<bench>/mean_response_tokens``) is strictly shorter.

That is the paper's claim in one rule: shorter answers at (almost) the same accuracy. A missing
or non-finite metric on either side fails the gate, with the reason naming it.

Metrics are flat dicts in the MLflow naming of the evaluate job (``metrics.json`` or a run's
``data.metrics``). :func:`decide_promotion` is pure. The flows decide before they register
(tasks.registry.register_compacted): a new version is created with the verdict's tags
(:func:`verdict_tags`: ``promotion``, the reason, so a version that did not pass says why, and
``promotion_passed``), and alias ``candidate`` is moved to it only when it passed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

ACCURACY = "eval/{bench}/accuracy"
TOKENS = "eval/{bench}/mean_response_tokens"
TAG = "promotion"
TAG_PASSED = "promotion_passed"
CANDIDATE_ALIAS = "candidate"
MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value


def benchmarks_of(metrics: Mapping[str, Any]) -> list[str]:
    """Benchmark names with an accuracy metric in ``metrics`` (sorted)."""
    return sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.endswith("/accuracy")
                   and k.count("/") == 2})


def _value(metrics: Mapping[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return None
    return float(v)


def decide_promotion(baseline: Mapping[str, Any], candidate: Mapping[str, Any],
                     benchmarks: Iterable[str] | None = None, max_accuracy_drop: float = 2.0) -> tuple[bool, str]:
    """``(promote, reason)`` for ``candidate`` against ``baseline``.

    ``benchmarks``: the benchmarks to check (None = every benchmark with an accuracy in
    ``baseline``). ``max_accuracy_drop`` is in percentage points (accuracies are fractions:
    a drop from 0.52 to 0.50 is 2.0 points). Promote only if every benchmark passes both tests.
    """
    if max_accuracy_drop < 0 or not math.isfinite(max_accuracy_drop):
        raise ValueError(f"max_accuracy_drop must be a finite number >= 0, got {max_accuracy_drop!r}")
    benches = sorted(benchmarks) if benchmarks is not None else benchmarks_of(baseline)
    if not benches:
        return False, "not promoted: no benchmark to compare (the baseline has no eval/<bench>/accuracy metric)"
    failures, passes = [], []
    for b in benches:
        acc_key, tok_key = ACCURACY.format(bench=b), TOKENS.format(bench=b)
        values = {(side, key): _value(m, key) for side, m in (("baseline", baseline), ("candidate", candidate))
                  for key in (acc_key, tok_key)}
        missing = [f"{side} {key}" for (side, key), v in values.items() if v is None]
        if missing:
            failures.append(f"{b}: missing or non-finite {', '.join(missing)}")
            continue
        acc0, acc1 = values[("baseline", acc_key)], values[("candidate", acc_key)]
        tok0, tok1 = values[("baseline", tok_key)], values[("candidate", tok_key)]
        drop = 100.0 * (acc0 - acc1)
        change = 100.0 * (tok1 - tok0) / tok0 if tok0 > 0 else float("nan")
        summary = (f"{b}: accuracy {acc0:.4f} -> {acc1:.4f} (drop {drop:+.2f} pt, tolerance {max_accuracy_drop:g}), "
                   f"mean tokens {tok0:.1f} -> {tok1:.1f} ({change:+.1f}%)")
        problems = []
        if drop > max_accuracy_drop + 1e-9:
            problems.append(f"accuracy drop {drop:.2f} pt > {max_accuracy_drop:g}")
        if not tok1 < tok0:
            problems.append("responses not shorter")
        (failures if problems else passes).append(summary if not problems else f"{summary}: {'; '.join(problems)}")
    if failures:
        return False, "not promoted: " + " | ".join(failures + passes)
    return True, "promoted: " + " | ".join(passes)


def verdict_tags(promote: bool, reason: str) -> dict[str, str]:
    """The version tags that record a verdict: ``promotion`` (the reason) and ``promotion_passed``."""
    return {TAG: reason[:MAX_TAG_CHARS], TAG_PASSED: "true" if promote else "false"}
