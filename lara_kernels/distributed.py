"""Context parallelism: LARA and RFA over a sequence sharded across the ranks of a group.

Each rank holds a contiguous shard of the queries (B, H, N_r, D) and, independently, of
the keys and values (B, H, M_r, D / Dv), with its shard of the padding masks; rank order
in ``group`` is sequence order, and shards may be uneven, empty or all padding. The rows a
rank gets back equal the matching rows of :func:`lara_kernels.lara_attention` on the whole
sequence (same options, same eps), and so do the gradients of its q, k, v. Given landmarks
(``q_landmarks``, ``k_landmarks``) describe the whole sequence and are replicated: each
rank gets its share of their gradient, and the sum over the group is the gradient of the
whole call (all_reduce it, as DDP does for replicated parameters; the same holds for the
parameters of a layer run with ``context_parallel_group``).

Why this is cheap (docs/math.md): everything that spans the long axes is a sum over
positions. The landmarks (section 1) are segment sums divided by segment sizes; the key
statistics Z, kap (section 4), the "attend" proposal's key pass (section 2) and the query
normalizer Lam (section 5) are log-sum-exps and softmax-weighted sums, which combine
exactly from per-rank partials: with m = max_r Z_r (a shift, no gradient: it cancels),

    Z = m + log sum_r exp(Z_r - m),    kap = sum_r exp(Z_r - m) kap_r / sum_r exp(Z_r - m).

So the ranks exchange C-sized partials only; the C x C steps (proposals, densities,
weights) and the query pass are then local. Nothing of size N or M crosses ranks, in the
forward or in the backward (whose collectives are the transposes: the gradient of a sum
all-reduce is a sum all-reduce of the gradients).

Collectives of one call (``torch.distributed`` with any backend: NCCL on GPUs, gloo on
CPU), each step's partials batched into one buffer:

1. all_gather of a 16-int64 header (shapes, options, dtype, flags; the ranks check that
   they agree) and, when a padding mask is given, all_gather of the 2B valid counts of
   every rank (a rank's segments start at the valid counts before its shard).
2. one sum all_reduce: the query and key landmark partial sums (those not given as
   ``q_landmarks`` / ``k_landmarks``; no key landmarks for ``proposal="attend"``) and, in
   training, eps: drawn by every rank from its ``generator`` as the single-device call
   draws it (so generator states advance alike), but only rank 0's enters the buffer (the
   others add zeros), so every rank uses rank 0's eps *by construction*: the sum is a
   broadcast. (RFA broadcasts rank 0's features ``w`` with ``broadcast``.)
3. ``proposal="attend"`` only: a max all_reduce of its Z partials, a sum all_reduce of
   [exp-shifted weights, weighted mean keys].
4. a max all_reduce of the key-pass Z partials with the Lam partials (weighting
   "optimal"), then one sum all_reduce of [weights, weighted kap (, Lam weights)].

Backward (when an input requires grad): one sum all_reduce of the gradients for each sum
all_reduce of steps 2-4 (eps has no gradient; the max shifts have none either).

Bytes per call, per rank (the size of the tensors this rank hands to the collectives; the
wire traffic of a ring all_reduce is 2 (R-1)/R times its buffer). With G = B H C,
C = min(num_samples, N, M) (global N, M), e = 8 for float64 inputs else 4 (the compute
dtype), nq / nk = 1 when the query / key landmarks are computed (not given; nk = 0 for
"attend"), t = 1 in training, a = 1 for "attend", o = 1 for "optimal", mk = 1 when a
padding mask is given:

    forward  = 8 (16 + 2 B mk) + e G D (nq + nk + t) + a e G (2 + D) + e G (2 + Dv + 2 o)
    backward = e G D (nq + nk) + a e G (1 + D) + e G (1 + Dv + o)

RFA (S = num_samples, G = B H S): forward = 8 (16 + 2 B mk) + 4 G D + e G (2 + Dv),
backward = e G (1 + Dv). None of it depends on N or M: :func:`bytes_per_call` computes it.

Ordering and autograd: the collectives are ``torch.autograd.Function``s chained by a
0-d "token" (an input and an output of each), so their backward collectives run in the
same order on every rank even where a rank's graph differs (empty or all-padding shards),
and every rank's output is connected to every collective. The contract: every rank calls
with the same options and the same ``requires_grad`` pattern of q, k, v and landmarks
(checked through the header). The sum all_reduce's backward calls the same Function, so
it is itself differentiable: double backward works on backends whose passes give it (the
tests check it on the reference backend).

Segment sums of the landmarks are computed here, in torch (a rank's segments are a window
of the global ones, which the backends' single-device landmark pass cannot express):
without padding as one sum per run of positions of a segment, with padding by
``scatter_add`` (O(L D), any device). The key pass, the query normalizer and the query
pass run on the backend ``backend=`` selects (its ``passes`` object), chosen on the global
shapes so that every rank runs the same backend. Not supported: ``torch.compile`` of the
call (it runs eagerly) and ``torch.func`` transforms.
"""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import torch.distributed as dist

from . import api, dispatch
from ._pipeline import NEG_INF, _key_pass_grouped, _mask_inactive, _zero_dropped
from .reference import compute_dtype

__all__ = ["context_parallel_lara_attention", "context_parallel_rfa_attention", "bytes_per_call"]

HEADER = 17          # int64 fields of the header every rank contributes
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- byte formula


def bytes_per_call(op: str, *, B: int, H: int, N: int, M: int, D: int, Dv: int, num_samples: int,
                   dtype: torch.dtype = torch.float32, proposal: str = "segment", weighting: str = "optimal",
                   training: bool = False, q_landmarks: bool = False, k_landmarks: bool = False,
                   masked: bool = False, kv_heads: Optional[int] = None):
    """(forward, backward) bytes a rank hands to the collectives in one call (module doc).

    ``op`` is "lara" or "rfa"; N and M are the global lengths and only matter through
    C = min(num_samples, N, M); q_landmarks / k_landmarks say whether they are given;
    ``masked`` whether a padding mask is given; ``kv_heads`` the key/value heads of a
    grouped-query call (default H: the key landmarks' sums then cross as H_kv heads).
    Degenerate shapes (N, M or Dv = 0) send the header only.
    """
    e = 8 if dtype == torch.float64 else 4
    head = 8 * (HEADER + (2 * B if masked else 0))
    if N == 0 or M == 0 or Dv == 0 or B * H == 0:
        return head, 0
    if op == "rfa":
        G = B * H * num_samples
        return head + 4 * G * D + e * G * (2 + Dv), e * G * (1 + Dv)
    G = B * H * min(num_samples, N, M)
    Gk = B * (H if kv_heads is None else kv_heads) * min(num_samples, N, M)
    nq = 0 if q_landmarks else 1
    nk = 0 if (k_landmarks or proposal == "attend") else 1
    t = 1 if training else 0
    a = 1 if proposal == "attend" else 0
    o = 1 if weighting == "optimal" else 0
    fwd = head + e * D * (G * (nq + t) + Gk * nk) + a * e * G * (2 + D) + e * G * (2 + Dv + 2 * o)
    bwd = e * D * (G * nq + Gk * nk) + a * e * G * (1 + D) + e * G * (1 + Dv + o)
    return fwd, bwd


# ----------------------------------------------------------------------------- collectives


class _Anchor(torch.autograd.Function):
    """A 0-d zero connected to the inputs: the first token of the chain. It requires grad
    exactly when an input does, and gives empty inputs a (zero, empty) gradient so that a
    rank with an empty shard still gets gradients for it."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.like = [(t.shape, t.dtype, t.device, t.numel() == 0) for t in tensors]
        return torch.zeros((), dtype=dtype, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad):
        return (None,) + tuple(torch.zeros(s, dtype=d, device=dev) if empty else None
                               for s, d, dev, empty in ctx.like)


class _AllReduceSum(torch.autograd.Function):
    """Sum all_reduce of several tensors (one dtype) as one buffer, chained by a token.

    ``constant`` marks tensors whose gradient is never needed (eps): their slots are left
    out of the backward buffer. The backward reduces the other gradients with this same
    Function, so it is differentiable (double backward)."""

    @staticmethod
    def forward(ctx, group, constant, token, *tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        ctx.group, ctx.constant = group, constant
        ctx.shapes = [t.shape for t in tensors]
        outs = []
        i = 0
        for t in tensors:   # separate tensors, not views of one buffer (autograd outputs)
            outs.append(flat[i:i + t.numel()].view(t.shape).clone())
            i += t.numel()
        return (token.new_zeros(()),) + tuple(outs)

    @staticmethod
    def backward(ctx, gtoken, *grads):
        idx = [i for i, const in enumerate(ctx.constant) if not const]
        out = [None] * len(grads)
        if idx:
            reduced = _AllReduceSum.apply(ctx.group, (False,) * len(idx), gtoken, *[grads[i] for i in idx])
            gtoken = reduced[0]
            for j, i in enumerate(idx):
                out[i] = reduced[1 + j]
        return (None, None, gtoken) + tuple(out)


def _all_reduce_sum(group, token, tensors, constant=None):
    constant = (False,) * len(tensors) if constant is None else tuple(constant)
    if token is not None and token.requires_grad:
        res = _AllReduceSum.apply(group, constant, token, *tensors)
        return res[0], list(res[1:])
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape))
        i += t.numel()
    return token, out


def _all_reduce_max(group, tensors):
    """Max all_reduce of detached tensors as one buffer (a shift: no gradient)."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape))
        i += t.numel()
    return out


def _lse_combine(group, token, parts):
    """Global (lse, weighted mean) pairs from per-rank partials.

    ``parts``: list of (lse_r (B, H, C), vals_r (B, H, C, X) or None), lse_r = -inf where
    this rank holds no valid position. One max all_reduce (the shift) and one sum
    all_reduce for all pairs. Returns token and a list of (lse, vals or None)."""
    shifts = _all_reduce_max(group, [lse for lse, _ in parts])
    bufs, layout = [], []
    for (lse, vals), m in zip(parts, shifts):
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        wgt = torch.exp(lse - m)
        bufs.append(wgt)
        if vals is not None:
            bufs.append(wgt[..., None] * vals)
        layout.append((m, vals is not None))
    token, red = _all_reduce_sum(group, token, bufs)
    out, i = [], 0
    for m, has_vals in layout:
        s = red[i]
        i += 1
        vals = None
        if has_vals:
            vals = red[i] / s[..., None]
            i += 1
        out.append((m + torch.log(s), vals))
    return token, out


def _join(y, token):
    """y, connected to the token chain (a zero added), so that every rank's backward
    reaches every collective, even with an empty query shard."""
    if token is None or not token.requires_grad:
        return y
    return y + token.to(y.dtype)


# ----------------------------------------------------------------------------- header


def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallel attention needs torch.distributed initialized "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.group.WORLD if group is None else group


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


_FIELDS = ("N_r", "M_r", "batch size B", "heads H", "head dim D", "value head dim Dv", "num_samples", "dtype",
           "proposal", "weighting", "training", "landmarks given", "padding masks given", "requires_grad pattern",
           "beta", "scale", "key/value heads H_kv")


def _exchange_header(group, fields, counts, device, fn):
    """All ranks' headers (R, 16) and, when ``counts`` is given (2B int64), their valid
    counts (R, 2B); raises the same error on every rank where they disagree."""
    R = dist.get_world_size(group)
    mine = torch.tensor(fields, dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(R)]
    dist.all_gather(got, mine, group=group)
    heads = torch.stack(got).cpu()
    for j in range(2, HEADER):
        col = heads[:, j]
        if bool((col != col[0]).any()):
            r = int((col != col[0]).nonzero()[0])
            raise ValueError(f"{fn}: the ranks of the group disagree on {_FIELDS[j]} (rank 0 has {int(col[0])}, "
                             f"rank {r} has {int(col[r])}); every rank must pass the same options, dtype, "
                             f"batch, heads and head dims, and the same requires_grad pattern")
    if counts is None:
        return heads, None
    got = [torch.empty_like(counts) for _ in range(R)]
    dist.all_gather(got, counts, group=group)
    return heads, torch.stack(got)


def _requires_grad_bits(*tensors):
    bits = 0
    if torch.is_grad_enabled():
        for i, t in enumerate(tensors):
            if t is not None and t.requires_grad:
                bits |= 1 << i
    return bits


def _counts(pad, B, L, device):
    return torch.full((B,), L, dtype=torch.int64, device=device) if pad is None else (~pad).long().sum(-1)


class _Layout:
    """Global view of one sequence axis: this rank's valid counts, the counts before its
    shard, the totals (all per batch element, after dropped elements become all-valid)."""

    def __init__(self, pad, valid_all, lengths, rank, keep):
        # valid_all (R, B): raw valid counts; lengths (R,): shard lengths
        adj = torch.where(keep[None, :], valid_all, lengths[:, None].expand_as(valid_all))
        self.before = adj[:rank].sum(0)
        self.total = adj.sum(0)
        self.pad = None if pad is None else pad & keep[:, None]


def _segment_sums(x, pad, before, total, c_eff, C):
    """Sums over this shard of x (B, H, L, D), in the compute dtype, of the global segments
    (docs/math.md section 1): valid position p (global, padded skipped) is in segment
    floor(p C_eff / L_valid). Returns (B, H, C, D)."""
    B, H, L, D = x.shape
    ct = compute_dtype(x.dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=x.device) if pad is None else ~pad
    xz = x.to(ct) if pad is None else x.to(ct).masked_fill(pad[:, None, :, None], 0.0)
    p = before[:, None] + valid.long().cumsum(-1) - 1
    seg = torch.div(p * c_eff[:, None], total.clamp(min=1)[:, None], rounding_mode="floor")
    seg = torch.where(valid, seg, torch.full_like(seg, C))
    out = xz.new_zeros(B, H, C + 1, D)
    out = out.scatter_add(2, seg[:, None, :, None].expand(B, H, L, D), xz)
    return out[:, :, :C]


def _segment_sums_unmasked(x, before: int, total: int, C: int):
    """:func:`_segment_sums` without padding (every element alike, C_eff = C): the shard's
    positions before + l fall in contiguous runs of segments, summed run by run (C slices
    of x, no index tensor: faster than ``scatter_add`` and no extra memory)."""
    L = x.shape[2]
    ct = compute_dtype(x.dtype)
    edges = [min(max(-((-c * total) // C) - before, 0), L) for c in range(C + 1)]
    runs = torch.split(x, [b - a for a, b in zip(edges[:-1], edges[1:])], dim=2)
    return torch.stack([r.sum(2, dtype=ct) for r in runs], 2)


def _segment_sizes(total, c_eff, C):
    """Sizes (B, C) of the global segments: ceil((c+1) L / C_eff) - ceil(c L / C_eff)."""
    c = torch.arange(C + 1, device=total.device)[None, :]
    ce = c_eff.clamp(min=1)[:, None]
    edge = -torch.div(-(c * total[:, None]), ce, rounding_mode="floor")
    size = edge[:, 1:] - edge[:, :-1]
    return torch.where(c[:, :C] < c_eff[:, None], size, torch.zeros_like(size))


def _local(x_list, pad, L):
    """Inputs and mask for a local pass over a shard of length L > 0: elements with no
    valid position here get a stand-in (all valid, zeroed inputs) so that the pass stays
    finite; returns (tensors, pad, has) with ``has`` (B,) None when every element has one."""
    if pad is None:
        return x_list, None, None
    has = (~pad).any(-1)
    if has.device.type == "cpu" and bool(has.all()):
        return x_list, pad, None
    fill = ~has[:, None, None, None]
    return [x.masked_fill(fill, 0.0) for x in x_list], pad & has[:, None], has


def _override(lse, vals, has):
    """-inf log-sum-exp and zero values where this rank holds no valid position."""
    if has is None:
        return lse, vals
    h = has[:, None, None]
    lse = torch.where(h, lse, torch.full_like(lse, NEG_INF))
    vals = None if vals is None else torch.where(h[..., None], vals, torch.zeros_like(vals))
    return lse, vals


def _key_partials(passes, w, k, v, pad, ss, subtract_norm, M_r, dv):
    """This rank's key-pass partials (Z_r, kap_r); -inf / 0 where it has no valid key."""
    B, H, C, _ = w.shape
    if M_r == 0:
        return w.new_full((B, H, C), NEG_INF), w.new_zeros(B, H, C, dv)
    (k, v), lpad, has = _local([k, v], pad, M_r)
    Z, kap = _key_pass_grouped(passes, w, k, v, lpad, ss, subtract_norm)   # GQA: the group's rows together
    return _override(Z, kap.to(w.dtype), has)


def _norm_partial(passes, qt, q, pad, ss, N_r):
    B, H, C, _ = qt.shape
    if N_r == 0:
        return qt.new_full((B, H, C), NEG_INF)
    (q,), lpad, has = _local([q], pad, N_r)
    lam = passes.query_normalizer(qt, q, lpad, ss)
    return _override(lam, None, has)[0]


def _stand_in(t, shape):
    """A stride-0 tensor of the global shape (for backend selection on global sizes)."""
    return torch.empty(1, dtype=t.dtype, device=t.device).as_strided(shape, (0,) * len(shape))


def _drop(keep, *tensors):
    return tuple(None if t is None else t.masked_fill(~keep[:, None, None, None], 0.0) for t in tensors)


# ----------------------------------------------------------------------------- LARA


def context_parallel_lara_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    num_samples: int = 64,
    proposal: str = "segment",
    weighting: str = "optimal",
    beta: float = 1.0,
    scale: Optional[float] = None,
    training: bool = False,
    generator: Optional[torch.Generator] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    q_landmarks: Optional[torch.Tensor] = None,
    k_landmarks: Optional[torch.Tensor] = None,
    backend: str = "auto",
    is_causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    check_finite: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """:func:`lara_kernels.lara_attention` on a sequence sharded over ``group`` (module doc).

    Args: those of ``lara_attention``, every one with the same meaning, on this rank's
    shards: q (B, H, N_r, D), k (B, H_kv, M_r, D), v (B, H_kv, M_r, Dv) (H_kv = H, or with
    ``enable_gqa`` a divisor of H: k and v are not repeated), query_padding_mask
    (B, N_r), key_padding_mask / padding_mask (B, M_r). ``q_landmarks`` / ``k_landmarks``
    (B, H, C, D) describe the whole sequence and must be the same on every rank.
        group: the process group (default: the world); rank order is sequence order.

    Every rank must call with the same options (checked) and its shard; shards may be
    uneven or empty (N_r = 0 or M_r = 0). Training: eps is rank 0's draw (every rank draws
    from its ``generator``, as ``lara_attention`` does, and uses rank 0's). Returns this
    rank's rows (B, H, N_r, Dv) in q's dtype. Bytes exchanged: :func:`bytes_per_call`.
    """
    fn = "context_parallel_lara_attention"
    (q, k, v, C_req, proposal, weighting, beta, scale, training, generator, key_padding_mask, query_padding_mask,
     q_landmarks, k_landmarks, backend) = api.checked_lara_args(
        q, k, v, num_samples=num_samples, proposal=proposal, weighting=weighting, beta=beta, scale=scale,
        training=training, generator=generator, key_padding_mask=key_padding_mask,
        query_padding_mask=query_padding_mask, padding_mask=padding_mask, q_landmarks=q_landmarks,
        k_landmarks=k_landmarks, backend=backend, is_causal=is_causal, attn_mask=attn_mask, dropout_p=dropout_p,
        check_finite=check_finite, enable_gqa=enable_gqa)
    B, H, N_r, D = q.shape
    Hkv, M_r, Dv = k.shape[1], k.shape[2], v.shape[3]

    group = _group(group)
    rank = dist.get_rank(group)
    masked = key_padding_mask is not None or query_padding_mask is not None
    fields = [N_r, M_r, B, H, D, Dv, C_req, _DTYPES.index(q.dtype), api.PROPOSALS.index(proposal),
              api.WEIGHTINGS.index(weighting), int(training),
              int(q_landmarks is not None) + 2 * int(k_landmarks is not None),
              int(query_padding_mask is not None) + 2 * int(key_padding_mask is not None),
              _requires_grad_bits(q, k, v, q_landmarks, k_landmarks), _float_bits(beta), _float_bits(scale), Hkv]
    counts = None
    if masked:
        counts = torch.cat([_counts(query_padding_mask, B, N_r, q.device), _counts(key_padding_mask, B, M_r, q.device)])
    heads, allc = _exchange_header(group, fields, counts, q.device, fn)
    n_len, m_len = heads[:, 0].to(q.device), heads[:, 1].to(q.device)
    N, M = int(heads[:, 0].sum()), int(heads[:, 1].sum())

    if N == 0 or M == 0 or Dv == 0 or B * H == 0:
        return api._empty_result(q, k, v, q_landmarks, k_landmarks)
    eps_full = None
    if training:       # every rank draws (its generator advances as lara_attention's); rank 0's is used
        eps_full = torch.randn((B, H, C_req, D), generator=generator, device=q.device, dtype=torch.float32)

    impl = dispatch.select("lara", backend, _stand_in(q, (B, H, N, D)), _stand_in(k, (B, Hkv, M, D)),
                           _stand_in(v, (B, Hkv, M, Dv)), num_samples=C_req, proposal=proposal, weighting=weighting,
                           beta=beta, scale=scale)
    with api._no_autocast(q.device):
        return _lara(impl.passes, group, rank, q, k, v, eps_full, heads, allc, n_len, m_len, N, M,
                     C_req=C_req, proposal=proposal, weighting=weighting, beta=beta, scale=scale,
                     q_pad=query_padding_mask, k_pad=key_padding_mask, q_landmarks=q_landmarks,
                     k_landmarks=k_landmarks)


def _masks(B, rank, q_pad, k_pad, allc, n_len, m_len, N, M, device):
    """Global keep (B,) or None, this rank's effective masks and the two layouts."""
    R = n_len.shape[0]
    if allc is None:
        nq = n_len[:, None].expand(R, B)
        nk = m_len[:, None].expand(R, B)
        keep = None
    else:
        nq, nk = allc[:, :B], allc[:, B:]
        keep = (nq.sum(0) > 0) & (nk.sum(0) > 0)
    k_all = torch.ones(B, dtype=torch.bool, device=device) if keep is None else keep
    ql = _Layout(q_pad, nq, n_len, rank, k_all)
    kl = _Layout(k_pad, nk, m_len, rank, k_all)
    return keep, ql, kl


def _lara(passes, group, rank, q, k, v, eps_full, heads, allc, n_len, m_len, N, M, *, C_req, proposal,
          weighting, beta, scale, q_pad, k_pad, q_landmarks, k_landmarks):
    B, H, N_r, D = q.shape
    M_r, Dv = k.shape[2], v.shape[3]
    C = min(C_req, N, M)                              # as _pipeline: only rows that can be active
    eps = None if eps_full is None else eps_full[:, :, :C]
    q_landmarks = None if q_landmarks is None else q_landmarks[:, :, :C]
    k_landmarks = None if k_landmarks is None else k_landmarks[:, :, :C]
    ct = compute_dtype(q.dtype)
    ss = math.sqrt(scale)
    keep, ql, kl = _masks(B, rank, q_pad, k_pad, allc, n_len, m_len, N, M, q.device)
    c_eff = torch.clamp(torch.minimum(ql.total, kl.total), max=C).long()
    q_pad, k_pad = ql.pad, kl.pad
    if keep is not None:
        q, k, v, q_landmarks, k_landmarks = _drop(keep, q, k, v, q_landmarks, k_landmarks)
    act_c = None if keep is None else (torch.arange(C, device=q.device)[None, :] < c_eff[:, None])[:, None, None, :]
    token = _Anchor.apply(ct, *[t for t in (q, k, v, q_landmarks, k_landmarks) if t is not None])

    # 1. landmarks: global segment sums (one buffer, with rank 0's eps), / segment sizes
    want_q = q_landmarks is None
    want_k = k_landmarks is None and proposal != "attend"
    bufs, const = [], []
    for want, x, pad, lay, col in ((want_q, q, q_pad, ql, 0), (want_k, k, k_pad, kl, 1)):
        if not want:
            continue
        if keep is None:       # no padding: one segment layout for every element, from the header
            lens = heads[:, col]
            bufs.append(_segment_sums_unmasked(x, int(lens[:rank].sum()), int(lens.sum()), C))
        else:
            bufs.append(_segment_sums(x, pad, lay.before, lay.total, c_eff, C))
        const.append(False)
    if eps is not None:
        bufs.append(eps.to(ct) if rank == 0 else torch.zeros(eps.shape, dtype=ct, device=q.device))
        const.append(True)
    if bufs:
        token, red = _all_reduce_sum(group, token, bufs, const)
        red = iter(red)
        if want_q:
            qt = ss * (next(red) / _segment_sizes(ql.total, c_eff, C).clamp(min=1)[:, None, :, None].to(ct))
        if want_k:
            kt = ss * (next(red) / _segment_sizes(kl.total, c_eff, C).clamp(min=1)[:, None, :, None].to(ct))
            if kt.shape[1] != H:     # GQA: the key landmarks of a key/value head, shared by its group
                kt = kt.repeat_interleave(H // kt.shape[1], dim=1)
        if eps is not None:
            eps = next(red)
    if not want_q:
        qt = ss * q_landmarks.to(ct)
    if not want_k and proposal != "attend":
        kt = ss * k_landmarks.to(ct)

    # 2. proposal means
    if proposal == "segment":
        mu = qt + kt
    elif proposal == "mixed":
        a = _mask_inactive(kt @ kt.transpose(-1, -2), act_c).softmax(-1)
        mu = qt + a @ kt
    else:  # "attend": a key pass with values k and no -|kh|^2/2 term, combined over ranks
        part = _key_partials(passes, qt, k, k, k_pad, ss, False, M_r, D)
        token, [(_, mean_k)] = _lse_combine(group, token, [part])
        mu = qt + ss * mean_k

    # 3. samples
    w = mu if eps is None else mu + eps

    # 4. key statistics and 5. query normalizer partials, combined in one step
    parts = [_key_partials(passes, w, k, v, k_pad, ss, True, M_r, Dv)]
    if weighting == "optimal":
        parts.append((_norm_partial(passes, qt, q, q_pad, ss, N_r), None))
    token, combined = _lse_combine(group, token, parts)
    Z, kap = combined[0]

    # 6. densities g_cc' and weights (C x C), local
    g = w @ mu.transpose(-1, -2) - 0.5 * mu.pow(2).sum(-1)[..., None, :]
    rho = torch.diagonal(g, dim1=-2, dim2=-1)
    log_den = _mask_inactive(g, act_c).logsumexp(-1)

    # 7. the query pass, local
    if N_r == 0:
        y = q.new_zeros(B, H, 0, Dv)
    elif weighting == "optimal":
        Lam = combined[1][0]
        bh = torch.exp(rho - log_den)
        y = passes.query_pass(q, w, Z - rho, kap, c_eff, q_pad, ss, (qt, Lam, bh, beta))
    else:
        y = passes.query_pass(q, w, Z - log_den, kap, c_eff, q_pad, ss, None)
    return _join(_zero_dropped(y, keep), token)


# ----------------------------------------------------------------------------- RFA


def context_parallel_rfa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group=None,
    num_samples: int = 64,
    scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    is_causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    check_finite: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """:func:`lara_kernels.rfa_attention` on a sequence sharded over ``group`` (module doc).

    Every rank draws the features ``w`` from its ``generator`` as ``rfa_attention`` does and
    uses rank 0's (broadcast, S x D per head). Returns this rank's rows (B, H, N_r, Dv)."""
    fn = "context_parallel_rfa_attention"
    q, k, v = api._autocast_inputs(q, k, v)
    api._check_qkv(q, k, v, enable_gqa)
    api._check_unsupported(is_causal, attn_mask, dropout_p)
    B, H, N_r, D = q.shape
    Hkv, M_r, Dv = k.shape[1], k.shape[2], v.shape[3]
    S = api._check_int("num_samples", num_samples, 1)
    scale = api._check_scale(scale, D)
    generator = api._check_generator(generator, q.device)
    key_padding_mask, query_padding_mask = api._resolve_padding(
        padding_mask, key_padding_mask, query_padding_mask, B, N_r, M_r, q.device, "rfa")
    backend = api._check_backend(backend)
    api._check_finite(check_finite, q, k, v, key_padding_mask=key_padding_mask,
                      query_padding_mask=query_padding_mask, scale=scale)
    group = _group(group)
    rank = dist.get_rank(group)
    masked = key_padding_mask is not None or query_padding_mask is not None
    fields = [N_r, M_r, B, H, D, Dv, S, _DTYPES.index(q.dtype), 0, 0, 0, 0,
              int(query_padding_mask is not None) + 2 * int(key_padding_mask is not None),
              _requires_grad_bits(q, k, v), 0, _float_bits(scale), Hkv]
    counts = None
    if masked:
        counts = torch.cat([_counts(query_padding_mask, B, N_r, q.device), _counts(key_padding_mask, B, M_r, q.device)])
    heads, allc = _exchange_header(group, fields, counts, q.device, fn)
    n_len, m_len = heads[:, 0].to(q.device), heads[:, 1].to(q.device)
    N, M = int(heads[:, 0].sum()), int(heads[:, 1].sum())
    if N == 0 or M == 0 or Dv == 0 or B * H == 0:
        return api._empty_result(q, k, v)
    w = torch.randn((B, H, S, D), generator=generator, device=q.device, dtype=torch.float32)
    dist.broadcast(w, src=dist.get_global_rank(group, 0), group=group)
    impl = dispatch.select("rfa", backend, _stand_in(q, (B, H, N, D)), _stand_in(k, (B, Hkv, M, D)),
                           _stand_in(v, (B, Hkv, M, Dv)), num_samples=S, scale=scale)
    passes = impl.passes
    with api._no_autocast(q.device):
        ss = math.sqrt(scale)
        keep, ql, kl = _masks(B, rank, query_padding_mask, key_padding_mask, allc, n_len, m_len, N, M, q.device)
        q_pad, k_pad = ql.pad, kl.pad
        if keep is not None:
            q, k, v = _drop(keep, q, k, v)
        token = _Anchor.apply(compute_dtype(q.dtype), q, k, v)
        w = w.to(compute_dtype(q.dtype))
        part = _key_partials(passes, w, k, v, k_pad, ss, True, M_r, Dv)
        token, [(Z, kap)] = _lse_combine(group, token, [part])
        if N_r == 0:
            y = q.new_zeros(B, H, 0, Dv)
        else:
            c_all = torch.full((B,), S, dtype=torch.long, device=q.device)
            y = passes.query_pass(q, w, Z, kap, c_all, q_pad, ss, None)
        return _join(_zero_dropped(y, keep), token)


# ----------------------------------------------------------------------------- layers


def check_layer_group(group, landmarks: str = "mean"):
    """The ``context_parallel_group`` argument of :class:`lara_kernels.nn.LaraAttention`,
    checked: None, or a process group with ``landmarks="mean"`` (the learned and 2-D pooled
    landmarks of the layer are computed from the whole sequence, which no rank holds)."""
    if group is None:
        return None
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"context_parallel_group must be a torch.distributed ProcessGroup or None, "
                        f"got {type(group).__name__}")
    if landmarks != "mean":
        raise NotImplementedError(f"context_parallel_group needs landmarks='mean', got landmarks={landmarks!r} "
                                  "(learned and pooled landmarks are computed from the whole sequence)")
    return group


def layer_attention(group):
    """``lara_attention``'s signature, run context-parallel over ``group`` (for the layers)."""
    def attention(q, k, v, **options):
        return context_parallel_lara_attention(q, k, v, group=group, **options)

    return attention
