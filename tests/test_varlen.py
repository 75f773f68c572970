"""Packed variable-length batches and grouped-query attention (issue 16), through the public
functions, on every backend that runs here (reference, cpu, triton under the interpreter).

The defining properties:
- ``lara_attention_varlen`` / ``rfa_attention_varlen``: the rows of sequence b equal the
  padded function on that sequence alone (with the b-th slice of eps, features and
  landmarks), forward and every gradient; a sequence with queries and no keys gives 0.
- ``enable_gqa=True``: equals the call with k and v repeated to H heads
  (``repeat_interleave`` over heads, as SDPA defines it); dk, dv are the repeat's
  gradients, i.e. summed over each group of query heads.

Tolerances. float64 backends (reference, cpu): 1e-10 absolute on values of size ~1: the
same formulas in a different order (packed vs per-sequence tiles, grouped vs repeated key
rows) differ by a few float64 roundoffs (measured below 1e-13). Triton runs float32 (its
float64 is not supported): relative RMS error against the float64 oracle at most
``FP32_TOL`` = 2e-5, the bound of tests/test_triton.py, for the reasons given there.
The fused outputs are NaN-poisoned (every buffer a kernel writes starts as NaN), so a row a
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import poisoned_empty, rel_rms
from lara_kernels import api, dispatch, lara_attention, lara_attention_varlen, rfa_attention, rfa_attention_varlen
from lara_kernels import _ops

FP32_TOL = 2e-5
F64_TOL = 1e-10

# (query lengths, key lengths): length 1, lengths not multiples of any tile or of C, C
# (6) larger than a sequence, an empty sequence first / in the middle / last, a sequence
# with queries and no keys (output 0), one with keys and no queries.
LENGTHS = {
    "mixed": ([5, 1, 0, 17, 3, 9], [7, 1, 4, 12, 3, 0]),
    "empty_ends": ([0, 4, 11, 0], [0, 9, 6, 2]),
    "one_long": ([40], [33]),
}


def _backends():
    out = ["reference"]
    if _ops.built():
        out.append("cpu")
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401

            out.append("triton")
        except ImportError:
            pass
    return out


BACKENDS = _backends()


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the fused kernels write starts as NaN (C++ ops: their test mode; Triton:
    its allocation helper)."""
    if _ops.built():
        _ops._C._set_poison_outputs(True)
    try:
        from lara_kernels.triton_kernels import _common

        monkeypatch.setattr(_common, "empty", poisoned_empty)
    except ImportError:
        pass
    yield
    if _ops.built():
        _ops._C._set_poison_outputs(False)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _packed_case(lens_q, lens_k, H=4, Hkv=4, D=16, Dv=8, seed=0, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, generator=g, dtype=torch.float64) * gain
    k = torch.randn(sum(lens_k), Hkv, D, generator=g, dtype=torch.float64) * gain
    v = torch.randn(sum(lens_k), Hkv, Dv, generator=g, dtype=torch.float64)
    dy = torch.randn(sum(lens_q), H, Dv, generator=g, dtype=torch.float64)
    return q, k, v, dy, _offsets(lens_q), _offsets(lens_k)


def _one(x, lo, hi):
    """Rows lo..hi-1 of a packed (T, H, D) tensor as a padded batch of one (1, H, L, D)."""
    return x[lo:hi].transpose(0, 1)[None]


def _grads(y, leaves, dy):
    return torch.autograd.grad(y, leaves, dy.to(y.dtype), allow_unused=True)


def _close(backend, got, want, what):
    if got is None or want is None:
        assert got is None and want is None, what
        return
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if got.dtype == torch.float64:
        err = (got - want.to(got.dtype)).abs().max().item() if got.numel() else 0.0
        assert err <= F64_TOL, f"{what}: max abs error {err:.3g} > {F64_TOL}"
    else:
        err = rel_rms(got, want)
        assert err <= FP32_TOL, f"{what}: relative RMS error {err:.3g} > {FP32_TOL}"


# ----------------------------------------------------------------------------- varlen == per sequence


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("proposal,weighting", [("segment", "optimal"), ("mixed", "balance"), ("attend", "optimal")])
def test_lara_varlen_equals_each_sequence_alone(backend, lengths, proposal, weighting):
    lens_q, lens_k = LENGTHS[lengths]
    q, k, v, dy, cu_q, cu_k = _packed_case(lens_q, lens_k, seed=len(lens_q))
    dt = _dtype(backend)
    B, C = len(lens_q), 6
    eps = torch.randn(B, 4, C, 16, generator=torch.Generator().manual_seed(5))
    opts = dict(num_samples=C, proposal=proposal, weighting=weighting, beta=1.5)

    leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
    y = api.run_lara(*leaves, eps, backend, scale=0.3, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                     max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), q_landmarks=None, k_landmarks=None, **opts)
    assert y.shape == (sum(lens_q), 4, 8) and y.dtype == dt
    grads = _grads(y, leaves, dy)

    # the oracle: each sequence alone, padded layout, float64
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    rows = []
    for b in range(B):
        n, m = lens_q[b], lens_k[b]
        if n == 0:
            continue
        if m == 0:
            rows.append(torch.zeros(n, 4, 8, dtype=torch.float64))
            continue
        sq, sk = sum(lens_q[:b]), sum(lens_k[:b])
        yb = api.run_lara(_one(ref_leaves[0], sq, sq + n), _one(ref_leaves[1], sk, sk + m),
                          _one(ref_leaves[2], sk, sk + m), eps[b:b + 1], "reference", scale=0.3, q_landmarks=None,
                          k_landmarks=None, **opts)
        rows.append(yb[0].transpose(0, 1))
    y_ref = torch.cat(rows)
    ref_grads = _grads(y_ref, ref_leaves, dy)
    _close(backend, y, y_ref, "y")
    for name, g, r in zip("qkv", grads, ref_grads):
        _close(backend, g, r, f"d{name}")
    # rows of a sequence with queries and no keys are exactly 0
    for b in range(B):
        if lens_q[b] and not lens_k[b]:
            s = sum(lens_q[:b])
            assert (y[s:s + lens_q[b]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lara_varlen_public_function_matches_padded_calls(backend):
    """The public function in evaluation mode (deterministic) against ``lara_attention`` on
    each sequence, the same backend, and with given landmarks (the b-th slice each)."""
    lens_q, lens_k = [3, 12, 7], [9, 5, 7]
    q, k, v, dy, cu_q, cu_k = _packed_case(lens_q, lens_k, seed=11)
    dt = _dtype(backend)
    g = torch.Generator().manual_seed(3)
    qlm, klm = torch.randn(3, 4, 4, 16, generator=g, dtype=dt), torch.randn(3, 4, 4, 16, generator=g, dtype=dt)
    q, k, v = (t.to(dt) for t in (q, k, v))
    y = lara_attention_varlen(q, k, v, cu_q, cu_k, num_samples=4, q_landmarks=qlm, k_landmarks=klm, backend=backend)
    for b in range(3):
        sq, sk = sum(lens_q[:b]), sum(lens_k[:b])
        yb = lara_attention(_one(q, sq, sq + lens_q[b]), _one(k, sk, sk + lens_k[b]), _one(v, sk, sk + lens_k[b]),
                            num_samples=4, q_landmarks=qlm[b:b + 1], k_landmarks=klm[b:b + 1], backend=backend)
        _close(backend, y[sq:sq + lens_q[b]], yb[0].transpose(0, 1), f"sequence {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lara_varlen_training_draw_matches_reference(backend):
    """training=True: eps (B, H, C, D) drawn once from the generator; every backend on the
    same generator state computes the oracle's result."""
    lens_q, lens_k = [6, 0, 9], [4, 5, 11]
    q, k, v, dy, cu_q, cu_k = _packed_case(lens_q, lens_k, seed=21)
    dt = _dtype(backend)
    outs = []
    for bk, d in ((backend, dt), ("reference", torch.float64)):
        gen = torch.Generator().manual_seed(77)
        leaves = [t.to(d).requires_grad_() for t in (q, k, v)]
        y = lara_attention_varlen(*leaves, cu_q, cu_k, 9, 11, num_samples=5, training=True, generator=gen, backend=bk)
        outs.append((y, _grads(y, leaves, dy)))
    (y, grads), (y_ref, ref_grads) = outs
    _close(backend, y, y_ref, "y")
    for name, a, b in zip("qkv", grads, ref_grads):
        _close(backend, a, b, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rfa_varlen_equals_each_sequence_alone(backend):
    lens_q, lens_k = LENGTHS["mixed"]
    q, k, v, dy, cu_q, cu_k = _packed_case(lens_q, lens_k, seed=31)
    dt = _dtype(backend)
    B, S = len(lens_q), 7
    w = torch.randn(B, 4, S, 16, generator=torch.Generator().manual_seed(2))
    leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
    y = api.run_rfa(*leaves, w, backend, scale=0.25, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                    max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    grads = _grads(y, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    rows = []
    for b in range(B):
        n, m = lens_q[b], lens_k[b]
        sq, sk = sum(lens_q[:b]), sum(lens_k[:b])
        if n and not m:
            rows.append(torch.zeros(n, 4, 8, dtype=torch.float64))
        elif n:
            yb = api.run_rfa(_one(ref_leaves[0], sq, sq + n), _one(ref_leaves[1], sk, sk + m),
                             _one(ref_leaves[2], sk, sk + m), w[b:b + 1], "reference", scale=0.25)
            rows.append(yb[0].transpose(0, 1))
    y_ref = torch.cat(rows)
    _close(backend, y, y_ref, "y")
    for name, a, b in zip("qkv", grads, _grads(y_ref, ref_leaves, dy)):
        _close(backend, a, b, f"d{name}")


# ----------------------------------------------------------------------------- grouped-query attention


def _repeat(x, G, dim):
    return x.repeat_interleave(G, dim=dim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hkv", [1, 2, 4])
@pytest.mark.parametrize("fn", ["lara", "rfa"])
def test_gqa_equals_repeated_kv(backend, Hkv, fn):
    H, D, Dv = 4, 16, 8
    g = torch.Generator().manual_seed(Hkv)
    dt = _dtype(backend)
    q = torch.randn(2, H, 13, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, 10, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, 10, Dv, generator=g, dtype=torch.float64)
    dy = torch.randn(2, H, 13, Dv, generator=g, dtype=torch.float64)
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, 7:] = True
    qpm = torch.zeros(2, 13, dtype=torch.bool)
    qpm[1, 11:] = True
    call = lara_attention if fn == "lara" else rfa_attention
    opts = dict(num_samples=5, key_padding_mask=kpm, query_padding_mask=qpm)
    if fn == "lara":
        opts.update(proposal="mixed", training=True)

    leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
    y = call(*leaves, enable_gqa=True, backend=backend, generator=torch.Generator().manual_seed(9), **opts)
    grads = _grads(y, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    G = H // Hkv
    y_ref = call(ref_leaves[0], _repeat(ref_leaves[1], G, 1), _repeat(ref_leaves[2], G, 1), backend="reference",
                 generator=torch.Generator().manual_seed(9), **opts)
    ref_grads = _grads(y_ref, ref_leaves, dy)
    _close(backend, y, y_ref, "y")
    for name, a, b in zip("qkv", grads, ref_grads):
        _close(backend, a, b, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_with_varlen(backend, Hkv):
    lens_q, lens_k = LENGTHS["mixed"]
    q, k, v, dy, cu_q, cu_k = _packed_case(lens_q, lens_k, H=4, Hkv=Hkv, seed=41)
    dt = _dtype(backend)
    leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
    y = lara_attention_varlen(*leaves, cu_q, cu_k, num_samples=6, enable_gqa=True, backend=backend,
                              proposal="attend")
    grads = _grads(y, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    G = 4 // Hkv
    y_ref = lara_attention_varlen(ref_leaves[0], _repeat(ref_leaves[1], G, 1), _repeat(ref_leaves[2], G, 1),
                                  cu_q, cu_k, num_samples=6, backend="reference", proposal="attend")
    _close(backend, y, y_ref, "y")
    for name, a, b in zip("qkv", grads, _grads(y_ref, ref_leaves, dy)):
        _close(backend, a, b, f"d{name}")


def test_gqa_key_pass_reads_shared_kv_without_copies():
    """The pipeline hands the key pass the (B, H_kv, G*C, D) view of the samples and k, v
    as given: no (B, H, M, D) copy of k or v is made (the largest tensors)."""
    from lara_kernels import _passes_torch, _pipeline

    seen = []

    class Spy:
        landmarks = staticmethod(_passes_torch.landmarks)
        query_normalizer = staticmethod(_passes_torch.query_normalizer)
        query_pass = staticmethod(_passes_torch.query_pass)

        @staticmethod
        def key_pass(w, k, v, padding, ss, sn):
            seen.append((tuple(w.shape), k.data_ptr(), None if v is None else v.data_ptr(), tuple(k.shape)))
            return _passes_torch.key_pass(w, k, v, padding, ss, sn)

    q = torch.randn(2, 8, 9, 4, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 4, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 3, dtype=torch.float64)
    _pipeline.lara_forward(Spy, q, k, v, None, num_samples=3, proposal="attend", weighting="optimal", beta=1.0,
                           scale=0.5)
    assert seen == [((2, 2, 12, 4), k.data_ptr(), k.data_ptr(), (2, 2, 7, 4)),
                    ((2, 2, 12, 4), k.data_ptr(), v.data_ptr(), (2, 2, 7, 4))]


# ----------------------------------------------------------------------------- degenerate batches


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_degenerate_batches(backend):
    dt = _dtype(backend)
    H, D, Dv = 2, 4, 3
    # no query rows at all, and no sequences at all
    for cu_q, cu_k, Tq, Tk in (([0, 0, 0], [0, 3, 5], 0, 5), ([0], [0], 0, 0), ([0, 2, 5], [0, 0, 0], 5, 0)):
        q = torch.randn(Tq, H, D, dtype=dt, requires_grad=True)
        k = torch.randn(Tk, H, D, dtype=dt, requires_grad=True)
        v = torch.randn(Tk, H, Dv, dtype=dt, requires_grad=True)
        y = lara_attention_varlen(q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32),
                                  num_samples=4, backend=backend)
        assert y.shape == (Tq, H, Dv) and (y == 0).all()
        y.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and (t.grad == 0).all()


# ----------------------------------------------------------------------------- validation


def _valid_inputs(Hkv=2):
    q = torch.randn(9, 4, 8)
    k = torch.randn(7, Hkv, 8)
    v = torch.randn(7, Hkv, 5)
    return q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)


@pytest.mark.parametrize("change,exc,pattern", [
    (dict(cu_seqlens_q=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\] must be 0, got 1"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 4, 9], dtype=torch.int32)), ValueError, "has 3 sequences"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 4], dtype=torch.int32)), ValueError,
     r"non-decreasing, got cu_seqlens_k\[1\] = 5 > cu_seqlens_k\[2\] = 4"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] = 8 must equal the number of rows of q, 9"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 7.0])), TypeError, "int32 .* got torch.float32"),
    (dict(cu_seqlens_k=torch.tensor([[0, 3, 7]], dtype=torch.int32)), ValueError, r"1-D .* got shape \(1, 3\)"),
    (dict(cu_seqlens_k=[0, 3, 7]), TypeError, "got list"),
    (dict(max_seqlen_q=4), ValueError, r"max_seqlen_q=4 is less than the longest sequence of cu_seqlens_q, 5"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0, got -1"),
    (dict(max_seqlen_k=True), TypeError, "max_seqlen_k must be an int"),
    (dict(enable_gqa=False), ValueError, r"k has 2 heads .* but q has 4; .* enable_gqa=True"),
    (dict(k=torch.randn(7, 3, 8), v=torch.randn(7, 3, 5)), ValueError, "divide the query head count, got 3"),
    (dict(v=torch.randn(7, 1, 5)), ValueError, "v has 1 heads .* but k has 2"),
    (dict(q=torch.randn(1, 9, 4, 8)), ValueError, r"q must be 3-D \(total rows T, H, D\)"),
    (dict(v=torch.randn(6, 2, 5)), ValueError, "k has 7 keys .* but v has 6"),
])
def test_varlen_bad_input_names_value(change, exc, pattern):
    q, k, v, cu_q, cu_k = _valid_inputs()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, enable_gqa=True)
    args.update(change)
    with pytest.raises(exc, match=pattern):
        lara_attention_varlen(**args, backend="reference")
    with pytest.raises(exc, match=pattern):
        rfa_attention_varlen(**args, backend="reference")


def test_padded_gqa_errors_name_heads():
    q, k, v = torch.randn(1, 6, 5, 4), torch.randn(1, 4, 5, 4), torch.randn(1, 4, 5, 4)
    with pytest.raises(ValueError, match="k has 4 heads .* but q has 6; .* enable_gqa=True"):
        lara_attention(q, k, v)
    with pytest.raises(ValueError, match="got 4 key/value heads .* and 6 query heads"):
        lara_attention(q, k, v, enable_gqa=True)
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        rfa_attention(q, k[:, :2], v[:, :2], enable_gqa="yes")


def test_varlen_check_finite_and_inputs_unchanged():
    q, k, v, cu_q, cu_k = _valid_inputs()
    before = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    lara_attention_varlen(q, k, v, cu_q, cu_k, enable_gqa=True, check_finite=True)
    for a, b in zip(before, (q, k, v, cu_q, cu_k)):
        assert torch.equal(a, b)
    k[5, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"check_finite: k has 1 non-finite value \(first nan at index \(5, 1, 2\)\)"):
        lara_attention_varlen(q, k, v, cu_q, cu_k, enable_gqa=True, check_finite=True)


def test_int64_offsets_accepted():
    q, k, v, cu_q, cu_k = _valid_inputs()
    a = lara_attention_varlen(q, k, v, cu_q, cu_k, enable_gqa=True, backend="reference")
    b = lara_attention_varlen(q, k, v, cu_q.long(), cu_k.long(), enable_gqa=True, backend="reference")
    assert torch.equal(a, b)


def test_dispatch_judges_packed_samples_by_longest_sequence():
    """Capacity limits see min(num_samples, max_seqlen_q, max_seqlen_k), not the packed shape."""
    q = torch.randn(3000, 2, 8)
    cuda = dispatch.backends()["cuda"]
    reasons = cuda.capacity_reasons("lara", q, q, q, 1000, max_seqlen_q=300, max_seqlen_k=200)
    assert reasons == []
    reasons = cuda.capacity_reasons("lara", q, q, q, 1000, max_seqlen_q=3000, max_seqlen_k=3000)
    assert reasons == ["active samples min(num_samples, N, M) 1000 > 256"]


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("fn", ["lara", "rfa"])
def test_varlen_compiles_fullgraph_and_equals_eager(fn):
    """fullgraph=True (no graph break) with fixed max_seqlen, as flash-attention asks: one
    opaque op per call; the generator's draws equal eager's; offsets are still checked, by
    an op that raises when the graph runs."""
    q, k, v, cu_q, cu_k = _valid_inputs()
    backend = "cpu" if _ops.built() else "reference"

    def f(q, k, v, cu_q, cu_k, gen):
        if fn == "lara":
            return lara_attention_varlen(q, k, v, cu_q, cu_k, 5, 4, num_samples=3, enable_gqa=True, training=True,
                                         generator=gen, backend=backend)
        return rfa_attention_varlen(q, k, v, cu_q, cu_k, 5, 4, num_samples=3, enable_gqa=True, generator=gen,
                                    backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    outs = []
    for run in (f, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y = run(*leaves, cu_q, cu_k, torch.Generator().manual_seed(4))
        outs.append((y, torch.autograd.grad(y.sum(), leaves)))
    (y, grads), (yc, grads_c) = outs
    torch.testing.assert_close(yc, y, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] = 6 must equal the number of rows of k and v, 7"):
        compiled(q, k, v, cu_q, torch.tensor([0, 3, 6], dtype=torch.int32), None)


def test_varlen_under_compile_needs_max_seqlen():
    q, k, v, cu_q, cu_k = _valid_inputs()
    compiled = torch.compile(lambda q, k, v, a, b: lara_attention_varlen(q, k, v, a, b, enable_gqa=True),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="under torch.compile pass max_seqlen_q and max_seqlen_k"):
        compiled(q, k, v, cu_q, cu_k)


# ----------------------------------------------------------------------------- the rest of the autograd surface


def _small_packed():
    g = torch.Generator().manual_seed(8)
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6], dtype=torch.int32)      # sequence 1: no queries; 2: no keys
    q = torch.randn(7, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])    # Triton has no float64
@pytest.mark.parametrize("proposal", ["segment", "mixed", "attend"])
def test_varlen_gqa_gradgradcheck(backend, proposal):
    """Second derivatives (create_graph=True backward: the eager passes in the packed layout)."""
    q, k, v, cu_q, cu_k = _small_packed()

    def f(q, k, v):
        return lara_attention_varlen(q, k, v, cu_q, cu_k, num_samples=3, enable_gqa=True, backend=backend,
                                     proposal=proposal)

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_varlen_forward_ad_and_vmap():
    """Forward-mode AD (the eager passes carry tangents) equals the oracle's; torch.vmap over a
    packed batch is refused with a message that says what to do instead."""
    from torch.func import jvp, vmap

    q, k, v, cu_q, cu_k = (t.detach() if t.is_floating_point() else t for t in _small_packed())
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (q, k, v))
    outs = [jvp(lambda q, k, v, b=b: lara_attention_varlen(q, k, v, cu_q, cu_k, num_samples=3, enable_gqa=True,
                                                          backend=b), (q, k, v), tangents)[1]
            for b in [b for b in BACKENDS if b != "triton"]]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max() <= F64_TOL
    if _ops.built():
        def f(q, k, v):
            return lara_attention_varlen(q, k, v, cu_q, cu_k, num_samples=3, enable_gqa=True, backend="cpu")

        with pytest.raises(NotImplementedError, match="vmap over packed .* pack the vmapped ones into it"):
            vmap(f)(*(t[None].expand(2, *t.shape) for t in (q, k, v)))


def test_device_side_offset_checks():
    """Offsets on a GPU with both max_seqlen given are checked without synchronizing
    (torch._assert_async); the same predicate, run here on CPU tensors, raises at once."""
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    api.assert_offsets_async(cu_q, cu_k, 9, 7, 5, 4)
    for args in ((cu_q, cu_k, 9, 7, 4, 4),                                          # max_seqlen_q too small
                 (cu_q, torch.tensor([0, 5, 4], dtype=torch.int32), 9, 4, 5, 5),   # decreasing
                 (cu_q, cu_k, 8, 7, 5, 4)):                                          # last != rows
        with pytest.raises(RuntimeError, match="must start at 0, be non-decreasing and end at the row count"):
            api.assert_offsets_async(*args)


def test_pack_unpack_round_trip_and_attention_equals_masked_call():
    """``pack`` a padded batch (scattered padding), attend with the varlen function, ``unpack``:
    the valid rows equal ``lara_attention`` with ``padding_mask`` (the defining property of
    the masks), padded rows 0; gradients flow back through both helpers."""
    from lara_kernels import pack, unpack

    g = torch.Generator().manual_seed(6)
    B, L, H, D = 3, 11, 2, 8
    x = torch.randn(B, L, H, 3 * D, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.rand(B, L, generator=g) < 0.3
    pad[2] = True                                  # an element with no valid position
    packed, cu, max_seqlen, idx = pack(x, pad)
    assert packed.shape == (int((~pad).sum()), H, 3 * D) and max_seqlen == int((~pad).sum(-1).max())
    assert torch.equal(unpack(packed, idx, B, L), x.masked_fill(pad[..., None, None], 0.0))
    q, k, v = packed.split(D, dim=-1)
    y = unpack(lara_attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, num_samples=4, backend="reference"),
               idx, B, L)
    qp, kp, vp = (t.transpose(1, 2) for t in x.split(D, dim=-1))
    want = lara_attention(qp, kp, vp, num_samples=4, padding_mask=pad, backend="reference").transpose(1, 2)
    assert (y - want).abs().max() <= F64_TOL
    y.sum().backward()
    assert (x.grad[pad] == 0).all() and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(B, L\) = \(3, 11\), got \(3, 10\)"):
        pack(x, pad[:, :10])
