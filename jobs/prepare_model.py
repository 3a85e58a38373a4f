"""Stage prepare_model: the base model reference the SFT stage starts from.

    python -m jobs.prepare_model --params params/demo.yaml --problems PROBLEMS --traces TRACES

For a real model this is just ``model.name_or_path`` (a hub id or a local checkpoint).
For the embedded default it trains the tokenizer on the training split's text (problems,
reference solutions, traces) and the prompts' fixed text, and saves a random-initialised tiny
Qwen3 under ``artifacts/base_model/<hash of data + model params>/``.
"""

from __future__ import annotations

from typing import Sequence

from compaction.artifacts import read_parquet
from compaction.logs import get_logger
from compaction.model import build_embedded_model
from compaction.model.prompts import prompt_boilerplate
from compaction.params import Params
from jobs.common import params_from, parse, parser


def tokenizer_corpus(problems_path: str, traces_path: str | None) -> list[str]:
    """The embedded tokenizer's training text: the prompts' fixed text first, then the training
    split's problems, reference solutions and traces."""
    problems = read_parquet(problems_path)
    train = problems[problems["split"] == "train"]
    texts = prompt_boilerplate() + list(train["problem"]) + [s for s in train["solution"] if isinstance(s, str)]
    if traces_path:
        texts += list(read_parquet(traces_path, required=["response"])["response"])
    return texts


def run(params: Params, problems_path: str, traces_path: str | None) -> str:
    if params.model.name_or_path != "embedded":
        return params.model.name_or_path
    out = params.stage_dir("base_model", params.section_hash("data", "model"))
    build_embedded_model(out, tokenizer_corpus(problems_path, traces_path), params.model.tiny)
    get_logger().info("prepare_model: embedded Qwen3 (%s) -> %s", params.model.tiny.model_dump(), out)
    return str(out)


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--problems", required=True)
    p.add_argument("--traces", default=None)
    args = parse(argv, p)
    return run(params_from(args), args.problems, args.traces)


if __name__ == "__main__":
    main()
