"""vLLM for real, on CPU: a server from `.venv-vllm` (make vllm), weights reloaded into it, the HF
engine beside it, RLVR and OPSD stages that roll out through it, and a server killed mid-stage.

One server serves the module (~25 s to start); the killed-server test starts the stage's own. These tests fail
loudly where the vLLM environment is missing: `make test` builds it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from compaction.model import build_prompt, build_student_messages, load_model, load_tokenizer
from compaction.rollout import HFEngine, Sampling, VLLMServer, VLLMServerEngine, eos_token_ids, write_weights
from compaction.rollout.vllm_server import group_alive

REPO = Path(__file__).resolve().parents[1]
GREEDY = Sampling(n=1, temperature=0.0, max_new_tokens=48, seed=0)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = VLLMServer(tiny_model, log_path=tmp_path_factory.mktemp("vllm") / "server.log").start()
    pid = srv.pid
    yield srv
    srv.close()
    assert not group_alive(pid), f"vLLM server process group {pid} is still running after close()"


@pytest.fixture(scope="module")
def sft_ckpt(smoke_params, smoke_data, tiny_model, tmp_path_factory):
    """The smoke model after a short SFT (what the smoke RLVR starts from)."""
    from jobs import sft

    params = smoke_params.model_copy(deep=True)
    params.sft.max_steps = 12
    return sft.run(params, tiny_model, smoke_data["traces"], tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def varied_model(tiny_model, tmp_path_factory) -> str:
    """The smoke architecture with every matrix redrawn at std 2/sqrt(fan_in), seeded: greedy
    output varies token to token with clear margins (the barely trained smoke model repeats a
    token), so a wrong or missing reload shows."""
    out = tmp_path_factory.mktemp("varied")
    model = load_model(tiny_model, dtype="float32")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[1] ** 0.5)
    model.save_pretrained(out)
    load_tokenizer(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def prompts(tiny_model, smoke_data):
    from compaction.data import load_problems

    tok = load_tokenizer(tiny_model)
    problems = load_problems(smoke_data["problems"], "eval")
    return [build_prompt(tok, build_student_messages(p), True) for p in problems["problem"]]


def engine_on(server, model_dir):
    tok = load_tokenizer(model_dir)
    return VLLMServerEngine(server, tok, eos_token_ids(model_dir, tok), owns_server=False)


def ids(completions):
    return [[c.token_ids for c in per_prompt] for per_prompt in completions]


def greedy_agreement(hf_out, vllm_out) -> tuple[int, int, int]:
    """(tokens that agree position by position, tokens, identical sequences) of two greedy runs."""
    agree = total = identical = 0
    for a, b in zip(hf_out, vllm_out):
        agree += sum(x == y for x, y in zip(a.token_ids, b.token_ids))
        total += max(len(a.token_ids), len(b.token_ids))
        identical += a.token_ids == b.token_ids
        assert (a.text == b.text) == (a.token_ids == b.token_ids)  # decoded by the same tokenizer
    return agree, total, identical


def test_reload_gives_the_new_weights_greedy_output(server, tiny_model, varied_model, prompts, tmp_path):
    """Weights written as a stage writes them, reloaded into a running server: its greedy output is
    the new model's (as the HF engine computes it), and reloading the first model restores its
    output exactly. A stale tied LM head (vLLM 0.32 on CPU) fails the first check."""
    engine = engine_on(server, tiny_model)
    engine.reload(tiny_model)
    before = ids(engine.generate(prompts, GREEDY))
    model = load_model(varied_model)
    folder = tmp_path / "weights"  # as a stage writes them: safetensors alone, HF names
    write_weights(dict(model.state_dict()), folder, tied_embeddings=model.config.tie_word_embeddings)
    seconds = engine.reload(folder)
    reloaded = [c[0] for c in engine.generate(prompts, GREEDY)]
    hf_out = [c[0] for c in HFEngine.from_pretrained(varied_model, dtype="float32").generate(prompts, GREEDY)]
    agree, total, identical = greedy_agreement(hf_out, reloaded)
    assert agree / total >= 0.9, f"after the reload only {agree}/{total} greedy tokens are the new model's"
    assert [[c.token_ids] for c in reloaded] != before, "the reload changed nothing: the new weights were not loaded"
    engine.reload(tiny_model)
    assert ids(engine.generate(prompts, GREEDY)) == before
    print(f"\nreload: {seconds:.2f} s; {agree}/{total} greedy tokens after it are the new model's "
          f"({identical}/{len(prompts)} sequences identical)")


def test_greedy_tokens_agree_with_the_hf_engine(server, sft_ckpt, prompts):
    """On the trained smoke model (small margins); the reload test checks a random model's."""
    model_dir, which = sft_ckpt, "the smoke SFT model"
    engine = engine_on(server, model_dir)
    engine.reload(model_dir)
    vllm_out = [c[0] for c in engine.generate(prompts, GREEDY)]
    hf_out = [c[0] for c in HFEngine.from_pretrained(model_dir, dtype="float32").generate(prompts, GREEDY)]
    agree, total, identical = greedy_agreement(hf_out, vllm_out)
    share = agree / total
    print(f"\nHF vs vLLM greedy on {which}: {agree}/{total} tokens agree position by position ({share:.1%}); "
          f"{identical}/{len(prompts)} sequences identical")
    assert share >= 0.9


def test_sampling_is_seeded_and_returns_the_ids_training_uses(server, tiny_model, prompts):
    engine = engine_on(server, tiny_model)
    engine.reload(tiny_model)
    # Every prompt at once: more prompt tokens than one engine step takes (with chunked prefill the
    # CPU engine then crashed on seeded requests).
    s = Sampling(n=3, temperature=1.0, max_new_tokens=24, seed=7)
    a, b = engine.generate(prompts, s), engine.generate(prompts, s)
    assert ids(a) == ids(b)
    assert ids(engine.generate(prompts, Sampling(n=3, temperature=1.0, max_new_tokens=24, seed=8))) != ids(a)
    tok = load_tokenizer(tiny_model)
    for per_prompt in a:
        assert len(per_prompt) == 3
        for c in per_prompt:
            assert 0 < c.n_tokens <= 24 and c.finish_reason in ("stop", "length")
            body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
            assert c.text == tok.decode(body, skip_special_tokens=True)


def stage_params(smoke_params, server, *sets):
    from compaction.params import load_params

    return load_params(REPO / "params" / "smoke.yaml",
                       ["rollout.backend=vllm", f"rollout.vllm_url={server.url}", *sets],
                       base=Path(smoke_params.paths.root))


def test_rlvr_stage_rolls_out_through_the_server(server, tiny_model, smoke_data, smoke_params, tmp_path, caplog):
    from jobs import rlvr

    params = stage_params(smoke_params, server, "rlvr.rounds=3", "rlvr.overlong=penalty",
                          "rlvr.dynamic_sampling=false")
    caplog.set_level("INFO")
    final = rlvr.run(params, tiny_model, smoke_data["problems"], tmp_path / "rlvr")
    out = tmp_path / "rlvr"
    assert Path(final, "config.json").is_file()
    lines = [r.getMessage() for r in caplog.records]
    for k in range(3):
        assert any(m.startswith(f"rlvr round {k} of 3:") for m in lines), lines
        rollouts = pd.read_parquet(out / f"round-{k:04d}" / "rollouts.parquet")
        assert len(rollouts) == 4 * 2 and (rollouts["response_tokens"] > 0).all()
    timings = json.loads((out / "timings.json").read_text())
    assert len(timings["weight_syncs"]) == 2  # after rounds 0 and 1: round 2 is the last
    assert not (out / "vllm" / "weights").exists()
    # The server now holds the policy of the last round (its weights before the last update).
    assert server.pid is not None and group_alive(server.pid)


def test_opsd_stage_rolls_out_through_the_server(server, tiny_model, smoke_data, smoke_params, tmp_path, caplog):
    from jobs import opsd

    scratch = tmp_path / "scratch"  # rollout.vllm_weights_dir (e.g. /dev/shm on a GPU node)
    scratch.mkdir()
    params = stage_params(smoke_params, server, "opsd.rounds=2", "opsd.unit=rollout",
                          f"rollout.vllm_weights_dir={scratch}")
    caplog.set_level("INFO")
    final = opsd.run(params, tiny_model, smoke_data["problems"], tmp_path / "opsd", "all")
    assert Path(final, "config.json").is_file()
    lines = [r.getMessage() for r in caplog.records]
    for k in range(2):
        assert any(m.startswith(f"opsd round {k} of 2 [all]:") for m in lines), lines
    assert len(json.loads((tmp_path / "opsd" / "timings.json").read_text())["weight_syncs"]) == 1
    assert list(scratch.iterdir()) == [] and not (tmp_path / "opsd" / "vllm" / "weights").exists()
    assert any("/collective_rpc" in m and "200" in m for m in lines)  # the server reloaded what we wrote


def run_until(cmd, pattern: str, env, timeout: float = 600):
    """Start ``cmd``; return (process, output so far) once a line matches ``pattern``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        out.append(line)
        if re.search(pattern, line):
            return proc, out
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(out)[-4000:]}")


@pytest.mark.slow
def test_a_killed_server_fails_the_job_and_a_rerun_resumes(tiny_model, smoke_data, tmp_path):
    out = tmp_path / "rlvr"
    cmd = [sys.executable, "-m", "jobs.rlvr", "--params", "params/smoke.yaml", "--set", "rollout.backend=vllm",
           "--set", "rlvr.rounds=3", "--set", "rlvr.save_every=1", "--set", "rlvr.overlong=penalty",
           "--set", "rlvr.dynamic_sampling=false", "--policy", tiny_model,
           "--problems", smoke_data["problems"], "--out", str(out)]
    env = {**os.environ, "COMPACTION_HOME": str(tmp_path)}
    proc, lines = run_until(cmd, r"rlvr round 1 of 3", env)  # the checkpoint after round 0 is written
    pid = int(re.search(r"vLLM server starting: pid (\d+)", "".join(lines)).group(1))
    os.killpg(pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=300)
    text = "".join(lines) + rest
    assert proc.returncode != 0
    assert re.search(rf"vLLM server at http://127\.0\.0\.1:\d+ \(pid {pid}, log {re.escape(str(out))}/vllm/server\.log\)",
                     text), text[-4000:]
    assert not group_alive(pid)
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    text = rerun.stdout + rerun.stderr
    assert re.search(r"resumed from its checkpoint after [12] of 3 rounds", text), text[-4000:]
    second = int(re.search(r"vLLM server starting: pid (\d+)", text).group(1))
    assert not group_alive(second), "the job ended but its vLLM server is still running"
    assert (out / "final" / "config.json").is_file()
