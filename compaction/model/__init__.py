"""Models and tokenizers: any Hugging Face causal LM by path or hub id, and the embedded tiny Qwen3."""

from compaction.model.embedded import build_embedded_model, train_tokenizer
from compaction.model.loading import load_model, load_tokenizer, resolve_dtype
from compaction.model.prompts import build_prompt, build_student_messages, build_teacher_messages

__all__ = [
    "build_embedded_model", "build_prompt", "build_student_messages", "build_teacher_messages", "load_model",
    "load_tokenizer", "resolve_dtype", "train_tokenizer",
]
