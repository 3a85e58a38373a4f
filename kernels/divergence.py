"""Per-token divergence between a student's and a teacher's full next-token distributions.

    div = linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                            kind="reverse_kl", beta=0.5, temperature=1.0, clip=None,
                            targets=None, backend="auto")                      # [N] float32

With s = log softmax(student_hidden @ student_weight.T / T), t = the same for the teacher,
p = exp(s), q = exp(t):
- reverse_kl:    KL(p || q) = sum p (s - t)            (the compaction paper's default)
- forward_kl:    KL(q || p) = sum q (t - s)
- jsd:           beta * KL(q || M) + (1 - beta) * KL(p || M), M = beta q + (1 - beta) p, with log M
                 = logaddexp(log beta + t, log(1 - beta) + s) (log space, no underflow). At beta = 0
                 M = p and at beta = 1 M = q: both terms vanish and the value is exactly 0 with a zero
                 gradient. (TRL's generalised JSD instead switches to forward / reverse KL at the ends;
                 here ask for `forward_kl` / `reverse_kl` by name.)
- sampled_token: -(t_y - s_y).detach() * s_y at the sampled token y = targets: a per-token loss whose
                 gradient is -A * grad s_y with the advantage A = log q(y) - log p(y).
- clip:          optional upper bound on each token's value; the gradient is zero where it clips
                 (value > clip).

Gradients flow to student_hidden and student_weight only; teacher inputs are treated as
constants (they never receive a gradient, even with requires_grad=True).

Gradient strategy (`grad_in_forward`, default True here): Liger-style, each chunk's gradient
w.r.t. the student logits is formed in the same pass as the values, grad_hidden rows and
grad_weight are accumulated per chunk and kept for backward, which scales them by grad_output.
grad_hidden is exact for any grad_output (row scaling); grad_weight is exact when grad_output
is the same for every token (OPSD's token mean), and is recomputed with the per-token weights
otherwise, so results are always exact. grad_in_forward=False keeps nothing and recomputes
the logits in backward (cheaper when the loss weights tokens unevenly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._chunking import is_uniform, rowdot, run_chunks
from ._common import (
    KINDS,
    check_chunk_size,
    check_matrix_pair,
    check_scalar,
    check_targets,
    compute_dtype,
    default_chunk_rows,
    logits_into,
    reduction_dtype,
    resolve_backend,
)

DEFAULT_VOCAB_CHUNK = 8192


def _jsd_is_degenerate(kind: str, beta: float) -> bool:
    return kind == "jsd" and beta in (0.0, 1.0)


# --- eager reference ---------------------------------------------------------------------------

def eager_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind="reverse_kl",
                     beta=0.5, temperature=1.0, clip=None, targets=None, return_entropy=False):
    """Reference: full [N, V] logits of both models and plain autograd (teacher detached).
    Returns the reduction dtype (float32, or float64 for float64 inputs)."""
    s_dtype = compute_dtype(student_hidden, student_weight)
    t_dtype = compute_dtype(teacher_hidden, teacher_weight)
    red = reduction_dtype(s_dtype)
    s_logits = (student_hidden.to(s_dtype) @ student_weight.to(s_dtype).t()).to(red)
    t_logits = (teacher_hidden.to(t_dtype) @ teacher_weight.to(t_dtype).t()).to(red).detach()
    if temperature != 1.0:
        s_logits, t_logits = s_logits / temperature, t_logits / temperature
    s = torch.log_softmax(s_logits, dim=-1)
    t = torch.log_softmax(t_logits, dim=-1)
    if kind == "reverse_kl":
        value = (s.exp() * (s - t)).sum(-1)
    elif kind == "forward_kl":
        value = (t.exp() * (t - s)).sum(-1)
    elif kind == "jsd":
        if _jsd_is_degenerate(kind, beta):
            value = s.sum(-1) * 0.0  # M equals one side: both terms vanish (zero gradient too)
        else:
            mix = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
            value = beta * (t.exp() * (t - mix)).sum(-1) + (1 - beta) * (s.exp() * (s - mix)).sum(-1)
    elif kind == "sampled_token":
        y = targets.long().unsqueeze(1)
        s_y, t_y = s.gather(1, y).squeeze(1), t.gather(1, y).squeeze(1)
        value = -(t_y - s_y).detach() * s_y
    else:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if clip is not None:
        value = torch.where(value > clip, torch.full_like(value, clip), value)
    if not return_entropy:
        return value
    return value, (-(s.exp() * s).sum(-1)).detach()


# --- torch row reducer (full rows of one chunk) ------------------------------------------------

def _torch_reducer(kind, beta, inv_temperature, clip, targets, values, entropy):
    degenerate = _jsd_is_degenerate(kind, beta)

    def reduce(z, u, start, stop, row_scale, compute_grad):
        if inv_temperature != 1.0:
            z.mul_(inv_temperature)
            u.mul_(inv_temperature)
        s = torch.log_softmax(z, dim=1)
        t = torch.log_softmax(u, dim=1)
        # Buffers z and u are free from here on: they are reused for p, q and the gradient.
        if kind == "reverse_kl":
            p = torch.exp(s, out=z)
            diff = torch.sub(s, t, out=u)  # s - t
            kl = value = rowdot(p, diff)  # `value` may be clipped below; the gradient uses the true KL
            grad_fn = lambda: diff.sub_(kl.unsqueeze(1)).mul_(p)  # p (s - t - KL)  # noqa: E731
        elif kind == "forward_kl":
            q = torch.exp(t, out=u)
            value = rowdot(q, t.sub_(s))  # sum q (t - s)
            p = torch.exp(s, out=z)
            grad_fn = lambda: p.sub_(q)  # p - q  # noqa: E731
        elif kind == "jsd" and degenerate:
            p = torch.exp(s, out=z)
            value = torch.zeros(stop - start, device=z.device, dtype=z.dtype)
            grad_fn = lambda: p.zero_()  # noqa: E731
        elif kind == "jsd":
            p, q = torch.exp(s, out=z), torch.exp(t, out=u)
            mix = torch.add(t, math.log(beta))
            torch.logaddexp(mix, s + math.log1p(-beta), out=mix)  # log M
            kl_teacher = rowdot(q, t.sub_(mix))
            s_minus_mix = mix.neg_().add_(s)
            kl_student = rowdot(p, s_minus_mix)
            value = beta * kl_teacher + (1 - beta) * kl_student
            # d/dz_S = (1 - beta) p (s - log M - KL(p || M)); the (1 - beta) goes into the scale.
            grad_fn = lambda: s_minus_mix.sub_(kl_student.unsqueeze(1)).mul_(p)  # noqa: E731
        else:  # sampled_token
            y = targets[start:stop].unsqueeze(1)
            s_y, t_y = s.gather(1, y).squeeze(1), t.gather(1, y).squeeze(1)
            advantage = t_y - s_y
            value = -advantage * s_y
            p = torch.exp(s, out=z)

            def grad_fn():  # advantage * (p - onehot(y)); the advantage goes into the scale
                return p.scatter_add_(1, y, torch.full_like(s_y, -1.0).unsqueeze(1))

        if entropy is not None:
            entropy[start:stop] = -rowdot(p, s)
        keep = None
        if clip is not None:
            keep = value <= clip
            value = torch.where(keep, value, torch.full_like(value, clip))
        values[start:stop] = value
        if not compute_grad:
            return None
        scale = torch.full_like(value, inv_temperature)
        if kind == "jsd":
            scale = scale * (1 - beta)
        if kind == "sampled_token":
            scale = scale * advantage
        if keep is not None:
            scale = scale * keep
        if row_scale is not None:
            scale = scale * row_scale.to(scale.dtype)
        return grad_fn().mul_(scale.unsqueeze(1))

    return reduce


def _torch_values_online(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kind,
                         inv_temperature, clip, rows, vocab_chunk, entropy_out):
    """Forward only, reverse_kl / forward_kl / sampled_token: one pass of online log-sum-exp over
    vocabulary chunks, so a chunk holds [rows, vocab_chunk] logits instead of [rows, V].
    KL(p || q) = sum p (z - u) - lse_S + lse_T needs only running sums."""
    n_rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    s_dtype = compute_dtype(student_hidden, student_weight)
    t_dtype = compute_dtype(teacher_hidden, teacher_weight)
    red = reduction_dtype(s_dtype)
    student_weight, teacher_weight = student_weight.to(s_dtype), teacher_weight.to(t_dtype)
    device = student_hidden.device
    values = torch.empty(n_rows, device=device, dtype=red)
    cols = min(vocab_chunk, vocab)
    # Flat buffers viewed per block, so that every block's logits are contiguous.
    s_buf = torch.empty(rows * cols, device=device, dtype=red)
    t_buf = torch.empty(rows * cols, device=device, dtype=red)
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        hs, ht = student_hidden[start:stop].to(s_dtype), teacher_hidden[start:stop].to(t_dtype)
        s_max = torch.full((stop - start,), float("-inf"), device=device, dtype=red)
        t_max = s_max.clone()
        s_sum, t_sum = torch.zeros_like(s_max), torch.zeros_like(s_max)
        cross = torch.zeros_like(s_max)  # reverse: sum e_S (z - u); forward: sum e_T (u - z)
        dot = torch.zeros_like(s_max)    # entropy: sum e_S z
        s_target, t_target = torch.zeros_like(s_max), torch.zeros_like(s_max)
        y = targets[start:stop] if targets is not None else None
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            shape = (stop - start, v1 - v0)
            z = logits_into(s_buf[: shape[0] * shape[1]].view(shape), hs, student_weight[v0:v1])
            u = logits_into(t_buf[: shape[0] * shape[1]].view(shape), ht, teacher_weight[v0:v1])
            if inv_temperature != 1.0:
                z.mul_(inv_temperature)
                u.mul_(inv_temperature)
            s_new, t_new = torch.maximum(s_max, z.amax(1)), torch.maximum(t_max, u.amax(1))
            s_rescale, t_rescale = torch.exp(s_max - s_new), torch.exp(t_max - t_new)
            e_s = torch.sub(z, s_new.unsqueeze(1)).exp_()
            e_t = torch.sub(u, t_new.unsqueeze(1)).exp_()
            s_sum = s_sum * s_rescale + e_s.sum(1)
            t_sum = t_sum * t_rescale + e_t.sum(1)
            if entropy_out is not None:
                dot = dot * s_rescale + rowdot(e_s, z)
            if kind == "sampled_token":
                inside = (y >= v0) & (y < v1)
                local = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
                s_target = torch.where(inside, z.gather(1, local).squeeze(1), s_target)
                t_target = torch.where(inside, u.gather(1, local).squeeze(1), t_target)
            elif kind == "reverse_kl":
                cross = cross * s_rescale + rowdot(e_s, u.neg_().add_(z))
            else:
                cross = cross * t_rescale + rowdot(e_t, u.sub_(z))
            s_max, t_max = s_new, t_new
        lse_s, lse_t = s_max + torch.log(s_sum), t_max + torch.log(t_sum)
        if kind == "reverse_kl":
            value = cross / s_sum - lse_s + lse_t
        elif kind == "forward_kl":
            value = cross / t_sum - lse_t + lse_s
        else:
            s_y, t_y = s_target - lse_s, t_target - lse_t
            value = -(t_y - s_y) * s_y
        if clip is not None:
            value = value.clamp(max=clip)
        values[start:stop] = value
        if entropy_out is not None:
            entropy_out[start:stop] = lse_s - dot / s_sum
    return values


# --- options and the autograd Function ----------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    kind: str
    beta: float
    temperature: float
    clip: Optional[float]
    backend: str  # resolved: "torch" or "triton"
    chunk_rows: int
    vocab_chunk: int
    return_entropy: bool
    grad_in_forward: bool


def _reducer(opts: _Options, targets, values, entropy, grad_dtype=torch.float32):
    inv_t = 1.0 / opts.temperature
    if opts.backend == "triton":
        from ._triton_divergence import triton_divergence_reducer

        return triton_divergence_reducer(opts.kind, opts.beta, inv_t, opts.clip, targets, values, entropy,
                                         grad_dtype)
    return _torch_reducer(opts.kind, opts.beta, inv_t, opts.clip, targets, values, entropy)


def _run(inputs, targets, opts: _Options, values, entropy, row_scale=None, want_h=False, want_w=False):
    student_hidden, student_weight, teacher_hidden, teacher_weight = inputs
    reducer = _reducer(opts, targets, values, entropy, compute_dtype(student_hidden, student_weight))
    return run_chunks(reducer, student_hidden, student_weight, teacher_hidden, teacher_weight,
                      chunk_rows=opts.chunk_rows, row_scale=row_scale, want_grad_hidden=want_h,
                      want_grad_weight=want_w, logits_dtype=torch.float32 if opts.backend == "triton" else None)


def _forward_values(inputs, targets, opts: _Options):
    """Values (and entropy) with no gradient work at all."""
    student_hidden, student_weight, teacher_hidden, teacher_weight = inputs
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    device = student_hidden.device
    entropy = torch.empty(n, device=device, dtype=torch.float32) if opts.return_entropy else None
    if opts.backend == "torch" and opts.kind != "jsd":
        # Same buffer budget as a full-row chunk: more rows, fewer columns.
        rows = max(1, min(n, opts.chunk_rows * max(1, vocab // opts.vocab_chunk)))
        values = _torch_values_online(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                                      opts.kind, 1.0 / opts.temperature, opts.clip, rows, opts.vocab_chunk,
                                      entropy)
        return values.float(), entropy
    values = torch.empty(n, device=device, dtype=torch.float32)
    _run(inputs, targets, opts, values, entropy)
    return values, entropy


class LinearDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, targets, opts: _Options):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)
        unit_grad_hidden = unit_grad_weight = None
        with torch.autocast(student_hidden.device.type, enabled=False):
            if opts.grad_in_forward:
                n = student_hidden.shape[0]
                values = torch.empty(n, device=student_hidden.device, dtype=torch.float32)
                entropy = (torch.empty(n, device=student_hidden.device, dtype=torch.float32)
                           if opts.return_entropy else None)
                grads = _run(inputs, targets, opts, values, entropy, None, want_h, want_w)
                unit_grad_hidden = grads.grad_hidden
                # Kept until backward in the weight's dtype (halves it for bf16; one rounding).
                unit_grad_weight = grads.grad_weight.to(student_weight.dtype) if want_w else None
            else:
                values, entropy = _forward_values(inputs, targets, opts)
        ctx.opts = opts
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
                              unit_grad_hidden, unit_grad_weight)
        if entropy is None:
            return values
        ctx.mark_non_differentiable(entropy)
        return values, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, *_grad_entropy):
        (student_hidden, student_weight, teacher_hidden, teacher_weight, targets,
         unit_grad_hidden, unit_grad_weight) = ctx.saved_tensors
        inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        opts: _Options = ctx.opts
        grad_output = grad_values.float()
        scratch = torch.empty_like(grad_output)
        grad_hidden = grad_weight = None
        with torch.autocast(student_hidden.device.type, enabled=False):
            if opts.grad_in_forward:
                if want_h:
                    grad_hidden = (unit_grad_hidden * grad_output.unsqueeze(1)).to(student_hidden.dtype)
                if want_w:
                    if is_uniform(grad_output):
                        scale = grad_output[0] if grad_output.numel() else 0.0
                        grad_weight = (unit_grad_weight * scale).to(student_weight.dtype)
                    else:  # per-token weights: the sum over tokens must be redone with them
                        grad_weight = _run(inputs, targets, opts, scratch, None, grad_output,
                                           False, True).grad_weight.to(student_weight.dtype)
            else:
                grads = _run(inputs, targets, opts, scratch, None, grad_output, want_h, want_w)
                if want_h:
                    grad_hidden = grads.grad_hidden.to(student_hidden.dtype)
                if want_w:
                    grad_weight = grads.grad_weight.to(student_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


# --- public API ---------------------------------------------------------------------------------

def linear_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                      teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                      kind: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
                      clip: Optional[float] = None, targets: Optional[torch.Tensor] = None,
                      backend: str = "auto", *, return_entropy: bool = False,
                      chunk_size: Optional[int] = None, grad_in_forward: bool = True,
                      vocab_chunk_size: Optional[int] = None):
    """Per-token divergence [N] (float32) between student and teacher (see the module docstring).

    student_hidden [N, d_S], student_weight [V, d_S], teacher_hidden [N, d_T], teacher_weight
    [V, d_T]; targets [N] ids (required by `sampled_token`, ignored otherwise). backend: "auto"
    (triton on CUDA, torch elsewhere), "triton", "torch", "eager" (full logits: the reference).
    return_entropy: also return the student's entropy [N] (no gradient), for metrics.
    chunk_size / vocab_chunk_size / grad_in_forward: see kernels.logprobs.linear_logprobs.
    Bad arguments raise ValueError naming the argument, before any compute.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    check_matrix_pair(student_hidden, student_weight, "student_hidden", "student_weight")
    check_matrix_pair(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden: {teacher_hidden.shape[0]} rows, but student_hidden has {n}")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight: vocabulary {teacher_weight.shape[0]}, but student_weight has {vocab}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden: on {teacher_hidden.device}, but student_hidden is on "
                         f"{student_hidden.device}")
    if kind == "sampled_token" and targets is None:
        raise ValueError("targets: required by kind='sampled_token' (the sampled token ids)")
    if targets is not None:
        check_targets(targets, n, vocab, student_hidden.device)
    beta = check_scalar(beta, "beta", low=0.0, high=1.0)
    temperature = check_scalar(temperature, "temperature", low=0.0, low_open=True)
    clip = None if clip is None else check_scalar(clip, "clip")
    chunk_size = check_chunk_size(chunk_size)
    vocab_chunk_size = check_chunk_size(vocab_chunk_size)
    backend = resolve_backend(backend, student_hidden.device)
    # The teacher is a constant: cut it out of the graph so it can never receive a gradient.
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()

    if backend == "eager" or n == 0:
        out = eager_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, kind, beta,
                               temperature, clip, targets, return_entropy)
        return (out[0].float(), out[1].float()) if return_entropy else out.float()

    opts = _Options(kind=kind, beta=beta, temperature=temperature, clip=clip, backend=backend,
                    chunk_rows=chunk_size or default_chunk_rows(n, vocab, student_hidden.shape[1]),
                    vocab_chunk=vocab_chunk_size or DEFAULT_VOCAB_CHUNK,
                    return_entropy=bool(return_entropy), grad_in_forward=bool(grad_in_forward))
    targets = targets.long().contiguous() if targets is not None else None
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            values, entropy = _forward_values(inputs, targets, opts)
        return (values, entropy) if return_entropy else values
    return LinearDivergenceFunction.apply(*inputs, targets, opts)
