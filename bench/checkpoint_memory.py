"""What a checkpoint's bytes cost to put in memory: a file in tmpfs (what checkpoint staging does
now) against a copy into host buffers allocated once and reused, and a fresh clone.

    .venv/bin/python bench/checkpoint_memory.py [--mb 400] [--repeats 8] [--staging /dev/shm]

Eight tensors of `--mb` MB in all (fp32), written `--repeats` times each way. Prints seconds per
repeat and the medians' ratio to the tmpfs write (the baseline). A reused buffer's pages were
touched at its first copy; tmpfs pages and a clone's are allocated anew every time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--staging", default="/dev/shm")
    args = ap.parse_args()
    n = args.mb * 2 ** 20 // 4 // 8
    src = {f"t{i}": torch.randn(n) for i in range(8)}
    buffers = {k: torch.empty_like(v) for k, v in src.items()}
    path = os.path.join(args.staging, f"checkpoint-memory-probe-{os.getpid()}.bin")
    rows = []
    for rep in range(args.repeats):
        t = time.perf_counter()
        torch.save(src, path)
        tmpfs = time.perf_counter() - t
        os.remove(path)
        t = time.perf_counter()
        for k, b in buffers.items():
            b.copy_(src[k])
        reused = time.perf_counter() - t
        t = time.perf_counter()
        fresh = {k: v.clone() for k, v in src.items()}
        clone = time.perf_counter() - t
        del fresh
        rows.append((tmpfs, reused, clone))
        print(f"repeat {rep}: torch.save into {args.staging} {tmpfs:.3f} s, copy into reused buffers {reused:.3f} s, "
              f"clone {clone:.3f} s", flush=True)
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    print(f"median ({args.mb} MB): tmpfs file {med[0]:.3f} s (1.00x), reused buffers {med[1]:.3f} s "
          f"({med[0] / med[1]:.1f}x faster), clone {med[2]:.3f} s ({med[0] / med[2]:.1f}x)")


if __name__ == "__main__":
    main()
