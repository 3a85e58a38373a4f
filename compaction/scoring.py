"""Per-token log-probs of a causal LM through the fused kernels, inside one ``forward``.

Distributed wrappers (DDP, FSDP) only see parameters used inside the wrapped module's
forward, so the LM-head projection happens here, not outside: the backbone gives hidden
states, we keep only the positions that predict scored tokens, and
``kernels.linear_logprobs`` turns (hidden, lm_head.weight, targets) into log-probs without
ever holding the full [tokens x vocab] logits.

Alignment: a token at position t is predicted by the hidden state at t-1. ``score_mask[b, t]``
marks the tokens to score; position 0 can never be scored.
"""

from __future__ import annotations

import torch
from torch import nn


def shifted_targets(input_ids: torch.Tensor, score_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over predicting positions [B, T-1], targets [N]) for the tokens marked in score_mask."""
    predict = score_mask[:, 1:].bool()
    return predict, input_ids[:, 1:][predict]


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM itself: unwraps a peft model (its LoRA layers stay in place, and active
    unless inside ``disable_adapter()``), so the backbone lookup below finds the real one."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    return causal_lm(model).get_output_embeddings().weight


def backbone_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, d] of a HF causal LM (after the final norm), without the LM head."""
    model = causal_lm(model)
    base = getattr(model, model.base_model_prefix, None) if hasattr(model, "base_model_prefix") else None
    # use_cache=False: scoring never decodes further, so no KV cache is built.
    if base is None or base is model:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class TokenScorer(nn.Module):
    """Wraps a causal LM; ``forward`` returns the log-probs [N] of the tokens in ``score_mask``."""

    def __init__(self, model: nn.Module, backend: str = "auto", uniform_token_weights: bool = False):
        super().__init__()
        self.model = model
        self.backend = backend
        # Losses that weight every scored token alike (SFT's summed NLL) let the kernel form the
        # weight gradient during the forward pass: one matmul fewer. Per-token weights (RLVR) need
        # the recompute path, which is exact for any upstream gradient.
        self.grad_in_forward = uniform_token_weights

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
        from kernels import linear_logprobs

        hidden = backbone_hidden(self.model, input_ids, attention_mask)
        predict, targets = shifted_targets(input_ids, score_mask)
        h = hidden[:, :-1][predict]
        return linear_logprobs(h, lm_head_weight(self.model), targets, temperature=temperature, backend=self.backend,
                               grad_in_forward=self.grad_in_forward)
