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

``padding`` is a (B, L) bool mask, None, or a ``_varlen.Packed`` layout: then the long
tensors are packed (T, H, D) rows of B sequences; each pass scatters them into a
zero-padded (B, H, max_seqlen, D) tensor with a padding mask and runs the padded formulas
(query pass output gathered back to (T, H, Dv)). The contract of the fused kernels for
sequences with nothing to attend holds here too: no valid key gives Z = -inf and kap = 0,
and c_eff = 0 gives output 0, with finite gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _varlen
from .reference import compute_dtype

NEG_INF = float("-inf")
ALPHA_FLOOR = 1e-8


def _zero_padded(x, padding):
    """Padded rows set to 0 so that nothing they hold reaches results or gradients."""
    return x if padding is None else x.masked_fill(padding[:, None, :, None], 0.0)


def _unpack(x, padding):
    """Packed (T, H, D) rows -> padded (B, H, max_seqlen, D) and its mask; else unchanged."""
    return _varlen.to_padded(x, padding) if _varlen.is_packed(padding) else (x, padding)


def landmarks(x, padding, c_eff, C):
    x, padding = _unpack(x, padding)
    B, H, L, D = x.shape
    ct = compute_dtype(x.dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=x.device) if padding is None else ~padding
    x = _zero_padded(x.to(ct), padding)
    pos = valid.long().cumsum(-1) - 1
    n_valid = valid.long().sum(-1, keepdim=True).clamp(min=1)
    # c_eff = 0 (a sequence of a packed batch with nothing to attend): every row 0
    seg = torch.where(valid & (c_eff[:, None] > 0), torch.div(pos * c_eff[:, None], n_valid, rounding_mode="floor"), C)
    member = F.one_hot(seg, C + 1)[..., :C].to(ct)                # (B, L, C)
    total = torch.einsum("blc,bhld->bhcd", member, x)
    return total / member.sum(1).clamp(min=1)[:, None, :, None]


def _attendable(padding):
    """(mask for the -inf fill, elements with a valid position (B,) or None): an element
    with none is computed over its zeroed rows unmasked and its result replaced after, so
    that nothing infinite enters a gradient."""
    if padding is None:
        return None, None
    has = (~padding).any(-1)
    return padding & has[:, None], has


def key_pass(w, k, v, padding, ss, subtract_norm):
    if _varlen.is_packed(padding):
        layout = padding
        k, padding = _unpack(k, layout)
        v = None if v is None else _unpack(v, layout)[0]
    ct = w.dtype
    kh = _zero_padded(ss * k.to(ct), padding)
    v = None if v is None else _zero_padded(v.to(ct), padding)
    fill, has = _attendable(padding)
    logits = w @ kh.transpose(-1, -2)                              # (B, H, C, M)
    if subtract_norm:
        logits = logits - 0.5 * kh.pow(2).sum(-1)[..., None, :]
    if fill is not None:
        logits = logits.masked_fill(fill[:, None, None, :], NEG_INF)
    Z = logits.logsumexp(-1)
    kap = None if v is None else torch.exp(logits - Z[..., None]) @ v
    if has is not None:   # no valid key: Z = -inf, kap = 0
        Z = torch.where(has[:, None, None], Z, NEG_INF)
        kap = None if kap is None else torch.where(has[:, None, None, None], kap, 0.0)
    return Z, kap


def query_normalizer(qt, q, padding, ss):
    q, padding = _unpack(q, padding)
    t = qt @ _zero_padded(ss * q.to(qt.dtype), padding).transpose(-1, -2)   # (B, H, C, N)
    fill, has = _attendable(padding)
    if fill is not None:
        t = t.masked_fill(fill[:, None, None, :], NEG_INF)
    lam = t.logsumexp(-1)
    return lam if has is None else torch.where(has[:, None, None], lam, NEG_INF)


def query_pass(q, w, bias, kap, c_eff, padding, ss, mis):
    if _varlen.is_packed(padding):
        layout, total = padding, q.shape[0]
        q, padding = _unpack(q, layout)
        return _varlen.to_packed(query_pass(q, w, bias, kap, c_eff, padding, ss, mis), layout, total)
    # c_eff = 0 (packed batches only: a sequence with no keys): computed as one active
    # sample on neutral C-sized inputs, then set to 0, so no inf or NaN reaches a gradient
    dead = c_eff == 0
    if mis is not None:
        qt, Lam, bh, beta = mis
        mis = (qt, torch.where(dead[:, None, None], 0.0, Lam), torch.where(dead[:, None, None], 1.0, bh), beta)
    bias = torch.where(dead[:, None, None], 0.0, bias)
    y = _query_pass(q, w, bias, kap, c_eff.clamp(min=1), padding, ss, mis)
    return torch.where(dead[:, None, None, None], 0.0, y).to(q.dtype)


def _query_pass(q, w, bias, kap, c_eff, padding, ss, mis):
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
    return y
