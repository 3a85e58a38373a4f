"""Rollout speed of the hf backend's two decode loops on the embedded tiny model, side by side.

    .venv/bin/python bench/rollout.py [--params params/demo.yaml] [--checkpoint DIR]
                                      [--batch-sizes 32 128] [--prompts 32] [--n 8] [--repeats 3]

For each batch size, ``HFEngine`` samples ``n`` responses for each of ``--prompts`` eval
problems (temperature 1, the RL rollout setting; ``max_new_tokens`` from the params) with
``decoder="generate"`` (transformers ``generate``: the baseline) and ``decoder="lean"``
(compaction.rollout.lean), the same prompts and seeds. Prints the median seconds, generated
tokens per second and the ratio to ``generate``, and the process's peak RSS.

``--checkpoint`` should be a trained model (an SFT checkpoint): responses then end when the
model says so, as in RLVR and evaluation. Without it the random base model is used and every
response runs to ``max_new_tokens``.
"""

from __future__ import annotations

import argparse
import os
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
    args = ap.parse_args()

    from jobs import prepare_data, prepare_model
    from compaction.data import load_problems
    from compaction.model import build_prompt, build_student_messages, load_model, load_tokenizer
    from compaction.rollout import HFEngine, Sampling

    with tempfile.TemporaryDirectory() as home:
        params = load_params(args.params, base=Path(home))
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
        for bs in args.batch_sizes:
            base = None
            for decoder in ("generate", "lean"):
                engine = HFEngine(model, tok, batch_size=bs, decoder=decoder)
                times, tokens = [], 0
                for r in range(args.repeats):
                    sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=params.rollout.max_new_tokens, seed=r)
                    t0 = time.perf_counter()
                    out = engine.generate(prompts, sampling)
                    times.append(time.perf_counter() - t0)
                    tokens += sum(c.n_tokens for cs in out for c in cs)
                seconds = statistics.median(times)
                rate = tokens / sum(times)
                base = base or rate
                print(f"{bs:>6} {decoder:>9} {seconds:>8.2f} {tokens // args.repeats:>7} {rate:>9.0f} "
                      f"{rate / base:>10.2f}x")
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
