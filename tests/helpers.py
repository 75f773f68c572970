"""Small helpers shared by the test files."""

import torch


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
