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
"""

from ._common import BACKENDS, KINDS, default_chunk_rows
from .divergence import eager_divergence, linear_divergence
from .logprobs import eager_logprobs, linear_logprobs

__all__ = [
    "BACKENDS",
    "KINDS",
    "default_chunk_rows",
    "eager_divergence",
    "eager_logprobs",
    "linear_divergence",
    "linear_logprobs",
]
