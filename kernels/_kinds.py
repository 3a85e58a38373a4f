"""The kernels' choice sets, defined once (no torch import, so that the params schema can use them
without loading torch): a ``Literal`` for type hints and pydantic, its values as a tuple.

Compaction's params schema (``opsd.divergence``, ``model.kernel_backend``) takes these from here;
kernels never imports compaction.
"""

from __future__ import annotations

from typing import Literal, get_args

#: Per-token divergence between student and teacher next-token distributions (kernels/divergence.py).
Kind = Literal["reverse_kl", "forward_kl", "jsd", "sampled_token"]
KINDS: tuple[str, ...] = get_args(Kind)

#: Where the log-prob / divergence kernels run: `auto` = triton on CUDA, torch elsewhere.
Backend = Literal["auto", "triton", "torch", "eager"]
BACKENDS: tuple[str, ...] = get_args(Backend)
