"""The rollout interface: prompts in, n completions per prompt out, whatever the backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generate call (shared by every backend)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (an end token was produced) | "length" (max_new_tokens reached)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


class RolloutEngine(Protocol):
    """A loaded policy that samples completions. ``generate`` returns, per prompt, ``n`` completions."""

    def generate(self, prompts: Sequence[str], sampling: Sampling, progress: bool = False) -> list[list[Completion]]:
        ...

    def close(self) -> None:
        ...
