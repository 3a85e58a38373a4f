"""Time and peak memory of the fused kernels, each backend beside `eager`, in one run.

    .venv/bin/python bench/kernels.py                                  # sizes chosen by device
    .venv/bin/python bench/kernels.py --sizes 4096,256,32000 --kinds reverse_kl \\
        --directions forward+backward --repeats 3                       # the CPU acceptance case

For every size (N tokens, d hidden, V vocabulary), kind (`reverse_kl`, `forward_kl`, `jsd`,
`sampled_token`, and `logprobs` for linear_logprobs) and direction, each backend runs the same
inputs and prints its median time and peak memory, and their ratios to `eager` (full logits,
plain autograd: the baseline, always measured).

Directions:
- `forward`: values only, under torch.no_grad (scoring: RLVR's old / reference log-probs,
  teacher-side metrics).
- `forward+backward`: a training step: student inputs require grad, forward, then backward of
  the token mean (for the fused backends most of the work happens in the forward).

Peak memory:
- CUDA: torch.cuda.max_memory_allocated() during the first call, minus the memory allocated
  just before it (inputs excluded, outputs and gradients included).
- CPU: each case runs in a fresh subprocess (`--isolate`, default on CPU), so no case inherits
  another's allocator state. After the inputs are built, the process's resident-set high-water
  mark is reset (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), the case runs once, and the
  peak is VmHWM minus the VmRSS just before: the most resident memory the case needed, as the
  OS saw it (an upper bound on live tensors: the interpreter's and allocator's own pages count).
  Timing repeats follow in the same subprocess. The subprocess runs with
  MALLOC_MMAP_THRESHOLD_=1048576, so that glibc unmaps every freed block >= 1 MiB at once and
  RSS follows live memory (with glibc's default dynamic threshold, freed blocks up to 32 MiB
  stay in per-thread arenas and the same case measured 174 or 315 MiB from run to run).

On a GPU the run also times the floor (the matmuls no implementation can avoid: student and
teacher logits forward, and grad_hidden and grad_weight for a training step, each at full
size) and, when `liger_kernel` is importable, Liger-Kernel's LigerFusedLinearJSD (beta 0 / 1 /
0.5 for forward KL / reverse KL / JSD, as in Liger and TRL) and LigerFusedLinearCrossEntropyLoss
(reduction="none", = -logprobs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

KINDS = ("reverse_kl", "forward_kl", "jsd", "sampled_token", "logprobs")
DIRECTIONS = ("forward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (N, d, V): from small up to the real one (Qwen3's vocabulary) where the device allows.
CPU_SIZES = ["1024,256,8000", "4096,256,32000"]
GPU_SIZES = ["4096,2048,32768", "8192,4096,151936"]
LIGER_JSD_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}


# --- one case ----------------------------------------------------------------------------------

def make_inputs(n, d, v, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Scaled so that logits have a realistic spread (std ~2) at every size.
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
    return dict(student_hidden=rand(n, d), student_weight=rand(v, d, scale=2 / d ** 0.5),
                teacher_hidden=rand(n, d), teacher_weight=rand(v, d, scale=2 / d ** 0.5),
                targets=torch.randint(0, v, (n,), generator=gen).to(device))


def case_fn(kind, backend, direction, inputs):
    """A closure running one call (and its backward for training steps)."""
    from kernels import linear_divergence, linear_logprobs

    train = direction == "forward+backward"

    def run():
        hidden = inputs["student_hidden"].detach().requires_grad_(train)
        weight = inputs["student_weight"].detach().requires_grad_(train)
        with torch.set_grad_enabled(train):
            if kind == "logprobs":
                out = linear_logprobs(hidden, weight, inputs["targets"], backend=backend)
            elif backend == "liger":
                out = liger_call(kind, hidden, weight, inputs)
            else:
                out = linear_divergence(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"],
                                        kind=kind, targets=inputs["targets"], backend=backend)
            if train:
                out.mean().backward()
        return out

    return run


_LIGER_MODULES = {}


def liger_call(kind, hidden, weight, inputs):
    if kind == "logprobs":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        module = _LIGER_MODULES.setdefault(kind, LigerFusedLinearCrossEntropyLoss(reduction="none"))
        return -module(weight, hidden, inputs["targets"])
    from liger_kernel.transformers import LigerFusedLinearJSD

    module = _LIGER_MODULES.setdefault(kind, LigerFusedLinearJSD(jsd_beta=LIGER_JSD_BETA[kind]))
    return module(hidden, weight, inputs["teacher_hidden"], inputs["teacher_weight"])


def floor_fn(kind, direction, inputs):
    """The unavoidable matmuls at full size (no reductions, nothing fused)."""
    h, w = inputs["student_hidden"], inputs["student_weight"]
    th, tw = inputs["teacher_hidden"], inputs["teacher_weight"]
    grad_logits = torch.empty(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype).normal_()

    def run():
        torch.mm(h, w.t())
        if kind != "logprobs":
            torch.mm(th, tw.t())
        if direction == "forward+backward":
            torch.mm(grad_logits, w)
            torch.mm(grad_logits.t(), h)

    return run


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(kind, backend, direction, size, dtype, device, repeats):
    n, d, v = size
    inputs = make_inputs(n, d, v, DTYPES[dtype], device)
    if backend == "floor":
        fn = floor_fn(kind, direction, inputs)
    else:
        fn = case_fn(kind, backend, direction, inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # First call: peak memory (and warm-up: Triton compilation, allocator, BLAS).
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark to the current RSS
        before = _proc_status_kib("VmRSS")
        out = fn()
        peak = (_proc_status_kib("VmHWM") - before) * 1024
    del out
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "peak_bytes": max(0, peak)}


# --- driver ------------------------------------------------------------------------------------

def run_case(args, kind, backend, direction, size):
    if not args.isolate:
        try:
            return measure(kind, backend, direction, size, args.dtype, torch.device(args.device), args.repeats)
        except Exception as exc:  # e.g. eager out of memory at the real size: report, go on
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    spec = json.dumps(dict(kind=kind, backend=backend, direction=direction, size=size, dtype=args.dtype,
                           device=args.device, repeats=args.repeats, threads=torch.get_num_threads()))
    # A fixed mmap threshold makes glibc return every block >= 1 MiB to the OS when it is freed, so
    # RSS follows live memory (the default dynamic threshold parks blocks up to 32 MiB in per-thread
    # arenas; repeated runs of one case then differed by ~140 MiB).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def liger_available():
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", nargs="+", help="N,d,V triples (default: by device)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--backends", nargs="+", help="compared with eager (default: torch, plus triton on CUDA)")
    ap.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case after the first (median)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one fresh subprocess per case (default: on for CPU, off for CUDA)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # a single case in this fresh process; prints one JSON line
        spec = json.loads(args.worker)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure(spec["kind"], spec["backend"], spec["direction"], tuple(spec["size"]),
                                 spec["dtype"], torch.device(spec["device"]), spec["repeats"])))
        return

    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.isolate = (not cuda) if args.isolate is None else args.isolate
    sizes = [tuple(int(x) for x in s.split(",")) for s in (args.sizes or (GPU_SIZES if cuda else CPU_SIZES))]
    backends = args.backends or (["torch", "triton"] if cuda else ["torch"])
    extras = (["floor"] + (["liger"] if liger_available() else [])) if cuda else []
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# kernels bench: {device_name}, torch {torch.__version__}, dtype {args.dtype}, "
          f"median of {args.repeats} after a warm-up call, peak memory of the first call")
    results = []
    for size in sizes:
        for kind in args.kinds:
            for direction in args.directions:
                print(f"\n## N={size[0]} d={size[1]} V={size[2]}  {kind}  {direction}", flush=True)
                print(f"{'backend':<8} {'time ms':>10} {'peak MiB':>10} {'time/eager':>11} {'mem/eager':>10}")
                eager = run_case(args, kind, "eager", direction, size)
                rows = [("eager", eager)]
                for backend in backends + extras:
                    if backend == "liger" and kind not in LIGER_JSD_BETA and kind != "logprobs":
                        continue
                    rows.append((backend, run_case(args, kind, backend, direction, size)))
                for backend, r in rows:
                    results.append(dict(size=size, kind=kind, direction=direction, backend=backend, **r))
                    if "error" in r:
                        print(f"{backend:<8} error: {r['error']}")
                        continue
                    ok = "error" not in eager
                    t_ratio = f"{r['time_s'] / eager['time_s']:.2f}x" if ok else "-"
                    m_ratio = f"{r['peak_bytes'] / max(1, eager['peak_bytes']):.3f}x" if ok else "-"
                    print(f"{backend:<8} {r['time_s'] * 1e3:>10.1f} {r['peak_bytes'] / 2**20:>10.1f} "
                          f"{t_ratio:>11} {m_ratio:>10}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
