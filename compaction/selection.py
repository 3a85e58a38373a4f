"""Which rollouts enter the OPSD loss: the condition (`all`, `correct`, `incorrect`) decided by the
verifier's verdicts, per rollout or per group of one prompt's rollouts.

- unit `rollout`: each rollout by its own verdict (`correct` = graded correct; `incorrect` = every
  other rollout, truncated and unparseable ones included: the verifier did not accept them).
- unit `group`: a group (the rollouts of one prompt of the round) enters whole, correct and
  incorrect members alike. `correct` takes the groups whose pass rate is >= the threshold,
  `incorrect` exactly the other ones (pass rate < threshold), so the two partition `all`.
"""

from __future__ import annotations

import pandas as pd

CONDITIONS = ("baseline", "all", "correct", "incorrect")
TRAINING_CONDITIONS = ("all", "correct", "incorrect")
UNITS = ("rollout", "group")
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
    if condition == "all":
        keep = pd.Series(True, index=df.index)
    elif unit == "rollout":
        keep = df["correct"] if condition == "correct" else ~df["correct"]
    else:
        passing = df["group_pass_rate"] >= group_threshold
        keep = passing if condition == "correct" else ~passing
    return df[keep.to_numpy()].reset_index(drop=True)[list(SELECTED_COLUMNS)]
