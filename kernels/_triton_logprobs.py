"""Triton row kernel for `linear_logprobs`: one program per token row of a chunk's logits.

Pass 1 streams the row once with an online log-sum-exp (running max and rescaled sum), which
also gives the entropy (running sum of exp(z - max) * z). When gradients are wanted, pass 2
writes d logp_y / d logits = (onehot(y) - p) * scale over the row, in place when the gradient
buffer is the logits buffer (float32 inputs) or into a separate bf16/fp16 buffer.

Imported lazily: TRITON_INTERPRET=1 (CPU tests) must be set before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import triton_interpreting


@triton.jit
def _logprob_rows_kernel(
    logits_ptr, logits_row_stride,
    grad_ptr, grad_row_stride,
    targets_ptr, row_scale_ptr, values_ptr, entropy_ptr,
    n_cols, inv_temperature,
    COMPUTE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride

    # Pass 1: online log-sum-exp (and the entropy's running dot product).
    run_max = float("-inf")
    run_sum = 0.0
    run_dot = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        # Lanes past the row end load 0 and get weight 0 (no inf - inf anywhere).
        z = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        new_max = tl.maximum(run_max, tl.max(tl.where(mask, z, float("-inf")), axis=0))
        rescale = tl.exp(run_max - new_max)
        e = tl.where(mask, tl.exp(z - new_max), 0.0)
        run_sum = run_sum * rescale + tl.sum(e, axis=0)
        if WANT_ENTROPY:
            run_dot = run_dot * rescale + tl.sum(e * z, axis=0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)

    target = tl.load(targets_ptr + row)
    target_logit = tl.load(logits_row + target).to(tl.float32) * inv_temperature
    tl.store(values_ptr + row, target_logit - lse)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, lse - run_dot / run_sum)

    if COMPUTE_GRAD:
        # d logp_y / d z = onehot(y) - p, and z = logits / T: scale by 1/T and the row weight.
        scale = inv_temperature
        if HAS_ROW_SCALE:
            scale = scale * tl.load(row_scale_ptr + row).to(tl.float32)
        grad_row = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
            p = tl.exp(z - lse)
            grad = tl.where(cols == target, 1.0 - p, -p) * scale
            tl.store(grad_row + cols, grad, mask=mask)


def grad_target(z: torch.Tensor, grad_dtype: torch.dtype, compute_grad: bool,
                grad_buffer: list[torch.Tensor]) -> torch.Tensor:
    """Where a reducer writes the logit gradient: in place over the logits ``z`` when the dtypes
    match (each element is read before it is overwritten, by the same program), else a buffer of
    ``grad_dtype`` reused across chunks (grown when a chunk has more rows)."""
    rows, n_cols = z.shape
    if compute_grad and grad_dtype != z.dtype:
        if not grad_buffer or grad_buffer[0].shape[0] < rows:
            grad_buffer[:] = [torch.empty(rows, n_cols, device=z.device, dtype=grad_dtype)]
        return grad_buffer[0][:rows]
    return z


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Large blocks on a GPU; smaller under the interpreter (numpy)."""
    cap = 2048 if triton_interpreting() else 8192
    block = min(triton.next_power_of_2(n_cols), cap)
    return block, (16 if block >= 8192 else 8 if block >= 2048 else 4)


def triton_logprobs_reducer(targets: torch.Tensor, inv_temperature: float, values: torch.Tensor,
                            entropy, grad_dtype: torch.dtype = torch.float32):
    """Row reducer for kernels._chunking.run_chunks (see there for the contract)."""
    grad_buffer: list[torch.Tensor] = []

    def reduce(z, _u, start, stop, row_scale, compute_grad):
        rows, n_cols = z.shape
        grad = grad_target(z, grad_dtype, compute_grad, grad_buffer)
        if row_scale is not None:
            row_scale = row_scale.float().contiguous()
        block, warps = launch_config(n_cols)
        _logprob_rows_kernel[(rows,)](
            z, z.stride(0), grad, grad.stride(0),
            targets[start:stop], row_scale if row_scale is not None else z,
            values[start:stop], entropy[start:stop] if entropy is not None else values[start:stop],
            n_cols, float(inv_temperature),
            COMPUTE_GRAD=bool(compute_grad), HAS_ROW_SCALE=row_scale is not None,
            WANT_ENTROPY=entropy is not None, BLOCK_V=block, num_warps=warps,
        )
        return grad if compute_grad else None

    return reduce
