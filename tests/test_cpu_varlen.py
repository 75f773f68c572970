"""The packed (varlen) layout of the compiled CPU ops (csrc/cpu): each op called through
torch.ops.lara_kernels on (T, H, D) rows with cu_seqlens, against the same op in the
padded layout on each sequence alone (x[cu[b]:cu[b+1]].transpose(0, 1)[None], a batch of
one) and against the float64 eager passes of lara_kernels/_passes_torch.py (padded,
batch of one), forward and backward, with every output and scratch buffer starting as NaN
(the library's test mode), so a row the packed kernels forget to write fails.

Cases: lengths 1, lengths that are multiples of no tile (128) or chunk (512) nor of C, a
sequence over a chunk boundary (700 rows), C larger than a sequence (c_eff < C), empty
sequences first / in the middle / last, a sequence with queries but no keys (c_eff = 0:
Z = -inf, kap = 0, dw = 0; y = 0, dq = 0, no NaN), non-contiguous (T, H, D) views, all
four dtypes, with and without values, subtract_norm both ways, MIS term on and off, and
key passes of many rows (grouped-query attention: w of G * C rows per key/value head,
256 and 512 rows).

Tolerances (relative RMS), those of tests/test_cpu_backend.py and tests/test_cpu_ops.py:
- against the float64 eager passes: float64 1e-10, float32 2e-5; float16 / bfloat16 at
  most 3 times the error of the eager pass run in the same dtype, plus 1e-5 (both compute
  in float32 and round the long outputs once); landmarks as in test_cpu_ops.py.
- against the padded op on the sequence alone: the same bounds (the packed op does the
  same arithmetic; only BLAS's blocking may differ with the operands' alignment).
"""

from __future__ import annotations

import pytest
import torch

from helpers import rel_rms
from lara_kernels import _ops, _passes_torch
from lara_kernels.reference import segment_means

pytestmark = pytest.mark.skipif(not _ops.built(), reason=f"lara_kernels._C is not built ({_ops.C_ERROR})")

ops = torch.ops.lara_kernels
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
HALF_K, HALF_FLOOR = 3.0, 1e-5
LM_TOL = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}

# lengths of the sequences of a packed batch (self-attention: queries = keys)
LENGTHS = {
    "ones": [1, 1],
    "mixed": [1, 37, 300, 130],
    "empty-first-middle-last": [0, 45, 0, 700, 3, 0],
}


@pytest.fixture(autouse=True)
def poison():
    """Every buffer the compiled ops allocate starts as NaN (the library's test mode)."""
    _ops._C._set_poison_outputs(True)
    yield
    _ops._C._set_poison_outputs(False)


def ct_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def offsets(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu, max(lengths)


def packed(T, H, D, dtype, g, strided=False):
    """(T, H, D) rows; strided: a view with head stride T * 2D and column stride 2."""
    if strided:
        return torch.randn(H, T, 2 * D, generator=g, dtype=torch.float64).to(dtype).transpose(0, 1)[..., ::2]
    return torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dtype)


def seq(x, cu, b):
    """Sequence b of packed rows as a padded batch of one, (1, H, L_b, D)."""
    return x[int(cu[b]):int(cu[b + 1])].transpose(0, 1)[None]


def rows(x, cu, b):
    return x[int(cu[b]):int(cu[b + 1])]


def check_close(out, ref, dtype, what, ref_same_dtype=None):
    """out against the float64 ref: TOL[dtype], or for float16/bfloat16 HALF_K times the
    error of the eager run in that dtype (ref_same_dtype) plus HALF_FLOOR."""
    err = rel_rms(out, ref)
    if dtype in TOL:
        tol = TOL[dtype]
    else:
        tol = HALF_K * (rel_rms(ref_same_dtype, ref) if ref_same_dtype is not None else 0.0) + HALF_FLOOR
    assert err <= tol, f"{what}: {err:.3g} > {tol:.3g}"


def finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


# ----------------------------------------------------------------------------- landmarks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("case", list(LENGTHS) + ["c-eff-0"])
def test_landmarks_packed(dtype, strided, case):
    lengths = LENGTHS.get(case, [5, 9, 0, 12])
    cu, maxlen = offsets(lengths)
    B, H, D, C = len(lengths), 2, 12, 7
    g = torch.Generator().manual_seed(sum(lengths) + C)
    x = packed(int(cu[-1]), H, D, dtype, g, strided)
    c_eff = torch.tensor([min(C, n) for n in lengths], dtype=torch.long)
    if case == "c-eff-0":
        c_eff[1] = 0                       # a sequence with rows but nothing to attend
    out = ops.landmarks(x, None, c_eff, C, cu, maxlen)
    assert out.shape == (B, H, C, D) and out.dtype == ct_of(dtype)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gx = ops.landmarks_backward(grad, None, c_eff, int(cu[-1]), dtype, cu, maxlen)
    assert gx.shape == (int(cu[-1]), H, D) and gx.dtype == dtype
    assert finite(out, gx)
    for b in range(B):
        ce = int(c_eff[b])
        assert (out[b, :, ce:] == 0).all()
        if ce == 0:
            assert (rows(gx, cu, b) == 0).all()
            continue
        xb = seq(x, cu, b)
        same = ops.landmarks(xb, None, c_eff[b:b + 1], C)
        assert rel_rms(out[b:b + 1], same) <= LM_TOL[dtype]
        x64 = xb.detach().double().requires_grad_()
        valid = torch.ones(1, xb.shape[2], dtype=torch.bool)
        ref = segment_means(x64, valid, C, c_eff[b:b + 1])
        assert rel_rms(out[b:b + 1], ref) <= LM_TOL[dtype]
        ref.backward(grad[b:b + 1].double())
        gsame = ops.landmarks_backward(grad[b:b + 1].contiguous(), None, c_eff[b:b + 1], xb.shape[2], dtype)
        gtol = max(LM_TOL[dtype], 4e-3 if dtype in (torch.float16, torch.bfloat16) else 0)
        assert rel_rms(seq(gx, cu, b), gsame) <= gtol
        assert rel_rms(seq(gx, cu, b), x64.grad) <= gtol


# ----------------------------------------------------------------------------- key pass


def key_case(lengths, H, D, DV, C, dtype, with_v, strided, seed):
    cu, maxlen = offsets(lengths)
    B, T = len(lengths), int(cu[-1])
    g = torch.Generator().manual_seed(seed)
    k = packed(T, H, D, dtype, g, strided)
    v = packed(T, H, DV, dtype, g, strided) if with_v else None
    w = torch.randn(B, H, C, D, generator=g, dtype=torch.float64).to(ct_of(dtype))
    dZ = torch.randn(B, H, C, generator=g, dtype=torch.float64).to(ct_of(dtype))
    dkap = torch.randn(B, H, C, DV, generator=g, dtype=torch.float64).to(ct_of(dtype)) if with_v else None
    return cu, maxlen, k, v, w, dZ, dkap


def eager_key(w, k, v, ss, sub, dZ, dkap, dtype_run):
    """Z, kap and the gradients (w, k, v) of the eager key pass with inputs in dtype_run
    (w in its compute type), padded layout."""
    ct = ct_of(dtype_run)
    leaves = [w.detach().to(ct).requires_grad_(), k.detach().to(dtype_run).requires_grad_()]
    if v is not None:
        leaves.append(v.detach().to(dtype_run).requires_grad_())
    Z, kap = _passes_torch.key_pass(leaves[0], leaves[1], leaves[2] if v is not None else leaves[1][..., :1], None,
                                    ss, sub)
    loss = (Z * dZ.to(ct)).sum()
    if v is not None:
        loss = loss + (kap * dkap.to(ct)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return Z.detach(), (kap.detach() if v is not None else None), grads


def check_key_pass(lengths, H, D, DV, C, dtype, with_v, sub, strided, seed):
    cu, maxlen, k, v, w, dZ, dkap = key_case(lengths, H, D, DV, C, dtype, with_v, strided, seed)
    ss = D ** -0.25
    Z, kap = ops.key_pass_fwd(w, k, v, None, ss, sub, cu, maxlen)
    assert Z.shape == (len(lengths), H, C) and kap.shape == (len(lengths), H, C, DV if with_v else 0)
    dw, dk, dv = ops.key_pass_bwd(w, k, v, None, ss, sub, Z, kap if with_v else None, dZ, dkap, cu, maxlen)
    assert dw.shape == w.shape and dk.shape == k.shape and dk.dtype == dtype
    assert finite(kap, dw, dk) and (not with_v or (dv.shape == v.shape and dv.dtype == dtype and finite(dv)))
    for b in range(len(lengths)):
        if lengths[b] == 0:      # no key: Z = -inf, kap = 0, dw = 0
            assert (Z[b] == float("-inf")).all() and (kap[b] == 0).all() and (dw[b] == 0).all()
            continue
        kb, vb = seq(k, cu, b), (seq(v, cu, b) if with_v else None)
        wb, dZb, dkapb = w[b:b + 1], dZ[b:b + 1], (dkap[b:b + 1] if with_v else None)
        # the same op in the padded layout on the sequence alone
        Zs, kaps = ops.key_pass_fwd(wb, kb, vb, None, ss, sub)
        dws, dks, dvs = ops.key_pass_bwd(wb, kb, vb, None, ss, sub, Zs, kaps if with_v else None, dZb, dkapb)
        tol = TOL.get(dtype, TOL[torch.float32])
        assert rel_rms(Z[b:b + 1], Zs) <= tol and rel_rms(dw[b:b + 1], dws) <= tol
        assert rel_rms(seq(dk, cu, b), dks) <= tol
        if with_v:
            assert rel_rms(kap[b:b + 1], kaps) <= tol and rel_rms(seq(dv, cu, b), dvs) <= tol
        # the float64 eager pass (and, for half inputs, the eager pass in their dtype)
        Zr, kapr, gr = eager_key(wb, kb, vb, ss, sub, dZb, dkapb, torch.float64)
        Zh, kaph, gh = eager_key(wb, kb, vb, ss, sub, dZb, dkapb, dtype) if dtype not in TOL else (None, None, None)
        check_close(Z[b:b + 1], Zr, dtype, f"Z[{b}]", Zh)
        check_close(dw[b:b + 1], gr[0], dtype, f"dw[{b}]", gh and gh[0])
        check_close(seq(dk, cu, b), gr[1], dtype, f"dk of {b}", gh and gh[1])
        if with_v:
            check_close(kap[b:b + 1], kapr, dtype, f"kap[{b}]", kaph)
            check_close(seq(dv, cu, b), gr[2], dtype, f"dv of {b}", gh and gh[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("with_v,sub", [(True, True), (True, False), (False, False)],
                         ids=["key-pass", "attend", "normalizer"])
def test_key_pass_packed(dtype, case, with_v, sub):
    check_key_pass(LENGTHS[case], 2, 24, 10, 9, dtype, with_v, sub, strided=case == "mixed", seed=len(case))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [256, 512], ids=["G4xC64", "G8xC64"])
def test_key_pass_packed_gqa_rows(dtype, rows):
    # grouped-query attention: the G query heads' C = 64 samples as G * 64 rows of w
    check_key_pass([0, 200, 77, 600], 2, 16, 8, rows, dtype, True, True, strided=True, seed=rows)


# ----------------------------------------------------------------------------- query pass


def query_case(q_lengths, k_lengths, H, D, DV, C, dtype, strided, seed):
    cu, maxlen = offsets(q_lengths)
    B, T = len(q_lengths), int(cu[-1])
    ct = ct_of(dtype)
    g = torch.Generator().manual_seed(seed)
    q = packed(T, H, D, dtype, g, strided)
    dy = packed(T, H, DV, dtype, g, strided)

    def small(*shape):
        return torch.randn(B, H, *shape, generator=g, dtype=torch.float64)

    w, qt = small(C, D).to(ct), (0.3 * small(C, D)).to(ct)
    bias, bh, kap = small(C).to(ct), small(C).abs().to(ct), small(C, DV).to(ct)
    c_eff = torch.tensor([min(C, n, m) for n, m in zip(q_lengths, k_lengths)], dtype=torch.long)
    ss = D ** -0.25
    # Lam of each sequence from the eager normalizer (0 where the sequence has no query)
    lam = torch.zeros(B, H, C, dtype=ct)
    for b in range(B):
        if q_lengths[b]:
            lam[b] = _passes_torch.query_normalizer(qt[b:b + 1].double(), seq(q, cu, b).double(), None, ss)[0].to(ct)
    return cu, maxlen, q, dy, w, qt, bias, bh, kap, lam, c_eff, ss


NAMES = ["dq", "dw", "dbias", "dkap", "dqt", "dlam", "dbh"]


def eager_query(q, w, bias, kap, c_eff, ss, mis_args, beta, dy, dtype_run):
    ct = ct_of(dtype_run)
    leaves = [q.detach().to(dtype_run)] + [t.detach().to(ct) for t in (w, bias, kap, *mis_args)]
    leaves = [t.requires_grad_() for t in leaves]
    mis = (*leaves[4:], beta) if mis_args else None
    y = _passes_torch.query_pass(*leaves[:4], c_eff, None, ss, mis)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype_run))
    return y.detach(), grads


def check_query_pass(q_lengths, k_lengths, H, D, DV, C, dtype, mis, strided, seed, beta=1.5):
    cu, maxlen, q, dy, w, qt, bias, bh, kap, lam, c_eff, ss = query_case(q_lengths, k_lengths, H, D, DV, C, dtype,
                                                                          strided, seed)
    mis_args = (qt, lam, bh) if mis else (None, None, None)
    y = ops.query_pass_fwd(q, w, bias, kap, c_eff, None, ss, *mis_args, beta, cu, maxlen)
    assert y.shape == (q.shape[0], H, DV) and y.dtype == dtype
    out = ops.query_pass_bwd(q, w, bias, kap, c_eff, None, ss, *mis_args, beta, dy, cu, maxlen)
    assert out[0].shape == q.shape and out[0].dtype == dtype
    if not mis:
        assert all(t.numel() == 0 for t in out[4:])
    assert finite(y, *out)
    n = 7 if mis else 4
    for b in range(len(q_lengths)):
        if int(c_eff[b]) == 0:    # no active sample (no key, or no query): y = 0, dq = 0, no contribution
            assert (rows(y, cu, b) == 0).all() and (rows(out[0], cu, b) == 0).all()
            assert all((t[b] == 0).all() for t in out[1:n])
            continue
        qb, dyb = seq(q, cu, b), seq(dy, cu, b)
        small = [t[b:b + 1] for t in (w, bias, kap)]
        mis_b = tuple(t[b:b + 1] for t in (qt, lam, bh)) if mis else (None, None, None)
        ys = ops.query_pass_fwd(qb, *small, c_eff[b:b + 1], None, ss, *mis_b, beta)
        outs = ops.query_pass_bwd(qb, *small, c_eff[b:b + 1], None, ss, *mis_b, beta, dyb)
        tol = TOL.get(dtype, TOL[torch.float32])
        assert rel_rms(seq(y, cu, b), ys) <= tol
        got = [seq(out[0], cu, b)] + [t[b:b + 1] for t in out[1:n]]
        for name, a, s in zip(NAMES, got, outs):
            assert rel_rms(a, s) <= tol, (name, b, rel_rms(a, s))
        mis_l = mis_b if mis else ()
        yr, gr = eager_query(qb, *small, c_eff[b:b + 1], ss, mis_l, beta, dyb, torch.float64)
        yh, gh = eager_query(qb, *small, c_eff[b:b + 1], ss, mis_l, beta, dyb, dtype) if dtype not in TOL else (None,
                                                                                                           None)
        check_close(seq(y, cu, b), yr, dtype, f"y of {b}", yh)
        for i, (name, a) in enumerate(zip(NAMES, got)):
            check_close(a, gr[i], dtype, f"{name} of {b}", gh and gh[i])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("mis", [False, True], ids=["balance", "mis"])
def test_query_pass_packed(dtype, case, mis):
    lengths = LENGTHS[case]
    check_query_pass(lengths, lengths, 2, 20, 12, 9, dtype, mis, strided=case != "mixed", seed=len(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mis", [False, True], ids=["balance", "mis"])
def test_query_pass_packed_sequence_without_keys(dtype, mis):
    # cross attention: sequence 0 has queries and no key (c_eff = 0), 2 has keys and no query,
    # 3 fewer keys than samples
    q_lengths, k_lengths = [6, 140, 0, 33], [0, 50, 12, 4]
    check_query_pass(q_lengths, k_lengths, 3, 16, 8, 6, dtype, mis, strided=True, seed=11)
    # the key pass of the same batch: the sequence without keys gives Z = -inf, kap = 0, dw = 0
    check_key_pass(k_lengths, 3, 16, 8, 6, dtype, True, True, strided=True, seed=12)


def test_query_pass_c_eff_zero_ignores_its_c_sized_inputs():
    # c_eff[b] = 0: nothing of b's C-sized inputs is read (they may hold inf / NaN)
    cu, maxlen, q, dy, w, qt, bias, bh, kap, lam, c_eff, ss = query_case([5, 7], [0, 7], 2, 8, 4, 3,
                                                                          torch.float32, False, 5)
    for t in (w, bias, kap, qt, lam, bh):
        t[0] = float("nan")
    bias[0, :, 1] = float("-inf")
    y = ops.query_pass_fwd(q, w, bias, kap, c_eff, None, ss, qt, lam, bh, 1.0, cu, maxlen)
    out = ops.query_pass_bwd(q, w, bias, kap, c_eff, None, ss, qt, lam, bh, 1.0, dy, cu, maxlen)
    assert (y[:5] == 0).all() and (out[0][:5] == 0).all() and finite(y, *(t[1] for t in out[1:]))
    assert all((t[0] == 0).all() for t in out[1:])


# ----------------------------------------------------------------------------- argument errors


def _op_calls(cu, pad=None):
    """Each op on a small packed batch of 2 sequences (T = 5), with the given offsets."""
    x, w = torch.randn(5, 2, 4), torch.randn(2, 2, 3, 4)
    Z, kap, c_eff = torch.randn(2, 2, 3), torch.randn(2, 2, 3, 4), torch.tensor([2, 3])
    return {
        "landmarks": lambda: ops.landmarks(x, pad, c_eff, 3, cu, 3),
        "landmarks_backward": lambda: ops.landmarks_backward(w, pad, c_eff, 5, torch.float32, cu, 3),
        "key_pass_fwd": lambda: ops.key_pass_fwd(w, x, x, pad, 1.0, True, cu, 3),
        "key_pass_bwd": lambda: ops.key_pass_bwd(w, x, x, pad, 1.0, True, Z, kap, Z, kap, cu, 3),
        "query_pass_fwd": lambda: ops.query_pass_fwd(x, w, Z, kap, c_eff, pad, 1.0, None, None, None, 0.0, cu, 3),
        "query_pass_bwd": lambda: ops.query_pass_bwd(x, w, Z, kap, c_eff, pad, 1.0, None, None, None, 0.0, x, cu, 3),
    }


OP_NAMES = list(_op_calls(None))


@pytest.mark.parametrize("op", OP_NAMES)
def test_ops_run_packed_then_name_bad_cu_seqlens(op):
    good = torch.tensor([0, 2, 5], dtype=torch.int32)
    _op_calls(good)[op]()         # the well-formed call runs
    bad = [
        (good.long(), r"cu_seqlens must be int32, got Long"),
        (good[None], r"cu_seqlens must be 1-D of size B \+ 1 >= 1, got shape \[1, 3\]"),
        (torch.zeros(0, dtype=torch.int32), r"cu_seqlens must be 1-D of size B \+ 1 >= 1, got shape \[0\]"),
        (torch.tensor([0, 2, 5, 9, 9, 9], dtype=torch.int32)[::2], r"cu_seqlens must be contiguous"),
        (torch.tensor([0, 3, 2], dtype=torch.int32), r"cu_seqlens must be non-decreasing"),
        (torch.tensor([1, 2, 5], dtype=torch.int32), r"cu_seqlens\[0\] must be 0, got 1"),
        (torch.tensor([0, 2, 4], dtype=torch.int32), r"cu_seqlens\[2\] = 4 must be the number of rows T = 5"),
    ]
    for cu, msg in bad:
        with pytest.raises(RuntimeError, match=rf"lara_kernels::{op}.*{msg}"):
            _op_calls(cu)[op]()
    with pytest.raises(RuntimeError, match=rf"lara_kernels::{op}: padding must be none with cu_seqlens"):
        _op_calls(good, pad=torch.zeros(2, 5, dtype=torch.bool))[op]()


def test_landmarks_packed_names_c_eff_beyond_a_sequence():
    x, cu = torch.randn(5, 2, 4), torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"c_eff\[0\] = 3 must lie in \[0, min\(num_segments=3, length of "
                                           r"sequence 0=2\)\]"):
        ops.landmarks(x, None, torch.tensor([3, 3]), 3, cu, 3)
