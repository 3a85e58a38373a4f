"""The token-chunk loop shared by every kernel and backend.

For each chunk of rows: logits = hidden @ weight.T into a reused float32 buffer (the matmul
library does the FLOPs), then a *row reducer* (torch ops or a Triton kernel) turns the chunk's
logits into per-row outputs and, when gradients are wanted, into d(output)/d(logits) already
multiplied by the per-row scale (1/temperature x upstream weight). Two matmuls then give that
chunk's grad_hidden rows and its contribution to grad_weight, accumulated in float32.

Nothing of size N x V is ever allocated: memory is the inputs, the [N] outputs, the gradients,
and a few [chunk, V] buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._common import accumulate_grad_weight, compute_dtype, logits_into, reduction_dtype

# reducer(z, u, start, stop, row_scale, compute_grad) -> grad_logits or None
#   z: [rows, V] student logits (raw: not yet divided by the temperature), may be overwritten;
#   u: [rows, V] teacher logits, or None; row_scale: [rows] or None (= 1).
Reducer = Callable[[torch.Tensor, Optional[torch.Tensor], int, int, Optional[torch.Tensor], bool],
                   Optional[torch.Tensor]]


@dataclass
class ChunkGrads:
    grad_hidden: Optional[torch.Tensor]  # [N, d] in the matmul dtype
    grad_weight: Optional[torch.Tensor]  # [V, d] float32 (float64 for float64 inputs)


def run_chunks(
    reducer: Reducer,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    chunk_rows: int,
    row_scale: Optional[torch.Tensor] = None,
    want_grad_hidden: bool = False,
    want_grad_weight: bool = False,
    logits_dtype: Optional[torch.dtype] = None,
) -> ChunkGrads:
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    mm_dtype = compute_dtype(hidden, weight)
    red_dtype = logits_dtype or reduction_dtype(mm_dtype)
    # Mixed dtypes (e.g. bf16 hidden, fp32 head): the weight is cast once, hidden rows per chunk.
    weight = weight.to(mm_dtype)
    t_dtype = None
    if teacher_hidden is not None:
        t_dtype = compute_dtype(teacher_hidden, teacher_weight)
        teacher_weight = teacher_weight.to(t_dtype)

    want_grad = want_grad_hidden or want_grad_weight
    rows = max(1, min(chunk_rows, n_rows))
    student_buf = torch.empty(rows, vocab, device=hidden.device, dtype=red_dtype)
    teacher_buf = (torch.empty(rows, vocab, device=hidden.device, dtype=red_dtype)
                   if teacher_hidden is not None else None)
    grad_hidden = (torch.empty(n_rows, hidden.shape[1], device=hidden.device, dtype=mm_dtype)
                   if want_grad_hidden else None)
    grad_weight = (torch.zeros(vocab, weight.shape[1], device=weight.device, dtype=reduction_dtype(mm_dtype))
                   if want_grad_weight else None)

    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        hidden_rows = hidden[start:stop].to(mm_dtype)
        z = logits_into(student_buf, hidden_rows, weight)
        u = (logits_into(teacher_buf, teacher_hidden[start:stop].to(t_dtype), teacher_weight)
             if teacher_buf is not None else None)
        scale = row_scale[start:stop] if row_scale is not None else None
        grad_logits = reducer(z, u, start, stop, scale, want_grad)
        if not want_grad:
            continue
        # The gradient matmuls run in the inputs' dtype (tensor cores for bf16), like autograd would.
        grad_logits = grad_logits.to(mm_dtype)
        if want_grad_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[start:stop])
        if want_grad_weight:
            accumulate_grad_weight(grad_weight, grad_logits, hidden_rows)
    return ChunkGrads(grad_hidden, grad_weight)


ROWDOT_BLOCK = 1024


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, dim=1) with an [rows, ROWDOT_BLOCK] temporary instead of [rows, V].

    Each block is multiplied into the temporary and summed by ``sum`` (pairwise, vectorised);
    the blocks' sums are added. A batched ``1 x V @ V x 1`` product (no temporary at all) sums
    sequentially on CPU: its error was ~30x larger, and it reached the reverse-KL / JSD gradients
    through ``p * (s - t - KL)`` (up to 8x eager's error at T < 1).
    """
    rows, vocab = a.shape
    if vocab <= ROWDOT_BLOCK:
        return (a * b).sum(1)
    out = torch.zeros(rows, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    tmp = torch.empty(rows, ROWDOT_BLOCK, dtype=out.dtype, device=a.device)
    for v0 in range(0, vocab, ROWDOT_BLOCK):
        v1 = min(v0 + ROWDOT_BLOCK, vocab)
        out += torch.mul(a[:, v0:v1], b[:, v0:v1], out=tmp[:, : v1 - v0]).sum(1)
    return out


def is_uniform(grad_output: torch.Tensor) -> bool:
    """True when every token's upstream gradient is the same number (loss = c * sum or mean)."""
    return grad_output.numel() == 0 or bool((grad_output == grad_output[0]).all())
