"""The compiled CUDA passes (csrc/cuda/*_pass_kernel.cu) and segment means
(csrc/cuda/landmarks_kernel.cu) against the CPU ops and the eager torch passes (the
reference for the segment means), forward and backward, through the dispatcher
(torch.ops.lara_kernels.*). Also: launch geometry with B x H beyond the 65535 of a grid's
y and z axes, and capture of every op in a CUDA graph (no host synchronization). The packed
(varlen) layout has its own section at the end: each op against the same op in the padded
layout on each sequence alone and against the float64 eager passes. The last section runs the
whole op (lara_fwd / lara_bwd, csrc/cuda/fused_cuda.cpp) against the CPU ops of the same schema.

Every test needs a GPU (marker ``gpu``; conftest.py skips them without one). Inputs are
drawn in float64 on the CPU and rounded once to the tested dtype; the oracle is
``lara_kernels._passes_torch`` run in float64 on those rounded inputs (autograd for the
gradients), and the CPU op with the same contract is compared the same way.

Padded rows of q/k/v hold NaN (they must never be read) and q/k/v/dy are non-contiguous
in half of the cases. Outputs the ops allocate are poisoned: before each call the CUDA
caching allocator's free blocks are filled with NaN, so an element a kernel forgets to
write stays NaN and fails the finiteness check.

Tolerances (relative RMS error against float64, ``helpers.rel_rms``), per output:
- float64 inputs: 1e-11. The kernels accumulate in float64; errors measured in an
  emulation of the kernels are 1e-15 .. 2e-14 (the larger with the MIS gradients, whose
  1 / alpha amplifies rounding), so 1e-11 only fails on a real error.
- float32 results (every result of float32 inputs, and the C-sized results Z, kap, dw,
  dbias, dkap, dqt, dlam, dbh of every dtype, which are float32 for half inputs):
  at most K32 = 4 times the error of the same eager passes run in float32 on the same
  inputs, plus a floor of 1e-5. Both do the same float32 arithmetic in different orders,
  so their errors are alike, and scaling by the eager error follows the conditioning of
  the case (the MIS gradients of a case with small alpha lose more digits in any float32
  code). The floor covers cases where the eager error is tiny by luck and the fast-math
  exp/log/division of the setup.py build (a few ulp each); it is the floor of the Triton
  GPU tests too. An indexing or formula error gives 1e-3 or more. (In an emulation of
  the kernels with exact libm the errors were 1e-7 .. 3e-6.)
- float16/bfloat16 results (y, dq, dk, dv in the input dtype): the float32 bound above
  plus twice the error of rounding the float64 result to that dtype (one rounding of the
  output, as in flash-attention's "at most k times the reference in that dtype").
"""

from __future__ import annotations

import pytest
import torch

from helpers import rel_rms
from lara_kernels import _ops, _passes_torch, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is available on this machine"),
    pytest.mark.skipif(not _ops.built_with_cuda(),
                       reason="lara_kernels._C is built without CUDA" if _ops.built()
                       else f"lara_kernels._C not built: {_ops.C_ERROR}"),
]

OPS = torch.ops.lara_kernels
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
K32 = 4.0
FLOOR32 = 1e-5
TOL64 = 1e-11


def ct_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def poison_cache():
    """Fill free blocks of the CUDA caching allocator with NaN (small and large pools)."""
    sizes = [256] * 64 + [2**16] * 16 + [2**18] * 8 + [2**22] * 4 + [2**24] * 2
    bufs = [torch.full((n,), float("nan"), device="cuda") for n in sizes]
    del bufs


def bound(out, ref64, ref32):
    """The allowed relative RMS error of ``out`` (see the module docstring)."""
    if out.dtype == torch.float64:
        return TOL64
    b = K32 * rel_rms(ref32, ref64) + FLOOR32
    if out.dtype in (torch.float16, torch.bfloat16):
        b += 2.0 * rel_rms(ref64.to(out.dtype), ref64)
    return b


def assert_close(name, out, ref64, ref32, dtype, at_least=0.0):
    """``at_least``: a bound of the caller's that the tolerance does not go below."""
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite elements (unwritten or NaN leaked)"
    err, tol = rel_rms(out, ref64), max(bound(out, ref64, ref32), at_least)
    assert err <= tol, f"{name}: rel RMS {err:.3g} > {tol:.3g}"


def rows_zero(x, pad):
    """x (B, H, L, W): every padded row is exactly 0."""
    return pad is None or bool((x.permute(0, 2, 1, 3)[pad.to(x.device)] == 0).all())


def long_input(g, B, H, L, W, dtype, strided, kind):
    """(B, H, L, W) in dtype; strided: three different non-contiguous layouts."""
    if not strided:
        return torch.randn(B, H, L, W, generator=g, dtype=torch.float64).to(dtype)
    if kind == 0:   # (B, L, H, W) transposed: head-major strides
        return torch.randn(B, L, H, W, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    if kind == 1:   # stride 1 along L, W strided (column loads are uncoalesced)
        return torch.randn(B, H, W, L, generator=g, dtype=torch.float64).to(dtype).transpose(-1, -2)
    return torch.randn(B, H, L, 2 * W, generator=g, dtype=torch.float64).to(dtype)[..., 1::2]


def make_padding(g, B, L):
    pad = torch.rand(B, L, generator=g) < 0.3
    pad[:, 0] = False                  # every element keeps a valid row
    if B > 1:
        pad[1, L // 2:] = True         # and one has a padded tail
        pad[1, 0] = False
    return pad


def fill_padded(x, pad):
    """A copy of x, in x's (possibly non-contiguous) layout, with NaN in the padded rows."""
    if pad is None or x is None:
        return x
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x)
    y.permute(0, 2, 1, 3)[pad] = float("nan")
    return y


def to_dev(t, device):
    """t on device with the same strides (``Tensor.to`` makes non-dense layouts contiguous)."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


# ----------------------------------------------------------------------------- key pass

KEY_SHAPES = [
    # B, H, M, D, Dv (None: no values, the query normalizer), C, subtract_norm
    (2, 2, 33, 16, 16, 5, True),
    (2, 3, 300, 40, 64, 24, True),
    (1, 2, 1000, 64, 40, 100, True),
    (2, 1, 257, 128, 128, 64, True),
    (1, 2, 200, 256, 256, 256, True),
    (2, 2, 150, 40, None, 17, False),
    (1, 1, 77, 256, None, 130, False),
    (2, 2, 90, 64, 128, 16, True),
    (2, 1, 70, 32, 24, 40, True),     # two groups of 32 rows, one k/v tile load for both
    (1, 1, 70, 64, 64, 130, True),    # five groups; float64 in c blocks (shared memory)
]


def key_case(shape, dtype, padded, strided, seed):
    B, H, M, D, Dv, C, sub = shape
    g = torch.Generator().manual_seed(seed)
    ct = ct_of(dtype)
    w = torch.randn(B, H, C, D, generator=g, dtype=torch.float64).to(ct)
    k = long_input(g, B, H, M, D, dtype, strided, seed % 3)
    v = long_input(g, B, H, M, Dv, dtype, strided, (seed + 1) % 3) if Dv else None
    pad = make_padding(g, B, M) if padded else None
    ss = D ** -0.25
    dZ = torch.randn(B, H, C, generator=g, dtype=torch.float64)
    dkap = torch.randn(B, H, C, Dv, generator=g, dtype=torch.float64) if Dv else None
    return w, k, v, pad, ss, sub, dZ, dkap


def key_reference(w, k, v, pad, ss, sub, dZ, dkap, dt):
    """Z, kap and (dw, dk, dv) of the eager passes in dt (kap, dv None without values)."""
    leaves = [w.to(dt).requires_grad_(), k.to(dt).requires_grad_()]
    if v is not None:
        leaves.append(v.to(dt).requires_grad_())
    Z, kap = _passes_torch.key_pass(leaves[0], leaves[1], leaves[2] if v is not None else leaves[1], pad, ss, sub)
    outs, grads_in = [Z], [dZ.to(dt)]
    if v is not None:
        outs.append(kap)
        grads_in.append(dkap.to(dt))
    grads = torch.autograd.grad(outs, leaves, grads_in)
    return Z.detach(), (kap.detach() if v is not None else None), grads


def run_key(device, w, k, v, pad, ss, sub, dZ, dkap):
    wd, kd, vd, pd = (to_dev(t, device) for t in (w, k, v, pad))
    if device == "cuda":
        poison_cache()
    Z, kap = OPS.key_pass_fwd(wd, kd, vd, pd, ss, sub)
    if device == "cuda":
        poison_cache()
    grads = OPS.key_pass_bwd(wd, kd, vd, pd, ss, sub, Z, kap if v is not None else None, to_dev(dZ.to(w.dtype), device),
                             None if dkap is None else to_dev(dkap.to(w.dtype), device))
    return Z, kap, grads


def check_key(results, refs, dtype, v, pad, shape):
    Z, kap, (dw, dk, dv) = results
    (Z64, kap64, g64), (Z32, kap32, g32) = refs
    ct = ct_of(dtype)
    assert_close("Z", Z.cpu(), Z64, Z32, ct)
    assert_close("dw", dw.cpu(), g64[0], g32[0], ct)
    assert_close("dk", dk.cpu(), g64[1], g32[1], dtype)
    assert rows_zero(dk, pad)
    if v is not None:
        assert_close("kap", kap.cpu(), kap64, kap32, ct)
        assert_close("dv", dv.cpu(), g64[2], g32[2], dtype)
        assert rows_zero(dv, pad)
    else:
        assert tuple(kap.shape) == (shape[0], shape[1], shape[5], 0)
        assert dv.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KEY_SHAPES, ids=lambda s: f"M{s[2]}-D{s[3]}-Dv{s[4]}-C{s[5]}")
def test_key_pass_cuda(shape, dtype):
    i = KEY_SHAPES.index(shape)
    padded, strided = i != 0, i % 2 == 1
    w, k, v, pad, ss, sub, dZ, dkap = key_case(shape, dtype, padded, strided, seed=10 + i)
    k, v = fill_padded(k, pad), fill_padded(v, pad)
    refs = [key_reference(w, k, v, pad, ss, sub, dZ, dkap, dt) for dt in (torch.float64, torch.float32)]
    if dtype == torch.float64:
        refs[1] = refs[0]
    cuda = run_key("cuda", w, k, v, pad, ss, sub, dZ, dkap)
    check_key(cuda, refs, dtype, v, pad, shape)
    # the CPU op, same contract, same inputs
    cpu = run_key("cpu", w, k, v, pad, ss, sub, dZ, dkap)
    check_key(cpu, refs, dtype, v, pad, shape)


# ----------------------------------------------------------------------------- query pass

QUERY_SHAPES = [
    # B, H, N, D, Dv, C
    (2, 2, 1, 16, 16, 5),
    (2, 3, 300, 40, 64, 24),
    (1, 2, 1000, 64, 40, 100),
    (2, 1, 257, 128, 128, 70),
    (1, 2, 200, 256, 256, 256),
    (2, 2, 150, 40, 24, 130),
]


def query_case(shape, dtype, padded, strided, mis, seed):
    B, H, N, D, Dv, C = shape
    g = torch.Generator().manual_seed(seed)
    ct = ct_of(dtype)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = long_input(g, B, H, N, D, dtype, strided, seed % 3)
    ss = D ** -0.25
    w, bias, kap = r(B, H, C, D).to(ct), r(B, H, C).to(ct), r(B, H, C, Dv).to(ct)
    c_eff = torch.randint(1, C + 1, (B,), generator=g)
    c_eff[0] = C                                   # one element with all samples active
    pad = make_padding(g, B, N) if padded else None
    mis_args = None
    if mis:
        qt = (0.5 * r(B, H, C, D)).to(ct)
        lam = _passes_torch.query_normalizer(qt.double(), q.double(), pad, ss).to(ct)   # as the pipeline does
        bh = torch.softmax(r(B, H, C), -1).to(ct)
        mis_args = (qt, lam, bh, 1.3)
    dy = long_input(g, B, H, N, Dv, dtype, strided, (seed + 2) % 3)
    return q, w, bias, kap, c_eff, pad, ss, mis_args, dy


def query_reference(q, w, bias, kap, c_eff, pad, ss, mis_args, dy, dt):
    leaves = [x.to(dt).requires_grad_() for x in (q, w, bias, kap)]
    mis = None
    if mis_args is not None:
        leaves += [x.to(dt).requires_grad_() for x in mis_args[:3]]
        mis = (leaves[4], leaves[5], leaves[6], mis_args[3])
    y = _passes_torch.query_pass(leaves[0], leaves[1], leaves[2], leaves[3], c_eff, pad, ss, mis)
    grads = torch.autograd.grad(y, leaves, dy.to(dt))
    return y.detach(), grads


def run_query(device, q, w, bias, kap, c_eff, pad, ss, mis_args, dy):
    qt, lam, bh, beta = mis_args if mis_args is not None else (None, None, None, 0.0)
    args = [to_dev(t, device) for t in (q, w, bias, kap, c_eff, pad)] + [ss]
    args += [to_dev(t, device) for t in (qt, lam, bh)] + [beta]
    if device == "cuda":
        poison_cache()
    y = OPS.query_pass_fwd(*args)
    if device == "cuda":
        poison_cache()
    grads = OPS.query_pass_bwd(*args, to_dev(dy, device))
    return y, grads


def check_query(results, refs, dtype, mis, pad):
    y, grads = results
    (y64, g64), (y32, g32) = refs
    ct = ct_of(dtype)
    assert_close("y", y.cpu(), y64, y32, dtype)
    assert rows_zero(y, pad)
    names = ["dq", "dw", "dbias", "dkap", "dqt", "dlam", "dbh"]
    for i in range(7 if mis else 4):
        assert_close(names[i], grads[i].cpu(), g64[i], g32[i], dtype if i == 0 else ct)
    assert rows_zero(grads[0], pad)
    if not mis:
        assert all(t.numel() == 0 for t in grads[4:])


@pytest.mark.parametrize("mis", [True, False], ids=["mis", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QUERY_SHAPES, ids=lambda s: f"N{s[2]}-D{s[3]}-Dv{s[4]}-C{s[5]}")
def test_query_pass_cuda(shape, dtype, mis):
    i = QUERY_SHAPES.index(shape)
    padded, strided = i != 0, i % 2 == 1
    q, w, bias, kap, c_eff, pad, ss, mis_args, dy = query_case(shape, dtype, padded, strided, mis, seed=20 + i)
    q = fill_padded(q, pad)
    refs = [query_reference(q, w, bias, kap, c_eff, pad, ss, mis_args, dy, dt) for dt in (torch.float64, torch.float32)]
    if dtype == torch.float64:
        refs[1] = refs[0]
    check_query(run_query("cuda", q, w, bias, kap, c_eff, pad, ss, mis_args, dy), refs, dtype, mis, pad)
    check_query(run_query("cpu", q, w, bias, kap, c_eff, pad, ss, mis_args, dy), refs, dtype, mis, pad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_query_pass_cuda_dy_in_float32(dtype):
    # dy of another dtype than q (float32 here, as autograd may hand it) is read as float32
    shape = (2, 2, 90, 40, 24, 33)
    q, w, bias, kap, c_eff, pad, ss, mis_args, dy = query_case(shape, dtype, True, True, True, seed=5)
    q = fill_padded(q, pad)
    dy = dy.float()
    refs = [query_reference(q, w, bias, kap, c_eff, pad, ss, mis_args, dy, dt) for dt in (torch.float64, torch.float32)]
    check_query(run_query("cuda", q, w, bias, kap, c_eff, pad, ss, mis_args, dy), refs, dtype, True, pad)


def test_cuda_passes_are_deterministic():
    # no float atomics: two runs give the same bits (several splits of the long axes)
    w, k, v, pad, ss, sub, dZ, dkap = key_case((2, 2, 3000, 64, 64, 48, True), torch.float32, True, True, seed=3)
    a = run_key("cuda", w, k, v, pad, ss, sub, dZ, dkap)
    b = run_key("cuda", w, k, v, pad, ss, sub, dZ, dkap)
    assert all(torch.equal(x, y) for x, y in zip(a[:2] + a[2], b[:2] + b[2]))
    q, w, bias, kap, c_eff, pad, ss, mis_args, dy = query_case((2, 2, 3000, 64, 64, 48), torch.float32, True, True,
                                                             True, seed=4)
    a = run_query("cuda", q, w, bias, kap, c_eff, pad, ss, mis_args, dy)
    b = run_query("cuda", q, w, bias, kap, c_eff, pad, ss, mis_args, dy)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_cuda_passes_large_logits_stay_finite():
    # log-space throughout: logits of a few hundred give no overflow in either pass
    g = torch.Generator().manual_seed(7)
    w = 20 * torch.randn(1, 2, 20, 32, generator=g, dtype=torch.float64)
    k = 20 * torch.randn(1, 2, 60, 32, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 60, 8, generator=g, dtype=torch.float64)
    Z, kap = OPS.key_pass_fwd(w.float().cuda(), k.float().cuda(), v.float().cuda(), None, 0.4, True)
    Zr, kr = _passes_torch.key_pass(w, k, v, None, 0.4, True)
    assert torch.isfinite(Z).all() and torch.isfinite(kap).all()
    assert rel_rms(Z.cpu(), Zr) < 1e-5 and rel_rms(kap.cpu(), kr) < 1e-4
    q = 20 * torch.randn(1, 2, 30, 32, generator=g, dtype=torch.float64)
    bias = torch.randn(1, 2, 20, generator=g, dtype=torch.float64)
    ce = torch.tensor([20])
    args = [x.float().cuda() for x in (q, w, bias, kr)] + [ce.cuda(), None, 0.4, None, None, None, 0.0]
    y = OPS.query_pass_fwd(*args)
    assert torch.isfinite(y).all()
    assert rel_rms(y.cpu(), _passes_torch.query_pass(q, w, bias, kr, ce, None, 0.4, None)) < 1e-4
    grads = OPS.query_pass_bwd(*args, torch.randn(1, 2, 30, 8, device="cuda"))
    assert all(torch.isfinite(t).all() for t in grads)


def test_cuda_ops_reject_cpu_tensors_mixed_with_cuda():
    w = torch.randn(1, 1, 4, 16, device="cuda")
    k = torch.randn(1, 1, 8, 16, device="cuda")
    with pytest.raises(RuntimeError, match="v is on"):
        OPS.key_pass_fwd(w, k, torch.randn(1, 1, 8, 16), None, 0.5, True)


# ----------------------------------------------------------------------------- landmarks

LANDMARK_SHAPES = [
    # B, H, L, D, C
    (2, 2, 37, 16, 5),
    (3, 2, 300, 40, 24),
    (2, 1, 70, 300, 64),   # the segment means take any D (no 256 limit)
]


def landmark_case(shape, dtype, padded, strided, seed):
    B, H, L, D, C = shape
    g = torch.Generator().manual_seed(seed)
    x = long_input(g, B, H, L, D, dtype, strided, seed % 3)
    pad = make_padding(g, B, L) if padded else None
    n_valid = L - (pad.sum(-1) if pad is not None else torch.zeros(B, dtype=torch.long))
    c_eff = torch.minimum(torch.randint(1, C + 1, (B,), generator=g), n_valid)
    c_eff[0] = min(C, int(n_valid[0]))               # one element with as many segments as it can
    grad = torch.randn(B, H, C, D, generator=g, dtype=torch.float64)
    return x, pad, c_eff, grad


def landmark_reference(x, pad, c_eff, grad, C):
    """Segment means of x in float64 (reference.segment_means) and their gradient for grad."""
    valid = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool) if pad is None else ~pad
    x64 = x.double().masked_fill(~valid[:, None, :, None], 0.0).requires_grad_()
    out = reference.segment_means(x64, valid, C, c_eff)
    (gx,) = torch.autograd.grad(out, x64, grad)
    return out.detach(), gx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LANDMARK_SHAPES, ids=lambda s: f"L{s[2]}-D{s[3]}-C{s[4]}")
def test_landmarks_cuda(shape, dtype):
    i = LANDMARK_SHAPES.index(shape)
    padded, strided = i != 0, i % 2 == 1
    B, H, L, D, C = shape
    x, pad, c_eff, grad = landmark_case(shape, dtype, padded, strided, seed=30 + i)
    x = fill_padded(x, pad)
    ct = ct_of(dtype)
    out64, gx64 = landmark_reference(x, pad, c_eff, grad, C)
    # the CPU op on the same inputs: the same accumulation type and order as the kernels
    out32 = OPS.landmarks(x, pad, c_eff, C) if dtype != torch.float64 else out64
    gx32 = OPS.landmarks_backward(grad.to(ct), pad, c_eff, L, ct) if dtype != torch.float64 else gx64
    dev = [to_dev(t, "cuda") for t in (x, pad, c_eff)]
    poison_cache()
    out = OPS.landmarks(*dev, C)
    assert_close("landmarks", out.cpu(), out64, out32, ct)
    poison_cache()
    gx = OPS.landmarks_backward(to_dev(grad.to(ct), "cuda"), dev[1], dev[2], L, dtype)
    assert_close("grad_x", gx.cpu(), gx64, gx32, dtype)
    assert rows_zero(gx, pad)


def test_landmarks_cuda_clamps_c_eff():
    # c_eff is not checked on the host (that would synchronize): each element's count is
    # clamped to [0, min(num_segments, valid length)]; the CPU op checks, so it gets the
    # clamped counts here
    B, H, L, D, C = 4, 2, 40, 8, 6
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[2, 3:] = True                                  # 3 valid positions
    c_eff = torch.tensor([C + 5, -2, 5, C])            # above C, negative, above the valid length, in range
    clamped = torch.tensor([C, 0, 3, C])
    grad = torch.randn(B, H, C, D, generator=g, dtype=torch.float64)
    dev = [to_dev(t, "cuda") for t in (x, pad, c_eff)]
    out = OPS.landmarks(*dev, C).cpu()
    ref = OPS.landmarks(x, pad, clamped, C)
    assert_close("landmarks", out, ref, ref, torch.float64)
    assert bool((out[1] == 0).all()) and bool((out[2, :, 3:] == 0).all())  # no segments beyond the count
    gx = OPS.landmarks_backward(to_dev(grad, "cuda"), dev[1], dev[2], L, torch.float64).cpu()
    gref = OPS.landmarks_backward(grad, pad, clamped, L, torch.float64)
    assert_close("grad_x", gx, gref, gref, torch.float64)


# ----------------------------------------------------------------------------- launch geometry, graphs

def all_ops(t):
    """Every op once on the tensors of dict t (forward, then backward with the forward's
    outputs): a flat list of the results."""
    C, L = t["w"].shape[2], t["x"].shape[2]
    lm = OPS.landmarks(t["x"], t["pad"], t["c_eff"], C)
    gx = OPS.landmarks_backward(t["gl"], t["pad"], t["c_eff"], L, t["x"].dtype)
    Z, kap = OPS.key_pass_fwd(t["w"], t["k"], t["v"], t["pad"], 0.5, True)
    dw, dk, dv = OPS.key_pass_bwd(t["w"], t["k"], t["v"], t["pad"], 0.5, True, Z, kap, t["dZ"], t["dkap"])
    qargs = [t["q"], t["w"], t["bias"], kap, t["c_eff"], t["pad"], 0.5, t["qt"], t["lam"], t["bh"], 1.3]
    y = OPS.query_pass_fwd(*qargs)
    return [lm, gx, Z, kap, dw, dk, dv, y, *OPS.query_pass_bwd(*qargs, t["dy"])]


def all_ops_inputs(B, H, L, D, C, dtype, seed, device):
    """Inputs of all_ops: sequences of length L (keys and queries alike), head dim D, C samples."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    pad = make_padding(g, B, L)
    t = {"x": r(B, H, L, D), "gl": r(B, H, C, D), "w": r(B, H, C, D), "k": r(B, H, L, D), "v": r(B, H, L, D),
         "dZ": r(B, H, C), "dkap": r(B, H, C, D), "q": r(B, H, L, D), "bias": r(B, H, C), "qt": 0.5 * r(B, H, C, D),
         "lam": r(B, H, C), "bh": torch.softmax(r(B, H, C), -1), "dy": r(B, H, L, D), "pad": pad,
         "c_eff": torch.minimum(torch.full((B,), C), (~pad).sum(-1))}
    return {name: to_dev(x, device) for name, x in t.items()}


# B x H = 65536 is beyond the 65535 of a grid's y and z axes (the landmarks kernels put
# B x H on y before); every kernel folds B x H into the int64 block index on x.
MANY_HEADS = (4096, 16, 5, 4, 3)   # B, H, L, D, C


def test_cuda_ops_batch_heads_beyond_grid_y():
    out = all_ops(all_ops_inputs(*MANY_HEADS, torch.float64, 12, "cuda"))
    ref = all_ops(all_ops_inputs(*MANY_HEADS, torch.float64, 12, "cpu"))
    assert len(out) == len(ref) == 15
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.shape == b.shape, f"result {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"result {i}: non-finite elements"
        assert rel_rms(a.cpu(), b) <= TOL64, f"result {i}: rel RMS {rel_rms(a.cpu(), b):.3g} > {TOL64}"


def test_cuda_ops_capture_in_cuda_graph():
    # no op synchronizes with the host (no .item(), no value-dependent shapes): all of them
    # are captured in one CUDA graph, and a replay on new inputs gives the bits of an eager
    # call on those inputs (the kernels are deterministic)
    static = all_ops_inputs(2, 3, 70, 16, 9, torch.float32, 13, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        all_ops(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = all_ops(static)
    fresh = all_ops_inputs(2, 3, 70, 16, 9, torch.float32, 14, "cuda")
    for name, x in fresh.items():
        static[name].copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    eager = all_ops(fresh)
    assert all(torch.equal(a, b) for a, b in zip(outs, eager))
    assert not torch.equal(outs[0], all_ops(all_ops_inputs(2, 3, 70, 16, 9, torch.float32, 13, "cuda"))[0])


# ----------------------------------------------------------------------------- packed (varlen) layout
#
# The packed layout (csrc/lara_ops.h): q, k, v, dy and their gradients are (T, H, W) rows of
# B sequences with cu_seqlens (B + 1) int32 and max_seqlen; the C-sized tensors stay
# (B, H, C, ...). For each sequence b the packed call must give what the same op gives in the
# padded layout on that sequence alone, x[cu[b]:cu[b+1]].transpose(0, 1)[None] (1, H, L_b, W)
# (compared with the tolerances above, the two runs differ in their splits of the long axis;
# the landmarks bitwise, they sum in the same order), and what the float64 eager passes give on
# it (the tolerances above). Sequences with nothing to attend follow the contract: no key ->
# Z = -inf, kap = 0, dw = 0; c_eff = 0 -> y = 0, dq = 0, nothing added to the C-sized gradients.
# Empty sequences sit first, in the middle and last; max_seqlen is above every length in some
# cases (blocks past every sequence's end); the outputs are NaN-poisoned as above.

def packed_input(g, lens, H, W, dtype, strided, kind):
    """(sum(lens), H, W) packed rows in dtype; strided: three different non-contiguous layouts."""
    T = sum(lens)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if not strided:
        return r(T, H, W)
    if kind == 0:   # (H, T, W) transposed: head-major strides
        return r(H, T, W).transpose(0, 1)
    if kind == 1:   # W strided, H contiguous
        return r(T, W, H).transpose(1, 2)
    return r(T, H, 2 * W)[..., 1::2]


def offsets(lens):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return cu


def seq_of(x, cu, b):
    """Sequence b of packed x (T, H, W) in the padded layout of a batch of one: (1, H, L_b, W)."""
    return None if x is None else x[int(cu[b]):int(cu[b + 1])].transpose(0, 1)[None]


def packed_rows(parts, H, W, dtype):
    """Per-sequence (1, H, L_b, W) results -> packed (T, H, W)."""
    rows = [p[0].transpose(0, 1) for p in parts]
    return torch.cat(rows, 0) if rows else torch.zeros(0, H, W, dtype=dtype)


def assert_packed(name, out, ref64, ref32, dtype, dead=None, dead_value=0.0):
    """assert_close on the finite part; `dead` (B,) bool: those leading-dim rows of a
    C-sized result must be exactly dead_value (and are left out of the RMS)."""
    out = out.cpu()
    if dead is not None and bool(dead.any()):
        assert bool((out[dead] == dead_value).all()), f"{name}: not {dead_value} for the sequences with nothing to attend"
        live = ~dead
        out, ref64, ref32 = out[live], ref64[live], ref32[live]
    if out.numel():
        assert_close(name, out, ref64, ref32, dtype)


VARLEN_KEY = [
    # lengths, H, D, Dv (None: no values), C, subtract_norm, max_seqlen beyond the longest
    ((0, 5, 1, 37, 0, 70, 0), 2, 16, 24, 5, True, 0),   # empty first / middle / last, a length 1
    ((33, 0, 64, 3), 2, 40, None, 17, False, 9),        # the normalizer; C above two of the lengths
    ((40, 0, 75), 1, 32, 16, 256, True, 0),              # grouped-query attention: G = 4 x 64 rows
    ((19, 50), 1, 16, 8, 512, True, 3),                  # G = 8 x 64 rows
]


def varlen_key_case(case, dtype, strided, seed):
    lens, H, D, Dv, C, sub, extra = case
    g = torch.Generator().manual_seed(seed)
    B, ct = len(lens), ct_of(dtype)
    w = torch.randn(B, H, C, D, generator=g, dtype=torch.float64).to(ct)
    k = packed_input(g, lens, H, D, dtype, strided, seed % 3)
    v = packed_input(g, lens, H, Dv, dtype, strided, (seed + 1) % 3) if Dv else None
    dZ = torch.randn(B, H, C, generator=g, dtype=torch.float64)
    dkap = torch.randn(B, H, C, Dv, generator=g, dtype=torch.float64) if Dv else None
    return w, k, v, D ** -0.25, sub, dZ, dkap, offsets(lens), max(lens) + extra


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_KEY, ids=lambda c: f"B{len(c[0])}-D{c[2]}-Dv{c[3]}-C{c[4]}")
def test_key_pass_cuda_packed(case, dtype):
    i = VARLEN_KEY.index(case)
    w, k, v, ss, sub, dZ, dkap, cu, max_seqlen = varlen_key_case(case, dtype, i % 2 == 1, seed=40 + i)
    lens, H, D, Dv, C = case[0], case[1], case[2], case[3], case[4]
    B, ct = len(lens), ct_of(dtype)
    dev = [to_dev(t, "cuda") for t in (w, k, v, cu)]
    dZd, dkapd = to_dev(dZ.to(ct), "cuda"), None if dkap is None else to_dev(dkap.to(ct), "cuda")
    poison_cache()
    Z, kap = OPS.key_pass_fwd(dev[0], dev[1], dev[2], None, ss, sub, dev[3], max_seqlen)
    poison_cache()
    dw, dk, dv = OPS.key_pass_bwd(dev[0], dev[1], dev[2], None, ss, sub, Z, kap if v is not None else None, dZd,
                                  dkapd, dev[3], max_seqlen)
    assert tuple(Z.shape) == (B, H, C) and tuple(dk.shape) == tuple(k.shape) and dk.dtype == dtype

    # per sequence: the eager passes (float64, float32) and the padded-layout op, on it alone
    empty = torch.tensor([n == 0 for n in lens])
    refs = {dt: {"Z": [], "kap": [], "dw": [], "dk": [], "dv": []} for dt in ("64", "32", "op")}
    for b in range(B):
        kb, vb = seq_of(k, cu, b), seq_of(v, cu, b)
        args = (w[b:b + 1], kb, vb, None, ss, sub, dZ[b:b + 1], None if dkap is None else dkap[b:b + 1])
        if lens[b] == 0:
            outs = {"Z": torch.full((1, H, C), float("-inf"), dtype=torch.float64),
                    "kap": torch.zeros(1, H, C, Dv or 0, dtype=torch.float64),
                    "dw": torch.zeros(1, H, C, D, dtype=torch.float64)}
            for name in ("64", "32", "op"):
                for key, val in outs.items():
                    refs[name][key].append(val)
            continue
        for name, dt in (("64", torch.float64), ("32", torch.float32 if dtype != torch.float64 else torch.float64)):
            Zr, kapr, gr = key_reference(*args, dt)
            refs[name]["Z"].append(Zr.double())
            refs[name]["kap"].append(kapr.double() if kapr is not None else torch.zeros(1, H, C, 0))
            refs[name]["dw"].append(gr[0].double())
            refs[name]["dk"].append(gr[1].double())
            refs[name]["dv"].append(gr[2].double() if v is not None else None)
        Zo, kapo, go = run_key("cuda", *args)
        refs["op"]["Z"].append(Zo.cpu().double())
        refs["op"]["kap"].append(kapo.cpu().double())
        refs["op"]["dw"].append(go[0].cpu().double())
        refs["op"]["dk"].append(go[1].cpu().double())
        refs["op"]["dv"].append(go[2].cpu().double() if v is not None else None)
    R = {name: {"Z": torch.cat(r["Z"]), "kap": torch.cat(r["kap"]), "dw": torch.cat(r["dw"]),
                "dk": packed_rows(r["dk"], H, D, torch.float64),
                "dv": packed_rows(r["dv"], H, Dv, torch.float64) if v is not None else None}
         for name, r in refs.items()}

    for ref in ("64", "op"):   # against float64, and against the padded-layout op on each sequence
        assert_packed("Z", Z, R[ref]["Z"], R["32"]["Z"], ct, dead=empty, dead_value=float("-inf"))
        assert_packed("dw", dw, R[ref]["dw"], R["32"]["dw"], ct, dead=empty)
        assert_packed("dk", dk, R[ref]["dk"], R["32"]["dk"], dtype)
        if v is not None:
            assert_packed("kap", kap, R[ref]["kap"], R["32"]["kap"], ct, dead=empty)
            assert_packed("dv", dv, R[ref]["dv"], R["32"]["dv"], dtype)
    if v is None:
        assert tuple(kap.shape) == (B, H, C, 0) and dv.numel() == 0


VARLEN_QUERY = [
    # lengths, H, D, Dv, C, max_seqlen beyond the longest; c_eff is drawn in [1, min(C, L_b)],
    # 0 for the empty sequences and for the one marked `dead` (queries but no key)
    ((0, 5, 1, 37, 0, 70, 0), 2, 16, 24, 5, 0, 3),
    ((33, 0, 64, 3), 2, 40, 64, 24, 9, 0),
    ((130, 9), 1, 64, 40, 100, 0, None),
]


def varlen_query_case(case, dtype, strided, mis, seed):
    lens, H, D, Dv, C, extra, dead = case
    g = torch.Generator().manual_seed(seed)
    B, ct = len(lens), ct_of(dtype)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    cu = offsets(lens)
    q = packed_input(g, lens, H, D, dtype, strided, seed % 3)
    dy = packed_input(g, lens, H, Dv, dtype, strided, (seed + 2) % 3)
    ss = D ** -0.25
    w, bias, kap = r(B, H, C, D), r(B, H, C), r(B, H, C, Dv)
    c_eff = torch.tensor([int(torch.randint(1, min(C, n) + 1, (1,), generator=g)) if n else 0 for n in lens])
    i_max = max(range(B), key=lambda b: lens[b])
    c_eff[i_max] = min(C, lens[i_max])               # one sequence with as many samples as it can
    if dead is not None:
        c_eff[dead] = 0
    nokey = c_eff == 0                                # as the pipeline hands them: Z = -inf, kap = 0
    bias[nokey], kap[nokey] = float("-inf"), 0.0
    mis_args = None
    if mis:
        qt = 0.5 * r(B, H, C, D)
        lam = torch.stack([_passes_torch.query_normalizer(qt[b:b + 1], seq_of(q, cu, b).double(), None, ss)[0]
                           if lens[b] else torch.full((H, C), float("-inf"), dtype=torch.float64)
                           for b in range(B)])
        bh = torch.softmax(r(B, H, C), -1)
        mis_args = (qt.to(ct), lam.to(ct), bh.to(ct), 1.3)
    return q, w.to(ct), bias.to(ct), kap.to(ct), c_eff, ss, mis_args, dy, cu, max(lens) + extra


@pytest.mark.parametrize("mis", [True, False], ids=["mis", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_QUERY, ids=lambda c: f"B{len(c[0])}-D{c[2]}-Dv{c[3]}-C{c[4]}")
def test_query_pass_cuda_packed(case, dtype, mis):
    i = VARLEN_QUERY.index(case)
    q, w, bias, kap, c_eff, ss, mis_args, dy, cu, max_seqlen = varlen_query_case(case, dtype, i % 2 == 0, mis,
                                                                                seed=50 + i)
    lens, H, D, Dv, C = case[:5]
    B, ct = len(lens), ct_of(dtype)
    qt, lam, bh, beta = mis_args if mis_args is not None else (None, None, None, 0.0)
    args = [to_dev(t, "cuda") for t in (q, w, bias, kap, c_eff)] + [None, ss]
    args += [to_dev(t, "cuda") for t in (qt, lam, bh)] + [beta]
    cud = to_dev(cu, "cuda")
    poison_cache()
    y = OPS.query_pass_fwd(*args, cud, max_seqlen)
    poison_cache()
    grads = OPS.query_pass_bwd(*args, to_dev(dy, "cuda"), cud, max_seqlen)
    assert tuple(y.shape) == (sum(lens), H, Dv) and y.dtype == dtype

    dead = c_eff == 0
    names = ["dq", "dw", "dbias", "dkap", "dqt", "dlam", "dbh"]
    n_out = 7 if mis else 4
    small = [(C, D), (C,), (C, Dv), (C, D), (C,), (C,)]
    refs = {name: {"y": [], "g": [[] for _ in range(n_out)]} for name in ("64", "32", "op")}
    for b in range(B):
        qb, dyb = seq_of(q, cu, b), seq_of(dy, cu, b)
        mis_b = None if mis_args is None else (qt[b:b + 1], lam[b:b + 1], bh[b:b + 1], beta)
        sl = lambda t: t[b:b + 1]  # noqa: E731
        if dead[b]:   # nothing to attend: y = 0, dq = 0, zero C-sized gradients
            for name in ("64", "32", "op"):
                refs[name]["y"].append(torch.zeros(1, H, lens[b], Dv, dtype=torch.float64))
                refs[name]["g"][0].append(torch.zeros(1, H, lens[b], D, dtype=torch.float64))
                for j in range(1, n_out):
                    refs[name]["g"][j].append(torch.zeros(1, H, *small[j - 1], dtype=torch.float64))
            continue
        for name, dt in (("64", torch.float64), ("32", torch.float32 if dtype != torch.float64 else torch.float64)):
            yr, gr = query_reference(qb, sl(w), sl(bias), sl(kap), sl(c_eff), None, ss, mis_b, dyb, dt)
            refs[name]["y"].append(yr.double())
            for j in range(n_out):
                refs[name]["g"][j].append(gr[j].double())
        yo, go = run_query("cuda", qb, sl(w), sl(bias), sl(kap), sl(c_eff), None, ss, mis_b, dyb)
        refs["op"]["y"].append(yo.cpu().double())
        for j in range(n_out):
            refs["op"]["g"][j].append(go[j].cpu().double())
    R = {name: {"y": packed_rows(r["y"], H, Dv, torch.float64),
                "g": [packed_rows(r["g"][0], H, D, torch.float64)] + [torch.cat(x) for x in r["g"][1:]]}
         for name, r in refs.items()}

    for ref in ("64", "op"):   # against float64, and against the padded-layout op on each sequence
        assert_packed("y", y, R[ref]["y"], R["32"]["y"], dtype)
        for j in range(n_out):
            assert_packed(names[j], grads[j], R[ref]["g"][j], R["32"]["g"][j], dtype if j == 0 else ct,
                          dead=None if j == 0 else dead)
    rows_dead = torch.repeat_interleave(dead, torch.tensor(lens))
    assert bool((y.cpu()[rows_dead] == 0).all()) and bool((grads[0].cpu()[rows_dead] == 0).all())
    if not mis:
        assert all(t.numel() == 0 for t in grads[4:])


VARLEN_LANDMARKS = [
    # lengths, H, D, C, max_seqlen beyond the longest; c_eff = min(C, L_b) but 0 for `dead`
    # (a sequence whose rows give no landmark) and fewer for `fewer`
    ((0, 7, 1, 40, 0, 23, 0), 2, 16, 6, 0, 5, 3),
    ((33, 0, 64, 3), 3, 40, 24, 9, None, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_LANDMARKS, ids=lambda c: f"B{len(c[0])}-D{c[2]}-C{c[3]}")
def test_landmarks_cuda_packed(case, dtype):
    i = VARLEN_LANDMARKS.index(case)
    lens, H, D, C, extra, dead, fewer = case
    B, ct = len(lens), ct_of(dtype)
    g = torch.Generator().manual_seed(60 + i)
    x = packed_input(g, lens, H, D, dtype, i % 2 == 1, i % 3)
    cu, max_seqlen = offsets(lens), max(lens) + extra
    c_eff = torch.tensor([min(C, n) for n in lens])
    if dead is not None:
        c_eff[dead] = 0
    c_eff[fewer] = max(1, int(c_eff[fewer]) // 2)
    grad = torch.randn(B, H, C, D, generator=g, dtype=torch.float64)
    dev = [to_dev(t, "cuda") for t in (x, c_eff, cu)]
    poison_cache()
    out = OPS.landmarks(dev[0], None, dev[1], C, dev[2], max_seqlen).cpu()
    poison_cache()
    gx = OPS.landmarks_backward(to_dev(grad.to(ct), "cuda"), None, dev[1], sum(lens), dtype, dev[2], max_seqlen).cpu()
    assert tuple(out.shape) == (B, H, C, D) and tuple(gx.shape) == tuple(x.shape) and gx.dtype == dtype

    out64, gx64, out32, gx32, out_op, gx_op = [], [], [], [], [], []
    for b in range(B):
        xb = seq_of(x, cu, b)
        if c_eff[b] == 0:   # no segment: landmarks 0, gradient 0 on the sequence's rows
            for o in (out64, out32):
                o.append(torch.zeros(1, H, C, D, dtype=torch.float64))
            for o in (gx64, gx32):
                o.append(torch.zeros(1, H, lens[b], D, dtype=torch.float64))
            out_op.append(out64[-1].to(ct))
            gx_op.append(gx64[-1].to(dtype))
            continue
        o, gr = landmark_reference(xb, None, c_eff[b:b + 1], grad[b:b + 1], C)
        out64.append(o)
        gx64.append(gr)
        # the eager pass in the compute type: the float32 arithmetic the bound scales by
        xc = xb.to(ct).requires_grad_()
        o32 = _passes_torch.landmarks(xc, None, c_eff[b:b + 1], C)
        (g32,) = torch.autograd.grad(o32, xc, grad[b:b + 1].to(ct))
        out32.append(o32.detach().double())
        gx32.append(g32.double())
        xbd, ceb = to_dev(xb, "cuda"), to_dev(c_eff[b:b + 1], "cuda")
        out_op.append(OPS.landmarks(xbd, None, ceb, C).cpu())
        gx_op.append(OPS.landmarks_backward(to_dev(grad[b:b + 1].to(ct), "cuda"), None, ceb, lens[b], dtype).cpu())
    out64, out32, out_op = torch.cat(out64), torch.cat(out32), torch.cat(out_op)
    gx64, gx32 = packed_rows(gx64, H, D, torch.float64), packed_rows(gx32, H, D, torch.float64)
    gx_op = packed_rows(gx_op, H, D, dtype)
    # the same sums in the same order as the padded-layout op on each sequence: the same bits
    assert torch.equal(out, out_op) and torch.equal(gx, gx_op)
    assert_close("landmarks", out, out64, out32, ct)
    assert_close("grad_x", gx, gx64, gx32, dtype)


def all_ops_packed(t, max_seqlen):
    """Every op once in the packed layout on the tensors of dict t (as all_ops)."""
    C, T, cu = t["w"].shape[2], t["x"].shape[0], t["cu"]
    lm = OPS.landmarks(t["x"], None, t["c_eff"], C, cu, max_seqlen)
    gx = OPS.landmarks_backward(t["gl"], None, t["c_eff"], T, t["x"].dtype, cu, max_seqlen)
    Z, kap = OPS.key_pass_fwd(t["w"], t["k"], t["v"], None, 0.5, True, cu, max_seqlen)
    dw, dk, dv = OPS.key_pass_bwd(t["w"], t["k"], t["v"], None, 0.5, True, Z, kap, t["dZ"], t["dkap"], cu, max_seqlen)
    qargs = [t["q"], t["w"], t["bias"], kap, t["c_eff"], None, 0.5, t["qt"], t["lam"], t["bh"], 1.3]
    y = OPS.query_pass_fwd(*qargs, cu, max_seqlen)
    return [lm, gx, Z, kap, dw, dk, dv, y, *OPS.query_pass_bwd(*qargs, t["dy"], cu, max_seqlen)]


def all_ops_packed_inputs(lens, H, D, C, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    B, T = len(lens), sum(lens)
    t = {"x": r(T, H, D), "gl": r(B, H, C, D), "w": r(B, H, C, D), "k": r(T, H, D), "v": r(T, H, D),
         "dZ": r(B, H, C), "dkap": r(B, H, C, D), "q": r(T, H, D), "bias": r(B, H, C), "qt": 0.5 * r(B, H, C, D),
         "lam": r(B, H, C), "bh": torch.softmax(r(B, H, C), -1), "dy": r(T, H, D), "cu": offsets(lens),
         "c_eff": torch.tensor([min(C, n) for n in lens])}
    return {name: to_dev(x, device) for name, x in t.items()}


def test_cuda_ops_packed_capture_in_cuda_graph():
    # the packed layout reads cu_seqlens on the device only (grids from max_seqlen): every op
    # is captured in a CUDA graph, and a replay with new offsets (same T, B) gives the bits of
    # an eager call
    lens, lens2, H, D, C = (0, 30, 1, 45, 0), (12, 0, 40, 24, 0), 2, 16, 9
    static = all_ops_packed_inputs(lens, H, D, C, torch.float32, 15, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        all_ops_packed(static, 64)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = all_ops_packed(static, 64)
    fresh = all_ops_packed_inputs(lens2, H, D, C, torch.float32, 16, "cuda")
    for name, x in fresh.items():
        static[name].copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    eager = all_ops_packed(fresh, 64)
    for i, (a, b) in enumerate(zip(outs, eager)):
        assert torch.equal(a, b), f"result {i}: the replay differs from the eager call"


# ----------------------------------------------------------------------------- the whole op
#
# lara_fwd / lara_bwd on CUDA tensors (csrc/cuda/fused_cuda.cpp) against the CPU ops of the
# same schema (csrc/cpu/fused.cpp) on the same inputs: y, the state (every C-sized result the
# backward keeps, in the CPU op's layout) and every gradient (dq, dk, dv, and the given
# landmarks'). The CPU op is run in float64 on the inputs rounded to the tested dtype (the
# reference) and in float32 (its error sets the bound, ``bound`` above): float64 cases are
# held to TOL64 against the CPU op itself; float32 to 4 x the CPU op's own float32 error +
# 1e-5; float16/bfloat16 results (y, dq, dk, dv, the landmarks' gradients) to that plus
# twice the rounding of the float64 result to the dtype, or, where larger, twice the error
# of the CPU op run at that dtype (flash-attention's criterion: dq and dk are sums of two or
# three pass results each rounded to the dtype, in both ops, which one rounding of the
# result does not cover: dk of the packed bfloat16 case is 2.6e-3 here and 2.7e-3 for the
# CPU op at bfloat16, above the one-rounding bound of 2.5e-3; in the half cases measured the
# errors here were at most those of the CPU op at the dtype). Entries of
# the state that are -inf in the reference (Z of a sequence without keys, lam of one
# without queries, and the biases made from them) must be -inf. Padded rows of q, k, v and
# dy hold NaN (never read); outputs are NaN-poisoned (the emulation's test mode), so an
# element no kernel writes fails the finiteness check.

WHOLE = [
    # name, dims (B, H, H_kv, N, M, D, Dv, num_samples), proposal, weighting, eps,
    # masks ("" none, "q", "k", "qk"; "drop": element 1 has every key padded), given landmarks,
    # packed (query lengths, key lengths, extra max_seqlen) or None, strided
    ("default", (2, 2, 2, 13, 11, 8, 5, 4), 0, 0, True, "", False, None, False),
    ("masks-drop", (3, 2, 2, 12, 10, 8, 6, 4), 0, 0, True, "qk-drop", False, None, True),
    ("mixed-balance-kmask", (2, 2, 2, 9, 14, 16, 8, 5), 1, 1, False, "k", False, None, False),
    ("attend-gqa-qmask", (2, 4, 2, 11, 9, 8, 8, 3), 2, 0, True, "q", False, None, True),
    ("given-mixed-gqa-drop", (3, 4, 2, 10, 12, 8, 4, 4), 1, 0, True, "qk-drop", True, None, False),
    ("C>N", (2, 2, 1, 5, 9, 8, 4, 20), 0, 1, True, "", False, None, True),
    ("given-segment-gqa", (2, 4, 2, 9, 10, 8, 4, 3), 0, 0, True, "", True, None, True),
    ("many-samples-wide", (2, 2, 1, 40, 37, 40, 36, 20), 0, 0, True, "qk", False, None, True),  # C, D, Dv > 32
    ("mixed-wide-drop", (2, 2, 2, 35, 40, 40, 33, 12), 1, 0, True, "qk-drop", False, None, False),
    ("attend-balance-C>M-drop", (3, 2, 2, 9, 6, 8, 8, 8), 2, 1, False, "k-drop", False, None, False),
    ("packed", (4, 2, 2, 0, 0, 8, 6, 4), 0, 0, True, "", False, ((0, 7, 9, 3), (5, 6, 0, 8), 2), True),
    ("packed-mixed-gqa-given", (4, 4, 2, 0, 0, 8, 4, 6), 1, 0, False, "", True, ((6, 0, 11, 4), (9, 3, 0, 7), 0), False),
    ("packed-attend-gqa", (3, 4, 1, 0, 0, 16, 8, 5), 2, 0, True, "", False, ((9, 0, 12), (0, 7, 10), 1), True),
]
WHOLE_DTYPES = {  # float64 everywhere; float32 and one half dtype where named
    "default": DTYPES, "masks-drop": (torch.float64, torch.float32, torch.float16),
    "given-mixed-gqa-drop": (torch.float64, torch.float32), "packed": (torch.float64, torch.float32, torch.bfloat16),
    "packed-attend-gqa": (torch.float64, torch.float32), "many-samples-wide": (torch.float64, torch.float32),
}
WHOLE_CASES = [(c, dt) for c in WHOLE for dt in WHOLE_DTYPES.get(c[0], (torch.float64,))]


def whole_case(case, dtype, seed):
    """The op's arguments (CPU tensors, inputs rounded to dtype) and dy."""
    name, (B, H, Hkv, N, M, D, Dv, NS), prop, wt, with_eps, masks, given, packed, strided = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    qpm = kpm = cu_q = cu_k = None
    max_q = max_k = 0
    if packed is None:
        q = long_input(g, B, H, N, D, dtype, strided, 0)
        k = long_input(g, B, Hkv, M, D, dtype, strided, 1)
        v = long_input(g, B, Hkv, M, Dv, dtype, strided, 2)
        dy = long_input(g, B, H, N, Dv, dtype, strided, 1)
        if "q" in masks:
            qpm = make_padding(g, B, N)
        if "k" in masks:
            kpm = make_padding(g, B, M)
        if "drop" in masks:
            if kpm is None:
                kpm = torch.zeros(B, M, dtype=torch.bool)
            kpm[1] = True                         # element 1: no valid key, output and gradients 0
        q, dy = fill_padded(q, qpm), fill_padded(dy, qpm)
        k, v = fill_padded(k, kpm), fill_padded(v, kpm)
    else:
        lq, lk, extra = packed
        q = packed_input(g, lq, H, D, dtype, strided, 0)
        k = packed_input(g, lk, Hkv, D, dtype, strided, 1)
        v = packed_input(g, lk, Hkv, Dv, dtype, strided, 2)
        dy = packed_input(g, lq, H, Dv, dtype, strided, 0)
        cu_q, cu_k, max_q, max_k = offsets(lq), offsets(lk), max(lq) + extra, max(lk) + extra
    eps = r(B, H, NS, D).float() if with_eps else None
    qlm = (0.7 * r(B, H, NS, D)).to(dtype) if given else None
    klm = (0.7 * r(B, H, NS, D)).to(dtype) if given else None
    args = [q, k, v, eps, qlm, klm, qpm, kpm, NS, prop, wt, 1.3, D ** -0.25, cu_q, cu_k, max_q, max_k]
    return args, dy


def run_whole(device, args, dy, dtype=None):
    """(y, state, dq, dk, dv, dqlm, dklm) of lara_fwd / lara_bwd on device, the floating inputs
    (q, k, v, landmarks, dy) in dtype if given; results on the CPU."""
    def mv(i, t):
        if t is None or not torch.is_tensor(t):
            return t
        if dtype is not None and t.is_floating_point() and i != 3:   # eps stays float32
            t = t.to(dtype)
        return to_dev(t, device)
    a = [mv(i, t) for i, t in enumerate(args)]
    dyd = mv(0, dy)
    if device == "cuda":
        poison_cache()
    y, state = OPS.lara_fwd(*a)
    if device == "cuda":
        poison_cache()
    grads = OPS.lara_bwd(dyd, a[0], a[1], a[2], state, *a[4:])
    return [t.cpu() for t in (y, state, *grads)]


def assert_state(out, ref64, ref32, ct):
    """The state: -inf exactly where the reference has it, the rest as assert_close."""
    assert out.dtype == ct and out.shape == ref64.shape, (out.dtype, out.shape, ref64.shape)
    inf = torch.isinf(ref64)
    assert bool((out[inf] == ref64[inf]).all()), "state: -inf entries differ"
    assert_close("state", out[~inf], ref64[~inf], ref32[~inf], ct)


WHOLE_NAMES = ("y", "state", "dq", "dk", "dv", "dq_landmarks", "dk_landmarks")


@pytest.mark.parametrize("case,dtype", WHOLE_CASES, ids=lambda x: x[0] if isinstance(x, tuple) else str(x))
def test_lara_whole_cuda(case, dtype):
    i = WHOLE.index(case)
    args, dy = whole_case(case, dtype, seed=70 + i)
    out = run_whole("cuda", args, dy)
    ref64 = run_whole("cpu", args, dy, torch.float64)
    ref32 = ref64 if dtype == torch.float64 else run_whole("cpu", args, dy, torch.float32)
    cpu = None if dtype == torch.float64 else run_whole("cpu", args, dy)   # the CPU op at dtype
    half = dtype in (torch.float16, torch.bfloat16)
    ct = ct_of(dtype)
    assert_state(out[1], ref64[1], ref32[1], ct)
    for i, (name, o, r64, r32) in enumerate(zip(WHOLE_NAMES, out, ref64, ref32)):
        if name == "state":
            continue
        if r64.numel() == 0:
            assert o.numel() == 0, f"{name}: expected an empty tensor, got {tuple(o.shape)}"
            continue
        assert_close(name, o, r64, r32, dtype, 2.0 * rel_rms(cpu[i], r64) if half else 0.0)
        if cpu is not None and not half:  # the CPU op at float32 keeps the same bound (a check of the bound)
            assert_close(f"cpu {name}", cpu[i], r64, r32, dtype)
    masks = case[5]
    if "drop" in masks:   # element 1: output and gradients exactly 0
        for name, o in zip(WHOLE_NAMES, out):
            if name != "state" and o.numel():
                assert bool((o[1] == 0).all()), f"{name}: not 0 for the element without a valid key"


def test_lara_whole_cuda_capture_in_cuda_graph():
    # lara_fwd and lara_bwd read no value on the host (c_eff, the dropped elements and the
    # packed lengths are found on the device): both are captured in one CUDA graph, and a
    # replay on new inputs (new masks, one element newly without keys) gives the bits of an
    # eager call
    case = WHOLE[1]
    args, dy = whole_case(case, torch.float32, seed=90)
    args2, dy2 = whole_case(case, torch.float32, seed=91)
    args2[7] = args2[7].clone()
    args2[7][2] = True
    def dev(a, d):
        return [to_dev(t, "cuda") if torch.is_tensor(t) else t for t in a], to_dev(d, "cuda")
    static, sdy = dev(args, dy)
    def both(a, d):
        y, state = OPS.lara_fwd(*a)
        return [y, state, *OPS.lara_bwd(d, a[0], a[1], a[2], state, *a[4:])]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        both(static, sdy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = both(static, sdy)
    fresh, fdy = dev(args2, dy2)
    for s, f in zip(static + [sdy], fresh + [fdy]):
        if torch.is_tensor(s):
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    eager = both(fresh, fdy)
    for i, (a, b) in enumerate(zip(outs, eager)):
        assert torch.equal(a, b), f"result {i}: the replay differs from the eager call"
