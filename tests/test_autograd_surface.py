"""The autograd surface of every backend beyond first-order reverse mode (issue 12, items
1 and 5; issue 13, item 6).

- Higher-order gradients: ``torch.autograd.gradgradcheck`` in float64 on every backend
  that takes float64 (reference, cpu here; cuda on a GPU), both ops, masks, given
  landmarks, every proposal and weighting, training eps; the fused backends' second
  derivatives equal the reference's on the same inputs. Triton takes no float64: its
  second derivatives (interpreter, float32) are compared with the reference's in float64.
- torch.func: vmap over a leading dim equals a Python loop, ``torch.func.grad`` equals
  autograd, forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) equals
  the reference's, and so does ``torch.func.hessian`` (forward over reverse).
- The fused first-order backward stays the fused kernels (no eager pass runs unless
  create_graph=True).
- A ``_C`` that exists but fails to import warns with its reason; a missing one is quiet.

Tolerances: float64 results of two backends agree to 1e-10 (relative RMS): both compute
the same formulas in float64 (unit roundoff 1e-16) through at most a few dozen steps of
moderate condition on these small, unit-scale inputs; a wrong term gives 1e-2 or more.
gradgradcheck runs with its float64 defaults (atol 1e-5, rtol 1e-3 against central
differences). The Triton tolerance is stated at its test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.autograd import forward_ad as fwAD

from helpers import rel_rms
from lara_kernels import _fused, _ops, _passes_torch, dispatch, lara_attention, rfa_attention

F64_TOL = 1e-10

needs_c = pytest.mark.skipif(not _ops.built(), reason=f"lara_kernels._C is not built ({_ops.C_ERROR})")
needs_triton = pytest.mark.skipif("triton" not in dispatch.backends(), reason="the triton backend is not registered")
TRITON_TOL = 2e-5   # see test_triton_second_derivatives_match_reference


def _triton_device():
    """CUDA tensors where there is a GPU, else CPU tensors (the interpreter, conftest.py)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _backends_f64():
    """(backend, device) pairs that take float64: reference and cpu here, cuda on a GPU."""
    return [
        pytest.param("reference", "cpu", id="reference"),
        pytest.param("cpu", "cpu", id="cpu", marks=needs_c),
        pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, needs_c]),
    ]


B, H, N, M, D, DV, C = 2, 1, 5, 6, 3, 2, 3


def _leaves(seed, *, landmarks=False, dtype=torch.float64, device="cpu", n=N, m=M):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, n, D), (B, H, m, D), (B, H, m, DV)]
    if landmarks:
        shapes += [(B, H, C, D), (B, H, C, D)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def _masks(device="cpu", fully=False, n=N, m=M):
    """Scattered padding in element 1 (and element 1 all padding when ``fully``)."""
    kpm = torch.zeros(B, m, dtype=torch.bool)
    qpm = torch.zeros(B, n, dtype=torch.bool)
    kpm[1, [1, 4]] = True
    qpm[1, [0, 3]] = True
    if fully:
        kpm[1] = True
    return {"key_padding_mask": kpm.to(device), "query_padding_mask": qpm.to(device)}


def _lara_fn(backend, device, *, masks=None, training=False, **opts):
    """lara_attention(q, k, v[, q_landmarks, k_landmarks]) as a function of its tensors;
    the eps of ``training`` comes from a generator reseeded on every call."""
    def f(q, k, v, *lm):
        extra = dict(opts, **(masks or {}))
        if lm:
            extra["q_landmarks"] = lm[0]
            if len(lm) > 1:
                extra["k_landmarks"] = lm[1]
        if training:
            extra.update(training=True, generator=torch.Generator(device=device).manual_seed(7))
        return lara_attention(q, k, v, num_samples=C, backend=backend, **extra)
    return f


def _rfa_fn(backend, device, *, masks=None):
    def f(q, k, v):
        return rfa_attention(q, k, v, num_samples=C, backend=backend,
                             generator=torch.Generator(device=device).manual_seed(7), **(masks or {}))
    return f


LARA_CASES = {
    # name: (options of _lara_fn, landmarks given, masks)
    "segment-optimal": (dict(proposal="segment", weighting="optimal"), False, None),
    "segment-balance": (dict(proposal="segment", weighting="balance"), False, None),
    "mixed-optimal": (dict(proposal="mixed", weighting="optimal", beta=0.7), False, None),
    "mixed-balance": (dict(proposal="mixed", weighting="balance"), False, None),
    "attend-optimal": (dict(proposal="attend", weighting="optimal"), False, None),
    "attend-balance": (dict(proposal="attend", weighting="balance"), False, None),
    "masks": (dict(proposal="mixed", weighting="optimal"), False, "masks"),
    "masks-fully-padded": (dict(proposal="segment", weighting="optimal"), False, "fully"),
    "landmarks": (dict(proposal="segment", weighting="optimal"), True, None),
    "training": (dict(proposal="attend", weighting="optimal", training=True), False, None),
    "training-masks-landmarks": (dict(proposal="mixed", weighting="balance", training=True), True, "masks"),
}


def _lara_case(name, backend, device, dtype=torch.float64):
    opts, landmarks, masks = LARA_CASES[name]
    m = None if masks is None else _masks(device, fully=masks == "fully")
    leaves = _leaves(11, landmarks=landmarks, dtype=dtype, device=device)
    if opts.get("proposal") == "attend" and landmarks:
        leaves = leaves[:4]                     # "attend" takes no key landmarks
    return _lara_fn(backend, device, masks=m, **opts), leaves


RFA_CASES = ("plain", "masks")


def _rfa_case(name, backend, device, dtype=torch.float64):
    m = _masks(device) if name == "masks" else None
    return _rfa_fn(backend, device, masks=m), _leaves(12, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- second order


@pytest.mark.parametrize("backend,device", _backends_f64())
@pytest.mark.parametrize("case", list(LARA_CASES))
def test_lara_gradgradcheck(backend, device, case):
    f, leaves = _lara_case(case, backend, device)
    assert torch.autograd.gradgradcheck(f, tuple(leaves), fast_mode=True)


@pytest.mark.parametrize("backend,device", _backends_f64())
@pytest.mark.parametrize("case", RFA_CASES)
def test_rfa_gradgradcheck(backend, device, case):
    f, leaves = _rfa_case(case, backend, device)
    assert torch.autograd.gradgradcheck(f, tuple(leaves), fast_mode=True)


def _second_order(f, leaves, seed):
    """Output, first-order gradients (create_graph=True) and the gradient of a random
    projection of them: second derivatives, including those in the incoming gradient."""
    g = torch.Generator().manual_seed(seed)
    y = f(*leaves)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype).requires_grad_()
    grads = torch.autograd.grad(y, leaves, dy, create_graph=True)
    proj = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
            for t in grads]
    s = sum((a * b).sum() for a, b in zip(grads, proj))
    second = torch.autograd.grad(s, list(leaves) + [dy], allow_unused=True)
    return [y, *grads, *second]


def _assert_close_f64(got, ref):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert torch.isfinite(a).all(), i
            assert rel_rms(a, b) <= F64_TOL, (i, rel_rms(a, b))


@pytest.mark.parametrize("backend,device", [p for p in _backends_f64() if p.values[0] != "reference"])
@pytest.mark.parametrize("case", list(LARA_CASES) + ["rfa-" + c for c in RFA_CASES])
def test_second_derivatives_equal_reference(backend, device, case):
    """The fused backends' second derivatives (and first-order gradients taken with
    create_graph=True) are the reference's, float64, on the same inputs."""
    make = (lambda b: _rfa_case(case[4:], b, device)) if case.startswith("rfa-") else \
        (lambda b: _lara_case(case, b, device))
    f, leaves = make(backend)
    f_ref, leaves_ref = make("reference")
    _assert_close_f64(_second_order(f, leaves, 3), _second_order(f_ref, leaves_ref, 3))


@needs_c
def test_create_graph_first_order_equals_fused_backward():
    """With create_graph=True the first-order gradients come from the eager recomputation;
    they equal those of the fused backward kernels."""
    f, leaves = _lara_case("training-masks-landmarks", "cpu", "cpu")
    y = f(*leaves)
    dy = torch.randn_like(y)
    fused = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    eager = torch.autograd.grad(y, leaves, dy, create_graph=True)
    assert all(e.requires_grad for e in eager)
    for a, b in zip(eager, fused):
        assert rel_rms(a, b) <= F64_TOL


def test_first_order_backward_runs_no_eager_pass(monkeypatch):
    """Plain backward (create_graph=False) runs the fused backward kernels only: the eager
    passes are called only under create_graph=True."""
    if not _ops.built():
        pytest.skip(f"lara_kernels._C is not built ({_ops.C_ERROR})")
    calls = []
    for name in ("key_pass", "query_normalizer", "query_pass", "landmarks"):
        orig = getattr(_passes_torch, name)
        monkeypatch.setattr(_passes_torch, name,
                            lambda *a, _orig=orig, _name=name: calls.append(_name) or _orig(*a))
    f, leaves = _lara_case("attend-optimal", "cpu", "cpu")
    y = f(*leaves)
    torch.autograd.grad(y.sum(), leaves, retain_graph=True)
    assert calls == []
    torch.autograd.grad(y.sum(), leaves, create_graph=True)
    assert sorted(set(calls)) == ["key_pass", "query_normalizer", "query_pass"]


@needs_triton
@pytest.mark.parametrize("case", ["masks", "attend-optimal", "training-masks-landmarks", "rfa-masks"])
def test_triton_second_derivatives_match_reference(case):
    """Triton (float32; on CPU tensors under the interpreter) second derivatives against
    the reference's in float64 on the same float32-rounded inputs.

    Tolerance TRITON_TOL = 2e-5 (relative RMS), test_triton.py's bound for first-order
    gradients. The second-order terms are the float32 eager passes' double backward fed
    by the Triton forward: a chain about twice as long as the first-order one, through
    the softmax/logsumexp Jacobians and the MIS weights' 1/alpha and 1/alpha^2, on
    unit-scale inputs. Measured here: 3e-7 .. 1.1e-6 (the largest with training eps,
    masks and given landmarks), a margin of about twenty; a wrong or missing term gives
    1e-2 or more (second derivatives of zero give 1).
    """
    dev = _triton_device()
    make = (lambda b, dt: _rfa_case(case[4:], b, dev, dt)) if case.startswith("rfa-") else \
        (lambda b, dt: _lara_case(case, b, dev, dt))
    f, leaves = make("triton", torch.float32)
    f_ref, _ = make("reference", torch.float64)
    leaves_ref = [t.detach().double().requires_grad_() for t in leaves]
    got = _second_order(f, leaves, 5)
    ref = _second_order(f_ref, leaves_ref, 5)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert a.dtype == torch.float32 and torch.isfinite(a).all(), i
            assert rel_rms(a, b) <= TRITON_TOL, (i, rel_rms(a, b))


@needs_c
def test_landmarks_op_gradgradcheck():
    """The compiled landmarks op, through the wrapper the fused backends call and called
    directly (its torch.library autograd), has exact derivatives of second order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.tensor([[False] * 7, [True, False, False, True, False, False, True]])
    c_eff = torch.tensor([3, 2])
    for fn in (_ops.landmarks, torch.ops.lara_kernels.landmarks):
        assert torch.autograd.gradgradcheck(lambda t: fn(t, pad, c_eff, 3), (x,), fast_mode=True)
        y = fn(x, pad, c_eff, 3)
        ref = _passes_torch.landmarks(x, pad, c_eff, 3)
        assert rel_rms(y, ref) <= F64_TOL


# ----------------------------------------------------------------------------- torch.func


def _func_backends():
    return [
        pytest.param("reference", id="reference"),
        pytest.param("cpu", id="cpu", marks=needs_c),
    ]


V = 3   # the vmapped dimension


def _batched(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(V, B, H, L, d, generator=g, dtype=torch.float64).to(dtype)
            for L, d in ((N, D), (M, D), (M, DV))]


@pytest.mark.parametrize("backend", _func_backends())
@pytest.mark.parametrize("op", ["lara", "rfa"])
def test_vmap_equals_loop(backend, op):
    """vmap over a leading dim of q, k and v (masks shared), and over q alone, equals a loop.
    rfa draws its features inside the call: randomness="same" with a generator reseeded
    every call, as the loop does."""
    masks = _masks()
    if op == "lara":
        f = _lara_fn(backend, "cpu", masks=masks, proposal="attend")
    else:
        f = _rfa_fn(backend, "cpu", masks=masks)
    q, k, v = _batched(20)
    got = torch.vmap(f, randomness="same")(q, k, v)
    want = torch.stack([f(q[i], k[i], v[i]) for i in range(V)])
    assert rel_rms(got, want) <= F64_TOL
    got = torch.vmap(f, in_dims=(0, None, None), randomness="same")(q, k[0], v[0])
    want = torch.stack([f(q[i], k[0], v[0]) for i in range(V)])
    assert rel_rms(got, want) <= F64_TOL


@pytest.mark.parametrize("backend", _func_backends())
def test_vmap_batched_masks_equals_loop(backend):
    """vmap over the padding masks as well (the pipeline never branches on batched values)."""
    q, k, v = _batched(21)
    kpm = torch.zeros(V, B, M, dtype=torch.bool)
    kpm[1, 0, 2:4] = True
    kpm[2, 1, :] = True                       # element 1 of vmap entry 2: no valid key
    f = lambda q, k, v, m: lara_attention(q, k, v, num_samples=C, backend=backend, key_padding_mask=m)  # noqa: E731
    got = torch.vmap(f)(q, k, v, kpm)
    want = torch.stack([f(q[i], k[i], v[i], kpm[i]) for i in range(V)])
    assert rel_rms(got, want) <= F64_TOL


@pytest.mark.parametrize("backend", _func_backends())
def test_func_grad_equals_autograd_and_per_sample_grads(backend):
    f = _lara_fn(backend, "cpu", masks=_masks(), proposal="mixed", training=True)
    q, k, v = _batched(22)

    def loss(q, k, v):
        return f(q, k, v).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q[0], k[0], v[0])
    leaves = [t[0].clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want):
        assert rel_rms(a, b) <= F64_TOL
    per_sample = torch.vmap(torch.func.grad(loss), randomness="same")(q, k, v)
    loop = torch.stack([torch.func.grad(loss)(q[i], k[i], v[i]) for i in range(V)])
    assert rel_rms(per_sample, loop) <= F64_TOL


@pytest.mark.parametrize("backend", [p for p in _func_backends() if p.values[0] != "reference"])
@pytest.mark.parametrize("op", ["lara", "rfa"])
def test_forward_mode_equals_reference(backend, op):
    """torch.func.jvp and torch.autograd.forward_ad on a fused backend give the reference's
    primal and tangent; so does torch.func.hessian (forward over reverse)."""
    def make(b):
        if op == "rfa":
            return _rfa_fn(b, "cpu", masks=_masks())
        return _lara_fn(b, "cpu", masks=_masks(), proposal="attend", weighting="optimal", training=True)

    f, f_ref = make(backend), make("reference")
    q, k, v = [t[0] for t in _batched(23)]
    tangents = tuple(t[0] for t in _batched(24))
    y, jy = torch.func.jvp(f, (q, k, v), tangents)
    y_ref, jy_ref = torch.func.jvp(f_ref, (q, k, v), tangents)
    assert rel_rms(y, y_ref) <= F64_TOL and rel_rms(jy, jy_ref) <= F64_TOL
    assert jy.abs().max() > 0
    with fwAD.dual_level():
        out = fwAD.unpack_dual(f(fwAD.make_dual(q, tangents[0]), k, fwAD.make_dual(v, tangents[2])))
    with fwAD.dual_level():
        out_ref = fwAD.unpack_dual(f_ref(fwAD.make_dual(q, tangents[0]), k, fwAD.make_dual(v, tangents[2])))
    assert rel_rms(out.primal, out_ref.primal) <= F64_TOL and rel_rms(out.tangent, out_ref.tangent) <= F64_TOL
    qs = q[:, :, :2]                                      # a small Hessian: (B, H, 2, D) x itself

    def hessian(fn):   # torch.func.hessian, with the draw inside allowed under its vmap
        return torch.func.jacfwd(torch.func.jacrev(lambda x: fn(torch.cat([x, q[:, :, 2:]], 2), k, v).square().sum()),
                                 randomness="same")(qs)

    hess, hess_ref = hessian(f), hessian(f_ref)
    assert rel_rms(hess, hess_ref) <= F64_TOL


@needs_c
def test_landmarks_op_vmap_equals_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(V, 2, 2, 7, 3, generator=g, dtype=torch.float64)
    pad = torch.rand(V, 2, 7, generator=g) < 0.3
    pad[..., 0] = False
    c_eff = torch.tensor([3, 2])
    for fn in (_ops.landmarks, torch.ops.lara_kernels.landmarks):
        got = torch.vmap(lambda a, p: fn(a, p, c_eff, 3))(x, pad)
        want = torch.stack([fn(x[i], pad[i], c_eff, 3) for i in range(V)])
        assert rel_rms(got, want) <= F64_TOL
        got = torch.vmap(lambda a: fn(a, pad[0], c_eff, 3))(x)
        want = torch.stack([fn(x[i], pad[0], c_eff, 3) for i in range(V)])
        assert rel_rms(got, want) <= F64_TOL


@needs_triton
def test_triton_vmap_grad_and_jvp():
    """The Triton backend under vmap, torch.func.grad and jvp (float32) against the
    reference in float64: first-order quantities of the same float32 computations as
    test_triton.py's, hence its tolerance 2e-5."""
    dev = _triton_device()
    f = _rfa_fn("triton", dev, masks=_masks(dev))
    f_ref = _rfa_fn("reference", dev, masks=_masks(dev))
    q, k, v = [t.to(dev) for t in _batched(25)]
    got = torch.vmap(f, randomness="same")(q.float(), k.float(), v.float())
    want = torch.stack([f_ref(q[i], k[i], v[i]) for i in range(V)])
    assert got.dtype == torch.float32 and rel_rms(got, want) <= TRITON_TOL
    x = [t[0] for t in (q, k, v)]
    g = torch.func.grad(lambda *a: f(*a).square().sum(), argnums=(0, 1, 2))(*[t.float() for t in x])
    g_ref = torch.func.grad(lambda *a: f_ref(*a).square().sum(), argnums=(0, 1, 2))(*x)
    assert all(rel_rms(a, b) <= TRITON_TOL for a, b in zip(g, g_ref))
    t = [s[0].to(dev) for s in _batched(26)]
    _, jy = torch.func.jvp(f, tuple(a.float() for a in x), tuple(a.float() for a in t))
    _, jy_ref = torch.func.jvp(f_ref, tuple(x), tuple(t))
    assert rel_rms(jy, jy_ref) <= TRITON_TOL and jy.abs().max() > 0


# ----------------------------------------------------------------------------- a broken _C


_PROBE = r"""
import importlib.abc, importlib.machinery, json, sys, warnings
mode = sys.argv[1]
if mode == "broken":
    class Loader(importlib.abc.Loader):
        def create_module(self, spec):
            return None
        def exec_module(self, module):
            raise ImportError("undefined symbol: _ZN3c106detail14torch_check_fail (built against another torch)")
    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lara_kernels._C":
                return importlib.machinery.ModuleSpec(name, Loader(), origin="_C.so")
            return None
    sys.meta_path.insert(0, Finder())
elif mode == "wrongtorch":                      # built, but setup.py recorded another torch
    import types
    info = types.ModuleType("lara_kernels._build_info")
    info.TORCH_VERSION = "0.0.1+other"
    sys.modules["lara_kernels._build_info"] = info
else:                                           # never built: no module of that name
    sys.modules["lara_kernels._C"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lara_kernels
    from lara_kernels import _ops, dispatch
ours = [str(w.message) for w in caught if "lara_kernels._C" in str(w.message)]
print(json.dumps({"warnings": ours, "C_ERROR": _ops.C_ERROR, "built": _ops.built(),
                  "cpu_reasons": dispatch.backends()["cpu"].availability_reasons()}))
"""


def _probe(mode):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_broken_c_warns_with_reason():
    r = _probe("broken")
    assert not r["built"]
    assert "undefined symbol" in r["C_ERROR"] and r["C_ERROR"].startswith("ImportError")
    assert len(r["warnings"]) == 1 and r["C_ERROR"] in r["warnings"][0]
    assert "failed to import" in r["warnings"][0]
    assert any(r["C_ERROR"] in reason for reason in r["cpu_reasons"])


def test_missing_c_is_quiet():
    r = _probe("missing")
    assert not r["built"] and r["warnings"] == []
    assert r["C_ERROR"].startswith("ModuleNotFoundError")
    assert any("not built" in reason for reason in r["cpu_reasons"])


def test_c_built_against_another_torch_is_refused_with_reason():
    r = _probe("wrongtorch")
    assert not r["built"]
    assert r["C_ERROR"].startswith("_WrongTorch: built against torch 0.0.1+other, but this is torch ")
    assert len(r["warnings"]) == 1 and "pip install --no-build-isolation -e ." in r["warnings"][0]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_grad_calls_skip_the_functions_and_equal_the_grad_path(backend, monkeypatch):
    """Inference (grad mode off, or no input requiring a gradient) calls the kernels directly,
    without the autograd Functions and their per-call cost; the result is bitwise the one of
    the recorded path."""
    if backend == "cpu" and not _ops.built():
        pytest.skip("lara_kernels._C is not built")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors run the Triton kernels only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 11, 8, generator=g) for _ in range(3))
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 7:] = True
    opts = dict(num_samples=4, padding_mask=pad, backend=backend, proposal="attend")
    recorded = lara_attention(q.requires_grad_(), k, v, **opts)
    applied = []
    real_apply = _fused._apply
    monkeypatch.setattr(_fused, "_apply", lambda fn, *a: applied.append(fn) or real_apply(fn, *a))
    with torch.no_grad():
        y = lara_attention(q, k, v, **opts)
    y2 = lara_attention(q.detach(), k, v, **opts)
    assert applied == []
    assert torch.equal(y, recorded.detach()) and torch.equal(y2, recorded.detach())
    assert y.grad_fn is None and y2.grad_fn is None
