"""Problems for every stage: the embedded synthetic domain, or real sets by hub id / file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from compaction.artifacts import read_parquet, write_parquet
from compaction.data.loaders import load_problem_set, split_train_eval
from compaction.data.schema import GRADE_COLUMNS, PROBLEM_COLUMNS, ROLLOUT_COLUMNS, problem_id
from compaction.data.synthetic import generate_problems, make_traces
from compaction.params import DataParams

__all__ = [
    "GRADE_COLUMNS", "PROBLEM_COLUMNS", "ROLLOUT_COLUMNS", "build_problems", "generate_problems",
    "load_problem_set", "load_problems", "make_traces", "problem_id", "write_problems",
]


def build_problems(data: DataParams) -> pd.DataFrame:
    """The problems table (train and eval splits) described by the ``data`` params section."""
    if data.source == "synthetic":
        s = data.synthetic
        return generate_problems(s.n_train, s.n_eval, seed=s.seed, families=s.families, difficulty=s.difficulty)
    assert data.train_set is not None  # enforced by DataParams
    return split_train_eval(load_problem_set(data.train_set, split="train"), data.eval_fraction)


def write_problems(df: pd.DataFrame, path: str | Path) -> Path:
    return write_parquet(df, path)


def load_problems(path: str | Path, split: str | None = None) -> pd.DataFrame:
    df = read_parquet(path, required=PROBLEM_COLUMNS)
    return df if split is None else df[df["split"] == split].reset_index(drop=True)
