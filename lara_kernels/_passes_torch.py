"""The long passes written as eager torch ops (the passes of docs/math.md, sections 1,
4, 5 and 7, unfused).

The fallback for ``landmarks`` where ``_C`` is not built, and an independent
implementation of the same formulas as ``reference.py`` and the fused kernels (they
check each other in the tests). It materializes the N x C and M x C matrices; the fused
backends (``_fused.py``: triton, cpu, cuda) do not, except where they run these passes
because the fused kernels have no such derivative: a backward under
``create_graph=True`` (differentiated again) and forward-mode AD. So every operation
here must stay differentiable to any order and forward-differentiable (plain torch ops;
the MIS floor as a ``where``, whose derivative is 1 only where alpha > 1e-8).

Pass signatures (shared by every backend's passes object, see ``_pipeline.py``):

- ``landmarks(x, padding, c_eff, C)``: unscaled segment means (B, H, C, D)
- ``key_pass(w, k, v, padding, ss, subtract_norm)``: Z (B, H, C), kap (B, H, C, Dv)
- ``query_normalizer(qt, q, padding, ss)``: Lam (B, H, C)
- ``query_pass(q, w, bias, kap, c_eff, padding, ss, mis)``: y (B, H, N, Dv) in q's dtype
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import compute_dtype

NEG_INF = float("-inf")
ALPHA_FLOOR = 1e-8


def _zero_padded(x, padding):
    """Padded rows set to 0 so that nothing they hold reaches results or gradients."""
    return x if padding is None else x.masked_fill(padding[:, None, :, None], 0.0)


def landmarks(x, padding, c_eff, C):
    B, H, L, D = x.shape
    ct = compute_dtype(x.dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=x.device) if padding is None else ~padding
    x = _zero_padded(x.to(ct), padding)
    pos = valid.long().cumsum(-1) - 1
    n_valid = valid.long().sum(-1, keepdim=True).clamp(min=1)
    seg = torch.where(valid, torch.div(pos * c_eff[:, None], n_valid, rounding_mode="floor"), C)
    member = F.one_hot(seg, C + 1)[..., :C].to(ct)                # (B, L, C)
    total = torch.einsum("blc,bhld->bhcd", member, x)
    return total / member.sum(1).clamp(min=1)[:, None, :, None]


def key_pass(w, k, v, padding, ss, subtract_norm):
    ct = w.dtype
    kh = _zero_padded(ss * k.to(ct), padding)
    v = _zero_padded(v.to(ct), padding)
    logits = w @ kh.transpose(-1, -2)                              # (B, H, C, M)
    if subtract_norm:
        logits = logits - 0.5 * kh.pow(2).sum(-1)[..., None, :]
    if padding is not None:
        logits = logits.masked_fill(padding[:, None, None, :], NEG_INF)
    Z = logits.logsumexp(-1)
    kap = torch.exp(logits - Z[..., None]) @ v
    return Z, kap


def query_normalizer(qt, q, padding, ss):
    t = qt @ _zero_padded(ss * q.to(qt.dtype), padding).transpose(-1, -2)   # (B, H, C, N)
    if padding is not None:
        t = t.masked_fill(padding[:, None, None, :], NEG_INF)
    return t.logsumexp(-1)


def query_pass(q, w, bias, kap, c_eff, padding, ss, mis):
    ct = w.dtype
    C = w.shape[2]
    qh = _zero_padded(ss * q.to(ct), padding)
    logits = qh @ w.transpose(-1, -2) + bias[..., None, :]        # (B, H, N, C)
    active = (torch.arange(C, device=q.device)[None, :] < c_eff[:, None])[:, None, None, :]
    if mis is not None:
        qt, Lam, bh, beta = mis
        r = torch.exp(qh @ qt.transpose(-1, -2) - Lam[..., None, :])   # (B, H, N, C)
        r_mean = (r * active).sum(-1, keepdim=True) / c_eff[:, None, None, None]
        alpha = bh[..., None, :] + beta * (r - r_mean)
        logits = logits + torch.log(torch.where(alpha > ALPHA_FLOOR, alpha, torch.full_like(alpha, ALPHA_FLOOR)))
    logits = logits.masked_fill(~active, NEG_INF)
    y = logits.softmax(-1) @ kap
    if padding is not None:
        y = y.masked_fill(padding[:, None, :, None], 0.0)
    return y.to(q.dtype)
