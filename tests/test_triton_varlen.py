"""The Triton kernels in the packed (varlen) layout, and the key pass with many rows (issue 16).

Packed layout (triton_kernels/_common.py, ``layout``): the long tensors are (T, H, D)
rows of B sequences back to back, sequence b is rows cu_seqlens[b] .. cu_seqlens[b+1]-1
(cu_seqlens (B + 1) int32), max_seqlen >= every length; the C-sized tensors stay
(B, H, C, ...). Each kernel-set function must compute, for every sequence, exactly what
the same function computes in the padded layout on that sequence alone
(``x[cu[b]:cu[b+1]].transpose(0, 1)[None]``, (1, H, L_b, D), no mask). The tests check it
three ways:

- bitwise against the padded call of the same kernels on each sequence, with one split
  of the long axis (``splits=1``): the block partition of a sequence is then the same in
  both layouts (blocks start at the sequence's first row), the packed program runs only
  the blocks that hold rows of its sequence, and the split combine gets the same single
  partial, so every output is the same float for float. Under the interpreter only (a GPU
  compiles the VARLEN specialization separately and may contract differently);
- with the launchers' own split counts and with small blocks and several splits, against
  the float64 eager passes (lara_kernels/_passes_torch.py, padded layout, batch of one)
  with the tolerances of tests/test_triton.py: FWD_TOL = GRAD_TOL = 2e-5 in float32, and
  for float16 / bfloat16 at most K_EMULATION times the error of the rounding emulation
  (tests/rounding.py, the same kernel set in torch, per sequence) + EMULATION_FLOOR.
  Errors are relative RMS over all sequences together (the reference concatenated);
- the contract's edge cases exactly: a sequence without keys gives Z = -inf, kap = 0,
  dw = 0; a sequence with c_eff = 0 gives y = 0, dq = 0 on its rows and adds nothing to
  the C-sized gradients; nothing is NaN anywhere.

Every buffer a kernel writes starts as NaN (the ``poison`` fixture, as in
tests/test_triton.py), so a row of dk, dv, dq or y that no program writes fails. The
lengths include empty sequences first, in the middle and last, a length 1, lengths that
are no multiple of any block or of C, C larger than a sequence (c_eff < C), and a
max_seqlen above every length; the long tensors are non-contiguous (T, H, D) views.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

import rounding  # noqa: E402
from helpers import poisoned_empty, rel_rms  # noqa: E402
from test_triton import EMULATION_FLOOR, FWD_TOL, GRAD_TOL, K_EMULATION  # noqa: E402
from lara_kernels import _passes_torch  # noqa: E402
from lara_kernels.triton_kernels import _common  # noqa: E402
from lara_kernels.triton_kernels import key_pass as kp  # noqa: E402
from lara_kernels.triton_kernels import query_pass as qp  # noqa: E402

interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tests of the Triton kernels need TRITON_INTERPRET=1",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
H = 2
# (lengths, max_seqlen slack): empty first / middle / last, length 1, none a multiple of a
# block (16, 32, 64) or of C; and long next to short, with C larger than two of them
LENGTHS = {
    "empties": ([0, 1, 37, 0, 20, 5, 0], 0),
    "short": ([70, 3, 1, 9], 6),
}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel-written buffer starts as NaN."""

    monkeypatch.setattr(_common, "empty", poisoned_empty)


# ----------------------------------------------------------------------------- helpers


def offsets(lens, slack=0, device="cpu"):
    """(cu_seqlens (B + 1) int32, max_seqlen = max length + slack)."""
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(device), max(lens, default=0) + slack


def packed(g, T, width, dtype, view):
    """(T, H, width) in ``dtype``, as a view of the given kind (strides of a real call)."""
    if view == "heads-first":       # (H, T, width) storage
        return torch.randn(H, T, width, generator=g).to(dtype).transpose(0, 1)
    if view == "qkv":               # one of q, k, v in a packed (T, 3, H, width) projection
        return torch.randn(T, 3, H, width, generator=g).to(dtype)[:, 1]
    if view == "every-other":       # stride 2 along the head dim
        return torch.randn(T, H, 2 * width, generator=g).to(dtype)[..., ::2]
    return torch.randn(T, H, width, generator=g).to(dtype)


def seq(x, cu, b):
    """Sequence b of a packed (T, H, .) tensor as a padded batch of one, (1, H, L_b, .)."""
    return x[int(cu[b]):int(cu[b + 1])].transpose(0, 1)[None]


def rows(x, cu, b):
    return x[int(cu[b]):int(cu[b + 1])]


def unseq(y):
    """(1, H, L, .) -> (L, H, .), the rows of one sequence in the packed layout."""
    return y[0].transpose(0, 1)


def check(dtype, got, ref, emu=None):
    """The tolerance rule of tests/test_triton.py for each (name, got, ref[, emu]) tensor:
    float32 within FWD_TOL / GRAD_TOL of float64; half dtypes at most K_EMULATION times
    the rounding emulation's error + EMULATION_FLOOR."""
    for i, name in enumerate(got):
        a, r = got[name], ref[name]
        assert a.shape == r.shape, (name, a.shape, r.shape)
        assert torch.isfinite(a).all(), name
        err = rel_rms(a, r)
        if dtype == torch.float32:
            tol = FWD_TOL if i == 0 else GRAD_TOL
            assert err <= tol, f"{name}: rel RMS {err:.3g} > {tol}"
        else:
            err_emu = rel_rms(emu[name], r)
            assert err <= K_EMULATION * err_emu + EMULATION_FLOOR, \
                f"{name}: triton {err:.3g} vs rounding emulation {err_emu:.3g} (k = {K_EMULATION})"


def cat(parts):
    parts = [p.reshape(-1).double() for p in parts]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


# ----------------------------------------------------------------------------- key pass


KEY_VARIANTS = {   # (values, subtract_norm): the key pass, the query normalizer, "attend"
    "values": ("v", True),
    "normalizer": (None, False),
    "attend": ("k", False),
}
KEY_CFGS = [dict(), dict(block_m=16, splits=3, block_c=16)]   # own splits; small blocks, 2 C blocks


def _key_inputs(lens, slack, dtype, variant, C=24, D=40, DV=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu, max_len = offsets(lens, slack)
    T, B = sum(lens), len(lens)
    k = packed(g, T, D, dtype, "heads-first")
    vals, sub = KEY_VARIANTS[variant]
    v = packed(g, T, DV, dtype, "every-other") if vals == "v" else (k if vals == "k" else None)
    w = torch.randn(B, H, C, D, generator=g) * 0.5
    dZ = torch.randn(B, H, C, generator=g)
    dkap = torch.randn(B, H, C, v.shape[-1], generator=g) if v is not None else None
    return cu, max_len, w, k, v, sub, dZ, dkap


def _key_run(w, k, v, padding, ss, sub, dZ, dkap, cu=None, max_len=0, **cfg):
    Z, kap = kp.key_pass_fwd(w, k, v, padding, ss, sub, cu, max_len, **cfg)
    dw, dk, dv = kp.key_pass_bwd(w, k, v, padding, ss, sub, Z, kap, dZ, dkap, cu, max_len, **cfg)
    return Z, kap, dw, dk, dv


def _key_reference(w, k, v, ss, sub, dZ, dkap):
    """float64 eager pass (padded, batch of one): Z, kap, dw, dk, dv (v = k: its own leaf)."""
    ins = [w.double(), k.double()] + ([v.double()] if v is not None else [])
    ins = [x.requires_grad_() for x in ins]
    Z, kap = _passes_torch.key_pass(ins[0], ins[1], ins[2] if v is not None else None, None, ss, sub)
    loss = (Z * dZ.double()).sum() + ((kap * dkap.double()).sum() if v is not None else 0)
    return [Z, kap] + list(torch.autograd.grad(loss, ins)) + ([None] if v is None else [])


@interp
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("variant", list(KEY_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_pass_packed(dtype, variant, lengths):
    lens, slack = LENGTHS[lengths]
    cu, max_len, w, k, v, sub, dZ, dkap = _key_inputs(lens, slack, dtype, variant)
    ss = 40 ** -0.25
    B = len(lens)
    sl = lambda t, b: None if t is None else t[b:b + 1]  # noqa: E731

    # one split: float for float the padded call on each sequence alone
    Z, kap, dw, dk, dv = _key_run(w, k, v, None, ss, sub, dZ, dkap, cu, max_len, splits=1)
    assert dk.shape == k.shape and dk.dtype == k.dtype and (v is None) == (dv is None)
    assert torch.isfinite(dk).all() and (dv is None or torch.isfinite(dv).all())
    for b in range(B):
        if lens[b] == 0:   # no key: Z = -inf, kap = 0, dw = 0
            assert (Z[b] == float("-inf")).all() and (dw[b] == 0).all()
            assert kap is None or (kap[b] == 0).all()
            continue
        vb = seq(v, cu, b) if v is not None else None
        one = _key_run(w[b:b + 1], seq(k, cu, b), vb, None, ss, sub, dZ[b:b + 1], sl(dkap, b), splits=1)
        assert torch.equal(Z[b], one[0][0]) and torch.equal(dw[b], one[2][0]), b
        assert kap is None or torch.equal(kap[b], one[1][0]), b
        assert torch.equal(rows(dk, cu, b), unseq(one[3])), b
        assert dv is None or torch.equal(rows(dv, cu, b), unseq(one[4])), b

    # the launchers' splits, and small blocks with several splits and C blocks: float64
    live = [b for b in range(B) if lens[b]]
    refs = [_key_reference(w[b:b + 1], seq(k, cu, b), seq(v, cu, b) if v is not None else None, ss, sub,
                           dZ[b:b + 1], sl(dkap, b)) for b in live]
    emus = []
    if dtype != torch.float32:
        for b in live:
            vb = seq(v, cu, b) if v is not None else None
            Ze, ke = rounding.RoundingKernels.key_pass_fwd(w[b:b + 1], seq(k, cu, b), vb, None, ss, sub)
            emus.append([Ze, ke] + list(rounding.RoundingKernels.key_pass_bwd(
                w[b:b + 1], seq(k, cu, b), vb, None, ss, sub, Ze, ke, dZ[b:b + 1], sl(dkap, b))))
    names = ["Z", "kap", "dw", "dk", "dv"]

    def gather(outs_per_seq, i):
        # C-sized outputs per sequence; dk, dv as (L, H, .) rows in sequence order
        return cat([o[i][0] if i < 3 else unseq(o[i]) for o in outs_per_seq])

    for cfg in KEY_CFGS:
        out = _key_run(w, k, v, None, ss, sub, dZ, dkap, cu, max_len, **cfg)
        got, ref, emu = {}, {}, {}
        for i, name in enumerate(names):
            if out[i] is None:
                continue
            got[name] = cat([out[i][b] for b in live]) if i < 3 else out[i].double().reshape(-1)
            ref[name] = gather(refs, i)
            if emus:
                emu[name] = gather(emus, i)
        for b in range(B):
            if lens[b] == 0:
                assert (out[0][b] == float("-inf")).all() and (out[2][b] == 0).all()
                assert out[1] is None or (out[1][b] == 0).all()
        check(dtype, got, ref, emu)


# ----------------------------------------------------------------------------- query pass


QUERY_CFGS = [dict(), dict(block_n=16, d_chunk=16, splits=3)]   # own blocks; 3 D and 2 Dv chunks, 3 splits


def _query_inputs(lens, slack, dtype, C=8, D=40, DV=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    cu, max_len = offsets(lens, slack)
    T, B = sum(lens), len(lens)
    q = packed(g, T, D, dtype, "qkv")
    dy = packed(g, T, DV, dtype, "heads-first")
    w = torch.randn(B, H, C, D, generator=g) * 0.5
    bias = torch.randn(B, H, C, generator=g)
    kap = torch.randn(B, H, C, DV, generator=g)
    qt = torch.randn(B, H, C, D, generator=g) * 0.3
    lam = torch.randn(B, H, C, generator=g) + 3
    bh = torch.rand(B, H, C, generator=g)
    # c_eff = min(C, n_b, m_b) with key counts m_b of our choosing; the second non-empty
    # sequence has no keys (c_eff = 0 while it has queries)
    c_eff = torch.tensor([min(C, n) for n in lens])
    c_eff[[b for b in range(B) if lens[b]][1]] = 0
    return cu, max_len, q, dy, (w, bias, kap), (qt, lam, bh), c_eff


def _query_run(q, small, c_eff, ss, mis, beta, dy, cu=None, max_len=0, **cfg):
    w, bias, kap = small
    extra = (*mis, beta) if mis is not None else (None, None, None, 0.0)
    fwd = {n: x for n, x in cfg.items() if n != "splits"}
    y = qp.query_pass_fwd(q, w, bias, kap, c_eff, None, ss, *extra, cu, max_len, **fwd)
    grads = qp.query_pass_bwd(q, w, bias, kap, c_eff, None, ss, *extra, dy, cu, max_len, **cfg)
    return [y] + list(grads)


def _query_reference(q, small, c_eff, ss, mis, beta, dy):
    """float64 eager pass (padded, batch of one): y, dq, dw, dbias, dkap[, dqt, dlam, dbh]."""
    ins = [x.double().requires_grad_() for x in (q, *small, *(mis or ()))]
    m = (*ins[4:], beta) if mis is not None else None
    y = _passes_torch.query_pass(*ins[:4], c_eff, None, ss, m)
    grads = torch.autograd.grad((y * dy.double()).sum(), ins)
    return [y] + list(grads)


QUERY_NAMES = ["y", "dq", "dw", "dbias", "dkap", "dqt", "dlam", "dbh"]   # the kernels' order of outputs


@interp
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("mis", [True, False], ids=["mis", "no-mis"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_query_pass_packed(dtype, mis, lengths):
    lens, slack = LENGTHS[lengths]
    cu, max_len, q, dy, small, mis_t, c_eff = _query_inputs(lens, slack, dtype)
    mis_t = mis_t if mis else None
    ss, beta, B = 40 ** -0.25, 1.3, len(lens)
    names = QUERY_NAMES if mis else QUERY_NAMES[:5]
    sl = lambda ts, b: None if ts is None else tuple(t[b:b + 1] for t in ts)  # noqa: E731

    # one split: float for float the padded call on each sequence alone
    out = _query_run(q, small, c_eff, ss, mis_t, beta, dy, cu, max_len, splits=1)
    y, dq = out[0], out[1]
    assert y.shape == q.shape[:-1] + (24,) and y.dtype == q.dtype and dq.shape == q.shape and dq.dtype == q.dtype
    assert all(x is None for x in out[5:]) != mis
    assert all(torch.isfinite(x).all() for x in out if x is not None)
    for b in range(B):
        if lens[b] == 0 or c_eff[b] == 0:   # no rows, or no keys: zeros, nothing added
            assert (rows(y, cu, b) == 0).all() and (rows(dq, cu, b) == 0).all(), b
            assert all((x[b] == 0).all() for x in out[2:] if x is not None), b
            if lens[b] == 0:
                continue
        one = _query_run(seq(q, cu, b), sl(small, b), c_eff[b:b + 1], ss, sl(mis_t, b), beta, seq(dy, cu, b),
                         splits=1)
        assert torch.equal(rows(y, cu, b), unseq(one[0])) and torch.equal(rows(dq, cu, b), unseq(one[1])), b
        for x, xb in zip(out[2:], one[2:]):
            assert (x is None and xb is None) or torch.equal(x[b], xb[0]), b

    # the launchers' splits, and small blocks, head-dim chunks, several splits: float64
    live = [b for b in range(B) if lens[b] and c_eff[b]]
    refs = {b: _query_reference(seq(q, cu, b), sl(small, b), c_eff[b:b + 1], ss, sl(mis_t, b), beta, seq(dy, cu, b))
            for b in live}
    emus = {}
    if dtype != torch.float32:
        ex = lambda b: (*sl(mis_t, b), beta) if mis else (None, None, None, 0.0)  # noqa: E731
        for b in live:
            args = (seq(q, cu, b), *sl(small, b), c_eff[b:b + 1], None, ss, *ex(b))
            emus[b] = [rounding.RoundingKernels.query_pass_fwd(*args)] + \
                list(rounding.RoundingKernels.query_pass_bwd(*args, seq(dy, cu, b)))

    def gather(per_seq, name):
        i = QUERY_NAMES.index(name)
        return cat([unseq(per_seq[b][i]) if i < 2 else per_seq[b][i][0] for b in live])

    for cfg in QUERY_CFGS:
        out = _query_run(q, small, c_eff, ss, mis_t, beta, dy, cu, max_len, **cfg)
        got = {n: cat([rows(out[i], cu, b) if i < 2 else out[i][b] for b in live]) for i, n in enumerate(names)}
        for b in range(B):
            if b not in live:
                assert (rows(out[0], cu, b) == 0).all() and (rows(out[1], cu, b) == 0).all(), b
                assert all((x[b] == 0).all() for x in out[2:] if x is not None), b
        check(dtype, got, {n: gather(refs, n) for n in names}, {n: gather(emus, n) for n in names} if emus else None)


# ----------------------------------------------------------------------------- many rows (GQA)


@interp
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("G,D", [(4, 64), (8, 64), (8, 32)], ids=["256rows-D64", "512rows-D64", "512rows-D32"])
def test_key_pass_many_rows(G, D, layout):
    # grouped-query attention: the key pass on w viewed as (B, H_kv, G * C, D) with C = 64,
    # against k, v of H_kv heads. 256 rows x D 64 fit one program; 512 rows take two C
    # blocks at D = 64 (dk, dv summed over C blocks) and one block of 512 rows at D = 32
    C, DV, Hkv = G * 64, 16, 2
    lens = [0, 45, 1, 30]
    g = torch.Generator().manual_seed(G * D)
    cu, max_len = offsets(lens)
    B, T = len(lens), sum(lens)
    w = torch.randn(B, Hkv, C, D, generator=g) * 0.3
    k = torch.randn(T, Hkv, D, generator=g)
    v = torch.randn(T, Hkv, DV, generator=g)
    dZ, dkap = torch.randn(B, Hkv, C, generator=g), torch.randn(B, Hkv, C, DV, generator=g)
    ss = D ** -0.25
    BLOCK_C = kp.blocks(C, D, DV)[0]
    assert (BLOCK_C, -(-C // BLOCK_C)) == {(256, 64): (256, 1), (512, 64): (256, 2), (512, 32): (512, 1)}[(C, D)]
    if layout == "packed":
        out = _key_run(w, k, v, None, ss, True, dZ, dkap, cu, max_len)
        live = [b for b in range(B) if lens[b]]
        refs = [_key_reference(w[b:b + 1], seq(k, cu, b), seq(v, cu, b), ss, True, dZ[b:b + 1], dkap[b:b + 1])
                for b in live]
        got = {n: cat([out[i][b] for b in live]) for i, n in enumerate(["Z", "kap", "dw"])}
        got.update(dk=out[3].double().reshape(-1), dv=out[4].double().reshape(-1))
        ref = {n: cat([r[i][0] for r in refs]) for i, n in enumerate(["Z", "kap", "dw"])}
        ref.update(dk=cat([unseq(r[3]) for r in refs]), dv=cat([unseq(r[4]) for r in refs]))
        assert (out[0][0] == float("-inf")).all() and (out[1][0] == 0).all() and (out[2][0] == 0).all()
    else:   # the same sequences padded to the longest, with a padding mask (no empty element)
        keep = [b for b in range(B) if lens[b]]
        L = max(lens)
        kk, vv = torch.randn(len(keep), Hkv, L, D, generator=g), torch.randn(len(keep), Hkv, L, DV, generator=g)
        pad = torch.ones(len(keep), L, dtype=torch.bool)
        for i, b in enumerate(keep):
            kk[i, :, :lens[b]], vv[i, :, :lens[b]] = seq(k, cu, b)[0], seq(v, cu, b)[0]
            pad[i, :lens[b]] = False
        w, dZ, dkap = w[keep], dZ[keep], dkap[keep]
        out = _key_run(w, kk, vv, pad, ss, True, dZ, dkap)
        ins = [x.double().requires_grad_() for x in (w, kk, vv)]
        Zr, kr = _passes_torch.key_pass(*ins, pad, ss, True)
        grads = torch.autograd.grad((Zr * dZ.double()).sum() + (kr * dkap.double()).sum(), ins)
        got = dict(zip(["Z", "kap", "dw", "dk", "dv"], out))
        ref = dict(zip(["Z", "kap", "dw", "dk", "dv"], [Zr, kr, *grads]))
    check(torch.float32, got, ref)


# ----------------------------------------------------------------------------- degenerate batches


@interp
def test_packed_without_rows():
    # T = 0 (every sequence empty, max_seqlen 0): no key anywhere (Z = -inf, kap = 0,
    # dw = 0), empty dk, dv, y, dq; and B = 0 (cu_seqlens = [0]): empty outputs, no launch
    for lens in ([0, 0, 0], []):
        cu, max_len = offsets(lens)
        B = len(lens)
        w, k, v = torch.randn(B, H, 8, 16), torch.randn(0, H, 16), torch.randn(0, H, 8)
        Z, kap, dw, dk, dv = _key_run(w, k, v, None, 0.5, True, torch.randn(B, H, 8), torch.randn(B, H, 8, 8),
                                      cu, max_len)
        assert (Z == float("-inf")).all() and (kap == 0).all() and (dw == 0).all()
        assert dk.shape == (0, H, 16) and dv.shape == (0, H, 8)
        small = (w, torch.randn(B, H, 8), torch.randn(B, H, 8, 8))
        out = _query_run(k, small, torch.zeros(B, dtype=torch.int64), 0.5, None, 0.0, v, cu, max_len)
        assert out[0].shape == (0, H, 8) and out[1].shape == (0, H, 16)
        assert all((x == 0).all() for x in out[2:5])


# ----------------------------------------------------------------------------- GPU, natively


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_packed_matches_padded_per_sequence(dtype):
    # natively, with the launchers' own splits: the packed call against the padded call of
    # the same kernels on each sequence (both on the GPU), within the float32 tolerance of
    # the outputs' scale for float32 and one rounding of the output dtype for half dtypes
    dev = torch.device("cuda")
    lens = [0, 1, 300, 0, 1000, 77, 0]
    cu, max_len = offsets(lens, 5, dev)
    g = torch.Generator().manual_seed(50)
    T, B, C, D, DV = sum(lens), len(lens), 64, 64, 64
    k = torch.randn(T, H, D, generator=g).to(dev, dtype)
    v = torch.randn(T, H, DV, generator=g).to(dev, dtype)
    w = (torch.randn(B, H, C, D, generator=g) * 0.5).to(dev)
    dZ, dkap = torch.randn(B, H, C, generator=g).to(dev), torch.randn(B, H, C, DV, generator=g).to(dev)
    tol = FWD_TOL if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    out = _key_run(w, k, v, None, 0.4, True, dZ, dkap, cu, max_len)
    assert all(torch.isfinite(x).all() for x in (out[1], out[2], out[3], out[4]))
    for b in range(B):
        if lens[b] == 0:
            assert (out[0][b] == float("-inf")).all() and (out[1][b] == 0).all() and (out[2][b] == 0).all()
            continue
        one = _key_run(w[b:b + 1], seq(k, cu, b), seq(v, cu, b), None, 0.4, True, dZ[b:b + 1], dkap[b:b + 1])
        pairs = [(out[0][b], one[0][0]), (out[1][b], one[1][0]), (out[2][b], one[2][0]),
                 (rows(out[3], cu, b), unseq(one[3])), (rows(out[4], cu, b), unseq(one[4]))]
        for a, r in pairs:
            assert rel_rms(a.cpu(), r.cpu()) <= max(tol, FWD_TOL), b


@pytest.mark.gpu
def test_gpu_packed_launchers_never_sync_and_capture_in_a_graph():
    # the four launchers in the packed layout issue no device synchronization and replay
    # from a CUDA graph with the same results
    dev = torch.device("cuda")
    lens = [0, 300, 1, 64]
    cu, max_len = offsets(lens, 0, dev)
    g = torch.Generator().manual_seed(51)
    T, B, C, D = sum(lens), len(lens), 24, 64
    x = torch.randn(T, H, D, generator=g).to(dev)
    w = torch.randn(B, H, C, D, generator=g).to(dev) * 0.5
    dZ, dkap = torch.randn(B, H, C, device=dev), torch.randn(B, H, C, D, device=dev)
    c_eff = torch.tensor([0, 24, 1, 24], device=dev)
    bias, bh = torch.randn(B, H, C, device=dev), torch.rand(B, H, C, device=dev)

    def calls():
        Z, kap = kp.key_pass_fwd(w, x, x, None, 0.4, True, cu, max_len)
        grads = kp.key_pass_bwd(w, x, x, None, 0.4, True, Z, kap, dZ, dkap, cu, max_len)
        y = qp.query_pass_fwd(x, w, bias, kap, c_eff, None, 0.4, w, bias, bh, 1.5, cu, max_len)
        qgrads = qp.query_pass_bwd(x, w, bias, kap, c_eff, None, 0.4, w, bias, bh, 1.5, x, cu, max_len)
        return [Z, kap, *grads, y, *qgrads]

    eager = calls()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = calls()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
