"""Rollouts from a transformers model: batched, left-padded, KV cache, n samples per prompt.

The decode loop is ``generate`` itself, or (``decoder="lean"``) the plain loop of
``compaction.rollout.lean`` over the same weights, faster for small models on CPU
(docs/performance.md, "Rollouts").
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from compaction.rollout import lean
from compaction.rollout.base import Completion, Sampling

DECODERS = ("auto", "generate", "lean")


def pick_decoder(model, decoder: str, device: torch.device) -> str:
    """``auto`` = ``lean`` for a supported model on CPU (where generate's per-step overhead
    dominates), else ``generate``. Asking for ``lean`` on a model it cannot run is an error."""
    if decoder not in DECODERS:
        raise ValueError(f"rollout.hf_decoder: {decoder!r} is not one of {DECODERS}")
    if decoder == "auto":
        return "lean" if device.type == "cpu" and lean.supports(model) else "generate"
    if decoder == "lean" and not lean.supports(model):
        raise ValueError(f"rollout.hf_decoder=lean supports {lean.SUPPORTED_MODEL_TYPES} models only, "
                         f"not {getattr(model.config, 'model_type', type(model).__name__)}; use generate")
    return decoder


class HFEngine:
    """Samples from a Hugging Face causal LM on one device.

    Each prompt is repeated ``n`` times and the repeats are packed into batches of
    ``batch_size`` sequences. Sequences are left-padded so that every row's next token sits
    at the same position and the KV cache can be shared by the batch. The batch's random
    state is seeded from (seed, batch index), so a run is reproducible.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32, device: str | torch.device | None = None,
                 decoder: str = "auto"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos = gen_eos if gen_eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.decoder = pick_decoder(model, decoder, self.device)

    @classmethod
    def from_pretrained(cls, ref: str, dtype: str = "auto", device: str = "cpu", batch_size: int = 32,
                        decoder: str = "auto"):
        from compaction.model import load_model, load_tokenizer

        return cls(load_model(ref, dtype, device), load_tokenizer(ref), batch_size=batch_size, decoder=decoder)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sampling: Sampling, progress: bool = False) -> list[list[Completion]]:
        flat = [(i, p) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        results: list[list[Completion]] = [[] for _ in prompts]
        batches = [flat[s: s + self.batch_size] for s in range(0, len(flat), self.batch_size)]
        for b, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
            enc = self.tokenizer([p for _, p in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            seed = sampling.seed * 1_000_003 + b
            if self.decoder == "lean":
                new_tokens = self._lean_generate(enc, sampling, seed)
            else:
                new_tokens = self._hf_generate(enc, sampling, seed)
            for (prompt_index, _), ids in zip(batch, new_tokens):
                results[prompt_index].append(self._completion(ids))
        return results

    def _hf_generate(self, enc, sampling: Sampling, seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=sorted(self.eos_ids), use_cache=True)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k or None)
        out = self.model.generate(**enc, **kwargs)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    def _lean_generate(self, enc, sampling: Sampling, seed: int) -> list[list[int]]:
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out = lean.LeanQwen3(self.model).generate(
            enc["input_ids"], enc["attention_mask"], max_new_tokens=sampling.max_new_tokens,
            eos_ids=sorted(self.eos_ids), pad_id=self.pad_id, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, generator=generator)
        return out.tolist()

    def _completion(self, ids: list[int]) -> Completion:
        # Cut at the first end token; after it, generate only pads the row.
        for k, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[: k + 1]
                text = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
                return Completion(text, ids, "stop")
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, "length")

    def close(self) -> None:
        self.model = None
