import pandas as pd
import pytest
import torch

from compaction.data import ROLLOUT_COLUMNS, load_problems
from compaction.model import load_model, load_tokenizer
from compaction.rollout import HFEngine, Sampling, generate_rollouts, write_rollouts


@pytest.fixture(scope="module")
def engine(tiny_model):
    return HFEngine(load_model(tiny_model), load_tokenizer(tiny_model), batch_size=8)


@pytest.fixture(scope="module")
def problems(smoke_data):
    return load_problems(smoke_data["problems"], "eval").head(6)


def test_rollouts_schema_and_counts(engine, problems, tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    df = generate_rollouts(engine, tok, problems, Sampling(n=3, temperature=1.0, max_new_tokens=24, seed=1), tiny_model)
    assert list(df.columns) == list(ROLLOUT_COLUMNS)
    assert len(df) == 3 * len(problems)
    assert all(sorted(g) == [0, 1, 2] for _, g in df.groupby("problem_id").sample_index)
    assert df.rollout_id.is_unique
    assert set(df.finish_reason) <= {"stop", "length"}
    assert (df[df.finish_reason == "length"].response_tokens == 24).all()
    assert (df.response_tokens <= 24).all()
    assert df.prompt.str.endswith("<|im_start|>assistant\n").all()
    out = write_rollouts(df, tmp_path / "r" / "rollouts.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out), df)
    assert [p.name for p in out.parent.iterdir()] == ["rollouts.parquet"]  # no temp file left


def test_seeded_sampling_is_reproducible(engine, problems, tiny_model):
    tok = load_tokenizer(tiny_model)
    s = Sampling(n=2, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16, seed=7)
    a = generate_rollouts(engine, tok, problems, s, tiny_model)
    b = generate_rollouts(engine, tok, problems, s, tiny_model)
    assert list(a.response) == list(b.response)
    c = generate_rollouts(engine, tok, problems, Sampling(n=2, temperature=1.0, max_new_tokens=16, seed=8), tiny_model)
    assert list(a.response) != list(c.response)


def test_left_padded_batches_equal_one_by_one_greedy(tiny_model, problems):
    """Left padding must not change what a prompt generates: greedy in a batch == greedy alone."""
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=12)
    batched = HFEngine(model, tok, batch_size=6)
    single = HFEngine(model, tok, batch_size=1)
    prompts = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in problems.problem]
    a = [c[0].token_ids for c in batched.generate(prompts, greedy)]
    b = [c[0].token_ids for c in single.generate(prompts, greedy)]
    assert a == b


def test_finish_reason_stop_when_model_emits_eos(tiny_model):
    """Force an end token by making every logit but the end tokens' zero: finish_reason is stop."""
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        # Tied to the embeddings: zeroing the head leaves every logit 0 but the end tokens'
        # (<|endoftext|> is id 0, so greedy argmax over equal logits also lands on an end token).
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos] = 1.0
    engine = HFEngine(model, tok, batch_size=4)
    outs = engine.generate(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], Sampling(n=2, temperature=0.0))
    assert [c.finish_reason for c in outs[0]] == ["stop", "stop"]
    assert len(outs[0][0].token_ids) == 1 and outs[0][0].token_ids[0] in engine.eos_ids
    assert outs[0][0].text == ""


def test_write_rollouts_rejects_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        write_rollouts(pd.DataFrame({"rollout_id": ["a"]}), tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()
