"""Choice sets that several modules spell, defined once: a ``Literal`` for the params schema and
its values as a tuple (``typing.get_args``) for runtime checks, CLI ``choices`` and report order.

Kept import-light on purpose (``typing`` only): compaction.params and the CLI's parser import it,
and neither should pay for pandas or torch (``compaction grade``, ``--help``).
compaction.selection re-exports these names; the divergence kinds live in kernels (``kernels.Kind``).
"""

from __future__ import annotations

from typing import Literal, get_args

#: OPSD conditions: which rollouts enter the loss (compaction/selection.py); `baseline` trains nothing.
Condition = Literal["baseline", "all", "correct", "incorrect"]
CONDITIONS: tuple[str, ...] = get_args(Condition)
#: The condition that trains nothing: the starting (RLVR) checkpoint, evaluated as is.
BASELINE: str = "baseline"
#: The conditions that train (every one but `baseline`).
TRAINING_CONDITIONS: tuple[str, ...] = tuple(c for c in CONDITIONS if c != BASELINE)

#: The length-penalty baseline (model ``rlvr-lenpen``): RLVR continued from the checkpoint with a reward
#: that penalises the length of correct responses (params ``lenpen``, tasks/lenpen.py). Not an OPSD condition.
LENPEN: str = "lenpen"
#: Its model label (eval runs, report rows, registered versions).
LENPEN_MODEL: str = f"rlvr-{LENPEN}"
#: The compaction flow's branches (``opsd.conditions``, ``--condition``): every OPSD condition and the
#: length-penalty baseline.
Branch = Literal[Condition, "lenpen"]
BRANCHES: tuple[str, ...] = get_args(Branch)

#: What an OPSD condition selects (``opsd.unit``): prompts once before OPSD, rollouts, or groups.
Unit = Literal["pool", "rollout", "group"]
UNITS: tuple[str, ...] = get_args(Unit)
