"""The function every fast backend computes, cut into passes (docs/design.md).

The long passes (landmarks, key pass, query normalizer, query pass) come from a
backend's ``passes`` object; the C x D and C x C steps between them (proposal means,
samples, proposal densities g, rho, the balance heuristic) are plain torch ops that
autograd differentiates. All backends run this same sequence on the same eps.

Two layouts (``_varlen``): padded (B, H, L, D) tensors with optional padding masks, or a
packed batch of sequences, (T, H, D) rows with ``cu_seqlens``/``max_seqlen`` per side,
whose ``Packed`` value goes to the passes where a mask would. Grouped-query attention
(k, v with H_kv heads, H_kv dividing H): the G = H / H_kv query heads of a key/value head
share its keys, so the pipeline runs its key passes on the (B, H_kv, G * C, D) view of
the samples, the G heads' rows one after the other: k and v are read once per key/value
head and the key pass's dk, dv sum over the group by construction. The key landmarks are
computed once per key/value head and shared (a (B, H_kv, C, D) tensor repeated to H
heads); everything else (query landmarks, samples, weights, the query pass) is per
query head.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._varlen import Packed
from .reference import compute_dtype

NEG_INF = float("-inf")


def prepare_masks(B, N, M, C, query_padding_mask, key_padding_mask, device):
    """Padding masks with degenerate batch elements made valid, and C_eff.

    Returns (query_padding, key_padding, keep, c_eff): the masks are None where the
    caller gave None; ``keep`` (B,) is None when every element has a valid query and a
    valid key, else False for the elements whose output must be zeroed.
    """
    if query_padding_mask is None and key_padding_mask is None:
        c_eff = torch.full((B,), min(C, N, M), dtype=torch.long, device=device)
        return None, None, None, c_eff
    q_pad = query_padding_mask
    k_pad = key_padding_mask
    keep = torch.ones(B, dtype=torch.bool, device=device)
    if q_pad is not None:
        keep = keep & ~q_pad.all(-1)
    if k_pad is not None:
        keep = keep & ~k_pad.all(-1)
    if q_pad is not None:
        q_pad = q_pad & keep[:, None]
    if k_pad is not None:
        k_pad = k_pad & keep[:, None]
    n_valid = torch.full((B,), N, device=device) if q_pad is None else (~q_pad).long().sum(-1)
    m_valid = torch.full((B,), M, device=device) if k_pad is None else (~k_pad).long().sum(-1)
    c_eff = torch.clamp(torch.minimum(n_valid, m_valid), max=C).long()
    return q_pad, k_pad, keep, c_eff


def drop_inputs(keep, *tensors):
    """Zero the inputs of dropped elements (no valid query or key): their output is 0 and
    they are computed on stand-in masks, so their padded data must not enter the passes.

    On CPU tensors (eager, outside torch.func transforms, which cannot branch on values)
    the copies are skipped when nothing is dropped: reading ``keep`` there costs no device
    synchronization. Elsewhere (GPU, or a compiled graph,
    which cannot branch on values) the inputs are always masked, so the call never waits
    for the device and can be captured in a CUDA graph; the result is the same.
    """
    if keep is None:
        return tensors
    if (keep.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(keep) and bool(keep.all())):
        return tensors
    return tuple(None if t is None else t.masked_fill(~keep[:, None, None, None], 0.0) for t in tensors)


def _mask_inactive(x, act_c):
    """-inf at the inactive samples c' (last axis) of a (B, H, C, C) matrix; act_c None = all active."""
    return x if act_c is None else x.masked_fill(~act_c, NEG_INF)


def _zero_dropped(y, keep):
    if keep is None:
        return y
    return y.masked_fill(~keep[:, None, None, None], 0.0)


def packed_sizes(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(B, N, M, query layout, key layout, query lengths, key lengths): the padded sizes,
    or for a packed batch the longest lengths and the ``Packed`` layouts."""
    if cu_seqlens_q is None:
        return q.shape[0], q.shape[2], k.shape[2], None, None, None, None
    q_lay, k_lay = Packed(cu_seqlens_q, int(max_seqlen_q)), Packed(cu_seqlens_k, int(max_seqlen_k))
    return q_lay.num_seqs, q_lay.max_seqlen, k_lay.max_seqlen, q_lay, k_lay, q_lay.lengths(), k_lay.lengths()


def _key_pass_grouped(passes, w, k, v, k_pad, ss, subtract_norm):
    """The key pass of (B, H, C, D) rows against keys with H_kv heads: the G = H / H_kv
    query heads of a key/value head go in as one (B, H_kv, G * C, D) block of rows."""
    B, H, C, D = w.shape
    Hkv = k.shape[1]
    if Hkv == H:
        return passes.key_pass(w, k, v, k_pad, ss, subtract_norm)
    Z, kap = passes.key_pass(w.reshape(B, Hkv, (H // Hkv) * C, D), k, v, k_pad, ss, subtract_norm)
    return Z.reshape(B, H, C), (None if kap is None else kap.reshape(B, H, C, kap.shape[-1]))


def lara_forward(passes, q, k, v, eps, *, num_samples, proposal, weighting, beta, scale,
                 key_padding_mask=None, query_padding_mask=None, q_landmarks=None,
                 k_landmarks=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                 max_seqlen_k=None) -> torch.Tensor:
    B, N, M, q_lay, k_lay, n_len, m_len = packed_sizes(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    H = q.shape[1]
    # Samples c >= C_eff = min(C, N_valid, M_valid) are inactive: run only the first
    # min(C, N, M) rows, which hold every active one (exact; the result does not depend on C
    # beyond C_eff, and the dropped rows of given landmarks get zero gradients).
    C = min(num_samples, N, M)
    if C < num_samples:
        eps = None if eps is None else eps[:, :, :C]
        q_landmarks = None if q_landmarks is None else q_landmarks[:, :, :C]
        k_landmarks = None if k_landmarks is None else k_landmarks[:, :, :C]
    ct = compute_dtype(q.dtype)
    ss = math.sqrt(scale)
    if q_lay is not None:
        # packed: C_eff per sequence, 0 for one with no queries or no keys (the kernels give
        # it output 0); the C x C steps below treat its sample 0 as active, so that they stay
        # finite, and the passes ignore it.
        c_eff = torch.clamp(torch.minimum(n_len, m_len), max=C)
        q_pad, k_pad = q_lay, k_lay
        act_c = (torch.arange(C, device=q.device)[None, :] < c_eff.clamp(min=1)[:, None])[:, None, None, :]
        keep = None
    else:
        q_pad, k_pad, keep, c_eff = prepare_masks(B, N, M, C, query_padding_mask, key_padding_mask, q.device)
        q, k, v, q_landmarks, k_landmarks = drop_inputs(keep, q, k, v, q_landmarks, k_landmarks)
        # Without masks every sample is active (C_eff = C for every element): no masking needed.
        act_c = None if keep is None else (torch.arange(C, device=q.device)[None, :] < c_eff[:, None])[:, None, None, :]

    # 1. landmarks, in the scaled space (key landmarks once per key/value head)
    qt = ss * (q_landmarks.to(ct) if q_landmarks is not None else passes.landmarks(q, q_pad, c_eff, C))
    if k_landmarks is not None:
        kt = ss * k_landmarks.to(ct)
    else:
        kt = ss * passes.landmarks(k, k_pad, c_eff, C)
        if kt.shape[1] != H:
            kt = kt.repeat_interleave(H // kt.shape[1], dim=1)

    # 2. proposal means
    if proposal == "segment":
        mu = qt + kt
    elif proposal == "mixed":
        a = _mask_inactive(kt @ kt.transpose(-1, -2), act_c).softmax(-1)
        mu = qt + a @ kt
    else:  # "attend": a key pass with values k and no -|kh|^2/2 term
        _, mean_k = _key_pass_grouped(passes, qt, k, k, k_pad, ss, False)
        mu = qt + ss * mean_k

    # 3. samples
    w = mu if eps is None else mu + eps.to(ct)

    # 4. key statistics
    Z, kap = _key_pass_grouped(passes, w, k, v, k_pad, ss, True)

    # 6. densities g_cc' and weights (C x C)
    g = w @ mu.transpose(-1, -2) - 0.5 * mu.pow(2).sum(-1)[..., None, :]
    rho = torch.diagonal(g, dim1=-2, dim2=-1)
    log_den = _mask_inactive(g, act_c).logsumexp(-1)
    if weighting == "optimal":
        Lam = passes.query_normalizer(qt, q, q_pad, ss)                     # 5.
        bh = torch.exp(rho - log_den)
        y = passes.query_pass(q, w, Z - rho, kap, c_eff, q_pad, ss, (qt, Lam, bh, beta))
    else:  # "balance": la_nc = rho_c - log_den_c does not depend on n: fold it into the bias
        y = passes.query_pass(q, w, Z - log_den, kap, c_eff, q_pad, ss, None)
    return _zero_dropped(y, keep)


def rfa_forward(passes, q, k, v, w, *, scale, key_padding_mask=None, query_padding_mask=None,
                cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> torch.Tensor:
    B, N, M, q_lay, k_lay, _, m_len = packed_sizes(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    S = w.shape[2]
    ss = math.sqrt(scale)
    if q_lay is not None:   # packed: every feature active, none for a sequence with no keys (output 0)
        q_pad, k_pad, keep = q_lay, k_lay, None
        c_all = torch.where(m_len > 0, S, 0)
    else:
        q_pad, k_pad, keep, _ = prepare_masks(B, N, M, S, query_padding_mask, key_padding_mask, q.device)
        q, k, v = drop_inputs(keep, q, k, v)
        c_all = torch.full((B,), S, dtype=torch.long, device=q.device)
    w = w.to(compute_dtype(q.dtype))
    Z, kap = _key_pass_grouped(passes, w, k, v, k_pad, ss, True)
    y = passes.query_pass(q, w, Z, kap, c_all, q_pad, ss, None)
    return _zero_dropped(y, keep)
