"""Real problem sets (GSM8K, MATH-500, AIME 2024/2025, any problem/answer set) -> problems schema.

Loaded through ``datasets`` from a hub id or a local .jsonl/.json/.parquet file, so the
same code serves a researcher's hub set and the tests' local files. Presets know each
set's column conventions; ``custom`` takes the column names from the spec.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd

from compaction.data.schema import PROBLEM_COLUMNS, problem_id
from compaction.params import DatasetSpec

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Candidate column names per preset, first match wins (AIME copies on the hub disagree on case).
PRESET_COLUMNS: dict[str, dict[str, list[str]]] = {
    "gsm8k": {"problem": ["question"], "answer": ["answer"], "solution": []},
    "math500": {"problem": ["problem"], "answer": ["answer"], "solution": ["solution"]},
    "aime": {"problem": ["problem", "Problem", "question"], "answer": ["answer", "Answer"],
             "solution": ["solution", "Solution"]},
}

GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def _load_frame(spec: DatasetSpec) -> tuple[pd.DataFrame, str]:
    """Rows of the set as a DataFrame, and a label naming where they came from (for errors)."""
    import datasets  # imported here: slow to import, and only this path needs it

    local = Path(spec.path)
    if local.suffix in LOCAL_FORMATS:
        if not local.is_file():
            raise FileNotFoundError(f"dataset {spec.name!r}: file {local} not found")
        ds = datasets.load_dataset(LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
        return ds.to_pandas(), str(local)
    ds = datasets.load_dataset(spec.path, spec.config, split=spec.split)
    return ds.to_pandas(), f"{spec.path}[{spec.split}]"


def _pick(df: pd.DataFrame, candidates: list[str], what: str, origin: str, required: bool) -> str | None:
    for c in candidates:
        if c in df.columns:
            return c
    if required:
        raise ValueError(f"{origin}: no {what} column (looked for {candidates}); columns are {list(df.columns)}")
    return None


def load_problem_set(spec: DatasetSpec, split: str = "eval") -> pd.DataFrame:
    """Load ``spec`` and normalise it to the problems schema (``source`` = spec.name)."""
    raw, origin = _load_frame(spec)
    if spec.preset == "custom":
        cols = {"problem": [spec.problem_column], "answer": [spec.answer_column],
                "solution": [spec.solution_column] if spec.solution_column else []}
    else:
        cols = PRESET_COLUMNS[spec.preset]
    pcol = _pick(raw, cols["problem"], "problem", origin, required=True)
    acol = _pick(raw, cols["answer"], "answer", origin, required=True)
    scol = _pick(raw, cols["solution"], "solution", origin, required=False)
    if spec.limit is not None:
        raw = raw.head(spec.limit)
    rows = []
    for i, r in enumerate(raw.itertuples(index=False)):
        rec = r._asdict()
        problem, answer = rec[pcol], rec[acol]
        if problem is None or (isinstance(problem, str) and not problem.strip()):
            raise ValueError(f"{origin}: row {i}: empty {pcol!r}")
        if answer is None:
            raise ValueError(f"{origin}: row {i}: empty {acol!r}")
        solution = rec[scol] if scol else None
        answer = str(answer).strip()
        if spec.preset == "gsm8k":
            # GSM8K's answer column is "<worked solution> #### <number>".
            m = GSM8K_FINAL.search(answer)
            if not m:
                raise ValueError(f"{origin}: row {i}: GSM8K answer has no '#### <final>' line")
            solution, answer = answer[: m.start()].strip(), m.group(1).replace(",", "").strip()
        level = rec.get("level")
        rows.append({
            "problem_id": problem_id(spec.name, str(problem)),
            "source": spec.name,
            "split": split,
            "problem": str(problem),
            "answer": answer,
            "solution": None if solution is None or (isinstance(solution, float) and pd.isna(solution)) else str(solution),
            "difficulty": int(level) if isinstance(level, (int, float)) and not pd.isna(level) else None,
        })
    df = pd.DataFrame(rows, columns=list(PROBLEM_COLUMNS))
    df["difficulty"] = df["difficulty"].astype("Int64")
    return df


def split_train_eval(df: pd.DataFrame, eval_fraction: float) -> pd.DataFrame:
    """Assign ``split`` by a hash of problem_id: stable, and no problem lands in both splits."""
    df = df.drop_duplicates("problem_id").copy()
    bucket = df["problem_id"].map(lambda pid: int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF)
    df["split"] = ["eval" if b < eval_fraction else "train" for b in bucket]
    return df
