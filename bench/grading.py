"""Rows per second of the grading pool over simple rows, beside an in-process math-verify loop.

    .venv/bin/python bench/grading.py [--rows 10000] [--workers 2] [--timeout 5]

Rows look like real responses (``<think>...</think>`` then ``The answer is \\boxed{...}``),
half right and half wrong, with integers, fractions, decimals and equivalent forms
(``\\frac{1}{2}`` vs ``0.5``). Every (gold, answer) pair is distinct, so the pool's
de-duplication of identical pairs does not flatter the figure.

Baseline, side by side in the same run: the plain single-thread loop
``verify(parse(gold), parse(answer))`` in this process (same extraction and LaTeX config,
gold parsed every row, math-verify's signal timeouts in the main thread).
Prints rows/s for both and their ratio, whether the verdicts agree, start-up time, and
peak RSS of this process and of the largest worker.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compaction.grading import Grader, extract_boxed, normalize_answer, wrap_gold  # noqa: E402


def make_rows(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, golds, seen = [], [], set()
    while len(golds) < n:
        kind = rng.randrange(4)
        a, b = rng.randrange(1, 10_000), rng.randrange(2, 64)
        if kind == 0:
            gold, right, wrong = str(a), str(a), str(a + rng.randrange(1, 9))
        elif kind == 1:
            gold, right, wrong = f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{2 * a}}}{{{2 * b}}}", f"\\frac{{{a + 1}}}{{{b}}}"
        elif kind == 2:
            gold, right, wrong = f"\\frac{{{a}}}{{4}}", f"{a / 4:g}", f"{a / 4 + 0.5:g}"
        else:
            gold, right, wrong = f"{-a}", f"-{a}", f"{a}"
        answer = right if rng.random() < 0.5 else wrong
        if (gold, answer) in seen:
            continue
        seen.add((gold, answer))
        golds.append(gold)
        responses.append(f"<think>\nLet me compute step by step. Wait, check again: {a} and {b}.\n</think>\n"
                         f"The answer is \\boxed{{{answer}}}.")
    return responses, golds


def baseline(responses: list[str], golds: list[str]) -> list[bool]:
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    out = []
    for response, gold in zip(responses, golds):
        answer = extract_boxed(response)
        g = parse(wrap_gold(gold), config, fallback_mode="no_fallback", parsing_timeout=5)
        p = parse("\\boxed{" + normalize_answer(answer) + "}", config, fallback_mode="no_fallback", parsing_timeout=5)
        out.append(bool(g and p and verify(g, p, timeout_seconds=5)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0, help="hard per-row deadline (s)")
    args = ap.parse_args()
    responses, golds = make_rows(args.rows)

    grader = Grader(workers=args.workers, timeout_s=args.timeout)
    t0 = time.perf_counter()
    grader.start()
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    grades = grader.grade(responses, golds)
    pool_s = time.perf_counter() - t0
    grader.close()
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest reaped worker

    t0 = time.perf_counter()
    base = baseline(responses, golds)
    base_s = time.perf_counter() - t0
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n = len(responses)
    statuses = {s: sum(g.status == s for g in grades) for s in sorted({g.status for g in grades})}
    agree = sum(g.correct == b for g, b in zip(grades, base))
    pool_rate, base_rate = n / pool_s, n / base_s
    print(f"rows {n}, workers {args.workers}, accuracy {sum(g.correct for g in grades) / n:.3f}, statuses {statuses}")
    print(f"{'path':<36} {'seconds':>8} {'rows/s':>9} {'vs loop':>8}")
    print(f"{'Grader pool (warm)':<36} {pool_s:8.2f} {pool_rate:9.0f} {pool_rate / base_rate:7.2f}x")
    print(f"{'Grader pool incl. start-up':<36} {pool_s + startup:8.2f} {n / (pool_s + startup):9.0f} "
          f"{n / (pool_s + startup) / base_rate:7.2f}x")
    print(f"{'in-process single-thread loop':<36} {base_s:8.2f} {base_rate:9.0f} {1:7.2f}x")
    print(f"verdicts agree with the loop: {agree}/{n}; worker start-up {startup:.2f} s")
    print(f"peak RSS: this process {self_rss:.0f} MiB (includes the in-process loop), largest worker {worker_rss:.0f} MiB")


if __name__ == "__main__":  # required: workers are spawned and re-import the main module
    main()
