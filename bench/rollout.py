"""Generated tokens per second of the embedded tiny model on this machine, per batch size.

    .venv/bin/python bench/rollout.py [--params params/demo.yaml] [--batch-sizes 1 8 32 64] [--tokens 128]

Baseline, side by side in the same run: batch size 1 (one sequence at a time, the unbatched
path). Each row prints tokens/s and its ratio to batch 1, and the process's peak RSS.
Every sequence is forced to generate exactly `--tokens` tokens (end tokens masked with
min_new_tokens), so the rows do the same work per sequence.
"""

from __future__ import annotations

import argparse
import os
import resource
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
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per sequence")
    ap.add_argument("--sequences", type=int, default=64, help="sequences per measurement (>= batch size)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from jobs import prepare_data, prepare_model
    from compaction.data import load_problems
    from compaction.model import build_prompt, build_student_messages, load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as home:
        params = load_params(args.params, base=Path(home))
        refs = prepare_data.run(params)
        ref = prepare_model.run(params, refs["problems"], refs["traces"])
        model, tok = load_model(ref).eval(), load_tokenizer(ref)
        problems = load_problems(refs["problems"], "eval")
        prompts = [build_prompt(tok, build_student_messages(p)) for p in problems.problem]
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M params, {model.config.num_hidden_layers} layers, "
              f"hidden {model.config.hidden_size}, vocab {model.config.vocab_size}; threads {args.threads}")
        print(f"{'batch':>6} {'sequences':>9} {'seconds':>8} {'tokens/s':>10} {'vs batch 1':>10}")
        base = None
        for bs in args.batch_sizes:
            n_seq = max(bs, args.sequences if bs > 1 else min(args.sequences, 8))
            seq_prompts = [prompts[i % len(prompts)] for i in range(n_seq)]
            t0 = time.perf_counter()
            generated = 0
            with torch.no_grad():
                for s in range(0, n_seq, bs):
                    enc = tok(seq_prompts[s: s + bs], return_tensors="pt", padding=True, add_special_tokens=False)
                    out = model.generate(**enc, do_sample=True, temperature=1.0, max_new_tokens=args.tokens,
                                         min_new_tokens=args.tokens, pad_token_id=tok.pad_token_id)
                    generated += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
            seconds = time.perf_counter() - t0
            rate = generated / seconds
            base = base or rate
            print(f"{bs:>6} {n_seq:>9} {seconds:>8.2f} {rate:>10.0f} {rate / base:>9.1f}x")
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
