"""Per-token log-probs of given tokens from hidden states and the LM head, chunked.

    logp = linear_logprobs(hidden, weight, targets, temperature=1.0, backend="auto")   # [N] float32

logp[i] = log softmax(hidden[i] @ weight.T / temperature)[targets[i]]. Gradients flow to
`hidden` and `weight`. Optional `return_entropy=True` also returns the (detached) entropy of
each token's distribution, for metrics.

Gradient strategy (`grad_in_forward`):
- False (default here): the forward pass keeps no logits; backward recomputes each chunk's logits
  and forms the gradient with the real per-token upstream gradient (one extra matmul, exact for
  any loss). RLVR's clipped-ratio loss gives every token a different upstream gradient, which is
  why this is the default for log-probs.
- True: Liger-style, the gradient w.r.t. the logits is formed in the same pass as the forward,
  grad_hidden rows and grad_weight are accumulated per chunk and kept for backward, which scales
  them by grad_output. grad_hidden is exact for any grad_output (row scaling); grad_weight is
  exact when grad_output is the same for every token (mean/sum losses) and is recomputed
  otherwise, so the result is always exact; only the speed depends on the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._chunking import is_uniform, rowdot, run_chunks
from ._common import (
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

# Forward-only torch path: vocabulary columns per online log-sum-exp step.
DEFAULT_VOCAB_CHUNK = 8192


# --- eager reference ---------------------------------------------------------------------------

def eager_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, return_entropy: bool = False):
    """Reference: the full [N, V] logits and plain autograd. Returns the reduction dtype
    (float32, or float64 for float64 inputs: the tests' reference)."""
    mm_dtype = compute_dtype(hidden, weight)
    logits = (hidden.to(mm_dtype) @ weight.to(mm_dtype).t()).to(reduction_dtype(mm_dtype))
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy.detach()


# --- torch row reducer (full rows of one chunk) ------------------------------------------------

def _torch_reducer(targets: torch.Tensor, inv_temperature: float, values: torch.Tensor,
                   entropy: Optional[torch.Tensor]):
    def reduce(z, _u, start, stop, row_scale, compute_grad):
        if inv_temperature != 1.0:
            z.mul_(inv_temperature)
        y = targets[start:stop].unsqueeze(1)
        logp = torch.log_softmax(z, dim=1)
        values[start:stop] = logp.gather(1, y).squeeze(1)
        if entropy is None and not compute_grad:
            return None
        probs = torch.exp(logp, out=z)  # the logits buffer is free now
        if entropy is not None:
            entropy[start:stop] = -rowdot(probs, logp)
        if not compute_grad:
            return None
        # d logp_y / d logits = onehot(y) - p, times 1/T and the row's upstream weight.
        scale = torch.full((stop - start, 1), inv_temperature, device=z.device, dtype=z.dtype)
        if row_scale is not None:
            scale = scale * row_scale.to(z.dtype).unsqueeze(1)
        grad = probs.mul_(-scale)
        grad.scatter_add_(1, y, scale)
        return grad

    return reduce


def _torch_values_online(hidden, weight, targets, inv_temperature, rows, vocab_chunk, entropy_out):
    """Forward only: online log-sum-exp over vocabulary chunks, so a chunk holds [rows, vocab_chunk]
    logits instead of [rows, V] (one pass over the vocabulary, no recomputation)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    mm_dtype = compute_dtype(hidden, weight)
    red_dtype = reduction_dtype(mm_dtype)
    weight = weight.to(mm_dtype)
    values = torch.empty(n_rows, device=hidden.device, dtype=red_dtype)
    cols = min(vocab_chunk, vocab)
    buf = torch.empty(rows * cols, device=hidden.device, dtype=red_dtype)  # viewed per block, contiguous
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        h, y = hidden[start:stop].to(mm_dtype), targets[start:stop]
        run_max = torch.full((stop - start,), float("-inf"), device=h.device, dtype=red_dtype)
        run_sum = torch.zeros_like(run_max)
        run_dot = torch.zeros_like(run_max)  # sum exp(z - max) * z, for the entropy
        target_logit = torch.zeros_like(run_max)
        for v0 in range(0, vocab, cols):
            v1 = min(v0 + cols, vocab)
            z = logits_into(buf[: h.shape[0] * (v1 - v0)].view(h.shape[0], v1 - v0), h, weight[v0:v1])
            if inv_temperature != 1.0:
                z.mul_(inv_temperature)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            rescale = torch.exp(run_max - new_max)
            e = torch.exp(z - new_max.unsqueeze(1))
            run_sum = run_sum * rescale + e.sum(dim=1)
            if entropy_out is not None:
                run_dot = run_dot * rescale + rowdot(e, z)
            run_max = new_max
            inside = (y >= v0) & (y < v1)
            local = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            target_logit = torch.where(inside, z.gather(1, local).squeeze(1), target_logit)
        lse = run_max + torch.log(run_sum)
        values[start:stop] = target_logit - lse
        if entropy_out is not None:
            entropy_out[start:stop] = lse - run_dot / run_sum
    return values


# --- options and the autograd Function ----------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    backend: str  # resolved: "torch" or "triton"
    temperature: float
    chunk_rows: int
    vocab_chunk: int
    return_entropy: bool
    grad_in_forward: bool


def _reducer(opts: _Options, targets, values, entropy, grad_dtype=torch.float32):
    inv_t = 1.0 / opts.temperature
    if opts.backend == "triton":
        from ._triton_logprobs import triton_logprobs_reducer

        return triton_logprobs_reducer(targets, inv_t, values, entropy, grad_dtype)
    return _torch_reducer(targets, inv_t, values, entropy)


def _forward_values(hidden, weight, targets, opts: _Options):
    """Values (and entropy) with no gradient work at all."""
    n = hidden.shape[0]
    entropy = torch.empty(n, device=hidden.device, dtype=torch.float32) if opts.return_entropy else None
    if opts.backend == "torch":
        rows = opts.chunk_rows * max(1, weight.shape[0] // opts.vocab_chunk)
        # Same buffer budget as a full-row chunk: more rows, fewer columns.
        values = _torch_values_online(hidden, weight, targets, 1.0 / opts.temperature,
                                      max(1, min(rows, n)), opts.vocab_chunk, entropy)
        return values.float(), entropy
    values = torch.empty(n, device=hidden.device, dtype=torch.float32)
    run_chunks(_reducer(opts, targets, values, entropy), hidden, weight, chunk_rows=opts.chunk_rows,
               logits_dtype=torch.float32)
    return values, entropy


def _chunk_grads(hidden, weight, targets, opts: _Options, row_scale, want_h, want_w, values, entropy):
    logits_dtype = torch.float32 if opts.backend == "triton" else None
    reducer = _reducer(opts, targets, values, entropy, compute_dtype(hidden, weight))
    return run_chunks(reducer, hidden, weight, chunk_rows=opts.chunk_rows,
                      row_scale=row_scale, want_grad_hidden=want_h, want_grad_weight=want_w,
                      logits_dtype=logits_dtype)


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, opts: _Options):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            unit_grad_hidden = unit_grad_weight = None
            if opts.grad_in_forward:
                n = hidden.shape[0]
                values = torch.empty(n, device=hidden.device, dtype=reduction_dtype(compute_dtype(hidden, weight)))
                entropy = torch.empty(n, device=hidden.device, dtype=torch.float32) if opts.return_entropy else None
                grads = _chunk_grads(hidden, weight, targets, opts, None, want_h, want_w, values, entropy)
                values = values.float()
                unit_grad_hidden = grads.grad_hidden
                # Kept until backward in the weight's dtype (halves it for bf16; one rounding).
                unit_grad_weight = grads.grad_weight.to(weight.dtype) if want_w else None
            else:
                values, entropy = _forward_values(hidden, weight, targets, opts)
        ctx.opts = opts
        ctx.save_for_backward(hidden, weight, targets, unit_grad_hidden, unit_grad_weight)
        if entropy is None:
            return values
        ctx.mark_non_differentiable(entropy)
        return values, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, *_grad_entropy):
        hidden, weight, targets, unit_grad_hidden, unit_grad_weight = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        opts: _Options = ctx.opts
        grad_output = grad_values.float()
        grad_hidden = grad_weight = None
        with torch.autocast(hidden.device.type, enabled=False):
            if opts.grad_in_forward:
                if want_h:
                    grad_hidden = (unit_grad_hidden * grad_output.unsqueeze(1)).to(hidden.dtype)
                if want_w:
                    if is_uniform(grad_output):
                        scale = grad_output[0] if grad_output.numel() else 0.0
                        grad_weight = (unit_grad_weight * scale).to(weight.dtype)
                    else:  # per-token weights: the sum over tokens must be redone with them
                        grads = _chunk_grads(hidden, weight, targets, opts, grad_output, False, True,
                                             torch.empty_like(grad_output), None)
                        grad_weight = grads.grad_weight.to(weight.dtype)
            else:
                grads = _chunk_grads(hidden, weight, targets, opts, grad_output, want_h, want_w,
                                     torch.empty(hidden.shape[0], device=hidden.device,
                                                 dtype=reduction_dtype(compute_dtype(hidden, weight))), None)
                if want_h:
                    grad_hidden = grads.grad_hidden.to(hidden.dtype)
                if want_w:
                    grad_weight = grads.grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


# --- public API ---------------------------------------------------------------------------------

def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, backend: str = "auto", *,
                    return_entropy: bool = False, chunk_size: Optional[int] = None,
                    grad_in_forward: bool = False, vocab_chunk_size: Optional[int] = None):
    """Log-probs [N] (float32) of `targets` under softmax(hidden @ weight.T / temperature).

    hidden [N, d], weight [V, d] (any float dtypes; the matmuls run in their promotion),
    targets [N] integer ids in [0, V). backend: "auto" (triton on CUDA, torch elsewhere),
    "triton", "torch" (chunked, any device), "eager" (full logits: the reference).
    chunk_size: token rows per chunk (default: Liger's heuristic N / ceil(V / d), clamped).
    vocab_chunk_size: torch backend, forward-only path: columns per online log-sum-exp step.
    return_entropy: also return the entropy [N] of each row's distribution (no gradient).
    Bad arguments raise ValueError naming the argument, before any compute.
    """
    check_matrix_pair(hidden, weight, "hidden", "weight")
    check_targets(targets, hidden.shape[0], weight.shape[0], hidden.device)
    temperature = check_scalar(temperature, "temperature", low=0.0, low_open=True)
    chunk_size = check_chunk_size(chunk_size)
    vocab_chunk_size = check_chunk_size(vocab_chunk_size) if vocab_chunk_size is not None else None
    backend = resolve_backend(backend, hidden.device)

    if backend == "eager":
        out = eager_logprobs(hidden, weight, targets, temperature, return_entropy)
        return (out[0].float(), out[1].float()) if return_entropy else out.float()

    n, d, vocab = hidden.shape[0], hidden.shape[1], weight.shape[0]
    opts = _Options(backend=backend, temperature=temperature,
                    chunk_rows=chunk_size or default_chunk_rows(n, vocab, d),
                    vocab_chunk=vocab_chunk_size or DEFAULT_VOCAB_CHUNK,
                    return_entropy=bool(return_entropy), grad_in_forward=bool(grad_in_forward))
    targets = targets.long().contiguous()
    if n == 0:  # nothing to chunk; the reference handles empty inputs (and their autograd) as is
        return linear_logprobs(hidden, weight, targets, temperature, "eager", return_entropy=return_entropy)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            values, entropy = _forward_values(hidden, weight, targets, opts)
        return (values, entropy) if return_entropy else values
    return LinearLogprobsFunction.apply(hidden, weight, targets, opts)
