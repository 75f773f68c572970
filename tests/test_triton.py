"""The ``triton`` backend against the reference (issues 4 and 13).

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py); the GPU tests at the end run the same
comparisons natively and are skipped here.

Every buffer a kernel writes (outputs, gradients, per-block partials) is allocated by
``triton_kernels._common.empty``; the autouse fixture below replaces it by a NaN-filled
allocation, so an element a kernel forgot to write makes the comparison fail.

Tolerances (relative RMS error, sqrt(mean((a - b)^2)) / sqrt(mean(b^2))), float32
kernels against the float64 reference:
- FWD_TOL = GRAD_TOL = 2e-5. float32 has unit roundoff 6e-8; the forward chains about
  ten float32 steps (dot products of length D <= 256, exp/log, sums of length <= 300)
  whose errors add, and the gradients go back through the MIS weights (1 / alpha) and
  the C x C proposal steps. Measured errors on these shapes are 1e-7 .. 3e-6 (the
  largest with large logits); 2e-5 leaves a margin of about seven for other platforms'
  libm and summation orders, while a formula or indexing error gives 1e-3 or more.
- float16/bfloat16 (and float32 on a GPU): the kernels feed tensor cores with operands in
  the input dtype (triton_kernels/_common.py); tests/rounding.py emulates those roundings
  in torch on CPU. The error of the Triton result against float64 must be at most
  K_EMULATION = 2 times the emulation's error (same rounded inputs and samples), plus
  EMULATION_FLOOR = 1e-5 so that float32, where both errors are near roundoff, does not
  fail on a ratio of two tiny numbers. With the same rounding points the two errors are
  of the same size (measured under the interpreter, float16 and bfloat16, cases 1 and 3:
  ratios 0.989 .. 1.003); they differ only through the summation order and operands
  rounded to a neighbour after float32-level differences, so 2 leaves a margin, while a
  wrong rounding point moves the ratio far more (bfloat16 operands truncated instead of
  rounded to nearest, as the interpreter's own cast does, gave 5.1 on y).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import rounding  # noqa: E402
from helpers import poisoned_empty, compare_to_reference, make_case, padding_mask, rel_rms, run, runs_with_padded_fill  # noqa: E402,E501
from lara_kernels import _passes_torch, _pipeline, dispatch, lara_attention, rfa_attention  # noqa: E402
from lara_kernels import _triton_backend as tb  # noqa: E402
from lara_kernels.triton_kernels import _common  # noqa: E402
from lara_kernels.triton_kernels import key_pass as kp  # noqa: E402
from lara_kernels.triton_kernels import query_pass as qp  # noqa: E402

FWD_TOL = 2e-5
GRAD_TOL = 2e-5
K_EMULATION = 2.0
EMULATION_FLOOR = 1e-5

interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tests of the Triton kernels need TRITON_INTERPRET=1",
)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel-written buffer starts as NaN."""

    monkeypatch.setattr(_common, "empty", poisoned_empty)


def test_poison_is_active():
    assert torch.isnan(_common.empty((3,), torch.float32, "cpu")).all()


def compare(fn, leaves, build, masks, dy, opts, device="cpu"):
    """Triton float32 vs reference float64: errors of the forward and of each gradient."""
    return compare_to_reference(fn, "triton", leaves, build, masks, dy, opts, torch.float32, device)


def assert_close(errs):
    assert errs[0] <= FWD_TOL, f"forward rel RMS {errs[0]:.3g} > {FWD_TOL}"
    for i, e in enumerate(errs[1:]):
        assert e <= GRAD_TOL, f"gradient {i} rel RMS {e:.3g} > {GRAD_TOL} (all: {errs})"


# ----------------------------------------------------------------------------- LARA, end to end

B, H = 2, 2


_kpm = padding_mask


@interp
@pytest.mark.parametrize("proposal", ["segment", "mixed", "attend"])
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
def test_lara_proposals_weightings(proposal, weighting):
    # N = 63, M = 50 (cross attention), D = 60, Dv = 24, C = 8 does not divide N; training
    leaves, build, masks, dy = make_case(B, H, 63, 50, 60, 24, 8, seed=1, kpm=_kpm(B, 50))
    opts = dict(num_samples=8, proposal=proposal, weighting=weighting, beta=1.5, training=True)
    assert_close(compare("lara", leaves, build, masks, dy, opts))


@interp
@pytest.mark.parametrize(
    "N,M,D,DV,C,training",
    [
        (1, 17, 16, 16, 4, True),      # N = 1, C > N
        (5, 40, 32, 8, 8, False),      # C > N, eval
        (200, 77, 60, 24, 16, False),  # C does not divide N, M != N
        (40, 40, 20, 20, 1, True),     # C = 1
        (63, 63, 80, 160, 40, True),   # D, Dv > 64: head-dim chunks in the query pass
        (70, 300, 32, 16, 256, False),  # C = 256 (C_eff = N = 70)
    ],
    ids=["N1", "C>N", "N200", "C1", "D80-Dv160", "C256"],
)
def test_lara_sizes(N, M, D, DV, C, training):
    leaves, build, masks, dy = make_case(1, H, N, M, D, DV, C, seed=N + M)
    opts = dict(num_samples=C, training=training)
    assert_close(compare("lara", leaves, build, masks, dy, opts))


@interp
@pytest.mark.parametrize("weighting", ["optimal", "balance"])
@pytest.mark.parametrize("fully", ["none", "keys", "queries"])
def test_lara_masks(weighting, fully):
    # key and query masks; optionally one batch element entirely padding (its rows are 0)
    Bn, N, M = 3, 45, 38
    kpm = _kpm(Bn, M, fully=fully == "keys", seed=5)
    qpm = _kpm(Bn, N, fully=fully == "queries", seed=6)
    leaves, build, masks, dy = make_case(Bn, H, N, M, 24, 12, 6, seed=7, kpm=kpm, qpm=qpm)
    opts = dict(num_samples=6, proposal="mixed", weighting=weighting, training=True)
    assert_close(compare("lara", leaves, build, masks, dy, opts))


@interp
@pytest.mark.parametrize("proposal", ["segment", "attend"])
def test_lara_landmarks_strided(proposal):
    # given landmarks (gradients flow to them), strided q, k, v, both masks, beta = 2
    leaves, build, masks, dy = make_case(B, H, 50, 31, 40, 20, 7, seed=8, strided=True, landmarks=True,
                                         kpm=_kpm(B, 31, seed=9), qpm=_kpm(B, 50, seed=10))
    if proposal == "attend":      # "attend" does not take k_landmarks
        leaves = leaves[:4]
    q, k, v, _, _ = build(leaves)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    opts = dict(num_samples=7, proposal=proposal, beta=2.0, training=True)
    errs = compare("lara", leaves, build, masks, dy, opts)
    # forward, q, k, v, q_landmarks and (not with "attend") k_landmarks
    assert len(errs) == (6 if proposal == "segment" else 5)
    assert_close(errs)


@interp
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_lara_beta_scale_large_logits(beta):
    # inputs of std 2.5 and scale 0.5: logits of tens, alpha often below the 1e-8 floor
    leaves, build, masks, dy = make_case(B, H, 33, 29, 16, 16, 5, seed=11, gain=2.5)
    opts = dict(num_samples=5, beta=beta, scale=0.5, training=True)
    assert_close(compare("lara", leaves, build, masks, dy, opts))


@interp
def test_lara_eval_deterministic_training_reproducible():
    leaves, build, masks, dy = make_case(B, H, 30, 30, 16, 16, 4, seed=12)
    q, k, v, _, _ = build(leaves)
    y1 = lara_attention(q, k, v, num_samples=4, backend="triton")
    y2 = lara_attention(q, k, v, num_samples=4, backend="triton")
    assert torch.equal(y1, y2)
    ys = [lara_attention(q, k, v, num_samples=4, training=True, backend="triton",
                         generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(ys[0], ys[1]) and not torch.equal(ys[0], ys[2])
    # eval equals the reference in float64
    y64 = lara_attention(q.double(), k.double(), v.double(), num_samples=4, backend="reference")
    assert rel_rms(y1, y64) <= FWD_TOL


# ----------------------------------------------------------------------------- RFA


@interp
@pytest.mark.parametrize("masked", [False, True])
def test_rfa(masked):
    Bn, N, M = 3, 41, 57
    kw = dict(kpm=_kpm(Bn, M, fully=True, seed=13), qpm=_kpm(Bn, N, seed=14)) if masked else {}
    leaves, build, masks, dy = make_case(Bn, H, N, M, 60, 24, 12, seed=15, strided=masked, **kw)
    assert_close(compare("rfa", leaves, build, masks, dy, dict(num_samples=12)))


# ----------------------------------------------------------------------------- no N x C state


@interp
def test_saves_no_long_by_samples_tensor():
    # Every tensor autograd saves is an input/view of one, or C-sized (at most C * max(D, Dv)
    # per head): no N x C or M x C matrix is held between forward and backward.
    Bn, N, M, D, DV, C = 1, 200, 180, 16, 16, 4
    leaves, build, masks, dy = make_case(Bn, 1, N, M, D, DV, C, seed=16, kpm=_kpm(Bn, M), qpm=_kpm(Bn, N))
    ls = [x.requires_grad_() for x in leaves]
    q, k, v, _, _ = build(ls)
    long_ptrs = {t.untyped_storage().data_ptr() for t in (q, k, v, *masks.values())}
    sizes = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in long_ptrs:
            sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lara_attention(q, k, v, num_samples=C, weighting="optimal", proposal="attend", training=True,
                           backend="triton", **masks)
    torch.autograd.grad(y, ls, dy)
    assert sizes, "expected some C-sized saved tensors"
    big = [s for s in sizes if math.prod(s) > C * max(D, DV) + max(N, M)]
    assert not big, f"tensors larger than C-sized saved for backward: {big}"


# ----------------------------------------------------------------------------- passes, directly


def _dir_inputs(seed, B_, H_, C, L, D, DV):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B_, H_, C, D, generator=g) * 0.5, torch.randn(B_, H_, L, D, generator=g),
            torch.randn(B_, H_, L, DV, generator=g)]


KEY_CFGS = [  # (block_m, splits, block_c): default, several splits of small key blocks, and
    (None, None, None),     # C blocks on the grid (as for C x D past 128 x 128)
    (16, 3, None),
    (16, 3, 16),
]


@interp
@pytest.mark.parametrize("subtract_norm", [True, False])
@pytest.mark.parametrize("cfg", KEY_CFGS, ids=["default", "split3-mblock16", "split3-cblock16"])
def test_key_pass_direct(subtract_norm, cfg):
    block_m, splits, block_c = cfg
    Bn, C, M, D, DV = 2, 37, 70, 60, 24
    w, k, v = _dir_inputs(17, Bn, H, C, M, D, DV)
    pad = _kpm(Bn, M, seed=18)
    ss = D ** -0.25
    opt = dict(block_m=block_m, splits=splits, block_c=block_c)
    Z, kap = kp.key_pass_fwd(w, k, v, pad, ss, subtract_norm, **opt)
    ins = [x.double().requires_grad_() for x in (w, k, v)]
    Zr, kr = _passes_torch.key_pass(*ins, pad, ss, subtract_norm)
    g = torch.Generator().manual_seed(19)
    dZ, dkap = torch.randn(Zr.shape, generator=g), torch.randn(kr.shape, generator=g)
    ref = torch.autograd.grad((Zr * dZ).sum() + (kr * dkap).sum(), ins)
    got = kp.key_pass_bwd(w, k, v, pad, ss, subtract_norm, Z, kap, dZ, dkap, **opt)
    assert_close([rel_rms(Z, Zr), rel_rms(kap, kr)] + [rel_rms(a, b) for a, b in zip(got, ref)])
    # and through the autograd Function (default blocks), values equal to keys as in "attend"
    ins32 = [x.clone().requires_grad_() for x in (w, k)]
    Z2, kap2 = tb.TritonPasses.key_pass(ins32[0], ins32[1], ins32[1], pad, ss, subtract_norm)
    ins = [x.double().requires_grad_() for x in (w, k)]
    Zr, kr = _passes_torch.key_pass(ins[0], ins[1], ins[1], pad, ss, subtract_norm)
    dkap = torch.randn(kr.shape, generator=g)
    ref = torch.autograd.grad((Zr * dZ).sum() + (kr * dkap).sum(), ins)
    got = torch.autograd.grad((Z2 * dZ).sum() + (kap2 * dkap).sum(), ins32)
    assert_close([rel_rms(Z2, Zr), rel_rms(kap2, kr)] + [rel_rms(a, b) for a, b in zip(got, ref)])


@interp
def test_key_pass_float32_backward_c_blocks():
    # float32 at C = D = 128 with the default blocks: the forward holds the 128 rows in one
    # program, the backward takes C blocks of 64 (dw programs per block, then the dk/dv kernel)
    C, M, D, DV = 128, 40, 128, 128
    assert kp.blocks(C, D, DV)[0] == 128 and kp.blocks(C, D, DV, bwd=True, fp32=True)[0] == 64
    w, k, v = _dir_inputs(23, 1, 1, C, M, D, DV)
    pad = _kpm(1, M, seed=24)
    ss = D ** -0.25
    Z, kap = kp.key_pass_fwd(w, k, v, pad, ss, True)
    ins = [x.double().requires_grad_() for x in (w, k, v)]
    Zr, kr = _passes_torch.key_pass(*ins, pad, ss, True)
    g = torch.Generator().manual_seed(25)
    dZ, dkap = torch.randn(Zr.shape, generator=g), torch.randn(kr.shape, generator=g)
    ref = torch.autograd.grad((Zr * dZ).sum() + (kr * dkap).sum(), ins)
    got = kp.key_pass_bwd(w, k, v, pad, ss, True, Z, kap, dZ, dkap)
    assert_close([rel_rms(Z, Zr), rel_rms(kap, kr)] + [rel_rms(a, b) for a, b in zip(got, ref)])


@interp
@pytest.mark.parametrize("padded", [False, True])
def test_query_normalizer_direct(padded):
    Bn, C, N, D = 2, 9, 53, 20
    qt, q, _ = _dir_inputs(20, Bn, H, C, N, D, 1)
    pad = _kpm(Bn, N, seed=21) if padded else None
    ins32 = [x.clone().requires_grad_() for x in (qt, q)]
    lam = tb.TritonPasses.query_normalizer(*ins32, pad, 0.6)
    ins = [x.double().requires_grad_() for x in (qt, q)]
    lam_r = _passes_torch.query_normalizer(*ins, pad, 0.6)
    dlam = torch.randn(lam.shape, generator=torch.Generator().manual_seed(22))
    got = torch.autograd.grad((lam * dlam).sum(), ins32)
    ref = torch.autograd.grad((lam_r * dlam).sum(), ins)
    assert_close([rel_rms(lam, lam_r)] + [rel_rms(a, b) for a, b in zip(got, ref)])


@interp
@pytest.mark.parametrize("padded", [False, True])
def test_query_normalizer_c_blocks(padded):
    # the key kernels without values (the normalizer) with several C blocks: the dw partials
    # per (split, C block of 16 rows) and dk summed over the C blocks (two of 32 rows, the dk
    # kernel's own blocks at D = 40) in one program
    Bn, C, N, D = 2, 37, 53, 40
    qt, q, _ = _dir_inputs(25, Bn, H, C, N, D, 1)
    pad = _kpm(Bn, N, seed=26) if padded else None
    ss = 0.6
    opt = dict(block_m=16, splits=3, block_c=16)
    lam, kap = kp.key_pass_fwd(qt, q, None, pad, ss, False, **opt)
    assert kap is None
    ins = [x.double().requires_grad_() for x in (qt, q)]
    lam_r = _passes_torch.query_normalizer(*ins, pad, ss)
    dlam = torch.randn(lam.shape, generator=torch.Generator().manual_seed(27))
    ref = torch.autograd.grad((lam_r * dlam).sum(), ins)
    dqt, dq, dv = kp.key_pass_bwd(qt, q, None, pad, ss, False, lam, None, dlam, None, **opt)
    assert dv is None
    assert_close([rel_rms(lam, lam_r), rel_rms(dqt, ref[0]), rel_rms(dq, ref[1])])


@interp
@pytest.mark.parametrize("mis", [False, True])
@pytest.mark.parametrize("cfg", [dict(), dict(block_n=16, d_chunk=16, splits=3)], ids=["default", "chunks"])
def test_query_pass_direct(mis, cfg):
    Bn, C, N, D, DV = 2, 7, 70, 40, 24
    g = torch.Generator().manual_seed(23)
    q = torch.randn(Bn, H, N, D, generator=g)
    w = torch.randn(Bn, H, C, D, generator=g) * 0.5
    bias = torch.randn(Bn, H, C, generator=g)
    kap = torch.randn(Bn, H, C, DV, generator=g)
    qt = torch.randn(Bn, H, C, D, generator=g) * 0.3
    lam = torch.randn(Bn, H, C, generator=g) + 3
    bh = torch.rand(Bn, H, C, generator=g)
    c_eff = torch.tensor([7, 5])
    pad = _kpm(Bn, N, seed=24)
    ss, beta = D ** -0.25, 1.3
    fwd_opt = {k_: v_ for k_, v_ in cfg.items() if k_ != "splits"}
    extra = (qt, lam, bh, beta) if mis else (None, None, None, 0.0)
    y = qp.query_pass_fwd(q, w, bias, kap, c_eff, pad, ss, *extra, **fwd_opt)
    ins = [x.double().requires_grad_() for x in (q, w, bias, kap, qt, lam, bh)]
    yr = _passes_torch.query_pass(*ins[:4], c_eff, pad, ss, (*ins[4:], beta) if mis else None)
    dy = torch.randn(yr.shape, generator=g)
    ref = torch.autograd.grad((yr * dy).sum(), ins, allow_unused=True)
    got = qp.query_pass_bwd(q, w, bias, kap, c_eff, pad, ss, *extra, dy, **cfg)
    pairs = [(a, b) for a, b in zip(got, ref) if a is not None]
    assert len(pairs) == (7 if mis else 4)
    assert (y[1, :, pad[1]] == 0).all() and (got[0][1, :, pad[1]] == 0).all()
    assert_close([rel_rms(y, yr)] + [rel_rms(a, b) for a, b in pairs])


# ----------------------------------------------------------------------------- dispatch


def test_backend_reasons(monkeypatch):
    be = dispatch.backends()["triton"]
    q = torch.zeros(1, 1, 4, 8)
    assert be.name == "triton" and isinstance(be, tb.TritonBackend)
    assert any("float64" in r for r in be.not_supported_reasons("lara", q.double(), q.double(), q.double()))
    big = torch.zeros(1, 1, 4, 300)
    assert any("head dim 300" in r for r in be.not_supported_reasons("lara", big, big, big))
    long = torch.zeros(1, 1, 400, 8)   # the sample count is judged as min(C, N, M)
    assert any("300 > 256" in r for r in be.not_supported_reasons("lara", long, long, long, num_samples=300))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tb.CPU_REASON in be.not_supported_reasons("lara", q, q, q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert be.not_supported_reasons("lara", q, q, q, num_samples=4) == []
    assert "triton" not in dispatch.auto_order("cpu")


def test_dot_precision_follows_torch():
    # float32 products follow torch.get_float32_matmul_precision (triton_kernels/_common.py:
    # "highest" -> ieee, "high" -> tf32x3, "medium" -> tf32); half dtypes are not float32
    old = torch.get_float32_matmul_precision()
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert _common.dot_precision(torch.float32) == want
            assert _common.dot_precision(torch.bfloat16) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)
    assert _common.emulated(torch.device("cpu")) and not _common.emulated(torch.device("cuda", 0))


def test_split_count_uses_cached_sm_count(monkeypatch):
    calls = []

    class Props:
        multi_processor_count = 132

    def props(index):
        calls.append(index)
        return Props()

    _common._sm_count.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    try:
        dev = torch.device("cuda", 1)
        # 1000 blocks, 4 other programs, 2 resident per SM: 66 splits of 16 blocks -> 63 splits
        assert _common.num_splits(1000, 4, dev, per_sm=2) == (63, 16)
        assert _common.num_splits(1000, 4, dev, per_sm=2) == (63, 16)
        assert calls == [1]                                   # read once per device
        assert _common.num_splits(1000, 4, torch.device("meta")) == (2, 500)   # DEFAULT_SMS = 8
    finally:
        _common._sm_count.cache_clear()


# ----------------------------------------------------------------------------- GPU, natively


GPU_CASES = [
    ("lara", dict(N=257, M=300, D=64, DV=64, C=64), dict(proposal="segment", weighting="optimal", training=True)),
    ("lara", dict(N=63, M=50, D=60, DV=24, C=8, masked=True), dict(proposal="mixed", weighting="optimal", beta=2.0)),
    ("lara", dict(N=200, M=77, D=96, DV=160, C=40, masked=True), dict(proposal="attend", weighting="balance")),
    ("lara", dict(N=1, M=33, D=128, DV=128, C=16), dict(proposal="segment", training=True)),
    ("lara", dict(N=300, M=300, D=256, DV=256, C=256, landmarks=True), dict(proposal="segment")),
    ("lara", dict(N=1000, M=1000, D=80, DV=80, C=100, masked=True), dict(proposal="mixed", training=True)),
    ("rfa", dict(N=500, M=400, D=64, DV=64, C=128, masked=True), dict()),
]


def _dtype_case(case, dtype):
    fn, shape, opts = GPU_CASES[case]
    shape = dict(shape)
    masked = shape.pop("masked", False)
    Bn = 2
    N, M, C = shape["N"], shape["M"], shape["C"]
    kw = dict(kpm=_kpm(Bn, M, fully=True, seed=30), qpm=_kpm(Bn, N, seed=31)) if masked else {}
    leaves, build, masks, dy = make_case(Bn, 3, N, M, shape["D"], shape["DV"], C, seed=case,
                                         strided=case % 2 == 1, landmarks=shape.get("landmarks", False), **kw)
    if opts.get("proposal") == "attend" and shape.get("landmarks"):
        leaves = leaves[:4]                                 # "attend" takes no k_landmarks
    leaves = [x.to(dtype).float() for x in leaves]          # one set of rounded inputs for all runs
    dy = dy.to(dtype).float()
    return fn, leaves, build, masks, dy, dict(opts, num_samples=C)


def check_dtype_rule(device, dtype, case, monkeypatch):
    """Triton in ``dtype`` on ``device`` vs float64: at most K_EMULATION times the error of
    the rounding emulation (tests/rounding.py, CPU) + EMULATION_FLOOR, for the output and
    every gradient. Returns the rows (name, triton error, emulation error)."""
    fn, leaves, build, masks, dy, opts = _dtype_case(case, dtype)
    monkeypatch.setitem(dispatch._REGISTRY, rounding.NAME, rounding.emulation_backend())
    cpu = torch.device("cpu")

    def go(backend, dt, dev):
        y, g = run(fn, backend, leaves, build, masks, dy, dt, dev, **opts,
                   generator=torch.Generator(device=dev).manual_seed(99))
        return [y] + [None if x is None else x.cpu() for x in g]

    got = go("triton", dtype, device)
    exact = go("reference", torch.float64, device)
    # the emulation runs on CPU, whose generator draws other samples than a GPU's: its
    # error is taken against a float64 reference on CPU with the same samples
    emu = go(rounding.NAME, dtype, cpu)
    exact_cpu = exact if device.type == "cpu" else go("reference", torch.float64, cpu)
    assert got[0].dtype == dtype
    rows = []
    for i, (a, e, x, xc) in enumerate(zip(got, emu, exact, exact_cpu)):
        if x is None:
            continue
        name = "y" if i == 0 else f"grad{i - 1}"
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err, err_emu = rel_rms(a.cpu(), x.cpu()), rel_rms(e, xc)
        rows.append((name, err, err_emu))
        assert err <= K_EMULATION * err_emu + EMULATION_FLOOR, \
            f"{name}: triton {err:.3g} vs rounding emulation {err_emu:.3g} (k = {K_EMULATION})"
    return rows


def test_rounding_emulation_is_the_math(monkeypatch):
    # the emulation in float32 (no rounding of operands) is the function: the reference's
    # float32 tolerance against float64, on a case with MIS, masks and strides
    fn, leaves, build, masks, dy, opts = _dtype_case(1, torch.float32)
    monkeypatch.setitem(dispatch._REGISTRY, rounding.NAME, rounding.emulation_backend())
    errs = compare_to_reference(fn, rounding.NAME, leaves, build, masks, dy, opts)
    assert_close(errs)
    # and in bfloat16 it is as far from float64 as bfloat16 operands make it (unit roundoff
    # 2^-9 = 2e-3): more than float32 roundoff, less than ten bfloat16 roundings
    fn, leaves, build, masks, dy, opts = _dtype_case(1, torch.bfloat16)
    y, g = run(fn, rounding.NAME, leaves, build, masks, dy, torch.bfloat16, "cpu", **opts,
               generator=torch.Generator().manual_seed(99))
    y64, g64 = run(fn, "reference", leaves, build, masks, dy, torch.float64, "cpu", **opts,
                   generator=torch.Generator().manual_seed(99))
    for a, b in zip([y, *g], [y64, *g64]):
        if b is not None:
            assert 1e-4 < rel_rms(a, b) < 2e-2, rel_rms(a, b)


@interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [1, 3])
def test_half_dtypes_interpreter(dtype, case, monkeypatch):
    # Under the interpreter the kernels round their product operands to the input dtype as
    # on a GPU and multiply them exactly in float32 (_common.mma): the result must match
    # the rounding emulation's error, not merely the math.
    rows = check_dtype_rule(torch.device("cpu"), dtype, case, monkeypatch)
    assert len(rows) >= 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_vs_reference(dtype, case, monkeypatch):
    check_dtype_rule(torch.device("cuda"), dtype, case, monkeypatch)


@pytest.mark.gpu
def test_gpu_passes_poisoned():
    # the direct pass comparisons, natively, with several splits
    dev = torch.device("cuda")
    w, k, v = [x.to(dev) for x in _dir_inputs(40, 2, 3, 150, 1000, 96, 80)]
    pad = _kpm(2, 1000, seed=41).to(dev)
    Z, kap = kp.key_pass_fwd(w, k, v, pad, 0.4, True)
    Zr, kr = _passes_torch.key_pass(w.double(), k.double(), v.double(), pad, 0.4, True)
    assert_close([rel_rms(Z, Zr), rel_rms(kap, kr)])


@pytest.mark.gpu
def test_gpu_launchers_never_sync_and_capture_in_a_graph():
    # the four launchers issue no device synchronization (sync debug mode "error") and
    # replay from a CUDA graph with the same results
    dev = torch.device("cuda")
    w, k, v = [x.to(dev) for x in _dir_inputs(43, 2, 3, 24, 300, 64, 64)]
    pad = _kpm(2, 300, seed=44).to(dev)
    dZ, dkap = torch.randn(2, 3, 24, device=dev), torch.randn(2, 3, 24, 64, device=dev)
    c_eff = torch.full((2,), 24, dtype=torch.int64, device=dev)
    bias, bh = torch.randn(2, 3, 24, device=dev), torch.rand(2, 3, 24, device=dev)

    def calls():
        Z, kap = kp.key_pass_fwd(w, k, v, pad, 0.4, True)
        grads = kp.key_pass_bwd(w, k, v, pad, 0.4, True, Z, kap, dZ, dkap)
        y = qp.query_pass_fwd(k, w, bias, kap, c_eff, pad, 0.4, w, bias, bh, 1.5)
        qgrads = qp.query_pass_bwd(k, w, bias, kap, c_eff, pad, 0.4, w, bias, bh, 1.5, v)
        return [Z, kap, *grads, y, *qgrads]

    eager = calls()                                   # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = calls()
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device():
    # inputs on cuda:1 with cuda:0 current: the launchers' device guard
    leaves, build, masks, dy = make_case(2, 2, 40, 40, 32, 32, 8, seed=42)
    with torch.cuda.device(0):
        y1, g1 = run("lara", "triton", leaves, build, masks, dy, torch.float32, torch.device("cuda", 1), num_samples=8)
    y0, g0 = run("lara", "triton", leaves, build, masks, dy, torch.float32, torch.device("cuda", 0), num_samples=8)
    assert y1.device == torch.device("cuda", 1)
    assert rel_rms(y1.cpu(), y0.cpu()) <= FWD_TOL


@interp
@pytest.mark.parametrize("garbage", [1e4, float("nan")], ids=["large", "nan"])
def test_padded_positions_are_never_read(garbage):
    # The defining property of the masks: padded rows do not change the valid rows. Fill
    # the padded queries, keys and values with garbage that overflows exp() (or NaN): the
    # output equals the one with zeros there, padded rows are 0, gradients finite.
    from lara_kernels import _ops

    if garbage != garbage and not _ops.built():
        pytest.skip("the torch landmarks fallback multiplies padded rows by 0 (0 * nan = nan)")
    ((y0, g0), (y1, g1)), qpm = runs_with_padded_fill("triton", (0.0, garbage))
    assert torch.isfinite(y1).all() and all(torch.isfinite(g).all() for g in g1)
    assert torch.equal(y1[1, :, qpm[1]], torch.zeros_like(y1[1, :, qpm[1]]))
    assert rel_rms(y1, y0) <= FWD_TOL
    assert all(rel_rms(a, b) <= GRAD_TOL for a, b in zip(g1, g0))
