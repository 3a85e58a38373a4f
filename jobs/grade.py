"""Stage grade: math-verify verdicts for a rollouts file, in sandboxed worker processes.

    python -m jobs.grade --params params/demo.yaml --rollouts ROLLOUTS --problems PROBLEMS --out OUT

Writes grades.parquet (schema: docs/design.md, "Stages and what they exchange") atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compaction.grading import grade_file
from compaction.logs import get_logger
from compaction.params import Params
from jobs.common import params_from, parse, parser


def run(params: Params, rollouts_path: str, problems_path: str | None, out_path: str | Path) -> str:
    out = grade_file(rollouts_path, out_path, problems_path=problems_path,
                     workers=params.grading.workers, timeout_s=params.grading.timeout_s)
    get_logger().info("grade: %s -> %s", rollouts_path, out)
    return str(out)


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rollouts", required=True)
    p.add_argument("--problems", default=None)
    p.add_argument("--out", required=True)
    args = parse(argv, p)
    return run(params_from(args), args.rollouts, args.problems, args.out)


if __name__ == "__main__":
    main()
