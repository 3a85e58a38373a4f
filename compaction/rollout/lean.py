"""Sampling from a small Qwen3 on CPU without ``generate``'s per-step overhead.

For the embedded model (under a million parameters) a decode step is a few hundred
microseconds of arithmetic, and ``transformers.generate`` spends ~20x that per step on
bookkeeping: cache objects, mask construction, logits processors, stopping criteria. This
module runs the same Qwen3 weights (the HF modules' own tensors, read in place) through a
plain loop: one preallocated KV cache, a boolean padding mask, RoPE from the model's own
rotary module, and the same sampling order as ``generate`` (temperature, top-k, top-p).
Greedy decoding gives the same tokens as ``generate`` (tests/test_rollout.py checks it).

Only the plain Qwen3 / Llama-style decoder is supported (full attention, no sliding
window); anything else should use the ``hf`` or ``vllm`` backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen3",)


def supports(model) -> bool:
    """A plain Qwen3: full attention, no biases, and every projection a bare ``nn.Linear`` (a
    LoRA-wrapped layer's ``.weight`` lacks the adapter's delta, so peft models are refused)."""
    cfg = getattr(model, "config", None)
    if (getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES or getattr(cfg, "use_sliding_window", False)
            or getattr(cfg, "attention_bias", False) or not hasattr(model, "model")):
        return False
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return all(type(mod) is torch.nn.Linear for layer in model.model.layers
               for name, mod in layer.named_modules() if name.rsplit(".", 1)[-1] in projections) \
        and type(model.lm_head) is torch.nn.Linear


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    # Qwen3RMSNorm: normalise in float32, scale by the weight in the input dtype.
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as ``generate``'s warpers do; removed
    entries become -inf. ``logits`` is [B, V] float32."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] by inverse-CDF sampling: one uniform per row
    (``torch.multinomial`` draws V exponentials per row, ~25x slower at V = 1024)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    # right=True: the first index whose cdf exceeds u, so zero-probability tokens are never drawn.
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


class LeanQwen3:
    """Decode loop over a loaded ``Qwen3ForCausalLM`` (weights shared, not copied)."""

    def __init__(self, model):
        if not supports(model):
            raise ValueError(f"the lean decoder supports {SUPPORTED_MODEL_TYPES} without sliding window "
                             f"or attention bias, not {type(model).__name__}")
        self.model = model
        self.cfg = model.config
        self.layers = model.model.layers
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = self.cfg.num_attention_heads
        self.n_kv = self.cfg.num_key_value_heads
        self.scaling = attn.scaling
        self.qkv_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]

    def _fused_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Per layer, q|k|v and gate|up stacked into one matrix each: 3 matmuls a layer instead of 6.
        # Built per generate call, so the decoder always reads the model's current weights.
        return [(torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight]),
                 torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight])) for l in self.layers]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keys: list, values: list,
                 start: int, attend: torch.Tensor, fused: list) -> torch.Tensor:
        """Run ``ids`` [B, T] (at cache slots start..start+T) and return the last position's
        logits [B, V]. ``attend`` [B, 1, T, start+T] says which cached slots each query sees."""
        B, T = ids.shape
        x = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        end = start + T
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm)
            q, k, v = F.linear(h, fused[i][0]).split(self.qkv_sizes, dim=-1)
            q = _rms_norm(q.view(B, T, self.n_heads, self.head_dim), a.q_norm).transpose(1, 2)
            k = _rms_norm(k.view(B, T, self.n_kv, self.head_dim), a.k_norm).transpose(1, 2)
            v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys[i][:, :, start:end] = k
            values[i][:, :, start:end] = v
            if T == 1:
                o = self._decode_attention(q, keys[i][:, :, :end], values[i][:, :, :end], attend)
            else:
                o = F.scaled_dot_product_attention(q, keys[i][:, :, :end], values[i][:, :, :end], attn_mask=attend,
                                                   scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            h = _rms_norm(x, layer.post_attention_layernorm)
            m = layer.mlp
            gate, up = F.linear(h, fused[i][1]).chunk(2, dim=-1)
            x = x + m.down_proj(F.silu(gate) * up)
        x = _rms_norm(x[:, -1], self.model.model.norm)
        return self.model.lm_head(x).float()

    def _decode_attention(self, q, k, v, attend):
        # One query per row: group the query heads that share a KV head, so each KV head is read
        # once (SDPA's GQA path re-reads it per query head and is ~2x slower here).
        B, _, _, D = q.shape
        qg = q.view(B, self.n_kv, self.n_heads // self.n_kv, D)
        scores = (qg @ k.transpose(-1, -2)) * self.scaling
        scores = scores.masked_fill(~attend, float("-inf"))
        return (scores.softmax(-1) @ v).view(B, self.n_heads, 1, D)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Left-padded prompts [B, P] -> new tokens [B, <= max_new_tokens], pad after each row's end
        token. ``temperature == 0`` is greedy."""
        B, P = input_ids.shape
        device = input_ids.device
        dtype = self.model.lm_head.weight.dtype
        total = P + max_new_tokens
        keys = [torch.empty(B, self.n_kv, total, self.head_dim, dtype=dtype, device=device) for _ in self.layers]
        values = [torch.empty_like(k) for k in keys]
        valid = torch.zeros(B, total, dtype=torch.bool, device=device)
        valid[:, :P] = attention_mask.bool()
        # Positions count real tokens only, as generate does for left-padded batches.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        attend = causal[None, None] & valid[:, None, None, :P]
        attend = attend | ~valid[:, None, :P, None]  # a pad query sees everything: keeps softmax finite
        fused = self._fused_weights()
        logits = self._forward(input_ids, positions, keys, values, 0, attend, fused)
        next_pos = positions[:, -1] + 1
        eos = torch.tensor(sorted(eos_ids), device=device)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)  # the original row of each active row
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            if temperature == 0.0:
                token = logits.argmax(-1)
            else:
                token = sample(filter_logits(logits, temperature, top_k, top_p).softmax(-1), generator)
            token = token.masked_fill(done, pad_id)
            out[rows, t] = token
            done = done | torch.isin(token, eos)
            n_done = int(done.sum())
            if n_done == len(rows) or t == max_new_tokens - 1:
                return out[:, : t + 1]
            slot = P + t
            if n_done * 4 >= len(rows):
                # Finished rows leave the batch once they are a quarter of it: later steps cost
                # what the unfinished rows need, and the cache copy is paid a few times, not per step.
                keep = (~done).nonzero().squeeze(1)
                rows, token, next_pos, done = rows[keep], token[keep], next_pos[keep], done[keep]
                valid = valid[keep]
                keys = [self._take(k, keep, slot) for k in keys]
                values = [self._take(v, keep, slot) for v in values]
            valid[:, slot] = True
            logits = self._forward(token[:, None], next_pos[:, None], keys, values, slot,
                                   valid[:, None, None, : slot + 1], fused)
            next_pos = next_pos + 1
        return out

    @staticmethod
    def _take(cache: torch.Tensor, keep: torch.Tensor, filled: int) -> torch.Tensor:
        """Rows ``keep`` of a [B, H, S, D] cache; only its first ``filled`` slots are copied."""
        new = torch.empty((len(keep),) + cache.shape[1:], dtype=cache.dtype, device=cache.device)
        new[:, :, :filled] = cache[keep, :, :filled]
        return new
