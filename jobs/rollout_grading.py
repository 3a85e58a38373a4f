"""Stage rollout_grading: the checkpoint's own samples of the OPSD training prompts, graded.

    python -m jobs.rollout_grading --params params/demo.yaml --policy RLVR_CKPT --problems PROBLEMS --out OUT

The first step of the design card's `rollout grading -> correct-group filtering -> OPSD`: the
checkpoint OPSD starts from samples ``opsd.group_samples`` responses to each of ``opsd.pool_prompts``
training prompts (a seeded choice; compaction.selection.pool_candidates), at the temperature and
length OPSD samples with, and math-verify grades them. ``OUT/`` gets rollouts.parquet,
grades.parquet and metrics.json (written last), atomically. Group filtering reads the grades:
each prompt's pass rate decides which condition's pool it joins.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Sequence

from compaction.artifacts import atomic_dir, write_parquet
from compaction.data import load_problems
from compaction.grading import Grader, grade_rollouts
from compaction.logs import get_logger
from compaction.model import load_tokenizer
from compaction.params import Params
from compaction.rollout import generate_rollouts, make_engine, sampling_from, write_rollouts
from compaction.selection import pool_candidates
from jobs.common import params_from, parse, parser

DONE = "metrics.json"


def run(params: Params, policy_ref: str, problems_path: str, out: str | Path, grader: Grader | None = None) -> str:
    """Sample and grade; returns ``OUT`` (a finished folder is returned at once)."""
    out, cfg = Path(out), params.opsd
    if (out / DONE).is_file():
        return str(out)
    train = load_problems(problems_path, "train")
    if train.empty:
        raise ValueError(f"{problems_path}: no train split")
    problems = pool_candidates(train, cfg.pool_prompts, cfg.seed)
    sampling = sampling_from(params.rollout, n=cfg.group_samples, temperature=cfg.sample_temperature, top_p=1.0,
                             top_k=0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    engine = make_engine(policy_ref, params.rollout, params.model)
    tokenizer = load_tokenizer(params.model.tokenizer or policy_ref)
    try:
        t0 = time.perf_counter()
        rollouts = generate_rollouts(engine, tokenizer, problems, sampling, policy_ref,
                                     enable_thinking=params.model.enable_thinking, progress=True)
        t1 = time.perf_counter()
    finally:
        engine.close()
    pool = contextlib.nullcontext(grader) if grader else Grader(params.grading.workers, params.grading.timeout_s)
    with pool as grader:
        grades = grade_rollouts(rollouts, problems[["problem_id", "answer"]], grader=grader)
    t2 = time.perf_counter()
    metrics = {"rollout_grading/prompts": float(len(problems)), "rollout_grading/rollouts": float(len(rollouts)),
               "rollout_grading/accuracy": float(grades["correct"].astype(float).mean()),
               "rollout_grading/mean_response_tokens": float(rollouts["response_tokens"].mean()),
               "rollout_grading/generate_seconds": t1 - t0, "rollout_grading/grade_seconds": t2 - t1}
    with atomic_dir(out) as tmp:
        write_rollouts(rollouts, tmp / "rollouts.parquet")
        write_parquet(grades, tmp / "grades.parquet")
        (tmp / DONE).write_text(json.dumps(metrics, indent=1))
    get_logger().info("rollout grading: %d prompts x %d samples, accuracy %.3f, %.1f mean tokens (%.1fs + %.1fs)",
                      len(problems), cfg.group_samples, metrics["rollout_grading/accuracy"],
                      metrics["rollout_grading/mean_response_tokens"], t1 - t0, t2 - t1)
    return str(out)


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="the checkpoint OPSD starts from")
    p.add_argument("--problems", required=True)
    p.add_argument("--out", required=True)
    args = parse(argv, p)
    return run(params_from(args), args.policy, args.problems, args.out)


if __name__ == "__main__":
    main()
