"""Load any causal LM and its tokenizer by local path or hub id (the same code for the tiny one)."""

from __future__ import annotations

import torch


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` = float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(ref: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: str, dtype: str = "auto", device: str | torch.device = "cpu",
               attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": resolve_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    return model.to(device)
