"""What a round costs in the old per-round layout and in the stage-long layout, at three model sizes.

    python bench/scaling.py [--rounds 10] [--save-every 5] [--old-rounds N] [--sizes demo,10m,50m] [--old-code DIR]
                            [--json OUT]

Old layout (``--old-code``: a worktree of the commit before stage-long jobs, b41303d): every round
is its own process (``launcher.kind: accelerate`` started one per round) that loads the previous
round's model and optimizer state, runs the round, and writes a full HF model and the accelerate
state beside the round's record. New layout (this tree): one process runs every round, a
checkpoint every ``--save-every`` rounds and after the last, and the final HF folder. The old
layout pays the same costs every round, so ``--old-rounds`` (default: ``--rounds``) can be fewer.

Both run the same rounds of the embedded Qwen3 architecture at three sizes (the demo's ~0.85M
parameters, ~10M, ~50M) on one random-initialised model per size: RLVR (soft overlong penalty,
no dynamic sampling, so every round takes a step) and OPSD (condition `all`, frozen teacher).
Each process is a child (``--driver``) that times its own methods exclusively (a nested timer's
seconds are not counted twice); the parent adds the process start (wall time minus what the
child timed). Printed per round: generate, grade, update, record (the round's Parquet and
metrics), state I/O (loading and saving weights, optimizer state, RNG, teacher) and start-up
(process start, imports, building the model and optimizer), and the bytes written per round
(checkpoints count when written, also those deleted later). Then a projection to Qwen3-1.7B and
Qwen3-8B: bytes from the measured bytes per parameter, seconds from this disk's measured write
and read bandwidth (a 1 GiB file, fsynced; read after dropping it from the page cache where
allowed, else from cache: an upper bound).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The repo first: bench/kernels.py would shadow the kernels package (the script's folder is sys.path[0]).
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
CATEGORIES = ("generate", "grade", "update", "record", "state_io", "startup")
SIZES = {  # model.tiny overrides: hidden, intermediate, layers, heads, kv heads, head_dim
    "demo": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
    "10m": dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2, head_dim=64),
    "50m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=10,
                num_key_value_heads=2, head_dim=64),
}
PROJECT = {"Qwen3-1.7B": 1.7e9, "Qwen3-8B": 8.2e9}
# The same small rounds at every size: what changes is the model.
ROUND_SETS = ["data.synthetic.n_train=256", "data.synthetic.n_eval=16", "model.tiny.vocab_size=1024",
              "rollout.batch_size=32", "grading.workers=1",
              "rlvr.prompts_per_round=8", "rlvr.samples_per_prompt=4", "rlvr.max_new_tokens=48",
              "rlvr.overlong=penalty", "rlvr.overlong_buffer=40", "rlvr.dynamic_sampling=false",
              "rlvr.micro_batch_size=32",
              "opsd.unit=rollout", "opsd.prompts_per_round=8", "opsd.samples_per_prompt=4", "opsd.max_new_tokens=48",
              "opsd.micro_batch_size=32", "opsd.redundancy_map_samples=4"]


# ------------------------------------------------------------------------------ driver (child)
class ExclusiveTimer:
    """Seconds per category; a timed call inside another is charged to its own category only."""

    def __init__(self):
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.stack: list[list] = []  # [category, start, child seconds]

    def wrap(self, owner, name: str, category: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            self.stack.append([category, time.perf_counter(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                cat, t0, child = self.stack.pop()
                total = time.perf_counter() - t0
                self.seconds[cat] += total - child
                if self.stack:
                    self.stack[-1][2] += total

        setattr(owner, name, timed)


def driver(args) -> None:
    """One process of one layout: time it, print ``TIMINGS {...}`` last."""
    t_start = time.perf_counter()
    sys.path.insert(0, args.code)
    import accelerate

    from compaction import training
    from compaction.params import load_params

    timer = ExclusiveTimer()
    timer.wrap(accelerate.Accelerator, "save_state", "state_io")
    timer.wrap(accelerate.Accelerator, "load_state", "state_io")
    timer.wrap(training, "save_hf_model", "state_io")
    stage_mod = __import__(f"jobs.{args.stage}", fromlist=["x"])
    timer.wrap(stage_mod, "load_model", "state_io")
    if hasattr(stage_mod, "save_hf_model"):
        timer.wrap(stage_mod, "save_hf_model", "state_io")
    cls = next(getattr(stage_mod, n) for n in ("RLVRStage", "OPSDStage", "RLVRRound", "OPSDRound")
               if hasattr(stage_mod, n))
    for name, cat in [("setup", "startup"), ("rollouts", "generate"), ("grade", "grade"), ("select", "grade"),
                      ("update", "update"), ("record", "record"), ("save", "record"), ("checkpoint", "state_io"),
                      ("resume", "state_io"), ("save_final", "state_io"), ("save_extra", "state_io"),
                      ("_save_models", "state_io")]:
        if hasattr(cls, name):
            timer.wrap(cls, name, cat)
    params = load_params(Path(args.code) / "params" / "demo.yaml", args.set, base=Path(args.root))
    extra = ["all"] if args.stage == "opsd" else []
    if args.round is None:  # new layout: every round
        stage_mod.run(params, args.policy, args.problems, args.out, *extra)
    else:  # old layout: one round from the previous round's folder
        prev = args.policy if args.round == 0 else str(Path(args.out) / f"round-{args.round - 1:04d}")
        if args.stage == "rlvr":
            stage_mod.run_round(params, prev, args.policy, args.problems, args.out, args.round)
        else:
            stage_mod.run_round(params, prev, args.policy, args.problems, args.out, args.round, "all")
    inside = time.perf_counter() - t_start
    print("TIMINGS " + json.dumps({"seconds": timer.seconds, "inside": inside}), flush=True)


# ------------------------------------------------------------------------------ parent
def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_child(cmd: list[str]) -> tuple[dict, float]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    line = next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("TIMINGS "))
    return json.loads(line[len("TIMINGS "):]), wall


def child_cmd(code: str, stage: str, root: Path, policy: str, problems: str, out: Path, sets: list[str],
              round_: int | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--driver", "--code", code, "--stage", stage,
           "--root", str(root), "--policy", policy, "--problems", problems, "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    return cmd + ([] if round_ is None else ["--round", str(round_)])


def add(total: dict, t: dict, wall: float) -> None:
    for k, v in t["seconds"].items():
        total[k] += v
    # Process start, imports and whatever no method timer covers (argument parsing, the loop's glue).
    total["startup"] += wall - sum(t["seconds"].values())
    total["wall"] += wall


def measure(size: str, args, work: Path) -> dict:
    from compaction.params import load_params
    from jobs import prepare_data, prepare_model

    tiny = [f"model.tiny.{k}={v}" for k, v in SIZES[size].items()]
    old_rounds = args.old_rounds or args.rounds
    sets = [*ROUND_SETS, *tiny, f"rlvr.rounds={args.rounds}", f"opsd.rounds={args.rounds}"]
    # New layout only (the old code has neither); the held-out curve is not a round's cost.
    checkpoints = [f"rlvr.save_every={args.save_every}", f"opsd.save_every={args.save_every}",
                   "rlvr.eval_every=0", "opsd.eval_every=0"]
    root = work / size
    params = load_params(REPO / "params" / "demo.yaml", sets, base=root)
    data = prepare_data.run(params)
    base = prepare_model.run(params, data["problems"], data["traces"])
    from safetensors import safe_open

    with safe_open(f"{base}/model.safetensors", "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    result = {"size": size, "params": n_params, "rounds": args.rounds, "old_rounds": old_rounds,
              "save_every": args.save_every}
    for stage in args.stages.split(","):
        for layout in args.layouts.split(","):
            code = args.old_code if layout == "old" else str(REPO)
            out = root / f"{stage}-{layout}"
            total = dict.fromkeys([*CATEGORIES, "wall"], 0.0)
            rounds = old_rounds if layout == "old" else args.rounds
            if layout == "old":
                for k in range(rounds):
                    t, wall = run_child(child_cmd(code, stage, root, base, data["problems"], out, sets, k))
                    add(total, t, wall)
                written = du(out)  # every round folder is kept: model, state and record
                ckpt_bytes = du(out / "round-0000") - du_record(out / "round-0000")
            else:
                staging = {"direct": ["launcher.checkpoint_staging_dir=null"],
                           "staged": ["launcher.checkpoint_snapshot=false"]}.get(layout, [])
                t, wall = run_child(child_cmd(code, stage, root, base, data["problems"], out,
                                              sets + checkpoints + staging, None))
                add(total, t, wall)
                timings = json.loads((out / "timings.json").read_text())
                print(f"  {size} {stage} {layout}: setup {timings['setup']:.2f} s, checkpoints "
                      + ", ".join(f"{c:.2f}" for c in timings["checkpoints"])
                      + f" s, final {timings['final']:.2f} s, last checkpoint's copy waited "
                      f"{timings.get('checkpoint_wait', 0):.2f} s", flush=True)
                n_ckpt = len(timings["checkpoints"])
                ckpt_bytes = du(sorted((out / "checkpoints").iterdir())[-1])
                staged_s = sum(timings["checkpoints"]) / max(len(timings["checkpoints"]), 1)
                written = du(out) + ckpt_bytes * (n_ckpt - len(list((out / "checkpoints").iterdir())))
            record = sum(du_record(r) for r in out.glob("round-*"))
            result[f"{stage}_{layout}"] = {**{k: v / rounds for k, v in total.items()},
                                           "bytes_per_round": written / rounds,
                                           "record_bytes_per_round": record / rounds,
                                           "checkpoint_bytes": ckpt_bytes,
                                           **({"checkpoint_loop_seconds": staged_s} if layout != "old" else {})}
            print(f"  {size} {stage} {layout}: {total['wall'] / rounds:.2f} s/round", flush=True)
    return result


def du_record(round_dir: Path) -> int:
    """A round folder's own record: its files at the top level (Parquet, metrics), no model or state."""
    return sum(p.stat().st_size for p in Path(round_dir).iterdir() if p.is_file())


def disk_bandwidth(work: Path, size_mb: int = 1024) -> tuple[float, float]:
    path = work / "bandwidth.bin"
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size_mb / (time.perf_counter() - t0)
    try:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    read = size_mb / (time.perf_counter() - t0)
    path.unlink()
    return write, read


def report(results: list[dict], write_mb_s: float, read_mb_s: float) -> None:
    print(f"\ndisk: write {write_mb_s:.0f} MB/s (fsynced), read {read_mb_s:.0f} MB/s\n")
    head = "| size | params | stage | layout | rounds | wall s/round | " + " | ".join(CATEGORIES) + \
           " | state I/O + start-up | MB written/round | record KB/round |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        for stage in ("rlvr", "opsd"):
            for layout in ("old", "direct", "staged", "new"):
                if f"{stage}_{layout}" not in r:
                    continue
                m = r[f"{stage}_{layout}"]
                share = (m["state_io"] + m["startup"]) / m["wall"]
                rounds = r["old_rounds"] if layout == "old" else r["rounds"]
                print(f"| {r['size']} | {r['params'] / 1e6:.2f}M | {stage} | {layout} | {rounds} | {m['wall']:.2f} | "
                      + " | ".join(f"{m[c]:.2f}" for c in CATEGORIES)
                      + f" | {share:.1%} | {m['bytes_per_round'] / 1e6:.2f} | {m['record_bytes_per_round'] / 1e3:.0f} |")
    big = results[-1]
    print(f"\nprojection (bytes per parameter measured at {big['size']}; seconds at this disk's bandwidth):")
    for stage in ("rlvr", "opsd"):
        if f"{stage}_old" not in big or f"{stage}_new" not in big:
            continue
        old, new = big[f"{stage}_old"], big[f"{stage}_new"]
        per_param_old = (old["bytes_per_round"] - old["record_bytes_per_round"]) / big["params"]
        per_param_ckpt = new["checkpoint_bytes"] / big["params"]
        for name, n in PROJECT.items():
            old_bytes = per_param_old * n  # written and read back every round
            ckpt = per_param_ckpt * n
            old_s = old_bytes / 1e6 / write_mb_s + old_bytes / 1e6 / read_mb_s
            # The loop waits for the memory write (the rate measured here, one process; a node writes its
            # ranks' shards in parallel), the copy to disk runs behind the next rounds. At 8B (FSDP) that
            # is the tmpfs staging path: its rate where the `staged` layout ran, else the default's.
            mem = big.get(f"{stage}_staged", new)
            loop_s = ckpt / (mem["checkpoint_bytes"] / mem["checkpoint_loop_seconds"])
            print(f"  {name} {stage}: old layout {old_bytes / 1e9:.0f} GB written + read every round "
                  f"({old_s:.0f} s of disk a round); new layout {ckpt / 1e9:.0f} GB per checkpoint, every "
                  f"{big['save_every']} rounds: {ckpt / 1e6 / write_mb_s:.0f} s of disk, behind the next rounds; "
                  f"the loop waits {loop_s:.0f} s for it in memory at this process's rate "
                  f"({mem['checkpoint_bytes'] / mem['checkpoint_loop_seconds'] / 1e9:.1f} GB/s), read once at resume")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code"), ap.add_argument("--stage"), ap.add_argument("--root"), ap.add_argument("--policy")
    ap.add_argument("--problems"), ap.add_argument("--out"), ap.add_argument("--round", type=int)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--old-rounds", type=int, default=None, help="rounds of the old layout (default: --rounds)")
    ap.add_argument("--sizes", default="demo,10m,50m")
    ap.add_argument("--old-code", default="/tmp/old-layout", help="worktree of the commit before stage-long jobs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--stages", default="rlvr,opsd")
    ap.add_argument("--layouts", default="old,direct,new",
                    help="old: a process per round (--old-code); direct: one process, checkpoints written straight "
                    "to disk (launcher.checkpoint_staging_dir=null); staged: written into the tmpfs staging folder "
                    "and copied in the background (launcher.checkpoint_snapshot=false, the FSDP path); new: copied "
                    "into host buffers and written in the background (the default)")
    args = ap.parse_args()
    if args.driver:
        return driver(args)
    if "old" in args.layouts and not (Path(args.old_code) / "jobs" / "rlvr.py").is_file():
        raise SystemExit(f"--old-code {args.old_code}: not a checkout; git worktree add {args.old_code} b41303d")
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        work = Path(tmp)
        results = []
        for size in args.sizes.split(","):
            results.append(measure(size, args, work))
        write_mb_s, read_mb_s = disk_bandwidth(work)
    report(results, write_mb_s, read_mb_s)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "disk_write_mb_s": write_mb_s,
                                               "disk_read_mb_s": read_mb_s}, indent=1))


if __name__ == "__main__":
    main()
