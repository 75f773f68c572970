"""The PyTorch surface of the public functions (issue: nothing silently wrong).

Autocast as SDPA casts, degenerate shapes, the range of finite results, the padding
trap of self-attention, landmarks a proposal ignores, and dispatch on the active samples
with its one-time warning. Every backend that runs here is checked: reference and cpu,
and triton under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from lara_kernels import api, dispatch, lara_attention, ra_attention, rfa_attention
from lara_kernels._ops import built

from helpers import make_qkv

FUNCS = {"lara": lara_attention, "rfa": rfa_attention}
TRITON = "triton" in dispatch.backends() and not dispatch.backends()["triton"].availability_reasons()
BACKENDS = ["reference"] + (["cpu"] if built() else []) + (["triton"] if TRITON else [])


def _backends_for(dtype):
    return [b for b in BACKENDS if not (b == "triton" and dtype == torch.float64)]


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("op", ["lara", "rfa"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_casts_like_sdpa(op, backend):
    if backend == "cpu" and not built():
        pytest.skip("lara_kernels._C is not built, so the cpu backend cannot run")
    fn = FUNCS[op]
    q, k, v = make_qkv(2, 2, 20, 20, 8, dtype=torch.float32, seed=1)
    opts = dict(num_samples=4, backend=backend, generator=torch.Generator().manual_seed(3))

    def call(*t):
        opts["generator"].manual_seed(3)
        return fn(*t, **opts)

    want = call(q.bfloat16(), k.bfloat16(), v.bfloat16())          # what SDPA's cast gives
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.scaled_dot_product_attention(q, k, v).dtype == torch.bfloat16   # the convention followed
        got = call(q, k, v)                                          # float32 in: runs in bfloat16
        mixed = call(q, k.half(), v)                                 # float32/float16 mix: accepted
        q64, k64, v64 = q.double(), k.double(), v.double()
        kept = call(q64, k64, v64)                                   # float64: left alone
    assert got.dtype == torch.bfloat16 and mixed.dtype == torch.bfloat16
    # the same operands give bitwise the same result: the accumulation is not cast down
    assert torch.equal(got, want)
    assert torch.equal(mixed, call(q.bfloat16(), k.half().bfloat16(), v.bfloat16()))
    assert kept.dtype == torch.float64
    assert torch.equal(kept, call(q64, k64, v64))


def test_autocast_mixed_float64_is_an_error_like_sdpa():
    q, k, v = make_qkv(1, 1, 6, 6, 4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"k has dtype torch.float64 but q has torch.bfloat16"):
            lara_attention(q, k.double(), v, num_samples=2)


def test_autocast_gradients_reach_float32_leaves():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 12, 12, 8, dtype=torch.float32, seed=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lara_attention(q, k, v, num_samples=4)
    y.float().sum().backward()
    for t in (q, k, v):
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- degenerate shapes


DEGENERATE = [  # (N, M, Dv)
    (5, 7, 0),
    (5, 0, 3),
    (0, 7, 3),
    (0, 0, 0),
]


@pytest.mark.parametrize("N,M,Dv", DEGENERATE)
@pytest.mark.parametrize("op", ["lara", "rfa", "ra"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_degenerate_shapes_give_zeros_and_zero_gradients(N, M, Dv, op, dtype):
    fn = {"lara": lara_attention, "rfa": rfa_attention, "ra": ra_attention}[op]
    backends = _backends_for(dtype) if op != "ra" else [None]
    for backend in backends:
        q = torch.full((2, 3, N, 4), float("inf"), dtype=dtype)      # huge / inf elsewhere must not leak
        k = torch.full((2, 3, M, 4), 1e30, dtype=dtype)
        v = torch.full((2, 3, M, Dv), float("-inf"), dtype=dtype)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        kw = {} if backend is None else {"backend": backend, "num_samples": 3}
        y = fn(*leaves, training=True, **kw) if op == "lara" else fn(*leaves, **kw)
        assert y.shape == (2, 3, N, Dv) and y.dtype == dtype
        assert torch.equal(y, torch.zeros_like(y))
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y), create_graph=True)
        for g, t in zip(grads, leaves):
            assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t)), backend


def test_degenerate_shapes_agree_with_given_landmarks():
    q, k, v = make_qkv(1, 2, 6, 6, 4, Dv=0)
    ql = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = lara_attention(q, k, v, num_samples=3, q_landmarks=ql)
    assert y.shape == (1, 2, 6, 0)
    (g,) = torch.autograd.grad(y.sum() + 0 * ql.sum(), [ql])
    assert torch.equal(g, torch.zeros_like(ql))


# ----------------------------------------------------------------------------- range of finite results


def _at_the_bound(dtype, D=16, seed=0, bound=api.range_bound):
    """q, k with some rows exactly at (just under) the range bound, in several directions."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 24, D, generator=g, dtype=torch.float64) for _ in range(3))
    scale = D ** -0.5
    r = (bound(dtype) / scale) ** 0.5 * 0.999
    x = torch.randn(D, generator=g, dtype=torch.float64)
    x = x / x.norm() * r
    k[0, 0, 3] = x
    q[0, 0, 5] = -x
    q[1, 1, 7] = x
    k[1, 0] = x                      # every key of one head at the bound
    q[1, 0] = -x                     # and every query of it opposite
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("proposal,weighting", [("segment", "optimal"), ("mixed", "optimal"),
                                                ("attend", "optimal"), ("segment", "balance")])
def test_finite_at_the_range_bound_on_every_backend(dtype, proposal, weighting):
    # outputs are finite up to range_bound; gradients (v and dy of order 1) up to grad_range_bound
    for backend in _backends_for(dtype):
        for bound in (api.range_bound, api.grad_range_bound):
            q, k, v = (t.requires_grad_() for t in _at_the_bound(dtype, bound=bound))
            api._check_finite_values(q, k, v, None, None, None, None)     # inside the range: passes
            for training in (False, True):
                y = lara_attention(q, k, v, num_samples=6, proposal=proposal, weighting=weighting,
                                   training=training, backend=backend, generator=torch.Generator().manual_seed(0))
                assert torch.isfinite(y).all(), (backend, training, bound.__name__)
                if bound is api.grad_range_bound:
                    grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
                    assert all(torch.isfinite(g).all() for g in grads), (backend, training)
            y = rfa_attention(q, k, v, num_samples=6, backend=backend)
            assert torch.isfinite(y).all(), backend


def test_check_finite_names_the_range():
    q, k, v = _at_the_bound(torch.float32)
    k = k.clone()
    k[1, 0, 2] *= 1.5                                              # 2.25x the bound
    with pytest.raises(ValueError, match=r"check_finite: k has 1 row outside the range where results are finite: "
                                         r"scale \* \|k\[1, 0, 2\]\|\^2 = 1\.19e\+37 > 5\.32e\+36"):
        lara_attention(q, k, v, num_samples=4, check_finite=True)
    assert api.range_bound(torch.bfloat16) == api.range_bound(torch.float32) == torch.finfo(torch.float32).max / 64


# ----------------------------------------------------------------------------- the padding trap


def _padded_self_attention(seed=0):
    q, k, v = make_qkv(2, 2, 16, 16, 8, seed=seed)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[0, 11:] = True
    pad[1, 3] = True
    return q, k, v, pad


def test_padding_mask_sets_both_masks():
    q, k, v, pad = _padded_self_attention()
    for fn in (lara_attention, rfa_attention):
        kw = dict(num_samples=4, generator=torch.Generator().manual_seed(0))
        y = fn(q, k, v, padding_mask=pad, **kw)
        kw["generator"].manual_seed(0)
        want = fn(q, k, v, key_padding_mask=pad, query_padding_mask=pad, **kw)
        assert torch.equal(y, want)
    # the defining property: valid rows equal the call on the element alone, unpadded
    y = lara_attention(q, k, v, num_samples=4, padding_mask=pad)
    keep = ~pad[0]
    alone = lara_attention(q[:1, :, keep], k[:1, :, keep], v[:1, :, keep], num_samples=4)
    torch.testing.assert_close(y[:1, :, keep], alone, rtol=1e-12, atol=1e-12)


def test_padding_mask_errors_name_the_values():
    q, k, v, pad = _padded_self_attention()
    with pytest.raises(ValueError, match=r"do not also pass key_padding_mask"):
        lara_attention(q, k, v, padding_mask=pad, key_padding_mask=pad)
    with pytest.raises(ValueError, match=r"self-attention .* got N=16 queries and M=9 keys"):
        lara_attention(q, k[:, :, :9], v[:, :, :9], padding_mask=pad)
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(B, N\) = \(2, 16\), got \(2, 15\)"):
        lara_attention(q, k, v, padding_mask=pad[:, :15])


def test_key_mask_alone_in_self_attention_warns_once():
    q, k, v, pad = _padded_self_attention()
    api._WARNED.clear()
    with pytest.warns(UserWarning, match=r"padded query rows still enter the query landmarks"):
        lara_attention(q, k, v, num_samples=4, key_padding_mask=pad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lara_attention(q, k, v, num_samples=4, key_padding_mask=pad)            # once only
        api._WARNED.clear()
        lara_attention(q, k, v, num_samples=4, padding_mask=pad)                # no ambiguity
        lara_attention(q, k, v, num_samples=4, key_padding_mask=pad, query_padding_mask=pad)
        rfa_attention(q, k, v, num_samples=4, key_padding_mask=pad)             # no landmarks in RFA
        lara_attention(q, k[:, :, :9], v[:, :, :9], num_samples=4, key_padding_mask=pad[:, :9])   # N != M


def test_key_mask_alone_lets_padding_shift_valid_rows():
    # why the warning exists: the same valid tokens with more padding give other outputs
    q, k, v, pad = _padded_self_attention()
    a = lara_attention(q, k, v, num_samples=4, key_padding_mask=pad)
    b = lara_attention(q, k, v, num_samples=4, padding_mask=pad)
    assert not torch.allclose(a[0, :, :11], b[0, :, :11])


# ----------------------------------------------------------------------------- landmarks a proposal ignores


def test_attend_rejects_key_landmarks():
    q, k, v = make_qkv(1, 2, 10, 10, 4)
    kl = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k_landmarks is not used by proposal='attend'"):
        lara_attention(q, k, v, num_samples=3, proposal="attend", k_landmarks=kl)
    lara_attention(q, k, v, num_samples=3, proposal="attend", q_landmarks=kl)   # q landmarks are used


# ----------------------------------------------------------------------------- dispatch on active samples


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_samples_above_the_limit_run_fused_when_few_are_active(backend):
    # C = 300 > 256, but only min(C, N, M) = 40 samples can be active: the fused backend
    # runs (no fallback) and equals the reference, with gradients of the given landmarks
    # (rows beyond 40 are inactive: zero gradient)
    dtype = torch.float32
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 40, 50, 8, dtype=dtype, seed=4))
    ql = torch.randn(1, 2, 300, 8, dtype=dtype, requires_grad=True)
    assert dispatch.select("lara", backend, q, k, v, num_samples=300).name == backend
    outs = []
    for b in (backend, "reference"):
        y = lara_attention(q, k, v, num_samples=300, q_landmarks=ql, backend=b, training=True,
                           generator=torch.Generator().manual_seed(5))
        outs.append((y,) + torch.autograd.grad(y, (q, k, v, ql), torch.ones_like(y)))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)   # float32 backends vs float32 reference
    assert torch.equal(outs[0][4][:, :, 40:], torch.zeros(1, 2, 260, 8))


class _OnCuda:
    """A meta tensor that reports a CUDA device (no GPU is touched)."""

    def __init__(self, shape):
        self._t = torch.empty(shape, device="meta")
        self.device = torch.device("cuda")

    def __getattr__(self, item):
        return getattr(self._t, item)


def test_auto_warns_once_when_it_passes_over_a_fused_backend_for_size():
    if not TRITON:
        pytest.skip("triton is not installed, so no fused CUDA backend is registered to pass over")
    q, v = _OnCuda((2, 4, 1024, 320)), _OnCuda((2, 4, 1024, 64))
    dispatch._WARNED.clear()
    with pytest.warns(UserWarning) as record:
        chosen = dispatch.select("lara", "auto", q, q, v, num_samples=64)
    assert chosen.name == "reference"
    msg = str(record[0].message)
    assert "passed over triton: head dim 320 > 256" in msg
    assert "(B, H, N, C) and (B, H, M, C) matrices, 2.0 MiB and 2.0 MiB each" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.select("lara", "auto", q, q, v, num_samples=64)          # shown once
        # C = 300 but only 200 samples can be active: triton fits, nothing to warn about
        q2 = _OnCuda((2, 4, 200, 64))
        assert dispatch.select("lara", "auto", q2, q2, q2, num_samples=300).name == "triton"


def test_auto_on_cpu_runs_fused_at_any_size_without_warning():
    if not built():
        pytest.skip("lara_kernels._C is not built, so the cpu backend cannot run")
    q, k, v = make_qkv(1, 1, 330, 330, 300, Dv=264, dtype=torch.float32, seed=6)
    assert dispatch.select("lara", "auto", q, k, v, num_samples=320).name == "cpu"
    assert dispatch.select("rfa", "auto", q, k, v, num_samples=320).name == "cpu"
    dispatch._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = lara_attention(q, k, v, num_samples=320)
    assert y.shape == (1, 1, 330, 264) and torch.isfinite(y).all()
