"""The embedded default model: a tokenizer trained here and a tiny random-initialised Qwen3.

Both are saved with ``save_pretrained`` and load back through ``AutoTokenizer`` /
``AutoModelForCausalLM``, so every later stage takes the code path of a real Qwen3
checkpoint: same chat-template call, same special tokens (``<|im_start|>``, ``<|im_end|>``,
``<think>``), same model class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from compaction.artifacts import atomic_dir
from compaction.params import TinyModel

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
# Not "special": like Qwen3, the thinking tags survive skip_special_tokens in decoded text.
THINK_TOKENS = ["<think>", "</think>"]

# Qwen3's template, reduced to what single-turn math prompts use; `enable_thinking=False`
# pre-fills an empty thinking block exactly as Qwen3 does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on the domain's text (any string stays encodable), digits split
    one per token (so arithmetic is learnable), wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + THINK_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE,
        model_max_length=4096, padding_side="left", clean_up_tokenization_spaces=False,
    )
    # Register <think> / </think> as added, non-special tokens: kept whole, kept in decoded text.
    from tokenizers import AddedToken

    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return fast


def build_embedded_model(out_dir: str | Path, texts: Iterable[str], tiny: TinyModel) -> Path:
    """Train the tokenizer on ``texts``, initialise a tiny Qwen3 from ``tiny.seed``, save both
    (atomically) to ``out_dir`` as a Hugging Face checkpoint; returns ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads, head_dim=tiny.head_dim,
        max_position_embeddings=tiny.max_position_embeddings, tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    torch.manual_seed(tiny.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=True, temperature=0.6, top_p=0.95,
    )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
