"""The cpu backend's whole-op path (``lara_kernels::lara_fwd`` / ``lara_bwd`` under one
autograd Function, lara_kernels/_whole.py, csrc/cpu/fused.cpp) against the pipeline of
passes it replaces (``_pipeline.lara_forward`` with the same compiled passes), forward and
every gradient.

Both paths compute the same formulas on the same passes; they differ only in where the
C x D and C x C steps run (C++ loops against torch ops) and in the order gradients are
summed. Tolerances: float64, relative RMS 1e-12 (measured 1e-16 .. 1e-15); float32, the
cpu backend tests' TOL32 = 2e-5 (relative RMS). Every buffer the compiled ops allocate
starts as NaN (the library's test mode), so an element the new op forgets to write fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import padding_mask, rel_rms
from lara_kernels import _ops, _whole, dispatch, lara_attention, lara_attention_varlen

pytestmark = pytest.mark.skipif(not _ops.built(), reason=f"lara_kernels._C is not built ({_ops.C_ERROR})")

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True)
def poison():
    _ops._C._set_poison_outputs(True)
    yield
    _ops._C._set_poison_outputs(False)


@pytest.fixture
def pipeline_only(monkeypatch):
    monkeypatch.setattr(_whole, "ENABLED", False)


def _run(call, leaves, dy, dtype, whole, seed=5):
    """(y, grads of the leaves) of call(*leaves, generator) on the path asked for."""
    old = _whole.ENABLED
    _whole.ENABLED = whole
    try:
        xs = [x.detach().to(dtype).requires_grad_() for x in leaves]
        y = call(*xs, generator=torch.Generator().manual_seed(seed))
        assert (type(y.grad_fn).__name__ == "_WholeBackward") == whole, type(y.grad_fn).__name__
        grads = torch.autograd.grad(y, xs, dy.to(dtype), allow_unused=True)
    finally:
        _whole.ENABLED = old
    return y, grads


def _compare(call, leaves, dy, dtype, seed=5):
    """The whole-op path equals the pipeline: forward and each gradient, all finite."""
    (y, g), (y0, g0) = _run(call, leaves, dy, dtype, True, seed), _run(call, leaves, dy, dtype, False, seed)
    tol = TOL[dtype]
    for name, a, b in [("y", y, y0)] + [(f"grad {i}", a, b) for i, (a, b) in enumerate(zip(g, g0))]:
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = rel_rms(a, b)
        assert err <= tol, f"{dtype} {name}: relative RMS error {err:.3g} > {tol}"
    return (y, g)


def _padded_case(B, H, Hkv, N, M, D, Dv, C, seed, landmarks=False):
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
              torch.randn(B, Hkv, M, D, generator=g, dtype=torch.float64),
              torch.randn(B, Hkv, M, Dv, generator=g, dtype=torch.float64)]
    if landmarks:
        leaves += [torch.randn(B, H, C, D, generator=g, dtype=torch.float64) for _ in range(2)]
    dy = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    return leaves, dy


def _lara(opts, landmarks=0):
    """call(q, k, v[, q_landmarks[, k_landmarks]], generator) of lara_attention on the cpu backend."""
    def call(q, k, v, *lm, generator):
        kw = dict(opts)
        if landmarks >= 1:
            kw["q_landmarks"] = lm[0]
        if landmarks >= 2:
            kw["k_landmarks"] = lm[1]
        return lara_attention(q, k, v, backend="cpu", generator=generator, **kw)
    return call


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proposal", ["segment", "mixed", "attend"])
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_equals_pipeline(dtype, proposal, weighting, training):
    # cross attention, C not dividing N, partial masks on both sides
    B, H, N, M, D, Dv, C = 2, 2, 23, 19, 12, 7, 5
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=1)
    opts = dict(num_samples=C, proposal=proposal, weighting=weighting, beta=1.5, training=training,
                key_padding_mask=padding_mask(B, M, seed=2), query_padding_mask=padding_mask(B, N, seed=3))
    _compare(_lara(opts), leaves, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proposal", ["segment", "mixed", "attend"])
def test_equals_pipeline_unmasked_and_scale(dtype, proposal):
    B, H, N, M, D, Dv, C = 1, 3, 16, 16, 16, 16, 4
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=4)
    opts = dict(num_samples=C, proposal=proposal, scale=0.3, beta=0.0 if proposal == "mixed" else 2.0)
    _compare(_lara(opts), leaves, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
@pytest.mark.parametrize("fully", ["keys", "queries", "both"])
def test_fully_padded_elements(dtype, weighting, fully):
    # element 2 has no valid key (or query, or neither): output 0 and gradients 0 there
    B, H, N, M, D, Dv, C = 3, 2, 14, 11, 8, 5, 4
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=5)
    kpm = padding_mask(B, M, fully=fully in ("keys", "both"), seed=6)
    qpm = padding_mask(B, N, fully=fully in ("queries", "both"), seed=7)
    opts = dict(num_samples=C, proposal="mixed", weighting=weighting, training=True, key_padding_mask=kpm,
                query_padding_mask=qpm)
    y, g = _compare(_lara(opts), leaves, dy, dtype)
    assert torch.equal(y[2], torch.zeros_like(y[2]))
    for grad in g:
        assert torch.equal(grad[2], torch.zeros_like(grad[2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_mask_only_with_a_fully_padded_element(dtype):
    B, H, N, M, D, Dv, C = 2, 2, 9, 13, 6, 4, 3
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=8)
    opts = dict(num_samples=C, key_padding_mask=padding_mask(B, M, fully=True, seed=9))
    _compare(_lara(opts), leaves, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proposal,given", [("segment", 2), ("mixed", 2), ("segment", 1), ("attend", 1)])
@pytest.mark.parametrize("C", [4, 20], ids=["C4", "C>N"])
def test_given_landmarks(dtype, proposal, given, C):
    # C = 20 > N, M: only the first min(C, N, M) landmark rows run; the others get gradient 0
    B, H, N, M, D, Dv = 2, 2, 12, 10, 8, 6
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=10, landmarks=True)
    leaves = leaves[:3 + given]
    opts = dict(num_samples=C, proposal=proposal, training=True, key_padding_mask=padding_mask(B, M, fully=True,
                seed=11), query_padding_mask=padding_mask(B, N, seed=12))
    y, g = _compare(_lara(opts, given), leaves, dy, dtype)
    for grad in g[3:]:
        if C > min(N, M):
            assert torch.equal(grad[:, :, min(N, M):], torch.zeros_like(grad[:, :, min(N, M):]))
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))     # element 1: every key padded


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hkv", [1, 2])
@pytest.mark.parametrize("proposal", ["segment", "mixed", "attend"])
def test_gqa(dtype, Hkv, proposal):
    B, H, N, M, D, Dv, C = 2, 4, 15, 13, 8, 5, 4
    leaves, dy = _padded_case(B, H, Hkv, N, M, D, Dv, C, seed=13)
    opts = dict(num_samples=C, proposal=proposal, enable_gqa=True, training=True,
                key_padding_mask=padding_mask(B, M, seed=14), query_padding_mask=padding_mask(B, N, seed=15))
    _compare(_lara(opts), leaves, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gqa_with_given_landmarks(dtype):
    B, H, Hkv, N, M, D, Dv, C = 2, 4, 2, 11, 9, 6, 4, 3
    leaves, dy = _padded_case(B, H, Hkv, N, M, D, Dv, C, seed=16, landmarks=True)
    opts = dict(num_samples=C, proposal="mixed", enable_gqa=True)
    _compare(_lara(opts, 2), leaves, dy, dtype)


# (query lengths, key lengths): an empty sequence first and in the middle, one with queries
# and no keys, one with keys and no queries, lengths below C.
LENGTHS = ([0, 5, 1, 0, 17, 3, 9, 0], [0, 7, 1, 4, 12, 3, 0, 6])


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _varlen(opts, cu_q, cu_k, landmarks=0):
    def call(q, k, v, *lm, generator):
        kw = dict(opts)
        if landmarks >= 1:
            kw["q_landmarks"] = lm[0]
        if landmarks >= 2:
            kw["k_landmarks"] = lm[1]
        return lara_attention_varlen(q, k, v, cu_q, cu_k, backend="cpu", generator=generator, **kw)
    return call


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proposal", ["segment", "mixed", "attend"])
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_packed(dtype, proposal, weighting, Hkv):
    lq, lk = LENGTHS
    H, D, Dv, C = 4, 8, 5, 6
    g = torch.Generator().manual_seed(17)
    leaves = [torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64),
              torch.randn(sum(lk), Hkv, D, generator=g, dtype=torch.float64),
              torch.randn(sum(lk), Hkv, Dv, generator=g, dtype=torch.float64)]
    dy = torch.randn(sum(lq), H, Dv, generator=g, dtype=torch.float64)
    opts = dict(num_samples=C, proposal=proposal, weighting=weighting, training=True, enable_gqa=Hkv != H)
    y, grads = _compare(_varlen(opts, _offsets(lq), _offsets(lk)), leaves, dy, dtype)
    # the sequence with queries and no keys (index 6, rows 27 .. 35) gives 0
    start = sum(lq[:6])
    assert torch.equal(y[start:start + lq[6]], torch.zeros_like(y[start:start + lq[6]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("given", [1, 2])
def test_packed_given_landmarks(dtype, given):
    lq, lk = LENGTHS
    B, H, D, Dv, C = len(lq), 2, 6, 4, 5
    g = torch.Generator().manual_seed(18)
    leaves = [torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64),
              torch.randn(sum(lk), H, D, generator=g, dtype=torch.float64),
              torch.randn(sum(lk), H, Dv, generator=g, dtype=torch.float64)]
    leaves += [torch.randn(B, H, C, D, generator=g, dtype=torch.float64) for _ in range(given)]
    dy = torch.randn(sum(lq), H, Dv, generator=g, dtype=torch.float64)
    opts = dict(num_samples=C, proposal="mixed", training=True)
    _compare(_varlen(opts, _offsets(lq), _offsets(lk), given), leaves, dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_pipeline_at_sizes_past_the_small_paths(dtype, threads):
    # The other cases are small: the C x C / C x D products of fused.cpp run as loops
    # (m n k <= 2048) and every parallel_for of the passes and the C-sized steps runs inline
    # (grain from the work). Here C = 32, D = 64 take BLAS for those products (32 * 32 * 64)
    # and one head's C-sized work is a grain of its own, and N, M > 512 give the key pass and
    # the query backward two chunks each, so that with 2 threads the tasks run in parallel.
    B, H, N, M, D, Dv, C = 2, 2, 600, 530, 64, 48, 32
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=26)
    opts = dict(num_samples=C, proposal="mixed", training=True, key_padding_mask=padding_mask(B, M, seed=27),
                query_padding_mask=padding_mask(B, N, seed=28))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare(_lara(opts), leaves, dy, dtype)
    finally:
        torch.set_num_threads(before)


def test_half_dtypes_close_to_the_pipeline():
    B, H, N, M, D, Dv, C = 2, 2, 20, 17, 16, 8, 4
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=19)
    opts = dict(num_samples=C, training=True, key_padding_mask=padding_mask(B, M, seed=20))
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        (y, g), (y0, g0) = (_run(_lara(opts), leaves, dy, dtype, w) for w in (True, False))
        for a, b in zip((y,) + g, (y0,) + g0):
            assert a.dtype == dtype and torch.isfinite(a).all()
            assert rel_rms(a, b) <= tol


def test_no_grad_and_inputs_without_grad_take_the_op_and_match():
    B, H, N, M, D, Dv, C = 2, 2, 10, 12, 8, 8, 4
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=21)
    q, k, v = (x.float() for x in leaves)
    opts = dict(num_samples=C, backend="cpu", key_padding_mask=padding_mask(B, M, seed=22))
    y = lara_attention(q.requires_grad_(), k, v, **opts)
    assert type(y.grad_fn).__name__ == "_WholeBackward"
    with torch.no_grad():
        y1 = lara_attention(q, k, v, **opts)
    y2 = lara_attention(q.detach(), k, v, **opts)
    assert y1.grad_fn is None and y2.grad_fn is None
    assert torch.equal(y1, y.detach()) and torch.equal(y2, y.detach())


def test_gradcheck_and_gradgradcheck():
    # float64, tiny: first order through lara_bwd, second order through the pipeline fallback
    B, H, N, M, D, Dv, C = 2, 2, 5, 6, 3, 2, 3
    leaves, _ = _padded_case(B, H, H, N, M, D, Dv, C, seed=23, landmarks=True)
    kpm = torch.zeros(B, M, dtype=torch.bool)
    kpm[1, -2:] = True
    for proposal, given in (("mixed", 2), ("attend", 1)):
        xs = [x.clone().requires_grad_() for x in leaves[:3 + given]]
        call = _lara(dict(num_samples=C, proposal=proposal, key_padding_mask=kpm), given)

        def f(*args):
            return call(*args, generator=None)

        assert type(f(*xs).grad_fn).__name__ == "_WholeBackward"
        assert torch.autograd.gradcheck(f, xs)
        assert torch.autograd.gradgradcheck(f, xs)


def test_double_backward_equals_the_pipeline():
    B, H, N, M, D, Dv, C = 1, 2, 7, 8, 4, 3, 3
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=24)

    def second(whole):
        old = _whole.ENABLED
        _whole.ENABLED = whole
        try:
            xs = [x.clone().requires_grad_() for x in leaves]
            y = lara_attention(*xs, num_samples=C, proposal="mixed", backend="cpu")
            gq, = torch.autograd.grad(y, xs[0], dy, create_graph=True)
            return torch.autograd.grad(gq.pow(2).sum(), xs)
        finally:
            _whole.ENABLED = old

    for a, b in zip(second(True), second(False)):
        assert rel_rms(a, b) <= 1e-12


def test_transforms_and_forward_ad_take_the_pipeline():
    B, H, N, M, D, C = 1, 2, 6, 7, 4, 3
    leaves, dy = _padded_case(B, H, H, N, M, D, D, C, seed=25)
    q, k, v = leaves
    with torch.autograd.forward_ad.dual_level():
        assert not _whole.applies(q)
    assert _whole.applies(q)

    def loss(q_):
        return (lara_attention(q_, k, v, num_samples=C, backend="cpu") * dy).sum()

    gq = torch.func.grad(loss)(q)
    q1 = q.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(q1), q1)
    assert rel_rms(gq, want) <= 1e-12
    y, t = torch.func.jvp(lambda q_: lara_attention(q_, k, v, num_samples=C, backend="cpu"), (q,), (dy[..., :D],))
    assert torch.isfinite(t).all()


def test_whole_op_path_by_device(monkeypatch):
    # the cpu and cuda backends take the whole op where it is built for the tensors' device:
    # CPU tensors with _C, CUDA tensors with _C built with CUDA (csrc/cuda/fused_cuda.cpp);
    # other devices, and the states listed in _whole's doc, keep the pipeline
    class On:   # a stand-in with only a device (no CUDA tensor can be made here)
        def __init__(self, dev):
            self.device = torch.device(dev)

    assert _whole.applies(On("cpu")) is _ops.built()
    assert _whole.applies(On("cuda")) is _ops.built_with_cuda()
    assert not _whole.applies(On("meta"))
    monkeypatch.setattr(_whole, "ENABLED", False)
    assert not _whole.applies(On("cpu")) and not _whole.applies(On("cuda"))
    monkeypatch.setattr(_whole, "ENABLED", True)

    q = torch.randn(1, 1, 4, 4)
    calls = []
    real = _whole.lara
    monkeypatch.setattr(_whole, "lara", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for name in ("cpu", "cuda"):   # the cuda backend inherits CpuBackend.lara
        y = dispatch.backends()[name].lara(q, q, q, None, num_samples=2, proposal="segment", weighting="optimal",
                                           beta=1.0, scale=0.5)
        assert y.shape == (1, 1, 4, 4)
    assert calls == [1, 1]


def test_opcheck_schema_and_fakes():
    B, H, N, M, D, Dv, C = 2, 2, 9, 7, 4, 3, 3
    leaves, dy = _padded_case(B, H, H, N, M, D, Dv, C, seed=26, landmarks=True)
    q, k, v, ql, kl = (x.float() for x in leaves)
    dy = dy.float()
    kpm = padding_mask(B, M, seed=27)
    ops = torch.ops.lara_kernels
    _ops._C._set_poison_outputs(False)    # opcheck compares runs; NaN != NaN is not the point here
    utils = ("test_schema", "test_faketensor")
    for proposal, weighting, lm in ((0, 0, (ql, kl)), (1, 1, (None, None)), (2, 0, (ql, None))):
        args = (q, k, v, None, *lm, None, kpm, C, proposal, weighting, 1.0, math.sqrt(D ** -0.5))
        torch.library.opcheck(ops.lara_fwd.default, args, test_utils=utils)
        _, state = ops.lara_fwd(*args)
        torch.library.opcheck(ops.lara_bwd.default, (dy, q, k, v, state, *args[4:]), test_utils=utils)


def test_op_argument_errors():
    q = torch.randn(1, 2, 5, 4)
    ops = torch.ops.lara_kernels
    with pytest.raises(RuntimeError, match="proposal must be"):
        ops.lara_fwd(q, q, q, None, None, None, None, None, 3, 7, 0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="key/value heads"):
        ops.lara_fwd(q, q[:, :1].expand(1, 3, 5, 4), q[:, :1].expand(1, 3, 5, 4), None, None, None, None, None,
                     3, 0, 0, 1.0, 0.5)
    _, state = ops.lara_fwd(q, q, q, None, None, None, None, None, 3, 0, 0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="state must be"):
        ops.lara_bwd(q, q, q, q, state[1:], None, None, None, None, 3, 0, 0, 1.0, 0.5)
    # dy: of y's shape (the passes would read past a smaller one), q's dtype or the compute type
    with pytest.raises(RuntimeError, match=r"dy must have shape \[1, 2, 5, 4\], got \[1, 2, 4, 4\]"):
        ops.lara_bwd(q[:, :, :4], q, q, q, state, None, None, None, None, 3, 0, 0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="dy must be Float or Float, got Long"):
        ops.lara_bwd(q.long(), q, q, q, state, None, None, None, None, 3, 0, 0, 1.0, 0.5)
