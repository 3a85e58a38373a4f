"""kernels, Triton backend: run under the Triton interpreter on CPU, compiled for a GPU target,
and on CUDA when a GPU is present.

TRITON_INTERPRET=1 must be set before the kernels are decorated (at import), and must not leak
into other test modules, so the checks run in a fresh subprocess: this same file, executed as a
script (`python tests/test_kernels_triton.py cpu`), prints one line per failed check and exits 1.
Relative error as in tests/test_kernels.py: ||x - ref|| / ||ref|| against a float64 eager
reference from the same inputs; fp32 <= 1e-5, bf16 <= 1e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# triton is a dependency on Linux (pyproject.toml): a missing one fails these tests, it does not skip them.


def _run_script(*args: str, interpret: bool, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; same default
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"


def test_triton_is_installed():
    import triton  # noqa: F401


def test_triton_backend_under_interpreter():
    _assert_ok(_run_script("cpu", interpret=True))


def test_triton_kernels_compile_for_a_gpu():
    """The interpreter is lenient (globals, types): compile every kernel to a cubin for sm_90,
    which needs no GPU, only the ptxas that ships in the triton wheel."""
    proc = _run_script("compile", interpret=False)
    if proc.returncode == 3:
        pytest.skip("needs CUDA's compiler backend in triton (" + (proc.stdout.strip() or "absent here") + ")")
    _assert_ok(proc)


def test_triton_backend_on_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (no CUDA device here; the interpreter test above covers the kernels on CPU)")
    _assert_ok(_run_script("cuda", interpret=False))


# --- the checks, run in the subprocess ----------------------------------------------------------

def _checks(device: str) -> list[str]:
    import torch

    import kernels
    from kernels import eager_divergence, eager_logprobs, linear_divergence, linear_logprobs

    failures: list[str] = []
    n, d, v, chunk = (19, 16, 203, 8) if device == "cpu" else (1000, 256, 50_257, 96)
    dev = torch.device(device)

    def rel(x, ref):
        diff, scale = (x.detach().double() - ref.detach().double()).norm(), ref.detach().double().norm()
        return float(diff / scale) if scale > 0 else float(diff)

    def check(label, pairs, tol):
        for name, x, ref in pairs:
            err = rel(x, ref)
            if not err <= tol:
                failures.append(f"{label}: {name} rel error {err:.2e} > {tol}")

    def inputs(dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        make = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(dev, dtype)  # noqa: E731
        return dict(sh=make(n, d), sw=make(v, d, s=2 / d ** 0.5), th=make(n, d), tw=make(v, d, s=2 / d ** 0.5),
                    y=torch.randint(0, v, (n,), generator=gen).to(dev))

    def reference(inp, kind, temperature, clip, upstream, beta=0.5):
        h, w = inp["sh"].double().requires_grad_(), inp["sw"].double().requires_grad_()
        value, entropy = eager_divergence(h, w, inp["th"].double(), inp["tw"].double(), kind, beta, temperature,
                                          clip, inp["y"], return_entropy=True)
        (value * upstream.double()).sum().backward()
        return value.detach(), entropy, h.grad, w.grad

    def triton_divergence(inp, kind, temperature, clip, upstream, backend="triton", beta=0.5, **kw):
        h, w = inp["sh"].clone().requires_grad_(), inp["sw"].clone().requires_grad_()
        th, tw = inp["th"].clone().requires_grad_(), inp["tw"].clone().requires_grad_()
        value, entropy = linear_divergence(h, w, th, tw, kind=kind, beta=beta, temperature=temperature, clip=clip,
                                           targets=inp["y"], backend=backend, return_entropy=True,
                                           chunk_size=chunk, **kw)
        (value * upstream).sum().backward()
        if th.grad is not None or tw.grad is not None:
            failures.append(f"{kind}: the teacher received a gradient")
        return value.detach(), entropy, h.grad, w.grad

    names = ("value", "entropy", "grad_hidden", "grad_weight")
    uneven = torch.rand(n, generator=torch.Generator().manual_seed(1)).to(dev)
    mean = torch.full((n,), 1 / n, device=dev)
    for kind in kernels.KINDS:
        # fp32, temperature != 1, a clip between two middle values, uneven upstream gradient.
        inp = inputs(torch.float32)
        with torch.no_grad():
            plain = eager_divergence(inp["sh"].double(), inp["sw"].double(), inp["th"].double(),
                                     inp["tw"].double(), kind, 0.5, 0.7, None, inp["y"]).sort().values
        clip = float(plain[n // 2 - 1] + plain[n // 2]) / 2
        ref = reference(inp, kind, 0.7, clip, uneven)
        for grad_in_forward in (True, False):
            got = triton_divergence(inp, kind, 0.7, clip, uneven, grad_in_forward=grad_in_forward)
            check(f"{kind} fp32 clip fused={grad_in_forward}", zip(names, got, ref), 1e-5)
        # bf16, token mean (the stored-gradient path).
        inp16 = inputs(torch.bfloat16, seed=2)
        check(f"{kind} bf16", zip(names, triton_divergence(inp16, kind, 1.0, None, mean),
                                  reference(inp16, kind, 1.0, None, mean)), 1e-2)
        # Forward only (the single-pass kernel variant).
        with torch.no_grad():
            value, entropy = linear_divergence(inp["sh"], inp["sw"], inp["th"], inp["tw"], kind=kind,
                                               temperature=0.7, targets=inp["y"], backend="triton",
                                               return_entropy=True, chunk_size=chunk)
        ref_nograd = reference(inp, kind, 0.7, None, uneven)
        check(f"{kind} no-grad", [("value", value, ref_nograd[0]), ("entropy", entropy, ref_nograd[1])], 1e-5)
        # Teacher == student: zero up to rounding, values and gradients.
        same = dict(inp, th=inp["sh"], tw=inp["sw"])
        value, _, gh, gw = triton_divergence(same, kind, 1.0, None, uneven)
        if max(value.abs().max(), gh.abs().max(), gw.abs().max()) > 1e-6:
            failures.append(f"{kind}: teacher == student is not ~0")

    for beta in (0.0, 1.0):  # JSD at the ends: exactly 0, finite
        inp = inputs(torch.float32)
        value, _, gh, gw = triton_divergence(inp, "jsd", 1.0, None, uneven, beta=beta)
        if value.abs().max() != 0 or not bool(gh.isfinite().all()) or gh.abs().max() != 0:
            failures.append(f"jsd beta={beta}: not exactly zero")

    # Log-probs: fp32 with temperature and uneven upstream (both strategies), bf16.
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        inp = inputs(dtype, seed=3)
        h64, w64 = inp["sh"].double().requires_grad_(), inp["sw"].double().requires_grad_()
        ref, ref_entropy = eager_logprobs(h64, w64, inp["y"], 0.6, return_entropy=True)
        (ref * uneven.double()).sum().backward()
        for grad_in_forward in (False, True):
            h, w = inp["sh"].clone().requires_grad_(), inp["sw"].clone().requires_grad_()
            logp, entropy = linear_logprobs(h, w, inp["y"], 0.6, "triton", return_entropy=True, chunk_size=chunk,
                                            grad_in_forward=grad_in_forward)
            (logp * uneven).sum().backward()
            check(f"logprobs {dtype} fused={grad_in_forward}",
                  [("logp", logp, ref), ("entropy", entropy, ref_entropy), ("grad_hidden", h.grad, h64.grad),
                   ("grad_weight", w.grad, w64.grad)], tol)

    if device == "cpu":
        # The GPU's bf16 path on CPU: logits rounded by a bf16 matmul, the kernel writing the logit
        # gradient straight into a bf16 buffer. Compared with the torch backend on the same bf16 logits.
        kernels._common.UPCAST_LOW_PRECISION_ON_CPU = False
        try:
            inp = inputs(torch.bfloat16, seed=4)
            for kind in ("reverse_kl", "jsd"):
                got = triton_divergence(inp, kind, 1.0, None, uneven)
                want = triton_divergence(inp, kind, 1.0, None, uneven, backend="torch")
                check(f"{kind} bf16 logits (GPU dtype path) vs torch", zip(names, got, want), 1e-2)
        finally:
            kernels._common.UPCAST_LOW_PRECISION_ON_CPU = True
    return failures


def _compile_for_gpu() -> int:
    """Compile each kernel variant that the reducers can launch, for sm_90 (exit 3: cannot try)."""
    import itertools

    import triton
    from triton.compiler import ASTSource

    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:
        print(f"no nvidia backend: {exc}")
        return 3
    from kernels._triton_divergence import _divergence_rows_kernel
    from kernels._triton_logprobs import _logprob_rows_kernel

    target = GPUTarget("cuda", 90, 32)
    common = dict(targets_ptr="*i64", row_scale_ptr="*fp32", values_ptr="*fp32", entropy_ptr="*fp32",
                  n_cols="i32", inv_temperature="fp32")
    jobs = []
    for kind, grad_dtype in itertools.product(range(5), ("fp32", "bf16")):
        sig = dict(student_ptr="*fp32", student_row_stride="i64", teacher_ptr="*fp32", teacher_row_stride="i64",
                   grad_ptr=f"*{grad_dtype}", grad_row_stride="i64", beta="fp32", log_beta="fp32",
                   log_one_minus_beta="fp32", clip="fp32", **common)
        consts = dict(KIND=kind, HAS_CLIP=True, COMPUTE_GRAD=True, HAS_ROW_SCALE=True, WANT_ENTROPY=True,
                      BLOCK_V=8192)
        jobs.append((_divergence_rows_kernel, sig, consts))
    jobs.append((_divergence_rows_kernel, jobs[0][1], dict(jobs[0][2], COMPUTE_GRAD=False, HAS_ROW_SCALE=False,
                                                            HAS_CLIP=False, WANT_ENTROPY=False)))
    for grad in (False, True):
        sig = dict(logits_ptr="*fp32", logits_row_stride="i64", grad_ptr="*bf16", grad_row_stride="i64", **common)
        jobs.append((_logprob_rows_kernel, sig, dict(COMPUTE_GRAD=grad, HAS_ROW_SCALE=grad, WANT_ENTROPY=True,
                                                     BLOCK_V=8192)))
    for fn, sig, consts in jobs:
        sig = {name: sig[name] if name in sig else "constexpr" for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": 16})
        assert kernel.asm.get("cubin"), f"no cubin for {fn.__name__} {consts}"
    print(f"compiled {len(jobs)} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "compile":
        sys.exit(_compile_for_gpu())
    problems = _checks(mode)
    print("\n".join(problems) or "all triton checks passed")
    sys.exit(1 if problems else 0)
