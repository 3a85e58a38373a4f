"""Column contracts of the Parquet files that stages exchange (docs/design.md, "Stages and what
they exchange").

Stages may add columns; they never drop these.
"""

from __future__ import annotations

import hashlib

PROBLEM_COLUMNS = ("problem_id", "source", "split", "problem", "answer", "solution", "difficulty")
ROLLOUT_COLUMNS = (
    "rollout_id", "problem_id", "sample_index", "policy_ref", "prompt", "response",
    "response_tokens", "finish_reason", "temperature", "seed", "round",
)
GRADE_COLUMNS = ("rollout_id", "problem_id", "correct", "extracted_answer", "status", "grade_ms")
GRADE_STATUSES = ("ok", "no_answer", "parse_error", "timeout")


def problem_id(source: str, text: str) -> str:
    """Stable id of a problem: a hash of its source and text (same problem, same id, every run)."""
    return hashlib.sha256(f"{source}\n{text}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


def rollout_id(policy_ref: str, problem_id_: str, round_: int, seed: int, sample_index: int) -> str:
    key = f"{policy_ref}\n{problem_id_}\n{round_}\n{seed}\n{sample_index}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]
