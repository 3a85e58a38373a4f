"""The lean decode loop against transformers' own generate and logits warpers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

from compaction.data import load_problems
from compaction.model import build_prompt, build_student_messages, load_model, load_tokenizer
from compaction.rollout import HFEngine, Sampling
from compaction.rollout.hf import pick_decoder
from compaction.rollout.lean import LeanQwen3, filter_logits, sample, supports


@pytest.fixture(scope="module")
def model_and_batch(tiny_model, smoke_data):
    model, tok = load_model(tiny_model).eval(), load_tokenizer(tiny_model)
    # Large random weights: the freshly initialised model emits one token everywhere, and
    # comparisons need rows whose greedy paths differ.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5 + (1.0 if w.ndim == 1 else 0.0))
    tok.padding_side = "left"
    problems = load_problems(smoke_data["problems"], "eval").head(12)
    prompts = [build_prompt(tok, build_student_messages(p)) for p in problems.problem]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any(), "prompts of one length would not exercise left padding"
    return model, tok, enc


def _hf_greedy(model, enc, max_new_tokens, eos, pad):
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=pad, eos_token_id=eos)
    return out[:, enc["input_ids"].shape[1]:]


def test_greedy_tokens_equal_generate_when_rows_end_at_different_steps(model_and_batch):
    """Rows that end early leave the lean batch; the tokens must still be generate's, row by row."""
    model, tok, enc = model_and_batch
    pad = tok.pad_token_id
    free = _hf_greedy(model, enc, 24, [pad], pad)  # the untrained model rarely ends by itself
    # An end token that some rows emit (at different steps) and others never: taken from the free run.
    n = len(free)
    for step in (3, 9, 15, 20):
        choices = [sorted({int(free[row, step]), pad}) for row in range(n)]
        fitting = [e for e in choices if n // 4 <= int(torch.isin(free, torch.tensor(e)).any(1).sum()) < n]
        if fitting:
            eos = fitting[0]
            break
    else:
        raise AssertionError("no token of the free run ends between a quarter and all but one of the rows")
    want = _hf_greedy(model, enc, 24, eos, pad)
    got = LeanQwen3(model).generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=24, eos_ids=eos,
                                    pad_id=pad, temperature=0.0)
    assert got.shape == want.shape
    ended = torch.isin(got, torch.tensor(eos)).any(1)
    # A quarter of the rows ending is what makes the lean loop drop them from its batch.
    assert len(got) // 4 <= int(ended.sum()) < len(got), "some rows must end early and some run on"
    assert torch.equal(got, want)


def test_engine_decoders_give_the_same_greedy_completions(model_and_batch):
    model, tok, enc = model_and_batch
    prompts = tok.batch_decode(enc["input_ids"], skip_special_tokens=False)
    prompts = [p.replace(tok.pad_token, "") for p in prompts]
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=16)
    a = HFEngine(model, tok, batch_size=5, decoder="generate").generate(prompts, greedy)
    b = HFEngine(model, tok, batch_size=5, decoder="lean").generate(prompts, greedy)
    assert [c[0].token_ids for c in a] == [c[0].token_ids for c in b]
    assert [c[0].finish_reason for c in a] == [c[0].finish_reason for c in b]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 0.95), (0.7, 20, 0.9), (1.3, 5, 1.0)])
def test_filter_logits_equals_generates_warpers(temperature, top_k, top_p):
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_sample_draws_each_token_at_its_probability_and_never_a_removed_one():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(40_000, 1)
    draws = sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs[0].double(), atol=0.01, rtol=0)


def test_seeded_lean_sampling_is_reproducible(model_and_batch):
    model, tok, enc = model_and_batch
    lean = LeanQwen3(model)

    def draw(seed):
        return lean.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=12, eos_ids=[tok.pad_token_id],
                             pad_id=tok.pad_token_id, temperature=1.0, top_p=0.95,
                             generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_lean_refuses_models_it_cannot_run(model_and_batch):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert not supports(llama)
    assert pick_decoder(llama, "auto", torch.device("cpu")) == "generate"
    with pytest.raises(ValueError, match="rollout.hf_decoder=lean"):
        pick_decoder(llama, "lean", torch.device("cpu"))
    with pytest.raises(ValueError, match="rollout.hf_decoder"):
        pick_decoder(llama, "fast", torch.device("cpu"))
    model = model_and_batch[0]
    assert supports(model) and pick_decoder(model, "auto", torch.device("cpu")) == "lean"
    import peft  # a dev dependency (pyproject.toml): missing, the test fails
    lora = peft.get_peft_model(load_model_copy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not supports(lora.get_base_model()), "a LoRA-wrapped projection's weight lacks the adapter"


def load_model_copy(model):
    import copy

    return copy.deepcopy(model)
