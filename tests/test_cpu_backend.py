"""The ``cpu`` backend (fused C++ passes, csrc/cpu/passes.cpp) against the reference.

The same awkward cases as the Triton tests, in float64 and float32, plus the ops on
their own, and sizes the CUDA passes refuse: D, Dv and C above 256 (the CPU passes have no
capacity limit; their row tiles shrink as the widths grow, so 257 and 513 cross tile-size
edges). Every output and scratch buffer of the compiled ops starts as NaN here (the
autouse fixture turns on the library's test mode), so an element a kernel forgot to
write makes a comparison fail.

Tolerances (relative RMS error against the float64 reference):
- float64: TOL64 = 1e-10 (issue 8). The kernels accumulate in float64 and differ from
  the reference only in summation order, the tile-wise online softmax and their own
  exp (about 1 ulp); measured errors are 1e-16 .. 1e-14, so 1e-10 leaves four orders of
  margin while any formula error is far above it.
- float32: TOL32 = 2e-5, the Triton tests' bound and argument (float32 roundoff 6e-8,
  about ten chained steps, gradients through 1 / alpha); measured 1e-7 .. 3e-6, and up to
  6e-6 with D, Dv, C of 257 .. 520 (dot products that long round about sqrt(D) times more).
- float16 / bfloat16: the error must be at most HALF_K = 3 times that of the reference
  run in the same dtype (both against float64 on the same rounded inputs) plus 1e-5.
  Both compute in float32; they differ in where they round (the reference rounds y and
  the gradients once, as the kernels do), so a factor 3 is generous.
"""

from __future__ import annotations

import pytest
import torch

from helpers import compare_to_reference, make_case, padding_mask, rel_rms, run, runs_with_padded_fill
from lara_kernels import _ops, _passes_torch, dispatch, lara_attention

pytestmark = pytest.mark.skipif(not _ops.built(), reason=f"lara_kernels._C is not built ({_ops.C_ERROR})")

TOL64 = 1e-10
TOL32 = 2e-5
HALF_K = 3.0
HALF_FLOOR = 1e-5
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: TOL64, torch.float32: TOL32}
B, H = 2, 2
ops = torch.ops.lara_kernels


@pytest.fixture
def uncapped(monkeypatch):
    """The cpu backend without the Python-side size cap, so that lara_attention reaches the
    compiled passes with D, Dv, C > 256 (the passes have no capacity limit on the CPU)."""
    cpu = dispatch.backends()["cpu"]
    monkeypatch.setattr(cpu, "max_head_dim", None)
    monkeypatch.setattr(cpu, "max_samples", None)


@pytest.fixture(autouse=True)
def poison():
    """Every buffer the compiled ops allocate starts as NaN (the library's test mode)."""
    _ops._C._set_poison_outputs(True)
    yield
    _ops._C._set_poison_outputs(False)


def check(fn, leaves, build, masks, dy, opts, dtype):
    errs = compare_to_reference(fn, "cpu", leaves, build, masks, dy, opts, dtype)
    tol = TOL[dtype]
    assert max(errs) <= tol, f"{dtype}: errors (forward, gradients) {errs} exceed {tol}"


def test_poison_mode_fills_outputs_with_nan():
    assert _ops._C._poison_outputs()
    assert torch.isnan(_ops._C._new_output(5)).all()     # the allocation every op output uses


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proposal", ["segment", "mixed", "attend"])
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
def test_lara_proposals_weightings(dtype, proposal, weighting):
    # cross attention N = 63, M = 50, D = 60, Dv = 24, C = 8 not dividing N, key mask, training
    leaves, build, masks, dy = make_case(B, H, 63, 50, 60, 24, 8, seed=1, kpm=padding_mask(B, 50))
    opts = dict(num_samples=8, proposal=proposal, weighting=weighting, beta=1.5, training=True)
    check("lara", leaves, build, masks, dy, opts, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N,M,D,DV,C,training",
    [
        (1, 17, 16, 16, 4, True),          # N = 1, C > N
        (5, 40, 32, 8, 8, False),          # C > N, eval
        (200, 77, 60, 24, 16, False),      # C does not divide N, M != N
        (40, 40, 20, 20, 1, True),         # C = 1
        (63, 63, 80, 160, 40, True),       # Dv > D
        (70, 300, 32, 16, 256, False),     # C = 256 (C_eff = N = 70)
        (1300, 1100, 24, 8, 12, True),     # several chunks (512 rows) and tiles (128 rows)
    ],
    ids=["N1", "C>N", "N200", "C1", "D80-Dv160", "C256", "chunks"],
)
def test_lara_sizes(dtype, N, M, D, DV, C, training):
    leaves, build, masks, dy = make_case(1, H, N, M, D, DV, C, seed=N + M)
    check("lara", leaves, build, masks, dy, dict(num_samples=C, training=training), dtype)


# Above 256 (the CUDA passes' limit): tiles of 64 rows from a width (max of D, Dv, C) of
# 257, 32 from 513; C_eff above 256 needs that many valid queries and keys.
LARGE = [
    (480, 470, 300, 520, 320),     # the example: C_eff = 320 with 30% padding
    (400, 420, 257, 513, 257),     # one past the edges (tile heights 64 and 32)
    (150, 140, 513, 24, 300),      # D above 512, C > valid length (C_eff < C)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,M,D,DV,C", LARGE, ids=["D300-Dv520-C320", "257-513-257", "D513-C300"])
def test_lara_large_dims(uncapped, dtype, N, M, D, DV, C):
    # element 0 unpadded (C_eff = min(C, N, M)), 1 partly padded, 2 with every query padded
    Bn = 3
    kpm, qpm = padding_mask(Bn, M, seed=M), padding_mask(Bn, N, fully=True, seed=N)
    leaves, build, masks, dy = make_case(Bn, 1, N, M, D, DV, C, seed=N + D, kpm=kpm, qpm=qpm)
    c_eff = torch.minimum((~kpm).sum(-1), (~qpm).sum(-1)).clamp(max=C)
    assert c_eff[0] == min(C, N, M) and 0 < c_eff[1] and c_eff[2] == 0
    opts = dict(num_samples=C, proposal="mixed", training=True)
    check("lara", leaves, build, masks, dy, opts, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rfa_large_dims(uncapped, dtype):
    Bn, N, M = 2, 60, 70
    kw = dict(kpm=padding_mask(Bn, M, seed=30), qpm=padding_mask(Bn, N, fully=True, seed=31))
    leaves, build, masks, dy = make_case(Bn, H, N, M, 300, 520, 320, seed=32, strided=True, **kw)
    check("rfa", leaves, build, masks, dy, dict(num_samples=320), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_large_dims(uncapped, dtype):
    Bn, N, M, C = 1, 300, 280, 270
    leaves, build, masks, dy = make_case(Bn, 1, N, M, 300, 260, C, seed=43, kpm=padding_mask(Bn, M, seed=44))
    leaves = [x.to(dtype).float() for x in leaves]
    dy = dy.to(dtype).float()
    opts = dict(num_samples=C, training=True)

    def go(backend, dt):
        return run("lara", backend, leaves, build, masks, dy, dt, "cpu", **opts,
                   generator=torch.Generator().manual_seed(98))

    (y, g), (yd, gd), (y64, g64) = go("cpu", dtype), go("reference", dtype), go("reference", torch.float64)
    for name, a, ref_dt, exact in [("y", y, yd, y64)] + [(f"grad{i}", *t) for i, t in enumerate(zip(g, gd, g64))]:
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err, err_ref = rel_rms(a, exact), rel_rms(ref_dt, exact)
        assert err <= HALF_K * err_ref + HALF_FLOOR, f"{name}: cpu {err:.3g} vs reference-in-{dtype} {err_ref:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
@pytest.mark.parametrize("fully", ["none", "keys", "queries"])
def test_lara_masks(dtype, weighting, fully):
    Bn, N, M = 3, 45, 38
    kpm = padding_mask(Bn, M, fully=fully == "keys", seed=5)
    qpm = padding_mask(Bn, N, fully=fully == "queries", seed=6)
    leaves, build, masks, dy = make_case(Bn, H, N, M, 24, 12, 6, seed=7, kpm=kpm, qpm=qpm)
    opts = dict(num_samples=6, proposal="mixed", weighting=weighting, training=True)
    check("lara", leaves, build, masks, dy, opts, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lara_long_masked_chunks(dtype):
    # masks across chunk boundaries, including a whole 512-row chunk of padded keys
    Bn, N, M = 2, 1200, 1600
    kpm = padding_mask(Bn, M, seed=20)
    kpm[1, 512:1024] = True
    qpm = padding_mask(Bn, N, seed=21)
    leaves, build, masks, dy = make_case(Bn, 1, N, M, 16, 16, 8, seed=22, kpm=kpm, qpm=qpm)
    check("lara", leaves, build, masks, dy, dict(num_samples=8, training=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proposal", ["segment", "attend"])
def test_lara_landmarks_strided(dtype, proposal):
    leaves, build, masks, dy = make_case(B, H, 50, 31, 40, 20, 7, seed=8, strided=True, landmarks=True,
                                         kpm=padding_mask(B, 31, seed=9), qpm=padding_mask(B, 50, seed=10))
    q, k, v, _, _ = build(leaves)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    opts = dict(num_samples=7, proposal=proposal, beta=2.0, training=True)
    errs = compare_to_reference("lara", "cpu", leaves, build, masks, dy, opts, dtype)
    assert len(errs) == (6 if proposal == "segment" else 5)   # y, q, k, v, landmarks
    assert max(errs) <= TOL[dtype], errs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_lara_beta_scale_large_logits(dtype, beta):
    # std 2.5 and scale 0.5: logits of tens, alpha often below the 1e-8 floor
    leaves, build, masks, dy = make_case(B, H, 33, 29, 16, 16, 5, seed=11, gain=2.5)
    check("lara", leaves, build, masks, dy, dict(num_samples=5, beta=beta, scale=0.5, training=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_rfa(dtype, masked):
    Bn, N, M = 3, 41, 57
    kw = dict(kpm=padding_mask(Bn, M, fully=True, seed=13), qpm=padding_mask(Bn, N, seed=14)) if masked else {}
    leaves, build, masks, dy = make_case(Bn, H, N, M, 60, 24, 12, seed=15, strided=masked, **kw)
    check("rfa", leaves, build, masks, dy, dict(num_samples=12), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
def test_half_dtypes(dtype, weighting):
    Bn, N, M, C = 2, 150, 130, 16
    leaves, build, masks, dy = make_case(Bn, 3, N, M, 64, 32, C, seed=40, strided=True,
                                         kpm=padding_mask(Bn, M, fully=True, seed=41), qpm=padding_mask(Bn, N, seed=42))
    leaves = [x.to(dtype).float() for x in leaves]     # one set of rounded inputs for all runs
    dy = dy.to(dtype).float()
    opts = dict(num_samples=C, weighting=weighting, training=True)

    def go(backend, dt):
        return run("lara", backend, leaves, build, masks, dy, dt, "cpu", **opts,
                   generator=torch.Generator().manual_seed(99))

    (y, g), (yd, gd), (y64, g64) = go("cpu", dtype), go("reference", dtype), go("reference", torch.float64)
    for name, a, ref_dt, exact in [("y", y, yd, y64)] + [(f"grad{i}", *t) for i, t in enumerate(zip(g, gd, g64))]:
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err, err_ref = rel_rms(a, exact), rel_rms(ref_dt, exact)
        assert err <= HALF_K * err_ref + HALF_FLOOR, f"{name}: cpu {err:.3g} vs reference-in-{dtype} {err_ref:.3g}"


@pytest.mark.parametrize("dims", [(32, 32, 16), (300, 264, 300)], ids=["usual", "D300-Dv264-C300"])
def test_bitwise_deterministic_across_thread_counts_any_size(uncapped, dims):
    # chunk sizes depend on the shapes only and partials are summed in chunk order; several
    # chunks (512 rows) and tiles (128 rows; 64 above width 256) of queries and keys
    D, DV, C = dims
    leaves, build, masks, dy = make_case(2, 1, 1100, 1200, D, DV, C, seed=62, kpm=padding_mask(2, 1200, seed=63))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run("lara", "cpu", leaves, build, masks, dy, torch.float32, "cpu", num_samples=C,
                               training=True, generator=torch.Generator().manual_seed(6)))
    finally:
        torch.set_num_threads(threads)
    (y0, g0) = results[0]
    for y, g in results[1:]:
        assert torch.equal(y, y0) and all(torch.equal(a, b) for a, b in zip(g, g0))


@pytest.mark.parametrize("garbage", [1e30, float("inf"), float("nan")], ids=["huge", "inf", "nan"])
def test_padded_positions_are_never_read(garbage):
    ((y0, g0), (y1, g1)), qpm = runs_with_padded_fill("cpu", (0.0, garbage), N=300, M=260)
    assert torch.equal(y1, y0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
    assert torch.equal(y1[1, :, qpm[1]], torch.zeros_like(y1[1, :, qpm[1]]))


# ----------------------------------------------------------------------------- the ops on their own


def _small(seed, B_, H_, C, D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B_, H_, C, D, generator=g, dtype=dtype)


# (D, Dv, C) of the op tests: usual, and above 256 (tiles of 64 rows; of 32 from width 513)
OP_DIMS = [(40, 24, 9), (300, 520, 320), (513, 8, 257)]
OP_IDS = ["usual", "D300-Dv520-C320", "D513-C257"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_v", [True, False], ids=["key-pass", "normalizer"])
@pytest.mark.parametrize("D,DV,C", OP_DIMS, ids=OP_IDS)
def test_key_pass_op_vs_eager(dtype, with_v, D, DV, C):
    # several chunks, a chunk of padded keys, non-contiguous k and v; against the eager pass
    B_, H_, M = 2, 3, 1400
    g = torch.Generator().manual_seed(70)
    k = torch.randn(B_, H_, D, M, generator=g, dtype=dtype).transpose(-1, -2)
    v = torch.randn(B_, H_, M, 2 * DV, generator=g, dtype=dtype)[..., ::2] if with_v else None
    pad = padding_mask(B_, M, seed=71)
    pad[1, 600:1200] = True
    w = _small(72, B_, H_, C, D, dtype)
    ss = D ** -0.25
    sub = with_v
    Z, kap = ops.key_pass_fwd(w, k, v, pad, ss, sub)
    Zr, kapr = _passes_torch.key_pass(w, k, v if with_v else k[..., :1], pad, ss, sub)
    assert rel_rms(Z, Zr) <= TOL[dtype]
    if with_v:
        assert rel_rms(kap, kapr) <= TOL[dtype]
    else:
        assert kap.shape == (B_, H_, C, 0)
    # backward against autograd of the eager pass
    leaves = [t.detach().clone().requires_grad_() for t in ((w, k, v) if with_v else (w, k))]
    Zr, kapr = _passes_torch.key_pass(leaves[0], leaves[1], leaves[2] if with_v else leaves[1][..., :1], pad, ss, sub)
    dZ = _small(73, B_, H_, C, 1, dtype)[..., 0]
    loss = (Zr * dZ).sum()
    dkap = None
    if with_v:
        dkap = _small(74, B_, H_, C, DV, dtype)
        loss = loss + (kapr * dkap).sum()
    grads = torch.autograd.grad(loss, leaves)
    dw, dk, dv = ops.key_pass_bwd(w, k, v, pad, ss, sub, Z, kap if with_v else None, dZ, dkap)
    assert rel_rms(dw, grads[0]) <= TOL[dtype] and rel_rms(dk, grads[1]) <= TOL[dtype]
    assert torch.equal(dk[1, :, 600:1200], torch.zeros_like(dk[1, :, 600:1200]))
    if with_v:
        assert rel_rms(dv, grads[2]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mis", [False, True])
@pytest.mark.parametrize("D,DV,C", [(24, 40, 11), (300, 520, 320), (8, 513, 257)], ids=OP_IDS)
def test_query_pass_op_vs_eager(dtype, mis, D, DV, C):
    B_, H_, N = 2, 2, 1300
    g = torch.Generator().manual_seed(80)
    q = torch.randn(B_, N, H_, D, generator=g, dtype=dtype).transpose(1, 2)
    pad = padding_mask(B_, N, seed=81)
    ss = 0.7
    w, qt = _small(82, B_, H_, C, D, dtype), 0.3 * _small(83, B_, H_, C, D, dtype)
    bias, bh = _small(84, B_, H_, C, 1, dtype)[..., 0], _small(85, B_, H_, C, 1, dtype)[..., 0].abs()
    kap = _small(86, B_, H_, C, DV, dtype)
    lam = _passes_torch.query_normalizer(qt, q, pad, ss)
    c_eff = torch.tensor([C, 7])      # all samples active, and 7 of them
    mis_args = (qt, lam, bh) if mis else (None, None, None)
    y = ops.query_pass_fwd(q, w, bias, kap, c_eff, pad, ss, *mis_args, 1.5)
    leaves = [t.detach().clone().requires_grad_() for t in (q, w, bias, kap, qt, lam, bh)]
    yr = _passes_torch.query_pass(*leaves[:4], c_eff, pad, ss, (*leaves[4:], 1.5) if mis else None)
    assert rel_rms(y, yr) <= TOL[dtype]
    dy = torch.randn(yr.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad(yr, leaves, dy, allow_unused=True)
    out = ops.query_pass_bwd(q, w, bias, kap, c_eff, pad, ss, *mis_args, 1.5, dy)
    n_checked = 0
    for name, a, b in zip(["dq", "dw", "dbias", "dkap", "dqt", "dlam", "dbh"], out, grads):
        if b is None or (not mis and name in ("dqt", "dlam", "dbh")):
            assert a.numel() == 0, name
            continue
        assert rel_rms(a, b) <= TOL[dtype], (name, rel_rms(a, b))
        n_checked += 1
    assert n_checked == (7 if mis else 4)


def test_ops_name_the_bad_value():
    k = torch.randn(1, 2, 10, 0)
    with pytest.raises(RuntimeError, match=r"head dim D must be in \[1, 2147483647\] on cpu, got 0"):
        ops.key_pass_fwd(torch.randn(1, 2, 4, 0), k, None, None, 1.0, True)
    with pytest.raises(RuntimeError, match=r"number of rows C of w must be in \[1, 2\*\*31 - 1\], got 0"):
        ops.key_pass_fwd(torch.randn(1, 2, 0, 8), torch.randn(1, 2, 10, 8), None, None, 1.0, True)
    with pytest.raises(RuntimeError, match=r"value head dim Dv must be in \[1, 2147483647\] on cpu, got 0"):
        ops.query_pass_fwd(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4),
                           torch.randn(1, 2, 4, 0), torch.tensor([4]), None, 1.0, None, None, None, 0.0)
    k = torch.randn(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match=r"w must be Double, got Float"):
        ops.key_pass_fwd(torch.randn(1, 2, 4, 8), k.double(), None, None, 1.0, True)
    with pytest.raises(RuntimeError, match=r"padding must have shape \(1, 10\), got \[1, 9\]"):
        ops.key_pass_fwd(torch.randn(1, 2, 4, 8), k, None, torch.zeros(1, 9, dtype=torch.bool), 1.0, True)
    q, w, bias, kap = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4), torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"c_eff must lie in \[0, 4\]"):
        ops.query_pass_fwd(q, w, bias, kap, torch.tensor([5]), None, 1.0, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match=r"qt, lam and bh are given together or not at all, got 1 of 3"):
        ops.query_pass_fwd(q, w, bias, kap, torch.tensor([4]), None, 1.0, w, None, None, 0.0)


def test_pass_size_limits_per_device():
    # the CUDA passes keep 256 (their tiles are sized for it); the CPU passes only BLAS's int
    assert _ops._C._max_pass_dim("cuda") == 256 and _ops._C._max_pass_dim("cuda:1") == 256
    assert _ops._C._max_pass_dim("cpu") == 2**31 - 1


def test_backend_reasons():
    q = torch.randn(1, 1, 4, 300)
    cuda = dispatch.backends()["cuda"]
    reasons = cuda.not_supported_reasons("rfa", q, q, q, num_samples=300)
    assert "head dim 300 > 256" in reasons and "num_samples 300 > 256" in reasons
    assert any("device 'cpu'" in r for r in cuda.not_supported_reasons("lara", q[..., :8], q[..., :8], q[..., :8]))
    if not _ops.built_with_cuda():
        assert any("without CUDA" in r for r in cuda.availability_reasons())


def test_opcheck_fused_ops():
    # schema, fake (meta) kernels and dispatch of the four ops (torch.library.opcheck)
    g = torch.Generator().manual_seed(90)
    B_, H_, L, D, DV, C = 2, 2, 37, 8, 6, 5
    k, q = torch.randn(B_, H_, L, D, generator=g), torch.randn(B_, H_, L, D, generator=g)
    v = torch.randn(B_, H_, L, DV, generator=g)
    w, qt = torch.randn(B_, H_, C, D, generator=g), torch.randn(B_, H_, C, D, generator=g)
    pad = padding_mask(B_, L, seed=91)
    Z, kap = ops.key_pass_fwd(w, k, v, pad, 0.5, True)
    lam, _ = ops.key_pass_fwd(qt, q, None, pad, 0.5, False)
    bias, bh, c_eff = torch.randn(B_, H_, C, generator=g), torch.rand(B_, H_, C, generator=g), torch.tensor([C, 3])
    dy = torch.randn(B_, H_, L, DV, generator=g)
    cases = [
        (ops.key_pass_fwd, (w, k, v, pad, 0.5, True)),
        (ops.key_pass_fwd, (qt, q, None, None, 0.5, False)),
        (ops.key_pass_bwd, (w, k, v, pad, 0.5, True, Z, kap, torch.randn_like(Z), torch.randn_like(kap))),
        (ops.key_pass_bwd, (qt, q, None, pad, 0.5, False, lam, None, torch.randn_like(lam), None)),
        (ops.query_pass_fwd, (q, w, bias, kap, c_eff, pad, 0.5, qt, lam, bh, 1.0)),
        (ops.query_pass_fwd, (q, w, bias, kap, c_eff, None, 0.5, None, None, None, 0.0)),
        (ops.query_pass_bwd, (q, w, bias, kap, c_eff, pad, 0.5, qt, lam, bh, 1.0, dy)),
        (ops.query_pass_bwd, (q, w, bias, kap, c_eff, pad, 0.5, None, None, None, 0.0, dy)),
    ]
    _ops._C._set_poison_outputs(False)    # opcheck compares runs; NaN != NaN is not the point here
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiles_without_graph_breaks():
    # the autograd Functions and the ops' fake kernels trace (fullgraph: no break allowed)
    g = torch.Generator().manual_seed(95)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return lara_attention(q, k, v, num_samples=8, backend="cpu")

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    y0 = f(q, k, v)
    torch.testing.assert_close(y, y0)
    for a, b in zip(torch.autograd.grad(y.sum(), (q, k, v)), torch.autograd.grad(y0.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_compiles_with_masks_without_graph_breaks():
    g = torch.Generator().manual_seed(96)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    kpm, qpm = padding_mask(2, 40, fully=True, seed=97), padding_mask(2, 40, seed=98)

    def f(q, k, v):
        return lara_attention(q, k, v, num_samples=8, backend="cpu", key_padding_mask=kpm, query_padding_mask=qpm)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    y0 = f(q, k, v)
    torch.testing.assert_close(y, y0)
    for a, b in zip(torch.autograd.grad(y.sum(), (q, k, v)), torch.autograd.grad(y0.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
