"""SFT: learns, resumes after SIGKILL to the same weights, and 2 processes follow 1 process's curve."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compaction.training import checkpoint_dirs, read_metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--params", "params/smoke.yaml"]


def sft_cmd(base, traces, out, *overrides, launcher=(sys.executable, "-m")):
    sets = [a for o in overrides for a in ("--set", o)]
    return [*launcher, "jobs.sft", *SMOKE, *sets, "--base", base, "--traces", traces, "--out", str(out)]


def env(home):
    return {**os.environ, "COMPACTION_HOME": str(home), "OMP_NUM_THREADS": "1"}


def weights(ckpt):
    return load_file(str(Path(ckpt) / "model.safetensors"))


def test_sft_learns_and_writes_hf_checkpoint(smoke_params, smoke_data, tiny_model, tmp_path):
    from jobs import sft

    params = smoke_params.model_copy(deep=True)
    params.sft.max_steps, params.sft.lr = 12, 1e-2  # the smoke model is tiny: a short, hot run
    params.sft.warmup_ratio = 0.25  # 3 warm-up steps
    final = sft.run(params, tiny_model, smoke_data["traces"], tmp_path / "sft")
    m = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert [r["step"] for r in m] == list(range(1, 13))
    assert m[-1]["sft/loss"] < 0.8 * m[0]["sft/loss"]
    lrs = [r["sft/lr"] for r in m]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-2)  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < lrs[2]  # then cosine decay
    assert all(r["sft/tokens_per_s"] > 0 and r["sft/grad_norm"] > 0 for r in m)
    from compaction.model import load_model

    assert type(load_model(final)).__name__ == "Qwen3ForCausalLM"
    assert (Path(final) / "tokenizer.json").is_file()


@pytest.mark.slow
def test_privileged_traces_are_prompted_like_the_opsd_teacher(smoke_params, smoke_data, tiny_model):
    import pandas as pd

    from compaction.data import load_problems
    from compaction.distillation import teacher_prompt
    from compaction.model import build_prompt, build_student_messages, load_tokenizer
    from jobs.sft import build_examples

    tok = load_tokenizer(tiny_model)
    traces = pd.read_parquet(smoke_data["traces"])
    assert traces.context.notna().any() and traces.context.isna().any()
    examples = build_examples(tok, traces, 512, True)
    problems = load_problems(smoke_data["problems"], "train").set_index("problem_id", drop=False)
    for (ids, start), (_, t) in zip(examples, traces.iterrows()):
        if isinstance(t.context, str):  # the very prompt OPSD's teacher gets (context: solution)
            expected = teacher_prompt(tok, smoke_params.opsd, problems.loc[t.problem_id], True)
        else:
            expected = build_prompt(tok, build_student_messages(t.problem), True)
        assert tok.decode(ids[:start]) == expected


def test_length_grouped_batches_cover_each_epoch_and_pad_less():
    """Every epoch is a permutation of the traces; batches (also those after an epoch that ends
    mid-batch) pad far less than plain random ones; the order is a pure function, as resume needs."""
    import random

    from jobs.sft import epoch_order, global_batch

    rng = random.Random(0)
    n, batch = 1000, 32  # 1000 is not a multiple of 32: epochs end mid-batch
    lengths = [rng.randint(40, 200) for _ in range(n)]
    for epoch in range(3):
        assert sorted(epoch_order(n, 7, epoch, lengths, batch, 16)) == list(range(n))

    def padding(window):
        real = padded = 0
        for step in range(3 * n // batch):
            widths = [lengths[i] for i in global_batch(n, 7, step, batch, lengths, window)]
            real, padded = real + sum(widths), padded + max(widths) * len(widths)
        return 1 - real / padded

    assert padding(0) > 0.3 and padding(16) < 0.1
    assert global_batch(n, 7, 40, batch, lengths, 16) == global_batch(n, 7, 40, batch, lengths, 16)
    assert global_batch(n, 7, 40, batch, lengths, 16) != global_batch(n, 8, 40, batch, lengths, 16)


def test_sigkill_then_resume_gives_the_same_weights(smoke_data, tiny_model, tmp_path):
    opts = ("sft.max_steps=10", "sft.save_every=2", "sft.micro_batch_size=4")
    # Uninterrupted reference run.
    ref = tmp_path / "ref"
    subprocess.run(sft_cmd(tiny_model, smoke_data["traces"], ref, *opts), cwd=REPO, env=env(tmp_path),
                   check=True, capture_output=True, timeout=300)
    # Interrupted run: SIGKILL once the step-4 checkpoint is on disk, then start again.
    out = tmp_path / "killed"
    proc = subprocess.Popen(sft_cmd(tiny_model, smoke_data["traces"], out, *opts), cwd=REPO, env=env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name >= "step-00000004" for p in checkpoint_dirs(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p.name for p in checkpoint_dirs(out)]
    assert done and "step-00000010" not in done and not (out / "final").exists(), done
    r = subprocess.run(sft_cmd(tiny_model, smoke_data["traces"], out, *opts), cwd=REPO, env=env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    a, b = weights(ref / "final"), weights(out / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # bitwise identical on CPU
    # The metrics file has each step once, as the uninterrupted run does.
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == list(range(1, 11))
    for x, y in zip(read_metrics(ref / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")):
        assert x["sft/loss"] == pytest.approx(y["sft/loss"], rel=1e-6)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(smoke_data, tiny_model, tmp_path):
    opts = ("sft.max_steps=4", "sft.save_every=100", "sft.batch_size=16", "sft.micro_batch_size=4")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(sft_cmd(tiny_model, smoke_data["traces"], one, *opts), cwd=REPO, env=env(tmp_path),
                   check=True, capture_output=True, timeout=300)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launcher = (accelerate, "launch", "--config_file", "params/accelerate/cpu-2proc.yaml", "-m")
    r = subprocess.run(sft_cmd(tiny_model, smoke_data["traces"], two, *opts, launcher=launcher), cwd=REPO,
                       env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    l1 = [m["sft/loss"] for m in read_metrics(one / "metrics.jsonl")]
    l2 = [m["sft/loss"] for m in read_metrics(two / "metrics.jsonl")]
    assert len(l1) == len(l2) == 4
    assert l2 == pytest.approx(l1, rel=1e-4)
    a, b = weights(one / "final"), weights(two / "final")
    for k in a:  # Adam's normalised steps turn gradient rounding (other reduction order) into ~1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=3e-5)
