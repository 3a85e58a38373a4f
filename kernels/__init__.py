"""Fused log-prob and divergence kernels over an LM head, chunked over tokens.

    from kernels import linear_logprobs, linear_divergence

    logp = linear_logprobs(hidden, weight, targets, temperature=1.0, backend="auto")        # [N] float32
    div = linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                            kind="reverse_kl", beta=0.5, temperature=1.0, clip=None,
                            targets=None, backend="auto")                                 # [N] float32

Backends: "triton" (CUDA; the CPU tests run it under TRITON_INTERPRET=1), "torch" (chunked over
tokens, any device), "eager" (full logits: the reference), "auto" (triton on CUDA, torch
elsewhere). Each kernel lives in its own module beside its eager reference:
kernels.logprobs (eager_logprobs), kernels.divergence (eager_divergence); the @triton.jit code
is in kernels._triton_*.py and is imported only when the triton backend runs.

`KINDS` / `Kind` and `BACKENDS` / `Backend` (the choice sets, kernels._kinds) import no torch;
the kernels themselves (and torch) are imported on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The choice sets import no torch: `from kernels import Kind` (the params schema) stays cheap.
from ._kinds import BACKENDS, KINDS, Backend, Kind

if TYPE_CHECKING:
    from ._common import default_chunk_rows
    from .divergence import eager_divergence, linear_divergence
    from .logprobs import eager_logprobs, linear_logprobs

#: The torch-backed names, imported on first use (PEP 562): name -> submodule.
_LAZY = {
    "default_chunk_rows": "._common",
    "eager_divergence": ".divergence",
    "linear_divergence": ".divergence",
    "eager_logprobs": ".logprobs",
    "linear_logprobs": ".logprobs",
}
_SUBMODULES = ("_chunking", "_common", "divergence", "logprobs")

__all__ = [
    "BACKENDS",
    "Backend",
    "KINDS",
    "Kind",
    "default_chunk_rows",
    "eager_divergence",
    "eager_logprobs",
    "linear_divergence",
    "linear_logprobs",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
