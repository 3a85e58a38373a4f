import json
from pathlib import Path

import torch

from compaction.data import load_problems
from compaction.model import build_prompt, build_student_messages, load_model, load_tokenizer


def test_embedded_checkpoint_loads_as_a_real_qwen3(tiny_model):
    files = {p.name for p in Path(tiny_model).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= files
    assert json.loads((Path(tiny_model) / "config.json").read_text())["model_type"] == "qwen3"
    model = load_model(tiny_model)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == torch.float32  # auto on CPU
    tok = load_tokenizer(tiny_model)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_chat_template_matches_qwen3_shape(tiny_model):
    tok = load_tokenizer(tiny_model)
    msgs = build_student_messages("Compute 1 + 2.")
    thinking = build_prompt(tok, msgs, enable_thinking=True)
    assert thinking.startswith("<|im_start|>user\nCompute 1 + 2.\n")
    assert thinking.endswith("<|im_end|>\n<|im_start|>assistant\n")
    plain = build_prompt(tok, msgs, enable_thinking=False)
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tokenizer_round_trips_traces_and_keeps_think_tags(tiny_model, smoke_data):
    import pandas as pd

    tok = load_tokenizer(tiny_model)
    traces = pd.read_parquet(smoke_data["traces"])
    for text in traces.response.head(20):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    ids = tok("<think>\n1</think>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "<think>"
    # Digits are one token each (arithmetic stays learnable).
    assert tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"]) == ["1", "2", "3"]
    # Text the tokenizer never saw stays encodable (byte-level).
    odd = "∫ émoji 🙂 \\sqrt{2}"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd


def test_base_model_is_deterministic_given_seed(smoke_params, smoke_data, tmp_path):
    from jobs import prepare_model

    a = load_model(prepare_model.run(smoke_params, smoke_data["problems"], smoke_data["traces"]))
    b = load_model(prepare_model.run(smoke_params, smoke_data["problems"], smoke_data["traces"]))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_problems_file_has_both_splits(smoke_data):
    assert set(load_problems(smoke_data["problems"]).split) == {"train", "eval"}


def test_prompt_boilerplate_is_words_where_the_vocabulary_has_room(smoke_data):
    """The instruction and role names are a few tokens, not one per letter (the demo's vocabulary
    has room; with the role names they took ~44 of a ~148-token demo training sequence before)."""
    import pandas as pd

    from compaction.model import train_tokenizer
    from compaction.model.prompts import ANSWER_INSTRUCTION, prompt_boilerplate

    problems = load_problems(smoke_data["problems"])
    texts = list(problems.problem) + list(pd.read_parquet(smoke_data["traces"]).response)
    for corpus, most in ((texts, None), (prompt_boilerplate() + texts, 16)):
        tok = train_tokenizer(corpus, 1024)
        n = len(tok(ANSWER_INSTRUCTION, add_special_tokens=False)["input_ids"])
        if most is None:
            assert n > 25  # without the boilerplate in its corpus, spelled out nearly letter by letter
        else:
            assert n <= most
            prompt = build_prompt(tok, build_student_messages("Compute 1 + 2."))
            assert tok.convert_ids_to_tokens(tok(prompt, add_special_tokens=False)["input_ids"])[:2] == [
                "<|im_start|>", "user"]
