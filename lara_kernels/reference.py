"""Eager PyTorch reference: the oracle every backend is compared with.

Plain PyTorch, written to be read next to ``docs/math.md`` (section numbers in
the comments refer to that page) and never imported on a fast path. Everything is in
log space: no feature map ``exp(w . x - |x|^2 / 2)`` is formed on its own.

Shapes follow ``scaled_dot_product_attention``: q (B, H, N, D), k (B, H, M, D),
v (B, H, M, Dv). Masks are (B, N) / (B, M) bool with True = padding. float64 inputs
are computed in float64, everything else in float32; the result has q's dtype.

Conventions for degenerate inputs (documented in the README): padded query rows are 0;
a batch element with no valid key (or no valid query) gives 0 for all its rows. Such
elements are computed on stand-in masks (everything valid) so that every intermediate
stays finite, and zeroed at the end, so their gradients are exactly 0 and never NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "compute_dtype",
    "effective_masks",
    "segment_means",
    "lara_reference",
    "rfa_reference",
    "ra_reference",
    "softmax_reference",
]

NEG_INF = float("-inf")
ALPHA_FLOOR = 1e-8  # la = log(max(alpha, 1e-8)), docs/math.md section 6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/float16/bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_masks(B, N, M, query_padding_mask, key_padding_mask, device):
    """Valid masks (True = valid) with degenerate batch elements made all-valid.

    Returns (q_valid (B, N), k_valid (B, M), keep (B,)) where ``keep[b]`` is False when
    element b has no valid query or no valid key; its output is zeroed by the caller.
    """
    q_valid = torch.ones(B, N, dtype=torch.bool, device=device)
    k_valid = torch.ones(B, M, dtype=torch.bool, device=device)
    if query_padding_mask is not None:
        q_valid = ~query_padding_mask
    if key_padding_mask is not None:
        k_valid = ~key_padding_mask
    keep = q_valid.any(-1) & k_valid.any(-1)
    q_valid = q_valid | ~keep[:, None]
    k_valid = k_valid | ~keep[:, None]
    return q_valid, k_valid, keep


def segment_means(x: torch.Tensor, valid: torch.Tensor, C: int, c_eff: torch.Tensor) -> torch.Tensor:
    """Section 1: means of x over C_eff contiguous segments of its valid positions.

    x (B, H, L, D), valid (B, L) bool, c_eff (B,) int64 with 1 <= c_eff <= valid.sum(-1).
    Valid position p (padded ones skipped) lies in segment floor(p * C_eff / L_valid).
    Rows c >= C_eff of the result are 0.
    """
    p = valid.long().cumsum(-1) - 1                        # (B, L) index among valid
    L_valid = valid.long().sum(-1, keepdim=True)           # (B, 1)
    seg = torch.div(p * c_eff[:, None], L_valid, rounding_mode="floor")
    seg = torch.where(valid, seg, torch.full_like(seg, C))  # padded -> spare bucket C
    onehot = F.one_hot(seg, C + 1)[..., :C].to(x.dtype)    # (B, L, C)
    counts = onehot.sum(1)                                 # (B, C)
    sums = torch.einsum("blc,bhld->bhcd", onehot, x)
    return sums / counts.clamp(min=1)[:, None, :, None]


def _zero_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) with the rows where valid (B, L) is False set to 0."""
    return x.masked_fill(~valid[:, None, :, None], 0.0)


def _masked_lse(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    return x.masked_fill(~valid, NEG_INF).logsumexp(dim)


def _masked_softmax(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    return x.masked_fill(~valid, NEG_INF).softmax(dim)


def _key_statistics(w, kh, v, k_valid):
    """Section 4: C rows attending over M keys. Returns Z (B, H, C), kap (B, H, C, Dv)."""
    l = w @ kh.transpose(-1, -2) - 0.5 * (kh * kh).sum(-1)[..., None, :]   # (B, H, C, M)
    valid = k_valid[:, None, None, :]
    Z = _masked_lse(l, valid, -1)
    kap = _masked_softmax(l, valid, -1) @ v
    return Z, kap


def _repeat_kv(q, k, v):
    """Grouped-query attention in the oracle: key/value head j serves query heads
    j * G .. j * G + G - 1 (G = H / H_kv), as in SDPA's ``enable_gqa``."""
    G = q.shape[1] // k.shape[1]
    if G == 1:
        return k, v
    return k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)


def _per_sequence(fn, q, k, v, cu_q, cu_k, per_seq, options):
    """A packed batch (q (T, H, D), offsets cu_q, cu_k) in the oracle: ``fn`` on each
    sequence alone as a batch of one (the per-sequence tensors of ``per_seq``, (B, ...)
    or None, sliced to it), rows concatenated. A sequence with queries and no keys gives
    zeros (as a padded element with every key padded)."""
    bq, bk = cu_q.tolist(), cu_k.tolist()
    H, Dv = q.shape[1], v.shape[-1]
    rows = []
    for b in range(len(bq) - 1):
        n, m = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        if n == 0:
            continue
        if m == 0:
            rows.append(q.new_zeros((n, H, Dv)))
            continue
        one = lambda x, lo, hi: x[lo:hi].transpose(0, 1)[None]  # noqa: E731  (rows -> (1, H, L, D))
        small = {name: (None if t is None else t[b:b + 1]) for name, t in per_seq.items()}
        y = fn(one(q, bq[b], bq[b + 1]), one(k, bk[b], bk[b + 1]), one(v, bk[b], bk[b + 1]), **small, **options)
        rows.append(y[0].transpose(0, 1))
    return torch.cat(rows) if rows else q.new_zeros((q.shape[0], H, Dv))


def lara_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: Optional[torch.Tensor] = None,
    *,
    num_samples: int,
    proposal: str = "segment",
    weighting: str = "optimal",
    beta: float = 1.0,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    q_landmarks: Optional[torch.Tensor] = None,
    k_landmarks: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> torch.Tensor:
    """LARA attention, docs/math.md sections 1-7. ``eps`` (B, H, C, D) or None (evaluation).

    Packed batches (``cu_seqlens_*`` given, q (T, H, D)): the function of each sequence
    alone, rows concatenated. Grouped-query attention (k, v with fewer heads than q): each
    key/value head repeated to its group of query heads."""
    options = dict(num_samples=num_samples, proposal=proposal, weighting=weighting, beta=beta, scale=scale)
    if cu_seqlens_q is not None:
        return _per_sequence(lara_reference, q, k, v, cu_seqlens_q, cu_seqlens_k,
                             dict(eps=eps, q_landmarks=q_landmarks, k_landmarks=k_landmarks), options)
    k, v = _repeat_kv(q, k, v)
    B, H, N, D = q.shape
    M = k.shape[2]
    C = num_samples
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype)
    s = D ** -0.5 if scale is None else scale
    ss = math.sqrt(s)

    q_valid, k_valid, keep = effective_masks(B, N, M, query_padding_mask, key_padding_mask, q.device)
    N_valid = q_valid.long().sum(-1)
    M_valid = k_valid.long().sum(-1)
    c_eff = torch.clamp(torch.minimum(N_valid, M_valid), max=C)       # (B,)
    active = torch.arange(C, device=q.device)[None, :] < c_eff[:, None]  # (B, C)
    act_c = active[:, None, None, :]                                   # over the last axis c

    # Scaled space: qh . kh = s q . k. Padded rows (and all rows of dropped elements) are
    # zeroed first: they take no part, and whatever they hold cannot reach the result or
    # the gradients (not even as 0 * inf in a backward).
    qh = _zero_rows(ss * q.to(ct), q_valid & keep[:, None])
    kh = _zero_rows(ss * k.to(ct), k_valid & keep[:, None])
    v = _zero_rows(v.to(ct), k_valid & keep[:, None])

    # 1. Landmarks: segment means of qh and kh, or the caller's (scaled like q and k)
    if q_landmarks is not None:
        qt = ss * q_landmarks.to(ct)
    else:
        qt = segment_means(qh, q_valid, C, c_eff)
    if k_landmarks is not None:
        kt = ss * k_landmarks.to(ct)
    else:
        kt = segment_means(kh, k_valid, C, c_eff)

    # 2. Proposal means mu_c
    if proposal == "segment":
        mu = qt + kt
    elif proposal == "mixed":
        a = _masked_softmax(kt @ kt.transpose(-1, -2), act_c, -1)          # (B, H, C, C')
        mu = qt + a @ kt
    elif proposal == "attend":
        a = _masked_softmax(qt @ kh.transpose(-1, -2), k_valid[:, None, None, :], -1)  # (B, H, C, M)
        mu = qt + a @ kh
    else:
        raise ValueError(f"proposal must be 'segment', 'mixed' or 'attend', got {proposal!r}")

    # 3. Samples
    w = mu if eps is None else mu + eps.to(ct)

    # 4. Key statistics
    Z, kap = _key_statistics(w, kh, v, k_valid)                         # (B,H,C), (B,H,C,Dv)

    # 5. Query normalizer: r_nc = exp(t_cn - Lam_c), normalized over valid queries n
    t = qt @ qh.transpose(-1, -2)                                       # (B, H, C, N)
    Lam = _masked_lse(t, q_valid[:, None, None, :], -1)                 # (B, H, C)
    r = torch.exp(t - Lam[..., None]).transpose(-1, -2)                 # (B, H, N, C)

    # 6. Proposal densities g_cc' = w_c . mu_c' - |mu_c'|^2 / 2 and MIS weights
    g = w @ mu.transpose(-1, -2) - 0.5 * (mu * mu).sum(-1)[..., None, :]  # (B, H, C, C')
    rho = torch.diagonal(g, dim1=-2, dim2=-1)                           # (B, H, C)
    log_den = _masked_lse(g, act_c, -1)                                 # (B, H, C)
    if weighting == "optimal":
        bh = torch.exp(rho - log_den)                                   # balance heuristic
        r_mean = (r * act_c).sum(-1, keepdim=True) / c_eff[:, None, None, None]
        alpha = bh[..., None, :] + beta * (r - r_mean)                  # (B, H, N, C)
        # max(alpha, 1e-8) with the gradient of docs/design.md: 1 where alpha > 1e-8, else 0
        # (torch.clamp would also pass it at alpha == 1e-8)
        la = torch.log(torch.where(alpha > ALPHA_FLOOR, alpha, torch.full_like(alpha, ALPHA_FLOOR)))
    elif weighting == "balance":
        la = (rho - log_den)[..., None, :]                              # (B, H, 1, C)
    else:
        raise ValueError(f"weighting must be 'optimal' or 'balance', got {weighting!r}")

    # 7. Output: N rows attending over the active samples
    L = la + qh @ w.transpose(-1, -2) + (Z - rho)[..., None, :]         # (B, H, N, C)
    P = _masked_softmax(L, act_c, -1)
    y = P @ kap                                                         # (B, H, N, Dv)
    row_keep = q_valid & keep[:, None]
    y = y.masked_fill(~row_keep[:, None, :, None], 0.0)
    return y.to(out_dtype)


def rfa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> torch.Tensor:
    """RFA / Performer with positive random features, w (B, H, S, D) ~ N(0, I):
    ``y_n = sum_s softmax_s(w_s . qh_n + Z_s) kap_s`` (la = 0, rho = 0). Packed batches
    and grouped-query attention as in :func:`lara_reference`."""
    if cu_seqlens_q is not None:
        return _per_sequence(rfa_reference, q, k, v, cu_seqlens_q, cu_seqlens_k, dict(w=w), dict(scale=scale))
    k, v = _repeat_kv(q, k, v)
    B, H, N, D = q.shape
    M = k.shape[2]
    ct = compute_dtype(q.dtype)
    s = D ** -0.5 if scale is None else scale
    ss = math.sqrt(s)
    q_valid, k_valid, keep = effective_masks(B, N, M, query_padding_mask, key_padding_mask, q.device)
    qh = _zero_rows(ss * q.to(ct), q_valid & keep[:, None])
    kh = _zero_rows(ss * k.to(ct), k_valid & keep[:, None])
    w = w.to(ct)
    Z, kap = _key_statistics(w, kh, _zero_rows(v.to(ct), k_valid & keep[:, None]), k_valid)
    L = qh @ w.transpose(-1, -2) + Z[..., None, :]                      # (B, H, N, S)
    y = L.softmax(-1) @ kap
    row_keep = q_valid & keep[:, None]
    y = y.masked_fill(~row_keep[:, None, :, None], 0.0)
    return y.to(q.dtype)


def ra_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    biased: bool = False,
    training: bool = True,
    scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Randomized attention (paper Section 3.2, Algorithm 1), quadratic in N and M.

    Unbiased: ``w_n = qh_n + kh_m* + eps_n`` with ``m* ~ Categorical(pi_n)``; it is a
    sampler, so it always draws m* and eps. Biased (Eq. 31): ``w_n = qh_n + sum_m pi_nm
    kh_m + eps_n`` with eps = 0 unless ``training``. Then
    ``y_n = sum_m softmax_m(w_n . kh_m - |kh_m|^2 / 2) v_m``. Draws: eps as float32
    ``randn((B, H, N, D))`` first, then m* by ``torch.multinomial``, both from ``generator``.
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    ct = compute_dtype(q.dtype)
    s = D ** -0.5 if scale is None else scale
    ss = math.sqrt(s)
    q_valid, k_valid, keep = effective_masks(B, N, M, query_padding_mask, key_padding_mask, q.device)
    qh = _zero_rows(ss * q.to(ct), q_valid & keep[:, None])
    kh = _zero_rows(ss * k.to(ct), k_valid & keep[:, None])
    kv = k_valid[:, None, None, :]
    pi = _masked_softmax(qh @ kh.transpose(-1, -2), kv, -1)            # (B, H, N, M)
    draw_eps = training or not biased
    eps = None
    if draw_eps:
        eps = torch.randn((B, H, N, D), generator=generator, device=q.device, dtype=torch.float32).to(ct)
    if biased:
        w = qh + pi @ kh
    else:
        idx = torch.multinomial(pi.detach().reshape(-1, M), 1, generator=generator).reshape(B, H, N)
        w = qh + torch.gather(kh, 2, idx[..., None].expand(B, H, N, D))
    if eps is not None:
        w = w + eps
    logits = w @ kh.transpose(-1, -2) - 0.5 * (kh * kh).sum(-1)[..., None, :]
    y = _masked_softmax(logits, kv, -1) @ _zero_rows(v.to(ct), k_valid & keep[:, None])
    row_keep = q_valid & keep[:, None]
    y = y.masked_fill(~row_keep[:, None, :, None], 0.0)
    return y.to(q.dtype)


def softmax_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention ``y_n = sum_m softmax_m(qh_n . kh_m) v_m`` with the same mask conventions."""
    B, H, N, D = q.shape
    M = k.shape[2]
    ct = compute_dtype(q.dtype)
    s = D ** -0.5 if scale is None else scale
    q_valid, k_valid, keep = effective_masks(B, N, M, query_padding_mask, key_padding_mask, q.device)
    qz = _zero_rows(q.to(ct), q_valid & keep[:, None])
    kz = _zero_rows(k.to(ct), k_valid & keep[:, None])
    logits = s * (qz @ kz.transpose(-1, -2))
    y = _masked_softmax(logits, k_valid[:, None, None, :], -1) @ _zero_rows(v.to(ct), k_valid & keep[:, None])
    row_keep = q_valid & keep[:, None]
    y = y.masked_fill(~row_keep[:, None, :, None], 0.0)
    return y.to(q.dtype)
