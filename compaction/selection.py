"""Which rollouts enter the OPSD loss: the condition (`all`, `correct`, `incorrect`) decided by the
verifier's verdicts, per prompt before OPSD, or per rollout or group of one round's rollouts.

- unit `pool` (the design card's DAG): the checkpoint's rollouts of each candidate prompt are
  graded once, before OPSD (rollout grading), and the condition keeps prompts (group filtering,
  :func:`prompt_pool`): `correct` those whose pass rate is >= the threshold, `incorrect` the
  others, `all` every one. OPSD then samples only its pool's prompts, and every on-policy rollout
  of them enters the loss, whatever its own verdict.

- unit `rollout`: each rollout by its own verdict (`correct` = graded correct; `incorrect` = every
  other rollout, truncated and unparseable ones included: the verifier did not accept them).
- unit `group`: a group (the rollouts of one prompt of the round) enters whole, correct and
  incorrect members alike. `correct` takes the groups whose pass rate is >= the threshold,
  `incorrect` exactly the other ones (pass rate < threshold), so the two partition `all`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Defined once in compaction.enums (import-light, shared with the params schema and the CLI).
from compaction.enums import BASELINE, CONDITIONS, TRAINING_CONDITIONS, UNITS, Condition, Unit

__all__ = ["BASELINE", "CONDITIONS", "POOL_COLUMNS", "SELECTED_COLUMNS", "TRAINING_CONDITIONS", "UNITS", "Condition",
           "Unit", "pool_candidates", "prompt_pool", "select_rollouts"]

POOL_COLUMNS = ("problem_id", "pass_rate", "samples")
SELECTED_COLUMNS = ("rollout_id", "problem_id", "group", "correct", "status", "group_pass_rate")


def select_rollouts(rollouts: pd.DataFrame, grades: pd.DataFrame, condition: str, unit: str = "rollout",
                    group_threshold: float = 0.5) -> pd.DataFrame:
    """The selected rollouts with their verdicts (columns SELECTED_COLUMNS), in the rollouts' order.

    Grades are joined on rollout_id. Groups are the rollouts' ``group`` column when there is
    one (a prompt position of the round), else their ``problem_id``.
    """
    if condition not in TRAINING_CONDITIONS:
        raise ValueError(f"condition: expected one of {TRAINING_CONDITIONS}, got {condition!r}")
    if unit not in UNITS:
        raise ValueError(f"opsd.unit: expected one of {UNITS}, got {unit!r}")
    verdicts = grades.set_index("rollout_id")
    missing = rollouts.loc[~rollouts["rollout_id"].isin(verdicts.index), "rollout_id"]
    if len(missing):
        raise ValueError(f"{len(missing)} rollout(s) have no grade, e.g. {list(missing[:3])}")
    df = pd.DataFrame({
        "rollout_id": rollouts["rollout_id"].to_numpy(),
        "problem_id": rollouts["problem_id"].to_numpy(),
        "group": (rollouts["group"] if "group" in rollouts.columns else rollouts["problem_id"]).to_numpy(),
    })
    df["correct"] = verdicts.loc[df["rollout_id"], "correct"].to_numpy().astype(bool)
    df["status"] = verdicts.loc[df["rollout_id"], "status"].to_numpy()
    df["group_pass_rate"] = df.groupby("group")["correct"].transform("mean").astype(float)
    if condition == "all" or unit == "pool":  # the pool chose the prompts: every rollout of them trains
        keep = pd.Series(True, index=df.index)
    elif unit == "rollout":
        keep = df["correct"] if condition == "correct" else ~df["correct"]
    else:
        passing = df["group_pass_rate"] >= group_threshold
        keep = passing if condition == "correct" else ~passing
    return df[keep.to_numpy()].reset_index(drop=True)[list(SELECTED_COLUMNS)]


def pool_candidates(train: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """The training prompts that rollout grading samples: ``n`` of them, a seeded choice (in the
    train split's order), or every one (``n`` None or >= the split)."""
    train = train.drop_duplicates("problem_id").reset_index(drop=True)
    if n is None or n >= len(train):
        return train
    keep = np.sort(np.random.default_rng([seed, 7]).choice(len(train), size=n, replace=False))
    return train.iloc[keep].reset_index(drop=True)


def prompt_pool(grades: pd.DataFrame, condition: str, threshold: float) -> pd.DataFrame:
    """Group filtering: the prompts of ``condition`` (columns POOL_COLUMNS) from the verdicts of
    the checkpoint's rollouts (grades with ``problem_id``), in first-seen order. A prompt's
    pass rate is the fraction of its samples graded correct."""
    if condition not in TRAINING_CONDITIONS:
        raise ValueError(f"condition: expected one of {TRAINING_CONDITIONS}, got {condition!r}")
    if grades.empty:
        raise ValueError("group filtering: no graded rollouts")
    stats = grades.groupby("problem_id", sort=False)["correct"].agg(["mean", "size"])
    pool = pd.DataFrame({"problem_id": stats.index.to_numpy(), "pass_rate": stats["mean"].astype(float).to_numpy(),
                         "samples": stats["size"].astype(int).to_numpy()})
    if condition == "correct":
        pool = pool[pool["pass_rate"] >= threshold]
    elif condition == "incorrect":
        pool = pool[pool["pass_rate"] < threshold]
    return pool.reset_index(drop=True)[list(POOL_COLUMNS)]
