"""Property tests over every backend in the registry (hypothesis): random shapes, dtypes,
options, masks, strides and training draws; each backend equals the reference, forward
and all gradients. A new backend is covered the day it registers.

Profiles: ``ci`` (default, bounded) and ``long`` for a deliberate run:
``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import rel_rms
from lara_kernels import dispatch, lara_attention, rfa_attention

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _runnable_backends():
    """Every registered backend that can run small float32 CPU inputs here."""
    probe = torch.zeros(1, 1, 4, 8)
    return [name for name, b in dispatch.backends().items()
            if name != "reference" and not b.not_supported_reasons("lara", probe, probe, probe, num_samples=4)]


BACKENDS = _runnable_backends()

# Tolerance, on the RMS error against the float64 reference: k times the error of the
# reference itself run in the same dtype, plus a floor of a few units of roundoff
# relative to the result, plus an absolute floor for results that are 0 in exact
# arithmetic (e.g. dq when a single key is valid), where relative error means nothing.
# Inputs are standard normal, so results are O(1) and an absolute floor of ~2^-20
# (float32) is a few ulps. A backend computing the same function in the same precision
# has errors of the same order; k = 8 leaves room for another summation order (split-K).
K_TIMES = 8.0
REL_FLOOR = {torch.float32: 2e-6, torch.float64: 1e-12}
ABS_FLOOR = {torch.float32: 1e-6, torch.float64: 1e-13}


def _rms(x):
    return x.detach().double().pow(2).mean().sqrt().item()


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 2))
    N = draw(st.integers(1, 40))
    M = draw(st.integers(1, 40))
    D = draw(st.sampled_from([1, 3, 8, 16, 20]))
    Dv = draw(st.sampled_from([D, 1, 5, 16]))
    C = draw(st.integers(1, 12))
    opts = dict(
        num_samples=C,
        proposal=draw(st.sampled_from(["segment", "mixed", "attend"])),
        weighting=draw(st.sampled_from(["optimal", "balance"])),
        beta=draw(st.floats(0.0, 3.0)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        training=draw(st.booleans()),
    )
    masks = draw(st.sampled_from(["none", "key", "query", "both", "one-key", "all-keys-padded"]))
    strided = draw(st.booleans())
    landmarks = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return B, H, N, M, D, Dv, opts, masks, strided, landmarks, seed


def _build(B, H, N, M, D, Dv, opts, masks, strided, landmarks, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        if strided:   # a (B, L, H, 2 x last) buffer seen as (B, H, L, last): no dim contiguous
            full = torch.randn(shape[0], shape[2], shape[1], 2 * shape[3], generator=g, dtype=torch.float64)
            return full[..., ::2].transpose(1, 2)
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rnd(B, H, N, D), rnd(B, H, M, D), rnd(B, H, M, Dv)
    kpad = qpad = None
    if masks in ("key", "both"):
        kpad = torch.rand(B, M, generator=g) < 0.4
    if masks in ("query", "both"):
        qpad = torch.rand(B, N, generator=g) < 0.4
    if masks == "one-key":
        kpad = torch.ones(B, M, dtype=torch.bool)
        kpad[:, M // 2] = False
    if masks == "all-keys-padded":
        kpad = torch.zeros(B, M, dtype=torch.bool)
        kpad[0] = True
    extra = dict(key_padding_mask=kpad, query_padding_mask=qpad)
    if landmarks:
        C = opts["num_samples"]
        extra["q_landmarks"] = torch.randn(B, H, C, D, generator=g, dtype=torch.float64)
        if opts["proposal"] != "attend":   # "attend" uses no key landmarks and rejects them
            extra["k_landmarks"] = torch.randn(B, H, C, D, generator=g, dtype=torch.float64)
    return (q, k, v), extra


def _run(fn, tensors, extra, dtype, backend, seed, **opts):
    """Output and gradients of q, k, v (and landmarks) for a fixed upstream gradient."""
    ins = [t.to(dtype).detach().requires_grad_() for t in tensors]
    lm = {key: val.to(dtype).detach().requires_grad_() for key, val in extra.items()
          if key.endswith("landmarks")}
    masks = {key: val for key, val in extra.items() if key.endswith("mask")}
    y = fn(*ins, backend=backend, generator=torch.Generator().manual_seed(seed), **masks, **lm, **opts)
    gy = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape).to(dtype)
    y.backward(gy)
    return [y] + [t.grad for t in ins] + [lm[key].grad for key in sorted(lm)]


def _check(fn, tensors, extra, dtype, backend, seed, **opts):
    want = _run(fn, tensors, extra, torch.float64, "reference", seed, **opts)
    ref_lo = _run(fn, tensors, extra, dtype, "reference", seed, **opts)
    got = _run(fn, tensors, extra, dtype, backend, seed, **opts)
    names = ["y", "dq", "dk", "dv"] + sorted(key for key in extra if key.endswith("landmarks"))
    for name, w, r, g in zip(names, want, ref_lo, got):
        assert g is not None and torch.isfinite(g).all(), f"{backend}: {name} missing or not finite"
        w = w.double()
        tol = K_TIMES * _rms(r.double() - w) + REL_FLOOR[dtype] * _rms(w) + ABS_FLOOR[dtype]
        err = _rms(g.double() - w)
        assert err <= tol, f"{backend} {dtype} {name}: RMS error {err:.3g} > tolerance {tol:.3g} (RMS {_rms(w):.3g})"


@pytest.mark.skipif(not BACKENDS, reason="no backend besides the reference can run on this machine")
@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=problems())
def test_lara_backends_equal_reference(backend, problem):
    B, H, N, M, D, Dv, opts, masks, strided, landmarks, seed = problem
    tensors, extra = _build(*problem)
    b = dispatch.backends()[backend]
    for dtype in (torch.float64, torch.float32):
        if b.not_supported_reasons("lara", tensors[0].to(dtype), tensors[1], tensors[2], **opts):
            continue
        _check(lara_attention, tensors, extra, dtype, backend, seed, **opts)


@pytest.mark.skipif(not BACKENDS, reason="no backend besides the reference can run on this machine")
@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=problems())
def test_rfa_backends_equal_reference(backend, problem):
    B, H, N, M, D, Dv, opts, masks, strided, landmarks, seed = problem
    tensors, extra = _build(*problem)
    extra = {key: val for key, val in extra.items() if key.endswith("mask")}
    b = dispatch.backends()[backend]
    for dtype in (torch.float64, torch.float32):
        if b.not_supported_reasons("rfa", tensors[0].to(dtype), tensors[1], tensors[2], **opts):
            continue
        _check(rfa_attention, tensors, extra, dtype, backend, seed, num_samples=opts["num_samples"],
               scale=opts["scale"])


# ---------------------------------------------------------------------------------------
# Determinism and extreme values, on every runnable backend (reference included)
# ---------------------------------------------------------------------------------------
ALL = ["reference"] + BACKENDS


@pytest.mark.parametrize("backend", ALL)
def test_same_inputs_and_generator_give_bitwise_equal_results(backend):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 2, 37, 16, generator=g) for _ in range(3)]
    kpad = torch.rand(2, 37, generator=g) < 0.3
    extra = dict(key_padding_mask=kpad)
    a = _run(lara_attention, tensors, extra, torch.float32, backend, 5, num_samples=6, training=True)
    b = _run(lara_attention, tensors, extra, torch.float32, backend, 5, num_samples=6, training=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["huge-logits", "tiny", "equal-keys"])
def test_extreme_values_stay_finite_and_agree(backend, dtype, case):
    g = torch.Generator().manual_seed(1)
    B, H, N, M, D = 1, 2, 24, 20, 16
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    if case == "huge-logits":       # |q|, |k| ~ 100: logits up to ~1e4
        q = 100 * q / q.norm(dim=-1, keepdim=True)
        k = 100 * k / k.norm(dim=-1, keepdim=True)
    elif case == "tiny":
        q, k = 1e-6 * q, 1e-6 * k
    else:                            # every key the same vector
        k = k[:, :, :1].expand_as(k).clone()
    b = dispatch.backends()[backend]
    if b.not_supported_reasons("lara", q.to(dtype), k.to(dtype), v.to(dtype), num_samples=5):
        pytest.skip(f"{backend} does not take {dtype}: " + "; ".join(
            b.not_supported_reasons("lara", q.to(dtype), k.to(dtype), v.to(dtype), num_samples=5)))
    for weighting in ("optimal", "balance"):
        got = _run(lara_attention, (q, k, v), {}, dtype, backend, 0, num_samples=5, weighting=weighting)
        want = _run(lara_attention, (q, k, v), {}, torch.float64, "reference", 0, num_samples=5,
                    weighting=weighting)
        for x in got:
            assert torch.isfinite(x).all()
        # Output agreement with the float64 log-space reference. The storage dtype's
        # rounding of q and k moves logits of size |q||k| s ~ 2.5e3 by up to
        # 2.5e3 * 2^-8 (bfloat16): a near-argmax softmax may then pick another sample,
        # so half dtypes are only checked for finiteness on huge logits.
        if case == "huge-logits" and dtype in (torch.float16, torch.bfloat16):
            continue
        tol = {torch.float64: 1e-10, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        assert rel_rms(got[0], want[0]) < tol
