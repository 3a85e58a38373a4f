"""SFT step time on the demo's data: what SFT does now against the plain setup, side by side.

    .venv/bin/python bench/sft_step.py [--params params/demo.yaml] [--steps 20] [--warmup 3]

Four variants of the same SFT job (jobs/sft.py, demo params) on the same traces:

- `plain`: a tokenizer trained without the prompts' fixed text (the instruction and role names
  are spelled in letters and fragments), random batches (`sft.length_grouping=0`). The baseline.
- `grouped`: the same tokenizer, length-grouped batches (`sft.length_grouping=16`).
- `boilerplate`: the tokenizer trained with `prompt_boilerplate()`, random batches.
- `both`: both changes: what `prepare_model` and `sft` do now.

Each variant runs in a fresh subprocess: setup, `--warmup` steps, then `--steps` timed steps.
Prints per variant the mean sequence length, padded tokens per step, median seconds per step,
the ratio of that to `plain`, and the subprocess's peak RSS (whole process: interpreter, model,
optimizer, activations).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"plain": (False, 0), "grouped": (False, 16), "boilerplate": (True, 0), "both": (True, 16)}


def run_variant(args) -> dict:
    from compaction.model import build_embedded_model
    from compaction.model.prompts import prompt_boilerplate
    from compaction.params import load_params
    from jobs import prepare_data, prepare_model
    from jobs.sft import SFTRecipe, global_batch

    boilerplate, window = VARIANTS[args.variant]
    home = Path(args.home)
    params = load_params(args.params, [f"sft.length_grouping={window}"], base=home)
    refs = prepare_data.run(params)
    texts = prepare_model.tokenizer_corpus(refs["problems"], refs["traces"])
    if not boilerplate:
        texts = texts[len(prompt_boilerplate()):]
    base = build_embedded_model(Path(tempfile.mkdtemp(dir=home)) / "base", texts, params.model.tiny)
    recipe = SFTRecipe(params, str(base), refs["traces"], tempfile.mkdtemp(dir=home))
    recipe.setup()
    cfg = recipe.cfg
    padded, times = [], []
    for k in range(args.warmup + args.steps):
        batch = global_batch(len(recipe.examples), cfg.seed, recipe.step, cfg.batch_size, recipe.lengths,
                             cfg.length_grouping)
        start = time.perf_counter()
        recipe.train_step()
        recipe.step += 1
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
            padded.append(max(recipe.lengths[i] for i in batch) * len(batch))
    return {"variant": args.variant, "mean_len": statistics.mean(recipe.lengths),
            "padded_tokens": statistics.mean(padded), "s_per_step": statistics.median(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params/demo.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="sft-step-") as home:
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--home", home,
                                  "--params", args.params, "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                 check=True, capture_output=True, text=True, cwd=REPO)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{variant}: done", file=sys.stderr)
    base = rows[0]["s_per_step"]
    print(f"{'variant':<12} {'mean len':>8} {'padded tok/step':>15} {'s/step':>7} {'vs plain':>8} {'peak RSS':>9}")
    for r in rows:
        print(f"{r['variant']:<12} {r['mean_len']:>8.1f} {r['padded_tokens']:>15.0f} {r['s_per_step']:>7.3f} "
              f"{r['s_per_step'] / base:>8.2f} {r['peak_rss_mib']:>6.0f} MiB")


if __name__ == "__main__":
    main()
