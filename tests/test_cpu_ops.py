"""The compiled landmarks op (lara_kernels._C) against the reference's segment means,
forward and backward, through the dispatcher as the cpu backend calls it."""

import pytest
import torch

from helpers import random_padding, rel_rms
from lara_kernels import _ops
from lara_kernels.reference import segment_means

pytestmark = pytest.mark.skipif(not _ops.built(), reason=f"lara_kernels._C not built: {_ops.C_ERROR}")

# float32 accumulates in float32 (one rounding per added row, L <= 100 rows): ~1e-6;
# half inputs are read exactly and accumulated in float32, so the same bound holds
# against the float64 mean of the *rounded* inputs.
TOL = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


def _case(B, H, L, D, C, dtype, padded, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:
        x = torch.randn(B, L, H, 2 * D, generator=g, dtype=torch.float64).to(dtype)[..., ::2].transpose(1, 2)
    else:
        x = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    pad = random_padding(B, L, seed=seed + 1) if padded else None
    valid = torch.ones(B, L, dtype=torch.bool) if pad is None else ~pad
    c_eff = torch.clamp(valid.sum(-1), max=C).long()
    c_eff[0] = min(int(c_eff[0]), max(1, C - 2))          # one element with c_eff < C
    return x, pad, valid, c_eff


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("L,C", [(1, 1), (37, 5), (64, 8), (9, 16), (100, 7)])
def test_landmarks_op_forward_and_backward(dtype, padded, strided, L, C):
    x, pad, valid, c_eff = _case(3, 2, L, 12, C, dtype, padded, strided, seed=L + C)
    x64 = x.detach().double().requires_grad_()
    ref = segment_means(x64, valid, C, c_eff)
    xin = x.detach().clone().requires_grad_()
    out = _ops.landmarks(xin, pad, c_eff, C)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (3, 2, C, 12)
    assert rel_rms(out, ref) < TOL[dtype]
    assert (out[0, :, int(c_eff[0]):] == 0).all()

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref.backward(grad)
    out.backward(grad.to(out.dtype))
    assert xin.grad.dtype == dtype
    assert rel_rms(xin.grad, x64.grad) < max(TOL[dtype], 4e-3 if dtype in (torch.float16, torch.bfloat16) else 0)
    if pad is not None:
        assert (xin.grad.permute(0, 2, 1, 3)[pad] == 0).all()


def test_landmarks_op_checks_name_the_bad_value():
    x = torch.randn(2, 1, 5, 3)
    c = torch.tensor([2, 2])
    with pytest.raises(RuntimeError, match=r"x must be 4-D \(B, H, L, D\), got shape \[2, 5, 3\]"):
        _ops.landmarks(x[:, 0], None, c, 2)
    with pytest.raises(RuntimeError, match=r"padding must have shape \(2, 5\), got \[2, 4\]"):
        _ops.landmarks(x, torch.zeros(2, 4, dtype=torch.bool), c, 2)
    with pytest.raises(RuntimeError, match=r"c_eff\[1\] = 6 must lie in \[0, min\(num_segments=8, valid length=5\)\]"):
        _ops.landmarks(x, None, torch.tensor([2, 6]), 8)
    with pytest.raises(RuntimeError, match=r"x must be float64, float32, float16 or bfloat16, got Int"):
        _ops.landmarks(x.int(), None, c, 2)


def test_landmarks_op_under_torch_library_opcheck():
    x = torch.randn(2, 2, 11, 4, dtype=torch.float64, requires_grad=True)
    pad = random_padding(2, 11, seed=3)
    c_eff = torch.tensor([3, 3])
    torch.library.opcheck(torch.ops.lara_kernels.landmarks.default, (x, pad, c_eff, 4))
