"""Triton row kernel for `linear_divergence`: one program per token row of a chunk's logits.

Pass 1 streams student and teacher logits once with two online log-sum-exps. Reverse and
forward KL also finish in this pass: KL(p || q) = sum p (z - u) - lse_S + lse_T needs only a
running sum of exp(z - max) * (z - u), rescaled like the normaliser. JSD needs both lses for
log M, so it takes a second pass. When gradients are wanted, a last pass writes
d(value)/d(student logits) x scale over the row (in place for float32 inputs, or into a
bf16/fp16 buffer that feeds the gradient matmuls directly).

Imported lazily: TRITON_INTERPRET=1 (CPU tests) must be set before this module is imported.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton_logprobs import grad_target, launch_config

# Kind ids (the KIND constexpr). Globals read inside @triton.jit must be tl.constexpr.
REVERSE_KL = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SAMPLED_TOKEN = tl.constexpr(3)
ZERO = tl.constexpr(4)  # JSD at beta = 0 or 1
_KIND_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "sampled_token": 3}


@triton.jit
def _log_mixture(s, t, log_beta, log_one_minus_beta):
    """log(beta e^t + (1 - beta) e^s), stable."""
    a = t + log_beta
    b = s + log_one_minus_beta
    top = tl.maximum(a, b)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _divergence_rows_kernel(
    student_ptr, student_row_stride,
    teacher_ptr, teacher_row_stride,
    grad_ptr, grad_row_stride,
    targets_ptr, row_scale_ptr, values_ptr, entropy_ptr,
    n_cols, inv_temperature, beta, log_beta, log_one_minus_beta, clip,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride

    # Pass 1: online log-sum-exp of both rows, plus the single-pass sums.
    s_max = float("-inf")
    s_sum = 0.0
    t_max = float("-inf")
    t_sum = 0.0
    cross = 0.0  # reverse: sum e_S (z - u); forward: sum e_T (u - z)
    dot = 0.0    # entropy: sum e_S z
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        # Lanes past the row end load 0 and get weight 0 (no inf - inf anywhere).
        z = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        u = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        s_new = tl.maximum(s_max, tl.max(tl.where(mask, z, float("-inf")), axis=0))
        t_new = tl.maximum(t_max, tl.max(tl.where(mask, u, float("-inf")), axis=0))
        s_rescale = tl.exp(s_max - s_new)
        t_rescale = tl.exp(t_max - t_new)
        e_s = tl.where(mask, tl.exp(z - s_new), 0.0)
        e_t = tl.where(mask, tl.exp(u - t_new), 0.0)
        s_sum = s_sum * s_rescale + tl.sum(e_s, axis=0)
        t_sum = t_sum * t_rescale + tl.sum(e_t, axis=0)
        if KIND == REVERSE_KL:
            cross = cross * s_rescale + tl.sum(e_s * (z - u), axis=0)
        if KIND == FORWARD_KL:
            cross = cross * t_rescale + tl.sum(e_t * (u - z), axis=0)
        if WANT_ENTROPY:
            dot = dot * s_rescale + tl.sum(e_s * z, axis=0)
        s_max = s_new
        t_max = t_new
    lse_s = s_max + tl.log(s_sum)
    lse_t = t_max + tl.log(t_sum)

    kl_student_mix = 0.0  # JSD: KL(p || M), needed by the gradient
    advantage = 0.0       # sampled_token: log q(y) - log p(y)
    target = 0
    if KIND == REVERSE_KL:
        value = cross / s_sum - lse_s + lse_t
    elif KIND == FORWARD_KL:
        value = cross / t_sum - lse_t + lse_s
    elif KIND == JSD:
        kl_teacher_mix = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            s = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_s
            t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
            log_m = _log_mixture(s, t, log_beta, log_one_minus_beta)
            kl_teacher_mix += tl.sum(tl.where(mask, tl.exp(t) * (t - log_m), 0.0), axis=0)
            kl_student_mix += tl.sum(tl.where(mask, tl.exp(s) * (s - log_m), 0.0), axis=0)
        value = beta * kl_teacher_mix + (1.0 - beta) * kl_student_mix
    elif KIND == SAMPLED_TOKEN:
        target = tl.load(targets_ptr + row)
        s_y = tl.load(student_row + target).to(tl.float32) * inv_temperature - lse_s
        t_y = tl.load(teacher_row + target).to(tl.float32) * inv_temperature - lse_t
        advantage = t_y - s_y
        value = -advantage * s_y
    else:  # ZERO: JSD at beta = 0 or 1, where M equals one side and both terms vanish
        value = lse_s * 0.0

    divergence = value  # before the clip: the reverse-KL gradient needs the true KL
    keep = 1.0
    if HAS_CLIP:
        keep = tl.where(value > clip, 0.0, 1.0)
        value = tl.minimum(value, clip)
    tl.store(values_ptr + row, value)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, lse_s - dot / s_sum)

    if COMPUTE_GRAD:
        scale = inv_temperature * keep
        if HAS_ROW_SCALE:
            scale = scale * tl.load(row_scale_ptr + row).to(tl.float32)
        if KIND == JSD:
            scale = scale * (1.0 - beta)
        if KIND == SAMPLED_TOKEN:
            scale = scale * advantage
        grad_row = grad_ptr + row * grad_row_stride
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            s = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_s
            p = tl.exp(s)
            if KIND == REVERSE_KL:  # p (s - t - KL)
                t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
                grad = p * (s - t - divergence)
            elif KIND == FORWARD_KL:  # p - q
                t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
                grad = p - tl.exp(t)
            elif KIND == JSD:  # p (s - log M - KL(p || M)), times (1 - beta) in the scale
                t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_t
                grad = p * (s - _log_mixture(s, t, log_beta, log_one_minus_beta) - kl_student_mix)
            elif KIND == SAMPLED_TOKEN:  # p - onehot(y), times the advantage in the scale
                grad = tl.where(cols == target, p - 1.0, p)
            else:
                grad = p * 0.0
            tl.store(grad_row + cols, grad * scale, mask=mask)


def triton_divergence_reducer(kind: str, beta: float, inv_temperature: float, clip, targets, values, entropy,
                              grad_dtype: torch.dtype = torch.float32):
    """Row reducer for kernels._chunking.run_chunks (see there for the contract)."""
    kind_id = 4 if kind == "jsd" and beta in (0.0, 1.0) else _KIND_IDS[kind]
    # Finite stand-ins for log(0) are never used: beta in {0, 1} takes the ZERO branch.
    log_beta = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_one_minus_beta = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    grad_buffer: list[torch.Tensor] = []

    def reduce(z, u, start, stop, row_scale, compute_grad):
        rows, n_cols = z.shape
        grad = grad_target(z, grad_dtype, compute_grad, grad_buffer)
        if row_scale is not None:
            row_scale = row_scale.float().contiguous()
        block, warps = launch_config(n_cols)
        _divergence_rows_kernel[(rows,)](
            z, z.stride(0), u, u.stride(0), grad, grad.stride(0),
            targets[start:stop] if targets is not None else z,
            row_scale if row_scale is not None else z,
            values[start:stop], entropy[start:stop] if entropy is not None else values[start:stop],
            n_cols, float(inv_temperature), float(beta), log_beta, log_one_minus_beta,
            float(clip) if clip is not None else 0.0,
            KIND=kind_id, HAS_CLIP=clip is not None, COMPUTE_GRAD=bool(compute_grad),
            HAS_ROW_SCALE=row_scale is not None, WANT_ENTROPY=entropy is not None,
            BLOCK_V=block, num_warps=warps,
        )
        return grad if compute_grad else None

    return reduce
