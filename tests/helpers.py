"""Small helpers shared by the test files."""

import torch

from lara_kernels import lara_attention, rfa_attention


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against b (fla's err ratio), computed in float64."""
    a = a.detach().double()
    b = b.detach().double()
    den = b.pow(2).mean().sqrt().item()
    num = (a - b).pow(2).mean().sqrt().item()
    return num / den if den > 0 else num


def make_qkv(B, H, N, M, D, Dv=None, dtype=torch.float64, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = (scale * torch.randn(B, H, N, D, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    k = (scale * torch.randn(B, H, M, D, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    v = torch.randn(B, H, M, Dv, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return q, k, v


def random_padding(B, L, seed=0, p=0.3, device="cpu"):
    """(B, L) bool with True = padding, scattered (not only trailing), at least one valid."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(B, L, generator=g) < p
    pad[:, 0] = False
    return pad.to(device)


# ----------------------------------------------------------------------------- backend vs reference


def padding_mask(Bn, L, fully=False, seed=3):
    """(Bn, L) padding with about 30% padded; element 0 unpadded; the last element all
    padding when ``fully`` (its output rows must then be 0)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(Bn, L, generator=g) < 0.3
    m[0] = False
    if fully:
        m[-1] = True
    return m


def make_case(B, H, N, M, D, DV, C, *, seed=0, strided=False, landmarks=False, kpm=None, qpm=None, gain=1.0):
    """Float32 leaves, a function that turns leaves into (q, k, v, q_lm, k_lm) views, the
    masks as keyword arguments, and an incoming gradient dy."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g) * gain

    if strided:   # q (B, N, H, D) transposed; k with stride 1 along M; v every other column
        leaves = [rn(B, N, H, D), rn(B, H, D, M), rn(B, H, M, 2 * DV) / gain]
        views = [lambda x: x.transpose(1, 2), lambda x: x.transpose(-1, -2), lambda x: x[..., ::2]]
    else:
        leaves = [rn(B, H, N, D), rn(B, H, M, D), rn(B, H, M, DV) / gain]
        views = [lambda x: x] * 3
    if landmarks:
        leaves += [rn(B, H, C, D) / gain, rn(B, H, C, D) / gain]
        views += [lambda x: x] * 2

    def build(ls):
        out = [f(x) for f, x in zip(views, ls)]
        return out + [None] * (5 - len(out))

    masks = {}
    if kpm is not None:
        masks["key_padding_mask"] = kpm
    if qpm is not None:
        masks["query_padding_mask"] = qpm
    dy = torch.randn(B, H, N, DV, generator=g)
    return leaves, build, masks, dy


def run(fn, backend, leaves, build, masks, dy, dtype, device, **opts):
    """Output and gradients of all leaves, leaves cast to dtype on device."""
    ls = [x.to(device=device, dtype=dtype).requires_grad_() for x in leaves]
    q, k, v, qlm, klm = build(ls)
    masks = {n: m.to(device) for n, m in masks.items()}
    if fn == "rfa":
        y = rfa_attention(q, k, v, backend=backend, **masks, **opts)
    else:
        if qlm is not None:
            opts = dict(opts, q_landmarks=qlm)
        if klm is not None and opts.get("proposal") != "attend":   # "attend" rejects key landmarks
            opts = dict(opts, k_landmarks=klm)
        y = lara_attention(q, k, v, backend=backend, **masks, **opts)
    grads = torch.autograd.grad(y, ls, dy.to(device=device, dtype=y.dtype), allow_unused=True)
    return y, grads


def compare_to_reference(fn, backend, leaves, build, masks, dy, opts, dtype=torch.float32, device="cpu"):
    """``backend`` in ``dtype`` against the reference in float64 on the same inputs and
    generator state; returns the relative RMS errors of the forward and of each gradient."""
    g_opts = {"generator": torch.Generator(device=device).manual_seed(1234)}
    y, grads = run(fn, backend, leaves, build, masks, dy, dtype, device, **opts, **g_opts)
    g_opts = {"generator": torch.Generator(device=device).manual_seed(1234)}
    y64, grads64 = run(fn, "reference", leaves, build, masks, dy, torch.float64, device, **opts, **g_opts)
    assert y.dtype == dtype and y.shape == y64.shape
    # a leaf unused by the function (k_landmarks under "attend") has no gradient in either
    assert [g is None for g in grads] == [g is None for g in grads64]
    grads, grads64 = [g for g in grads if g is not None], [g for g in grads64 if g is not None]
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    return [rel_rms(y, y64)] + [rel_rms(a, b) for a, b in zip(grads, grads64)]


def runs_with_padded_fill(backend, fills, N=30, M=26, C=5, H=2):
    """The defining property of the masks, as a setup: lara_attention on ``backend`` with the
    padded rows of q, k, v filled with each value of ``fills`` (same valid rows, masks and
    incoming gradient). Returns ([(y, grads of q, k, v)] per fill, query padding mask)."""
    Bn = 2
    kpm, qpm = padding_mask(Bn, M, seed=50), padding_mask(Bn, N, seed=51)
    leaves, build, masks, dy = make_case(Bn, H, N, M, 16, 8, C, seed=52, kpm=kpm, qpm=qpm)
    q, k, v, _, _ = build(leaves)
    outs = []
    for fill in fills:
        ls = [x.masked_fill(m[:, None, :, None], fill).requires_grad_() for x, m in ((q, qpm), (k, kpm), (v, kpm))]
        y = lara_attention(*ls, num_samples=C, backend=backend, **masks)
        outs.append((y, torch.autograd.grad(y, ls, dy)))
    return outs, qpm


def poisoned_empty(shape, dtype, device):
    """A stand-in for ``triton_kernels._common.empty`` in tests: floating buffers full of
    NaN, integer ones (c_eff) of the most negative value, so that any element a kernel
    leaves unwritten shows up in the result."""
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(tuple(shape), fill, dtype=dtype, device=device)
