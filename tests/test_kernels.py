"""kernels: torch and eager backends against a float64 eager reference, argument checks, memory.

Relative error throughout: rel(x, ref) = ||x - ref||_2 / ||ref||_2 over the whole tensor
(values [N], grad_hidden [N, d] or grad_weight [V, d]), with the reference computed in float64
from the very same (possibly bf16-rounded) inputs. Bounds: fp32 <= 1e-5, bf16 <= 1e-2.
Shapes are odd on purpose: N = 37 rows in chunks of 16, V = 203 (not a power of 2), d = 24.
The Triton backend is tested in tests/test_kernels_triton.py (interpreter, in a subprocess).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import eager_divergence, eager_logprobs, linear_divergence, linear_logprobs

N, D, V, CHUNK = 37, 24, 203, 16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
BACKENDS = ["torch", "eager"]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (x.detach().double() - ref.detach().double()).norm()
    scale = ref.detach().double().norm()
    return float(diff / scale) if scale > 0 else float(diff)


def make_inputs(dtype=torch.float32, n=N, d=D, v=V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Logits with a spread like a real LM head's (std ~2), student and teacher different.
    return dict(
        student_hidden=torch.randn(n, d, generator=gen).to(dtype),
        student_weight=(torch.randn(v, d, generator=gen) * 2 / d ** 0.5).to(dtype),
        teacher_hidden=torch.randn(n, d, generator=gen).to(dtype),
        teacher_weight=(torch.randn(v, d, generator=gen) * 2 / d ** 0.5).to(dtype),
        targets=torch.randint(0, v, (n,), generator=gen),
    )


def reference_divergence(inp, kind, temperature, clip, beta=0.5, upstream=None):
    """float64 values, entropy and student gradients of sum(upstream * div)."""
    h = inp["student_hidden"].double().requires_grad_()
    w = inp["student_weight"].double().requires_grad_()
    value, entropy = eager_divergence(h, w, inp["teacher_hidden"].double(), inp["teacher_weight"].double(),
                                      kind, beta, temperature, clip, inp["targets"], return_entropy=True)
    weights = upstream.double() if upstream is not None else torch.full_like(value, 1 / value.numel())
    (value * weights).sum().backward()
    return value.detach(), entropy, h.grad, w.grad


def run_divergence(inp, kind, temperature, clip, backend, beta=0.5, upstream=None, **kw):
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    value, entropy = linear_divergence(h, w, inp["teacher_hidden"], inp["teacher_weight"], kind=kind, beta=beta,
                                       temperature=temperature, clip=clip, targets=inp["targets"], backend=backend,
                                       return_entropy=True, chunk_size=CHUNK, **kw)
    assert value.dtype == torch.float32 and value.shape == (inp["targets"].shape[0],)
    (value.mean() if upstream is None else (value * upstream).sum()).backward()
    return value.detach(), entropy, h.grad, w.grad


def median_clip(inp, kind, temperature):
    """A clip that cuts about half of the tokens (so both branches are exercised), halfway between
    two neighbouring values so that rounding cannot flip a token from one side to the other."""
    with torch.no_grad():
        ref = eager_divergence(inp["student_hidden"].double(), inp["student_weight"].double(),
                               inp["teacher_hidden"].double(), inp["teacher_weight"].double(), kind, 0.5,
                               temperature, None, inp["targets"])
    ordered = ref.sort().values
    middle = ordered.numel() // 2
    return float((ordered[middle - 1] + ordered[middle]) / 2)


# --- divergence: every kind against the float64 reference ------------------------------------

# (backend, grad_in_forward): the strategy only exists for the chunked backends.
BACKEND_MODES = [("torch", True), ("torch", False), ("eager", True)]
BACKEND_MODE_IDS = ["torch-fused", "torch-recompute", "eager"]


@pytest.mark.parametrize("backend,grad_in_forward", BACKEND_MODES, ids=BACKEND_MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("temperature,clipped", [(1.0, False), (0.7, True)], ids=["T1", "T0.7-clip"])
def test_divergence_matches_float64_reference(backend, grad_in_forward, dtype, kind, temperature, clipped):
    inp = make_inputs(dtype)
    clip = median_clip(inp, kind, temperature) if clipped else None
    # Uneven per-token upstream gradients: exercises the exact (recomputed) grad_weight path.
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(1))
    ref = reference_divergence(inp, kind, temperature, clip, upstream=upstream)
    got = run_divergence(inp, kind, temperature, clip, backend, upstream=upstream, grad_in_forward=grad_in_forward)
    tol = TOLERANCE[dtype]
    for name, x, r in zip(("value", "entropy", "grad_hidden", "grad_weight"), got, ref):
        assert rel(x, r) <= tol, f"{name}: rel error {rel(x, r):.2e} > {tol}"
    if clipped:
        assert (got[0] <= clip).all() and (got[0] == clip).any() and (got[0] < clip).any()


@pytest.mark.parametrize("kind", kernels.KINDS)
def test_divergence_token_mean_uses_stored_gradients(kind, monkeypatch):
    """mean() gives every token the same upstream gradient: backward only scales what the forward
    stored, and never runs the chunk loop again."""
    inp = make_inputs()
    ref = reference_divergence(inp, kind, 0.8, None)
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    value = linear_divergence(h, w, inp["teacher_hidden"], inp["teacher_weight"], kind=kind, temperature=0.8,
                              targets=inp["targets"], backend="torch", chunk_size=CHUNK)
    import kernels.divergence as divergence_module

    monkeypatch.setattr(divergence_module, "run_chunks", lambda *a, **k: pytest.fail("recomputed in backward"))
    (value.mean() * 3.0).backward()
    assert rel(h.grad, 3.0 * ref[2]) <= 1e-5 and rel(w.grad, 3.0 * ref[3]) <= 1e-5


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "sampled_token", "jsd"])
def test_forward_only_values_use_vocab_chunks(kind):
    """No grad: the torch backend streams the vocabulary in chunks (online log-sum-exp)."""
    inp = make_inputs()
    ref, ref_entropy = eager_divergence(*(inp[k].double() for k in ("student_hidden", "student_weight",
                                                                     "teacher_hidden", "teacher_weight")),
                                        kind, 0.5, 1.3, None, inp["targets"], return_entropy=True)
    with torch.no_grad():
        value, entropy = linear_divergence(inp["student_hidden"], inp["student_weight"], inp["teacher_hidden"],
                                           inp["teacher_weight"], kind=kind, temperature=1.3, targets=inp["targets"],
                                           backend="torch", return_entropy=True, chunk_size=CHUNK,
                                           vocab_chunk_size=50)
    assert rel(value, ref) <= 1e-5 and rel(entropy, ref_entropy) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", kernels.KINDS)
def test_teacher_equal_to_student_gives_zero(backend, kind):
    inp = make_inputs()
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    value = linear_divergence(h, w, inp["student_hidden"], inp["student_weight"], kind=kind,
                              targets=inp["targets"], backend=backend, chunk_size=CHUNK)
    value.sum().backward()
    assert value.abs().max() <= 1e-6
    assert h.grad.abs().max() <= 1e-6 and w.grad.abs().max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_teacher_never_gets_a_gradient(backend, grad_in_forward):
    inp = make_inputs()
    th = inp["teacher_hidden"].clone().requires_grad_()
    tw = inp["teacher_weight"].clone().requires_grad_()
    h = inp["student_hidden"].clone().requires_grad_()
    for kind in kernels.KINDS:
        value = linear_divergence(h, inp["student_weight"], th, tw, kind=kind, targets=inp["targets"],
                                  backend=backend, grad_in_forward=grad_in_forward)
        (value * torch.rand(N)).sum().backward()
    assert th.grad is None and tw.grad is None and h.grad is not None
    # A teacher that requires grad with a frozen student: nothing to differentiate at all.
    value = linear_divergence(inp["student_hidden"], inp["student_weight"], th, tw, backend=backend)
    assert not value.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_at_beta_0_and_1_is_zero_and_finite(backend, beta):
    """M equals one side at beta 0 / 1: both JSD terms vanish (value 0, gradient 0, no NaN)."""
    inp = make_inputs()
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    value = linear_divergence(h, w, inp["teacher_hidden"], inp["teacher_weight"], kind="jsd", beta=beta,
                              backend=backend, chunk_size=CHUNK)
    value.sum().backward()
    assert torch.equal(value, torch.zeros(N))
    assert torch.isfinite(h.grad).all() and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_jsd_interior_beta_matches_reference():
    inp = make_inputs()
    for beta in (0.1, 0.9):
        ref = reference_divergence(inp, "jsd", 1.0, None, beta=beta)
        got = run_divergence(inp, "jsd", 1.0, None, "torch", beta=beta)
        assert all(rel(x, r) <= 1e-5 for x, r in zip(got, ref))


def test_sampled_token_gradient_is_minus_advantage_times_grad_logp():
    inp = make_inputs()
    h = inp["student_hidden"].clone().requires_grad_()
    value = linear_divergence(h, inp["student_weight"], inp["teacher_hidden"], inp["teacher_weight"],
                              kind="sampled_token", targets=inp["targets"], backend="torch")
    value.sum().backward()
    h2 = inp["student_hidden"].clone().requires_grad_()
    logp_s = eager_logprobs(h2, inp["student_weight"], inp["targets"])
    logp_t = eager_logprobs(inp["teacher_hidden"], inp["teacher_weight"], inp["targets"])
    advantage = (logp_t - logp_s).detach()
    torch.autograd.backward(logp_s, -advantage)
    assert rel(h.grad, h2.grad) <= 1e-5
    assert rel(value, -advantage * logp_s.detach()) <= 1e-5


def test_mixed_dtypes_and_frozen_head():
    """bf16 hidden with an fp32 head (promoted), and a head without requires_grad."""
    inp = make_inputs()
    h = inp["student_hidden"].to(torch.bfloat16).requires_grad_()
    value = linear_divergence(h, inp["student_weight"], inp["teacher_hidden"], inp["teacher_weight"],
                              backend="torch")
    value.mean().backward()
    assert h.grad.dtype == torch.bfloat16 and inp["student_weight"].grad is None
    ref = reference_divergence(dict(inp, student_hidden=h.detach()), "reverse_kl", 1.0, None)
    assert rel(value, ref[0]) <= 1e-5 and rel(h.grad, ref[2]) <= 1e-2


# --- log-probs -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,grad_in_forward", BACKEND_MODES, ids=BACKEND_MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_match_float64_reference(backend, grad_in_forward, dtype, temperature):
    inp = make_inputs(dtype)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2))
    h64 = inp["student_hidden"].double().requires_grad_()
    w64 = inp["student_weight"].double().requires_grad_()
    ref, ref_entropy = eager_logprobs(h64, w64, inp["targets"], temperature, return_entropy=True)
    (ref * upstream.double()).sum().backward()
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    logp, entropy = linear_logprobs(h, w, inp["targets"], temperature, backend, return_entropy=True,
                                    chunk_size=CHUNK, grad_in_forward=grad_in_forward)
    (logp * upstream).sum().backward()
    tol = TOLERANCE[dtype]
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    for name, x, r in (("logp", logp, ref), ("entropy", entropy, ref_entropy),
                       ("grad_hidden", h.grad, h64.grad), ("grad_weight", w.grad, w64.grad)):
        assert rel(x, r) <= tol, f"{name}: rel error {rel(x, r):.2e} > {tol}"
    assert h.grad.dtype == dtype and w.grad.dtype == dtype


def test_logprobs_forward_only_streams_the_vocabulary():
    inp = make_inputs()
    ref, ref_entropy = eager_logprobs(inp["student_hidden"].double(), inp["student_weight"].double(), inp["targets"],
                                      0.9, return_entropy=True)
    with torch.no_grad():
        logp, entropy = linear_logprobs(inp["student_hidden"], inp["student_weight"], inp["targets"], 0.9, "torch",
                                        return_entropy=True, vocab_chunk_size=37)
    assert rel(logp, ref) <= 1e-5 and rel(entropy, ref_entropy) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 12), v=st.integers(2, 90), chunk=st.integers(1, 48),
       kind=st.sampled_from(kernels.KINDS), seed=st.integers(0, 2**16))
def test_any_shape_and_chunking_matches_reference(n, d, v, chunk, kind, seed):
    inp = make_inputs(n=n, d=d, v=v, seed=seed)
    ref = reference_divergence(inp, kind, 1.0, None)
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    value = linear_divergence(h, w, inp["teacher_hidden"], inp["teacher_weight"], kind=kind, targets=inp["targets"],
                              backend="torch", chunk_size=chunk)
    value.mean().backward()
    logp = linear_logprobs(inp["student_hidden"], inp["student_weight"], inp["targets"], backend="torch",
                           chunk_size=chunk)
    ref_logp = eager_logprobs(inp["student_hidden"].double(), inp["student_weight"].double(), inp["targets"])
    # Relative error with an absolute floor: tiny values (d = 1, V = 2) make a pure ratio meaningless.
    for x, r in ((value, ref[0]), (h.grad, ref[2]), (w.grad, ref[3]), (logp, ref_logp)):
        assert float((x.detach().double() - r).norm()) <= 1e-5 * max(1.0, float(r.norm()))


# --- memory: nothing of size N x V ----------------------------------------------------------

def test_no_tensor_of_size_n_by_v_is_ever_allocated():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    LargestAllocation.largest = max(LargestAllocation.largest, t.numel())
            return out

    n, d, v, chunk = 512, 16, 1000, 64
    inp = make_inputs(n=n, d=d, v=v)
    h = inp["student_hidden"].clone().requires_grad_()
    w = inp["student_weight"].clone().requires_grad_()
    with LargestAllocation():
        for kind in kernels.KINDS:
            value = linear_divergence(h, w, inp["teacher_hidden"], inp["teacher_weight"], kind=kind,
                                      targets=inp["targets"], backend="torch", chunk_size=chunk)
            (value * torch.rand(n)).sum().backward()  # uneven: the recompute path too
        linear_logprobs(h, w, inp["targets"], backend="torch", chunk_size=chunk).sum().backward()
    assert LargestAllocation.largest <= chunk * v, LargestAllocation.largest  # never [N, V]


def test_default_chunk_heuristic():
    # Liger's rule N / ceil(V / d), power of 2, clamped: the real size gives 256 rows.
    assert kernels.default_chunk_rows(8192, 151_936, 4096) == 256
    assert kernels.default_chunk_rows(4096, 32_000, 256) == kernels._common.MIN_CHUNK_ROWS
    assert kernels.default_chunk_rows(10**6, 509, 128) == kernels._common.MAX_CHUNK_ROWS


def test_empty_input():
    inp = make_inputs(n=0)
    assert linear_logprobs(inp["student_hidden"], inp["student_weight"], inp["targets"]).shape == (0,)
    assert linear_divergence(inp["student_hidden"], inp["student_weight"], inp["teacher_hidden"],
                             inp["teacher_weight"]).shape == (0,)


# --- bad arguments: ValueError naming the argument, before any compute -----------------------

@pytest.fixture
def no_compute(monkeypatch):
    import kernels.divergence as divergence_module
    import kernels.logprobs as logprobs_module

    def refuse(*_a, **_k):
        raise AssertionError("computed before checking the arguments")

    for module in (divergence_module, logprobs_module):
        monkeypatch.setattr(module, "run_chunks", refuse)
    monkeypatch.setattr(divergence_module, "eager_divergence", refuse)
    monkeypatch.setattr(divergence_module, "_torch_values_online", refuse)
    monkeypatch.setattr(logprobs_module, "eager_logprobs", refuse)
    monkeypatch.setattr(logprobs_module, "_torch_values_online", refuse)


@pytest.mark.parametrize("change,argument", [
    (dict(kind="kl"), "kind"),
    (dict(backend="cuda"), "backend"),
    (dict(kind="sampled_token", targets=None), "targets"),
    (dict(targets=torch.zeros(N + 1, dtype=torch.long)), "targets"),
    (dict(targets=torch.full((N,), V, dtype=torch.long)), "targets"),
    (dict(targets=torch.zeros(N)), "targets"),
    (dict(student_weight=torch.zeros(V, D + 1)), "student_weight"),
    (dict(student_hidden=torch.zeros(N, D, 1)), "student_hidden"),
    (dict(teacher_hidden=torch.zeros(N - 1, D)), "teacher_hidden"),
    (dict(teacher_weight=torch.zeros(V + 1, D)), "teacher_weight"),
    (dict(temperature=0.0), "temperature"),
    (dict(beta=1.5), "beta"),
    (dict(clip=float("nan")), "clip"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_divergence_rejects_bad_arguments(no_compute, change, argument):
    inp = make_inputs()
    kwargs = dict(kind="reverse_kl", targets=inp["targets"], backend="torch")
    tensors = {k: inp[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")}
    for key in list(change):
        if key in tensors:
            tensors[key] = change.pop(key)
    kwargs.update(change)
    with pytest.raises(ValueError, match=argument):
        linear_divergence(**tensors, **kwargs)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(backend="fast"), "backend"),
    (dict(temperature=-1.0), "temperature"),
    (dict(targets=torch.zeros(3, dtype=torch.long)), "targets"),
    (dict(weight=torch.zeros(V, D - 1)), "weight"),
    (dict(hidden=torch.zeros(N, D, dtype=torch.long)), "hidden"),
])
def test_logprobs_rejects_bad_arguments(no_compute, kwargs, argument):
    inp = make_inputs()
    call = dict(hidden=inp["student_hidden"], weight=inp["student_weight"], targets=inp["targets"])
    call.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        linear_logprobs(**call)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inp = make_inputs()
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(inp["student_hidden"], inp["student_weight"], inp["targets"], backend="triton")


@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.0])
def test_torch_backend_is_as_precise_as_fp32_eager(kind, temperature):
    """The chunked torch backend's fp32 error (against float64) stays within 2x plain fp32
    eager's on the same inputs, for values and both gradients, at a vocabulary several row-dot
    blocks wide (its reductions once summed sequentially: 5-10x eager's error at T < 1)."""
    gen = torch.Generator().manual_seed(3)
    n, d, v = 301, 48, 5003
    inp = dict(student_hidden=torch.randn(n, d, generator=gen), student_weight=torch.randn(v, d, generator=gen) * 0.3,
               teacher_hidden=torch.randn(n, d, generator=gen), teacher_weight=torch.randn(v, d, generator=gen) * 0.3,
               targets=torch.randint(0, v, (n,), generator=gen))
    upstream = torch.randn(n, generator=gen)
    ref = reference_divergence(inp, kind, temperature, None, upstream=upstream)
    errors = {}
    for backend in ("eager", "torch"):
        h = inp["student_hidden"].clone().requires_grad_()
        w = inp["student_weight"].clone().requires_grad_()
        value = linear_divergence(h, w, inp["teacher_hidden"], inp["teacher_weight"], kind=kind,
                                  temperature=temperature, targets=inp["targets"], backend=backend)
        (value * upstream).sum().backward()
        with torch.no_grad():  # the forward-only path (evaluation, the redundancy map)
            plain = linear_divergence(inp["student_hidden"], inp["student_weight"], inp["teacher_hidden"],
                                      inp["teacher_weight"], kind=kind, temperature=temperature,
                                      targets=inp["targets"], backend=backend)
        errors[backend] = [rel(value, ref[0]), rel(h.grad, ref[2]), rel(w.grad, ref[3]), rel(plain, ref[0])]
    for name, e, t in zip(("value", "grad_hidden", "grad_weight", "value without grad"), errors["eager"],
                          errors["torch"]):
        assert t <= 2 * e + 1e-8, f"{kind} T={temperature} {name}: torch {t:.2e} vs eager {e:.2e}"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kind, beta", [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.5), ("jsd", 0.2)])
def test_divergences_agree_with_trl_generalized_jsd(kind, beta, temperature):
    """An oracle we did not write: TRL's `generalized_jsd_loss` (GKD), where beta = 1 is reverse KL
    KL(student || teacher), beta = 0 forward KL and JSD in between, with the mixture
    M = beta teacher + (1 - beta) student. A formula error made in both our kernels and our eager
    reference (reverse and forward swapped, say) shows here."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    inp = make_inputs(torch.float64)
    s_logits = inp["student_hidden"] @ inp["student_weight"].T
    t_logits = inp["teacher_hidden"] @ inp["teacher_weight"].T
    trl = GKDTrainer.generalized_jsd_loss(s_logits[None], t_logits[None], beta=beta, temperature=temperature,
                                          reduction="none")[0].sum(-1)
    for backend in BACKENDS:
        ours = linear_divergence(inp["student_hidden"], inp["student_weight"], inp["teacher_hidden"],
                                 inp["teacher_weight"], kind=kind, beta=beta, temperature=temperature,
                                 backend=backend)
        torch.testing.assert_close(ours.double(), trl, rtol=1e-5, atol=1e-7, msg=f"{backend} {kind}")
