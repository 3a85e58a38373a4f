"""Stage rollouts: sample responses of a policy on a split of the problems.

    python -m jobs.rollouts --params params/demo.yaml --policy CKPT --problems PROBLEMS --split eval --out OUT

Writes rollouts.parquet (schema: docs/design.md, "Stages and what they exchange") atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from compaction.data import load_problems
from compaction.logs import get_logger
from compaction.model import load_tokenizer
from compaction.params import Params
from compaction.rollout import generate_rollouts, make_engine, sampling_from, write_rollouts
from jobs.common import params_from, parse, parser


def run(params: Params, policy_ref: str, problems_path: str, split: str, out_path: str | Path,
        round_: int = 0, limit: int | None = None, progress: bool = True) -> str:
    log = get_logger()
    problems = load_problems(problems_path, split)
    if problems.empty:
        raise ValueError(f"{problems_path}: no problems in split {split!r}")
    if limit is not None:
        problems = problems.head(limit)
    sampling = sampling_from(params.rollout)
    engine = make_engine(policy_ref, params.rollout, params.model)
    tokenizer = load_tokenizer(params.model.tokenizer or policy_ref)
    t0 = time.perf_counter()
    rollouts = generate_rollouts(engine, tokenizer, problems, sampling, policy_ref, round_,
                                 params.model.enable_thinking, progress=progress)
    seconds = time.perf_counter() - t0
    engine.close()
    write_rollouts(rollouts, out_path)
    log.info("rollouts: %d responses, %d tokens in %.1fs (%.0f tok/s) -> %s", len(rollouts),
             rollouts["response_tokens"].sum(), seconds, rollouts["response_tokens"].sum() / max(seconds, 1e-9), out_path)
    return str(out_path)


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--problems", required=True)
    p.add_argument("--split", default="eval")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None)
    args = parse(argv, p)
    return run(params_from(args), args.policy, args.problems, args.split, args.out, limit=args.limit)


if __name__ == "__main__":
    main()
