"""Shared pieces of the kernels: argument checks, chunk-size heuristic, backend choice, matmuls.

Everything here runs before any compute (checks) or is the plumbing that every backend shares
(matmuls into preallocated float32 buffers, gradient accumulation in float32).
"""

from __future__ import annotations

import math
import os

import torch

from ._kinds import BACKENDS, KINDS, Backend, Kind  # noqa: F401  (defined once, torch-free)

# Token-chunk clamp. The lower bound keeps matmuls efficient when V >> d (the heuristic alone
# would go down to a handful of rows); the upper bound keeps a chunk's [rows, V] float32 buffers
# near the size of the hidden states when V is small.
MIN_CHUNK_ROWS = 256
MAX_CHUNK_ROWS = 2048


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_chunk_rows(n_rows: int, vocab: int, dim: int) -> int:
    """Liger-Kernel's heuristic: chunk ~ N / ceil(V / d), so one chunk's [rows, V] logits are
    about as large as the [N, d] hidden states; rounded up to a power of 2 and clamped."""
    inc_factor = max(1, math.ceil(vocab / max(1, dim)))
    rows = _next_power_of_2(math.ceil(max(1, n_rows) / inc_factor))
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency on Linux
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> `triton` on CUDA (when importable), `torch` elsewhere. `triton` on a CPU tensor
    is only possible under the Triton interpreter (TRITON_INTERPRET=1, set before import)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' requested but triton is not importable")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (got {device.type}); on CPU set "
                "TRITON_INTERPRET=1 before importing the kernels"
            )
    return backend


def check_matrix_pair(hidden: torch.Tensor, weight: torch.Tensor, hidden_name: str, weight_name: str) -> None:
    for name, t in ((hidden_name, hidden), (weight_name, weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{weight_name}: shape {tuple(weight.shape)} does not match {hidden_name} {tuple(hidden.shape)} "
            f"(expected [V, {hidden.shape[1]}])"
        )
    if hidden.device != weight.device:
        raise ValueError(f"{weight_name}: on {weight.device}, but {hidden_name} is on {hidden.device}")


def check_targets(targets, n_rows: int, vocab: int, device: torch.device, name: str = "targets") -> None:
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(targets).__name__}")
    if targets.ndim != 1 or targets.shape[0] != n_rows:
        raise ValueError(f"{name}: expected shape [{n_rows}], got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype, got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"{name}: on {targets.device}, but the hidden states are on {device}")
    # Out-of-range ids would read outside a row in the Triton kernel: refuse them up front
    # (one small reduction; a sync on CUDA, negligible next to the matmuls).
    if n_rows and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"{name}: ids must lie in [0, {vocab}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def check_scalar(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name}: expected {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected <= {high}, got {value}")
    return value


def check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return chunk_size


# On CPU, bf16/fp16 matmuls round the logits to 8/11 bits before the softmax (there is no
# float32-output low-precision matmul there), which costs ~1% in every probability. CPU runs are
# tests and small models, so accuracy wins: low-precision inputs are multiplied in float32.
# Tests switch this off to exercise the GPU's low-precision code paths on CPU.
UPCAST_LOW_PRECISION_ON_CPU = True


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Dtype of the matmuls: the promotion of the two inputs (bf16 x bf16 stays bf16 on CUDA,
    with float32 logits via out_dtype), float32 for low-precision inputs on CPU."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if (UPCAST_LOW_PRECISION_ON_CPU and hidden.device.type == "cpu"
            and dtype in (torch.float16, torch.bfloat16)):
        return torch.float32
    return dtype


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in float32, or float64 when the inputs are float64 (the test reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- matmuls -----------------------------------------------------------------------------------
# Low-precision inputs: on CUDA, torch's `mm(..., out_dtype=float32)` (cuBLAS with a float32 C)
# gives float32 logits and accumulates grad_weight in float32 without a [V, d] temporary. It is
# a recent, CUDA-only overload: probe it once per (device, dtype) and fall back otherwise.
_OUT_DTYPE_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def _supports_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype)
    if key not in _OUT_DTYPE_SUPPORT:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(2, 2, device=device, dtype=dtype)
                acc = torch.ones(2, 2, device=device, dtype=torch.float32)
                torch.mm(a, a, torch.float32, out=torch.empty(2, 2, device=device))
                torch.addmm(acc, a, a, torch.float32, out=acc)
                ok = bool((acc == 3).all())
            except Exception:
                ok = False
        _OUT_DTYPE_SUPPORT[key] = ok
    return _OUT_DTYPE_SUPPORT[key]


def logits_into(out: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[:rows] = hidden_rows @ weight.T in out's (float32/64) dtype; returns that view."""
    out = out[: hidden_rows.shape[0]]
    if hidden_rows.dtype == out.dtype:
        return torch.mm(hidden_rows, weight.t(), out=out)
    if _supports_out_dtype(hidden_rows.device, hidden_rows.dtype):
        return torch.mm(hidden_rows, weight.t(), out.dtype, out=out)
    return out.copy_(torch.mm(hidden_rows, weight.t()))


def accumulate_grad_weight(acc: torch.Tensor, grad_logits: torch.Tensor, hidden_rows: torch.Tensor) -> None:
    """acc[V, d] (float32) += grad_logits.T @ hidden_rows."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden_rows)
    elif _supports_out_dtype(acc.device, grad_logits.dtype):
        torch.addmm(acc, grad_logits.t(), hidden_rows, acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(grad_logits.t(), hidden_rows))
