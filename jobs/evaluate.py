"""Stage evaluate: avg@k, pass@k and response length of one checkpoint on each benchmark.

    python -m jobs.evaluate --params params/demo.yaml --checkpoint CKPT --problems PROBLEMS --out OUT

Benchmarks: the embedded eval split (named ``synthetic``: the ``eval`` split of
``problems.parquet``, when ``eval.include_synthetic``) and every set of ``eval.benchmarks``
(MATH-500, AIME, GSM8K... by hub id or local file). For each, ``eval.k`` samples per problem at
``eval.temperature`` / ``eval.top_p``, graded by math-verify in worker processes.

Writes, as one folder renamed into place when complete::

    OUT/<bench>/rollouts.parquet    the eval rollouts (the rollouts schema of docs/design.md)
    OUT/<bench>/grades.parquet      their verdicts
    OUT/metrics.json                {"eval/<bench>/<name>": value}

with names ``accuracy`` (avg@k: mean verdict over all samples), ``pass@k`` (share of problems
with at least one correct sample), ``mean_response_tokens``, ``median_response_tokens``,
``p90_response_tokens``, ``truncation_rate``, ``epistemic_rate`` (markers per 1k tokens),
``problems`` and ``samples``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from compaction.artifacts import atomic_dir, write_parquet
from compaction.data import load_problem_set, load_problems
from compaction.grading import Grader, grade_rollouts
from compaction.logs import get_logger
from compaction.metrics import epistemic_rate, response_length_stats
from compaction.model import load_tokenizer
from compaction.params import Params
from compaction.rollout import generate_rollouts, make_engine, sampling_from
from jobs.common import params_from, parse, parser

SYNTHETIC = "synthetic"


def benchmarks(params: Params, problems_path: str | None) -> dict[str, pd.DataFrame]:
    """Every benchmark's problems by name, loaded (and checked) before any sampling starts."""
    e = params.eval
    sets: dict[str, pd.DataFrame] = {}
    if e.include_synthetic:
        if problems_path is None:
            raise ValueError("eval.include_synthetic is true but no problems file was given (--problems)")
        sets[SYNTHETIC] = load_problems(problems_path, "eval")
        if sets[SYNTHETIC].empty:
            raise ValueError(f"{problems_path}: no problems in split 'eval'")
    for spec in e.benchmarks:
        if spec.name in sets:
            raise ValueError(f"eval.benchmarks: duplicate benchmark name {spec.name!r}")
        sets[spec.name] = load_problem_set(spec, split="eval")
    if not sets:
        raise ValueError("eval: nothing to evaluate (include_synthetic is false and eval.benchmarks is empty)")
    if e.limit is not None:
        sets = {name: df.head(e.limit) for name, df in sets.items()}
    return sets


def benchmark_metrics(bench: str, rollouts: pd.DataFrame, grades: pd.DataFrame, markers: list[str]) -> dict[str, float]:
    """``eval/<bench>/<name>`` for one benchmark's graded rollouts (rows in the same order)."""
    correct = grades["correct"].astype(float).to_numpy()
    per_problem = pd.Series(correct).groupby(rollouts["problem_id"].to_numpy()).max()
    m = {
        "accuracy": float(correct.mean()),
        "pass@k": float(per_problem.mean()),
        **response_length_stats(rollouts),
        "epistemic_rate": epistemic_rate(rollouts["response"], float(rollouts["response_tokens"].sum()), markers),
        "problems": float(per_problem.size),
        "samples": float(len(rollouts)),
    }
    return {f"eval/{bench}/{k}": v for k, v in m.items()}


def run(params: Params, checkpoint: str, problems_path: str | None, out: str | Path,
        grader: Grader | None = None) -> str:
    """Evaluate ``checkpoint`` on every benchmark; returns the path of ``OUT/metrics.json``.
    ``grader``: running workers to use (default: a pool of its own for this call)."""
    log, e = get_logger(), params.eval
    out = Path(out)
    sets = benchmarks(params, problems_path)
    sampling = sampling_from(params.rollout, n=e.k, temperature=e.temperature, top_p=e.top_p, top_k=0,
                             max_new_tokens=e.max_new_tokens, seed=e.seed)
    engine = make_engine(checkpoint, params.rollout, params.model)
    tokenizer = load_tokenizer(params.model.tokenizer or checkpoint)
    metrics: dict[str, float] = {}
    try:
        pool = contextlib.nullcontext(grader) if grader else Grader(params.grading.workers, params.grading.timeout_s)
        with atomic_dir(out) as tmp, pool as grader:
            for bench, problems in sets.items():
                t0 = time.perf_counter()
                rollouts = generate_rollouts(engine, tokenizer, problems, sampling, checkpoint,
                                             enable_thinking=params.model.enable_thinking, progress=True)
                grades = grade_rollouts(rollouts, problems[["problem_id", "answer"]], grader=grader)
                write_parquet(rollouts, tmp / bench / "rollouts.parquet")
                write_parquet(grades, tmp / bench / "grades.parquet")
                m = benchmark_metrics(bench, rollouts, grades, e.epistemic_markers)
                metrics.update(m)
                log.info("eval %s: avg@%d %.3f pass@%d %.3f, %.1f mean tokens, truncated %.3f (%d problems, %.1fs)",
                         bench, e.k, m[f"eval/{bench}/accuracy"], e.k, m[f"eval/{bench}/pass@k"],
                         m[f"eval/{bench}/mean_response_tokens"], m[f"eval/{bench}/truncation_rate"],
                         len(problems), time.perf_counter() - t0)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    finally:
        engine.close()
    return str(out / "metrics.json")


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF checkpoint folder or hub id")
    p.add_argument("--problems", default=None, help="problems.parquet (its eval split is the `synthetic` benchmark)")
    p.add_argument("--out", required=True)
    args = parse(argv, p)
    return run(params_from(args), args.checkpoint, args.problems, args.out)


if __name__ == "__main__":
    main()
