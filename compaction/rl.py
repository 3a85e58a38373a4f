"""RLVR primitives: rewards, group-normalised advantages, dynamic sampling, the clipped loss.

Pure functions over arrays, so the math is tested on its own, apart from models and data.

Loss aggregation is expressed as a per-token weight, computed once per optimizer step over
the *global* batch (all processes), so every process's micro-batches add up to exactly the
loss one process would compute on the whole batch:

- ``token_mean`` (DAPO): 1 / (response tokens in the batch)
- ``seq_mean`` (GRPO): 1 / (len(seq) * sequences in the batch)
- ``const_norm`` (Dr.GRPO): 1 / (sequences in the batch * max_new_tokens)
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-6


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment: 0 up to max-buffer, then linearly down to -1 at max."""
    lengths = np.asarray(lengths, dtype=float)
    if buffer <= 0:
        return np.zeros_like(lengths)
    start = max_new_tokens - buffer
    return -np.clip((lengths - start) / buffer, 0.0, 1.0)


def length_penalty(correct: np.ndarray, lengths: np.ndarray, max_new_tokens: int, coef: float) -> np.ndarray:
    """The length-penalty baseline's reward term: ``-coef * L / max_new_tokens`` on correct responses,
    0 on wrong ones, so that reward = 1[correct] * (1 - coef * L / L_max).

    A linear, correct-only member of the length rewards of Kimi k1.5 (arXiv:2501.12599, sec. 2.3.3,
    which also rewards short wrong answers less) and Arora & Zanette, "Training Language Models to
    Reason Efficiently" (arXiv:2502.04463: 1 - a * sigmoid(normalised length), correct only). Penalising
    correct answers only, with coef < 1, keeps every correct answer above every wrong one.
    """
    lengths = np.asarray(lengths, dtype=float)
    return -coef * np.asarray(correct, dtype=bool) * lengths / max_new_tokens


def group_advantages(rewards: np.ndarray, scaling: str, batch_std: float | None = None) -> np.ndarray:
    """Advantages of a [groups, samples] reward array: reward minus its group mean, divided by
    the group's std (``group``), the batch's std (``batch``; pass the global one) or 1 (``none``)."""
    r = np.asarray(rewards, dtype=float)
    centred = r - r.mean(axis=1, keepdims=True)
    if scaling == "group":
        return centred / (r.std(axis=1, keepdims=True) + EPS)
    if scaling == "batch":
        std = float(r.std()) if batch_std is None else batch_std
        return centred / (std + EPS)
    if scaling == "none":
        return centred
    raise ValueError(f"rlvr.adv_scaling: unknown value {scaling!r} (group, batch, none)")


def weight_negative(advantages: np.ndarray, weight: float) -> np.ndarray:
    """Scale the negative advantages by ``weight`` (1 = unchanged, 0 = positive samples only)."""
    a = np.asarray(advantages, dtype=float)
    return np.where(a < 0, a * weight, a)


def zero_variance_groups(rewards: np.ndarray) -> np.ndarray:
    """[groups] bool: groups whose rewards all agree (no learning signal; dropped by dynamic sampling)."""
    r = np.asarray(rewards, dtype=float)
    return np.all(r == r[:, :1], axis=1)


def token_weights(lengths: list[int], agg: str, global_tokens: float, global_seqs: float,
                  max_new_tokens: int) -> list[float]:
    """Per-sequence weight of each token under the aggregation (see module docstring)."""
    if agg == "token_mean":
        return [1.0 / global_tokens] * len(lengths)
    if agg == "seq_mean":
        return [1.0 / (max(n, 1) * global_seqs) for n in lengths]
    if agg == "const_norm":
        return [1.0 / (global_seqs * max_new_tokens)] * len(lengths)
    raise ValueError(f"rlvr.loss_agg: unknown value {agg!r} (token_mean, seq_mean, const_norm)")


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
    eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum over tokens of the PPO-clip surrogate (+ k3 KL to a reference).

    All inputs are flat [N] over response tokens. Returns (loss, stats) where stats hold
    summed counts for logging (clipped tokens, KL sum), to be reduced across processes.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    stats = {"clipped": (clipped < unclipped).float().sum().detach()}
    if ref_logp is not None and kl_coef > 0:
        # k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1, always >= 0.
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * k3
        stats["kl"] = k3.detach().sum()
    return (per_token * weights).sum(), stats
