"""Round update time of the demo's RLVR and OPSD stages by micro-batch size, side by side.

    .venv/bin/python bench/micro_batch.py --stage opsd --rounds 10 --sizes 64,16,32
    .venv/bin/python bench/micro_batch.py --stage rlvr --rounds 8 --sizes 64,16,32

Runs the stage job (jobs/rlvr.py, jobs/opsd.py condition `all`) in this process for `--rounds`
rounds at each `micro_batch_size`, from the checkpoints a `make demo` left in `artifacts/` (RLVR
starts from the SFT model, OPSD from the RLVR model), with params/demo.yaml otherwise. A step's
sequences are sorted by length before they are cut into micro-batches (training.micro_batches), so
the sizes differ only in how the same sum is split. Prints per size the mean update and round
seconds (from each round's metrics.json) and the ratio to the first size (the baseline: 64, the
demo's setting before micro-batches were sorted).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def newest(pattern: str) -> str:
    found = sorted(glob.glob(str(REPO / pattern)), key=lambda p: Path(p).stat().st_mtime)
    if not found:
        raise SystemExit(f"{pattern}: not found; run `make demo` first")
    return found[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["rlvr", "opsd"], required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sizes", default="64,16,32", help="micro_batch_size values; the first is the baseline")
    ap.add_argument("--params", default=str(REPO / "params" / "demo.yaml"))
    args = ap.parse_args()

    from compaction.params import load_params
    from jobs import opsd, rlvr

    problems = newest("artifacts/prepare_data/*/problems.parquet")
    start = newest("artifacts/sft/*/final" if args.stage == "rlvr" else "artifacts/rlvr/*/final")
    print(f"{args.stage}: {args.rounds} rounds from {start}")
    print(f"{'micro-batch':>11} {'update s':>9} {'round s':>8} {'wall s':>7} {'update vs first':>16}")
    base = None
    for size in [int(x) for x in args.sizes.split(",")]:
        sets = [f"{args.stage}.micro_batch_size={size}", f"{args.stage}.rounds={args.rounds}",
                f"{args.stage}.save_every={args.rounds}", f"{args.stage}.eval_every=0"]
        params = load_params(args.params, sets, base=REPO)
        out = Path(tempfile.mkdtemp()) / args.stage
        t = time.perf_counter()
        if args.stage == "rlvr":
            rlvr.run(params, start, problems, out)
        else:
            opsd.run(params, start, problems, out, "all")
        wall = time.perf_counter() - t
        rounds = [json.loads((out / f"round-{k:04d}" / "metrics.json").read_text()) for k in range(args.rounds)]
        update = sum(m[f"{args.stage}/update_seconds"] for m in rounds) / len(rounds)
        seconds = sum(m[f"{args.stage}/seconds"] for m in rounds) / len(rounds)
        base = base or update
        print(f"{size:>11} {update:>9.3f} {seconds:>8.3f} {wall:>7.1f} {base / update:>15.2f}x", flush=True)


if __name__ == "__main__":
    main()
