"""Stage prepare_data: the problems table (train / eval) and, for the synthetic domain, SFT traces.

    python -m jobs.prepare_data --params params/demo.yaml

Writes ``artifacts/prepare_data/<hash of the data params>/{problems,traces}.parquet``
atomically (a temp folder renamed into place).
"""

from __future__ import annotations

from typing import Sequence

from compaction.artifacts import atomic_dir, write_parquet
from compaction.data import build_problems, make_traces
from compaction.logs import get_logger
from compaction.params import Params
from jobs.common import params_from, parse, parser


def run(params: Params) -> dict[str, str | None]:
    log = get_logger()
    out = params.stage_dir("prepare_data", params.section_hash("data"))
    with atomic_dir(out) as tmp:
        problems = build_problems(params.data)
        write_parquet(problems, tmp / "problems.parquet")
        has_traces = params.data.source == "synthetic"
        if has_traces:
            s = params.data.synthetic
            traces = make_traces(problems[problems["split"] == "train"], s.redundancy_rate, s.seed,
                                 s.traces_per_problem, s.privileged_fraction, s.slip_rate,
                                 s.direct_answer_rate, s.premature_answer_rate)
            write_parquet(traces, tmp / "traces.parquet")
    counts = problems["split"].value_counts().to_dict()
    log.info("prepare_data: %d train / %d eval problems -> %s", counts.get("train", 0), counts.get("eval", 0), out)
    return {"problems": str(out / "problems.parquet"), "traces": str(out / "traces.parquet") if has_traces else None}


def main(argv: Sequence[str] | None = None) -> dict:
    return run(params_from(parse(argv, parser(__doc__.splitlines()[0]))))


if __name__ == "__main__":
    main()
