"""Rollout speed of the hf backend's two decode loops and of a vLLM server, side by side.

    .venv/bin/python bench/rollout.py [--params params/demo.yaml] [--checkpoint DIR] [--size demo|10m|50m]
                                      [--batch-sizes 32 128] [--prompts 32] [--n 8] [--repeats 3] [--no-vllm]

For each batch size, ``HFEngine`` samples ``n`` responses for each of ``--prompts`` eval
problems (temperature 1, the RL rollout setting; ``max_new_tokens`` from the params) with
``decoder="generate"`` (transformers ``generate``: the baseline) and ``decoder="lean"``
(compaction.rollout.lean); then a vLLM server from ``.venv-vllm`` (``make vllm``; its start-up
printed apart) samples the same prompts with the same seeds, all prompts in one request, as a
stage job does. Prints the median seconds, generated tokens per second and the ratio to
``generate``, and the peak RSS of this process and of the server's processes.

``--size`` gives the embedded model the shape of bench/scaling.py's sizes (``50m``: ~50M
parameters) instead of the params file's.

``--checkpoint`` should be a trained model (an SFT checkpoint): responses then end when the
model says so, as in RLVR and evaluation. Without it the random base model is used and every
response runs to ``max_new_tokens``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from compaction.params import load_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--checkpoint", default=None, help="model to sample from (default: the embedded base model)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default=None, help="model shape from bench/scaling.py's SIZES (demo, 10m, 50m)")
    ap.add_argument("--no-vllm", action="store_true", help="leave out the vLLM server row")
    args = ap.parse_args()

    from jobs import prepare_data, prepare_model
    from compaction.data import load_problems
    from compaction.model import build_prompt, build_student_messages, load_model, load_tokenizer
    from compaction.rollout import HFEngine, Sampling

    sets = []
    if args.size:
        from bench.scaling import SIZES

        sets = [f"model.tiny.{k}={v}" for k, v in SIZES[args.size].items()]
    with tempfile.TemporaryDirectory() as home:
        params = load_params(args.params, sets, base=Path(home))
        refs = prepare_data.run(params)
        ref = args.checkpoint or prepare_model.run(params, refs["problems"], refs["traces"])
        model, tok = load_model(ref).eval(), load_tokenizer(ref)
        problems = load_problems(refs["problems"], "eval").head(args.prompts)
        prompts = [build_prompt(tok, build_student_messages(p)) for p in problems.problem]
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {ref}\n  {n_params / 1e6:.2f}M params, {model.config.num_hidden_layers} layers, hidden "
              f"{model.config.hidden_size}, vocab {model.config.vocab_size}; {torch.get_num_threads()} threads; "
              f"{len(prompts)} prompts x {args.n} samples, max {params.rollout.max_new_tokens} new tokens")
        print(f"{'batch':>6} {'decoder':>9} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'vs generate':>11}")
        def row(label: str, engine) -> float:
            times, tokens = [], 0
            for r in range(args.repeats):
                sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=params.rollout.max_new_tokens, seed=r)
                t0 = time.perf_counter()
                out = engine.generate(prompts, sampling)
                times.append(time.perf_counter() - t0)
                tokens += sum(c.n_tokens for cs in out for c in cs)
            rate = tokens / sum(times)
            print(f"{label:>6} {engine_name(engine):>9} {statistics.median(times):>8.2f} {tokens // args.repeats:>7} "
                  f"{rate:>9.0f} {rate / (base or rate):>10.2f}x", flush=True)
            return rate

        base = None
        for bs in args.batch_sizes:
            base = None
            for decoder in ("generate", "lean"):
                rate = row(str(bs), HFEngine(model, tok, batch_size=bs, decoder=decoder))
                base = base or rate
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        if not args.no_vllm:
            from compaction.rollout import VLLMServer, VLLMServerEngine, eos_token_ids

            t0 = time.perf_counter()
            with VLLMServer(ref, log_path=Path(home) / "vllm.log") as server:
                print(f"vLLM server start-up: {time.perf_counter() - t0:.1f} s (float32, eager, 1 GiB KV cache)")
                engine = VLLMServerEngine(server, tok, eos_token_ids(ref, tok), owns_server=False)
                row("server", engine)
                print(f"vLLM server peak RSS: {server_peak_rss_mib(server.pid):.0f} MiB (all its processes)")
                weight_sync(model, engine, [Path(home) / "weights", Path("/dev/shm") / f"bench-weights-{os.getpid()}"],
                            args.repeats)


def weight_sync(model, engine, folders, repeats: int) -> None:
    """A stage's per-round weight sync: write the weights (safetensors), the server reloads them."""
    import shutil

    from compaction.rollout import write_weights

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for folder in folders:
        if not folder.parent.is_dir():
            continue
        writes, reloads = [], []
        try:
            for _ in range(repeats):
                t0 = time.perf_counter()
                path = write_weights(dict(model.state_dict()), folder, tied_embeddings=tied)
                t1 = time.perf_counter()
                engine.reload(folder)
                writes.append(t1 - t0)
                reloads.append(time.perf_counter() - t1)
            mb = path.stat().st_size / 1e6
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        w, r = statistics.median(writes), statistics.median(reloads)
        print(f"weight sync via {folder.parent}: {mb:.0f} MB written in {w:.2f} s ({mb / w:.0f} MB/s), "
              f"reloaded in {r:.2f} s ({mb / r:.0f} MB/s)")


def engine_name(engine) -> str:
    return getattr(engine, "decoder", "vllm")


def server_peak_rss_mib(pgid: int) -> float:
    """Sum over the server's process group of each process's peak RSS (VmHWM)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            total += int(m.group(1)) if m else 0
        except (OSError, ProcessLookupError):
            continue
    return total / 1024


if __name__ == "__main__":
    main()
