"""Key pass: C sample rows attending over a long axis (docs/math.md sections 4 and 5).

    l_cm  = w_c . kh_m  [- |kh_m|^2 / 2]     (-inf for padded or out-of-range m)
    Z_c   = LSE_m l_cm
    kap_c = sum_m softmax_m(l_c)_m v_m        (only when values are given)

The same kernel is the query normalizer (w = qt, keys = q, no values, no norm term):
Lam_c = LSE_n qt_c . qh_n.

Reads w (B, H, C, D) float32 (any C: grouped-query attention passes the G * C rows of
the G query heads sharing a key/value head, w viewed as (B, H_kv, G * C, D)), k and v
(any strides, one float dtype), the padding mask or cu_seqlens; writes Z (B, H, C) and
kap (B, H, C, Dv) float32 (forward), dw (B, H, C, D) float32, dk, dv in k's and v's
shape and dtype, every row (backward).

Layouts (constexpr VARLEN):
- padded: k (B, H, M, D), v (B, H, M, Dv), an optional (B, M) padding mask; key m of
  element b at K + b sk_b + h sk_h + m sk_m, valid when m < M and not padded.
- packed (flash-attention's varlen): k (T, H, D), v (T, H, Dv), cu_seqlens (B + 1)
  int32; sequence b is rows start = cu[b] .. cu[b + 1] - 1, its key m at
  K + h sk_h + (start + m) sk_m (int64), valid when m < length = cu[b + 1] - cu[b]. The
  splits cover max_seqlen (>= every length); a program whose split starts at or past
  its sequence's length loads nothing (its C-sized loads are masked off, its loop runs
  no block) and writes neutral partials (max -inf, sum 0, accumulator 0) in the forward,
  a zero dw partial in the backward; every row of dk, dv belongs to exactly one program.
  A sequence without keys gets Z = -inf and kap = 0 (the combine never divides 0 by 0)
  and dw = 0.

kh_m = ss k_m; the scale is folded into the C x D rows (w ss, rounded once to the input
dtype, the operand of every product with k), so k goes into ``tl.dot`` as loaded:
w_c . kh_m = (ss w_c) . k_m and |kh_m|^2 = ss^2 |k_m|^2 (float32).

Forward: split-K over the long axis. Program (bh, s) holds all C rows of w (padded to a
power of two >= 16) and runs an online log-sum-exp over the key blocks of split s, so
every key block is read by exactly one program (up to 128 x 128, below). It writes the partials
(max, sum of exp, accumulator) of its split to one (S, B*H*C, 2 + Dv) float32 buffer; a
second small kernel (grid B*H*C/16) combines the splits into Z and kap (kap = 0 for a
row with no key at all, Z = -inf). Float32 inputs take key blocks of 16 and 8 warps or
more (``blocks``: the products are FMAs without tensor cores at the default precision);
the split count does not depend on the key block.
Past C x max(D, Dv) = 128 x 128 (C = 256 with D = 128, D = 256 with C > 64, or the G x C
rows of grouped-query attention: 512 at G = 8, C = 64) one program cannot hold all C rows
(shared memory, registers): C blocks of 128 * 128 / max(D, Dv) rows go on the grid and k
and v are read once per C block by the forward. The C blocks of one (head, split) are
adjacent on the grid (C block fastest), so they run side by side over the same key blocks
and the repeated reads of a k/v tile are meant to come from L2, not from memory (not
measured: no GPU yet).
Traffic: k and v read once (the floor); w (C x D) read once per program; partials
S x C x (2 + Dv) float32 per head written and read once, with S ~ SMs / (B*H): small
next to k and v unless M is short.

Backward (docs/design.md, "Backward"): the same grid recomputes the C x M tiles from
w, k, v and Z and writes dw per split ((S, B*H*C, D) float32, summed by one torch op;
deterministic, no atomics). With one C block the same programs write dk, dv of every key
block directly in the input dtype (each key block belongs to one program). With several C
blocks a second kernel (``_key_bwd_dkv_kernel``, program per (head, split)) takes each key
block once and runs over every C block for it, summing dk, dv in registers: no per-C-block
partials (they used to be float32 (n_cb, B, H, M, D) tensors, 1.6 GB at C = 256), at the
price of computing the C x M tiles twice for these sizes and re-reading the C-sized rows
per key block (C x (D + Dv + 2) float32 per 32 keys, from L2).
``key_pass_split`` and ``key_pass_bwd_split`` are the launches alone, partials not
combined or summed: the lean path (lara_kernels/_whole_triton.py) combines and sums
them inside its small kernels (triton_kernels/small.py, ``combine_rows``).
E_c = dZ_c - dkap_c . kap_c is formed in the kernel. Traffic: k, v read once, dk, dv
written once (the floor); w, dkap, kap, Z, dZ (C-sized) once per program; with several
C blocks k and v are read once more per C block by the dw programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import long_strides, mma, rnd

# Programs of each kernel resident per SM at the main configurations (registers and shared
# memory from the AOT check): the split count fills the device once with them. The float32
# forward's own blocks (8 warps, 64-255 registers) leave 1 to 4 resident per SM by
# registers (1 at C = D = 128), and its split count is the same.
FWD_PER_SM = 2
BWD_PER_SM = 1
DKV_PER_SM = 2   # the backward's dk/dv kernel of several C blocks: 4 warps of 255 registers


@triton.jit
def _keys_of(K, V, CU, b, h, pid_s, c_ok, sk_b, sk_h, sk_m, sv_b, sv_h, sv_m, M, blocks_per_split,
             VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """(k_base, v_base, seqlen, n_blk, c_ld) of program (b, h, split pid_s): the row-0
    pointers of sequence b's keys and values, its length, the number of key blocks of the
    split that hold keys of it, and the mask of the C-sized loads (all False where there
    are none: such a program loads nothing). Padded layout: (B, H, M, D) rows 0 .. M - 1,
    every split's blocks. Packed layout: rows CU[b] .. CU[b + 1] - 1 of (T, H, D), the
    splits covering max_seqlen (the caller passes sk_b = sv_b = 0)."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        seqlen = tl.load(CU + b + 1).to(tl.int64) - start
        first = (pid_s * blocks_per_split).to(tl.int64) * BLOCK_M     # first key of the split
        n_blk = tl.maximum(tl.minimum(tl.cdiv(seqlen - first, BLOCK_M), blocks_per_split), 0).to(tl.int32)
        c_ld = tl.where(first < seqlen, c_ok, False)                  # (not c_ok & scalar: interpreter)
        return (K + h * sk_h + start * sk_m, V + h * sv_h + start * sv_m, seqlen, n_blk, c_ld)
    else:
        return K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, M, blocks_per_split, c_ok


@triton.jit
def _key_tile(k_base, v_base, PAD, b, sp_b, sp_m, first, seqlen, d, d_ok, dv, dv_ok, sk_m, sk_d, sv_m, sv_d,
              HAS_V: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(m, m_in, valid, k tile [BLOCK_M, BLOCK_D], v tile [BLOCK_M, BLOCK_DV] or the k tile
    without values) of the key block starting at key ``first`` (int64). Padded keys and
    values are never read: whatever they hold (even inf/nan) stays out."""
    m = first + tl.arange(0, BLOCK_M)
    m_in = m < seqlen
    valid = m_in
    if HAS_PAD:
        padded = tl.load(PAD + b * sp_b + m * sp_m, mask=m_in, other=1)
        valid = valid & (padded == 0)
    kk = tl.load(k_base + m[:, None] * sk_m + d[None, :] * sk_d, mask=valid[:, None] & d_ok[None, :], other=0.0)
    if HAS_V:
        vv = tl.load(v_base + m[:, None] * sv_m + dv[None, :] * sv_d, mask=valid[:, None] & dv_ok[None, :],
                     other=0.0)
    else:
        vv = kk
    return m, m_in, valid, kk, vv


@triton.jit(do_not_specialize=["M", "blocks_per_split", "S"])
def _key_fwd_kernel(
    W, K, V, PAD, CU, PART,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sp_b, sp_m,
    H, C, M, D, DV, ss, S, blocks_per_split,
    HAS_V: tl.constexpr, HAS_PAD: tl.constexpr, SUB_NORM: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NCB: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    DT: tl.constexpr = K.dtype.element_ty
    pid = tl.program_id(0)                                             # (bh, s, cb), cb fastest
    pid_c = pid % NCB
    pid_s = (pid // NCB) % S
    pid_bh = pid // (S * NCB)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    BH = (tl.num_programs(0) // (S * NCB)).to(tl.int64)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < D
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    dv_ok = dv < DV
    rows = bh * C + c                                                  # rows of (B*H*C, ...)
    k_base, v_base, seqlen, n_blk, c_ld = _keys_of(K, V, CU, b, h, pid_s, c_ok, sk_b, sk_h, sk_m, sv_b, sv_h,
                                                   sv_m, M, blocks_per_split, VARLEN, BLOCK_M)
    w = tl.load(W + rows[:, None] * D + d[None, :], mask=c_ld[:, None] & d_ok[None, :], other=0.0)
    w = rnd(w * ss, DT, EMU)                                           # [BLOCK_C, BLOCK_D]

    m_i = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_C], tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
    for blk in range(0, n_blk):   # a split past the sequence's end: no iteration, neutral partials
        first = (pid_s * blocks_per_split + blk).to(tl.int64) * BLOCK_M
        m, m_in, valid, kk, vv = _key_tile(k_base, v_base, PAD, b, sp_b, sp_m, first, seqlen, d, d_ok, dv, dv_ok,
                                           sk_m, sk_d, sv_m, sv_d, HAS_V, HAS_PAD, BLOCK_M)
        logit = mma(w, tl.trans(kk), DT, PREC, EMU)                    # [BLOCK_C, BLOCK_M]
        if SUB_NORM:
            kf = kk.to(tl.float32)
            logit -= (0.5 * ss * ss) * tl.sum(kf * kf, axis=1)[None, :]
        logit = tl.where(valid[None, :], logit, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logit, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)           # all -inf so far: no shift
        p = tl.exp(logit - m_use[:, None])                             # [BLOCK_C, BLOCK_M]
        corr = tl.exp(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, axis=1)
        if HAS_V:
            acc = acc * corr[:, None] + mma(p, vv, DT, PREC, EMU)
        m_i = m_new

    PW = 2 + DV
    prow = ((pid_s.to(tl.int64) * BH + bh) * C + c) * PW               # rows of (S, B*H*C, 2 + Dv)
    tl.store(PART + prow, m_i, mask=c_ok)
    tl.store(PART + prow + 1, l_i, mask=c_ok)
    if HAS_V:
        tl.store(PART + prow[:, None] + 2 + dv[None, :], acc, mask=c_ok[:, None] & dv_ok[None, :])


@triton.jit
def combine_rows(PART, r, r_ok, R, DV, S, HAS_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(Z, kap) of the rows r (int64, [BLOCK_R]) of a split-partials buffer (S, R, 2 + DV)
    float32 written by ``_key_fwd_kernel``, combined in split order (deterministic):
    Z = mx + log(sum_s e_s l_s), kap = sum_s e_s acc_s / sum_s e_s l_s, e_s = exp(m_s - mx);
    a row with no key at all gets Z = -inf and kap = 0 (kap is a [BLOCK_R, BLOCK_DV] zero
    tile without values). Shared by the combine kernel and triton_kernels/small.py."""
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    dv_ok = dv < DV
    PW = 2 + DV
    m_i = tl.full(r.shape, float("-inf"), tl.float32)
    l_i = tl.zeros(r.shape, tl.float32)
    acc = tl.zeros([r.shape[0], BLOCK_DV], tl.float32)
    for s in range(0, S):
        prow = (s * R + r) * PW
        m_s = tl.load(PART + prow, mask=r_ok, other=float("-inf"))
        l_s = tl.load(PART + prow + 1, mask=r_ok, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)           # empty splits: exp(-inf) = 0
        a_old = tl.exp(m_i - m_use)
        a_s = tl.exp(m_s - m_use)
        l_i = l_i * a_old + l_s * a_s
        if HAS_V:
            acc_s = tl.load(PART + prow[:, None] + 2 + dv[None, :], mask=r_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = acc * a_old[:, None] + acc_s * a_s[:, None]
        m_i = m_new
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    z = m_use + tl.log(l_i)                                            # no key at all: log(0) = -inf
    kap = tl.where(l_i[:, None] > 0.0, acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], 0.0)   # no key: 0
    return z, kap


@triton.jit(do_not_specialize=["S"])
def _key_combine_kernel(
    PART, Z, KAP, R, DV, S,
    HAS_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Z and kap of rows r from the split partials (combine_rows)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    dv_ok = dv < DV
    z, kap = combine_rows(PART, r, r_ok, R, DV, S, HAS_V, BLOCK_DV)
    tl.store(Z + r, z, mask=r_ok)
    if HAS_V:
        tl.store(KAP + r[:, None] * DV + dv[None, :], kap, mask=r_ok[:, None] & dv_ok[None, :])


@triton.jit
def _rows_bwd(W, Z, DZ, KAP, DKAP, rows, c_ld, d, d_ok, dv, dv_ok, D, DV, ss,
              HAS_V: tl.constexpr, DT: tl.constexpr, EMU: tl.constexpr):
    """The C-sized operands of the backward for the rows ``rows`` (int64 rows of
    (B*H*C, ...)): (ss w in DT, Z, E = dZ - dkap . kap, dkap in DT; E again without values)."""
    w = tl.load(W + rows[:, None] * D + d[None, :], mask=c_ld[:, None] & d_ok[None, :], other=0.0)
    w = rnd(w * ss, DT, EMU)                                           # [BLOCK_C, BLOCK_D]
    z = tl.load(Z + rows, mask=c_ld, other=0.0)
    e = tl.load(DZ + rows, mask=c_ld, other=0.0)
    if HAS_V:
        cv = rows[:, None] * DV + dv[None, :]
        dkap = tl.load(DKAP + cv, mask=c_ld[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_C, BLOCK_DV]
        kap = tl.load(KAP + cv, mask=c_ld[:, None] & dv_ok[None, :], other=0.0)
        e -= tl.sum(dkap * kap, axis=1)
        dkap = rnd(dkap, DT, EMU)
    else:
        dkap = e
    return w, z, e, dkap


@triton.jit
def _tile_bwd(w, z, e, dkap, kk, vv, valid, c_ok, ss,
              HAS_V: tl.constexpr, SUB_NORM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
              EMU: tl.constexpr):
    """(S, dl) [BLOCK_C, BLOCK_M] of one C block and one key block: S_cm = exp(l_cm - Z_c)
    (0 off the valid keys and rows), dl_cm = S_cm (dkap_c . v_m + E_c)."""
    logit = mma(w, tl.trans(kk), DT, PREC, EMU)                        # [BLOCK_C, BLOCK_M]
    if SUB_NORM:
        kf = kk.to(tl.float32)
        logit -= (0.5 * ss * ss) * tl.sum(kf * kf, axis=1)[None, :]
    # S <= 1 (Z is the log-sum-exp over these logits), but the forward summed the products in
    # another order (other tiles): near the range bound (logits ~1e11, float32 ulp ~1e4) the
    # recomputed logit can exceed Z by ulps, and exp of that overflows. Clamped at exp(0).
    sm = tl.where(valid[None, :] & c_ok[:, None], tl.exp(tl.minimum(logit - z[:, None], 0.0)), 0.0)
    if HAS_V:
        dp = mma(dkap, tl.trans(vv), DT, PREC, EMU)                     # [BLOCK_C, BLOCK_M]
        dl = sm * (dp + e[:, None])
    else:
        dl = sm * e[:, None]
    return sm, dl


@triton.jit
def _dk_base(DK, DVO, CU, b, h, sdk_b, sdk_h, sdk_m, sdv_b, sdv_h, sdv_m, VARLEN: tl.constexpr):
    """Row-0 pointers of dk and dv for (b, h) (packed: the sequence's first row)."""
    dk_base = DK + b * sdk_b + h * sdk_h
    dv_base = DVO + b * sdv_b + h * sdv_h
    if VARLEN:                                                         # sdk_b = sdv_b = 0 there
        start = tl.load(CU + b).to(tl.int64)
        dk_base += start * sdk_m
        dv_base += start * sdv_m
    return dk_base, dv_base


@triton.jit(do_not_specialize=["M", "blocks_per_split", "S"])
def _key_bwd_kernel(
    W, K, V, PAD, CU, Z, KAP, DZ, DKAP, DK, DVO, DW_PART,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sp_b, sp_m,
    sdk_b, sdk_h, sdk_m, sdk_d,
    sdv_b, sdv_h, sdv_m, sdv_d,
    H, C, M, D, DV, ss, S, blocks_per_split,
    HAS_V: tl.constexpr, HAS_PAD: tl.constexpr, SUB_NORM: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NCB: tl.constexpr, DKV: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    # S_cm = exp(l_cm - Z_c); E_c = dZ_c - dkap_c . kap_c
    # dv_m = sum_c S_cm dkap_c;  dl_cm = S_cm (dkap_c . v_m + E_c)
    # dk_m = sum_c dl_cm (ss w_c [- ss^2 k_m]);  dw_c = ss sum_m dl_cm k_m
    # Program (bh, s, cb): the dw partial of C block cb over split s; with DKV (one C block:
    # NCB = 1) also dk, dv of the split's key blocks. With several C blocks, dk and dv come
    # from _key_bwd_dkv_kernel instead (every C block of a key block in one program).
    DT: tl.constexpr = K.dtype.element_ty
    pid = tl.program_id(0)                                             # (bh, s, cb), cb fastest
    pid_c = pid % NCB
    pid_s = (pid // NCB) % S
    pid_bh = pid // (S * NCB)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    BH = (tl.num_programs(0) // (S * NCB)).to(tl.int64)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < D
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    dv_ok = dv < DV
    rows = bh * C + c
    k_base, v_base, seqlen, n_blk, c_ld = _keys_of(K, V, CU, b, h, pid_s, c_ok, sk_b, sk_h, sk_m, sv_b, sv_h,
                                                   sv_m, M, blocks_per_split, VARLEN, BLOCK_M)
    w, z, e, dkap = _rows_bwd(W, Z, DZ, KAP, DKAP, rows, c_ld, d, d_ok, dv, dv_ok, D, DV, ss, HAS_V, DT, EMU)
    dk_base, dv_base = _dk_base(DK, DVO, CU, b, h, sdk_b, sdk_h, sdk_m, sdv_b, sdv_h, sdv_m, VARLEN)
    dw_acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for blk in range(0, n_blk):   # a split past the sequence's end: no iteration, dw partial 0
        first = (pid_s * blocks_per_split + blk).to(tl.int64) * BLOCK_M
        m, m_in, valid, kk, vv = _key_tile(k_base, v_base, PAD, b, sp_b, sp_m, first, seqlen, d, d_ok, dv, dv_ok,
                                           sk_m, sk_d, sv_m, sv_d, HAS_V, HAS_PAD, BLOCK_M)
        sm, dl = _tile_bwd(w, z, e, dkap, kk, vv, valid, c_ok, ss, HAS_V, SUB_NORM, DT, PREC, EMU)
        if DKV:
            if HAS_V:
                dv_blk = mma(tl.trans(sm), dkap, DT, PREC, EMU)         # [BLOCK_M, BLOCK_DV]
                tl.store(dv_base + m[:, None] * sdv_m + dv[None, :] * sdv_d,
                         rnd(dv_blk, DVO.dtype.element_ty, EMU), mask=m_in[:, None] & dv_ok[None, :])
            dk_blk = mma(tl.trans(dl), w, DT, PREC, EMU)                # [BLOCK_M, BLOCK_D]
            if SUB_NORM:
                dk_blk -= (ss * ss) * tl.sum(dl, axis=0)[:, None] * kk.to(tl.float32)
            tl.store(dk_base + m[:, None] * sdk_m + d[None, :] * sdk_d,
                     rnd(dk_blk, DK.dtype.element_ty, EMU), mask=m_in[:, None] & d_ok[None, :])
        dw_acc += mma(dl, kk, DT, PREC, EMU)                           # [BLOCK_C, BLOCK_D]

    prow = (pid_s.to(tl.int64) * BH + bh) * C + c                      # rows of (S, B*H*C, D)
    tl.store(DW_PART + prow[:, None] * D + d[None, :], dw_acc * ss, mask=c_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["M", "blocks_per_split", "S"])
def _key_bwd_dkv_kernel(
    W, K, V, PAD, CU, Z, KAP, DZ, DKAP, DK, DVO,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sp_b, sp_m,
    sdk_b, sdk_h, sdk_m, sdk_d,
    sdv_b, sdv_h, sdv_m, sdv_d,
    H, C, M, D, DV, ss, S, blocks_per_split,
    HAS_V: tl.constexpr, HAS_PAD: tl.constexpr, SUB_NORM: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NCB: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    # dk, dv with several C blocks (C x D past 128 x 128, or the G * C rows of grouped-query
    # attention): program (bh, s) holds one key block at a time and runs over every C block
    # for it, so each key block is read once and its dk, dv are summed in registers and
    # written once in the input dtype (no per-C-block partials). The C-sized rows are
    # re-read per key block (from L2: C x (D + Dv + 2) float32 per BLOCK_M keys).
    DT: tl.constexpr = K.dtype.element_ty
    pid = tl.program_id(0)                                             # (bh, s), s fastest
    pid_s = pid % S
    pid_bh = pid // S
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    cb0 = tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = d < D
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    dv_ok = dv < DV
    k_base, v_base, seqlen, n_blk, _ = _keys_of(K, V, CU, b, h, pid_s, cb0 < C, sk_b, sk_h, sk_m, sv_b, sv_h,
                                                sv_m, M, blocks_per_split, VARLEN, BLOCK_M)
    dk_base, dv_base = _dk_base(DK, DVO, CU, b, h, sdk_b, sdk_h, sdk_m, sdv_b, sdv_h, sdv_m, VARLEN)
    for blk in range(0, n_blk):   # a split past the sequence's end: no iteration
        first = (pid_s * blocks_per_split + blk).to(tl.int64) * BLOCK_M
        m, m_in, valid, kk, vv = _key_tile(k_base, v_base, PAD, b, sp_b, sp_m, first, seqlen, d, d_ok, dv, dv_ok,
                                           sk_m, sk_d, sv_m, sv_d, HAS_V, HAS_PAD, BLOCK_M)
        dk_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dv_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        dl_sum = tl.zeros([BLOCK_M], tl.float32)
        for cb in range(0, NCB):
            c = cb * BLOCK_C + cb0
            c_ok = c < C
            w, z, e, dkap = _rows_bwd(W, Z, DZ, KAP, DKAP, bh * C + c, c_ok, d, d_ok, dv, dv_ok, D, DV, ss,
                                      HAS_V, DT, EMU)
            sm, dl = _tile_bwd(w, z, e, dkap, kk, vv, valid, c_ok, ss, HAS_V, SUB_NORM, DT, PREC, EMU)
            if HAS_V:
                dv_acc += mma(tl.trans(sm), dkap, DT, PREC, EMU)        # [BLOCK_M, BLOCK_DV]
            dk_acc += mma(tl.trans(dl), w, DT, PREC, EMU)               # [BLOCK_M, BLOCK_D]
            if SUB_NORM:
                dl_sum += tl.sum(dl, axis=0)
        if SUB_NORM:
            dk_acc -= (ss * ss) * dl_sum[:, None] * kk.to(tl.float32)
        if HAS_V:
            tl.store(dv_base + m[:, None] * sdv_m + dv[None, :] * sdv_d,
                     rnd(dv_acc, DVO.dtype.element_ty, EMU), mask=m_in[:, None] & dv_ok[None, :])
        tl.store(dk_base + m[:, None] * sdk_m + d[None, :] * sdk_d,
                 rnd(dk_acc, DK.dtype.element_ty, EMU), mask=m_in[:, None] & d_ok[None, :])


def blocks(C, D, DV, block_m=None, bwd=False, block_c=None, arch=None, dkv=False, fp32=False, prec="ieee"):
    """(BLOCK_C, BLOCK_M, BLOCK_D, BLOCK_DV, num_warps, num_stages) of the forward (or
    the backward, or with ``dkv`` the backward's dk/dv kernel of several C blocks) key
    kernel for compute capability ``arch`` (``_common.arch``; None: the newest) and
    inputs in float32 (``fp32``, products of precision ``prec``: ``_common.dot_precision``)
    or a half dtype. All C rows are in one
    program up to C x max(D, Dv) = 128 x 128 (one read of k and v per pass); the key
    block and the warps shrink and grow with the C x head-dim tiles held in registers;
    the backward holds about twice the forward's state, so twice the warps."""
    BLOCK_C, BLOCK_D, BLOCK_DV = _common.pow2(C), _common.pow2(D), _common.pow2(DV)
    wide = max(BLOCK_D, BLOCK_DV)
    # Past 128 x 128 the C x D operands and accumulators do not fit one program (sm_90, C =
    # D = 256: 289 KB of shared memory in float32, and no wgmma under 16 warps' 128 registers):
    # C blocks of 16384 / wide rows. The forward and the backward's dw put them on the grid
    # (k, v read once per C block); the backward's dk, dv loop over them in one program
    # (_key_bwd_dkv_kernel: k, v read once, no partials).
    if dkv:   # holds dk, dv (BLOCK_M x head dim, float32) and one C block's tiles at a time
        # C blocks of 2048 / wide rows, 32 keys, 4 warps: stack <= 152 bytes on sm_80 and
        # sm_90 at D = 64, C = 512 and D = 128, C = 256 / 512 (bf16, AOT check); blocks of
        # 4096 / wide rows spill up to 670 bytes with 4 warps, 392 with 8
        # float32 with "tf32x3" products (three tensor-core products each): 16 keys, and 8
        # warps on sm_90 (D = C = 128: 96-296 bytes on both; 32 keys: 488-552)
        tf32x3 = fp32 and prec == "tf32x3"
        num_warps = 8 if tf32x3 and (arch is None or arch >= 90) else 4
        return min(BLOCK_C, max(16, 2048 // wide)), (16 if tf32x3 else 32), BLOCK_D, BLOCK_DV, num_warps, 1
    # The float32 backward holds at most 64 x 128 rows x head dim with FMA products ("ieee",
    # see below) and 32 x 128 with tensor-core ones ("tf32", "tf32x3"): at C = D = 128 in
    # one program ptxas gave it 32-64 registers and a 2.7-5.3 KB stack on sm_90 ("ieee"; it
    # varied with the padding variant), and "tf32x3" in blocks of 64 rows up to 7.2 KB on
    # sm_80. In these C blocks (the dw programs on the grid, dk and dv in
    # _key_bwd_dkv_kernel) they fit: 0-240 bytes (AOT check, tests/test_triton_aot.py).
    if fp32 and bwd:
        rows = (64 if prec == "ieee" else 32) * 128 // wide
    else:
        rows = 128 * 128 // wide
    BLOCK_C = block_c if block_c is not None else min(BLOCK_C, max(16, rows))
    tile = BLOCK_C * wide
    fp32 = fp32 and not bwd
    if block_m is None:   # the backward holds dw (C x D, float32) besides: 16 keys a block
        block_m = 16 if bwd or fp32 or tile > 128 * 128 else (64 if tile <= 64 * 64 else 32)
    num_warps = 4 if tile <= 64 * 64 else (8 if tile <= 128 * 128 else 16)
    if fp32:
        # The float32 forward: without tensor cores ("ieee") ``tl.dot`` is a sequence of
        # FMAs whose operands each thread holds whole (its rows of w x D, D x its keys of
        # k; its rows of p x the key block, the key block x its columns of v): 16 keys a
        # block, 8 warps at least and 16 past 128 rows. Stack frames (bytes per thread,
        # AOT check, both layouts, D in {64, 128}, C in {16, 64, 128}): sm_80 0-24, sm_90
        # 0, 64-255 registers (before, the half-dtype blocks of 32-64 keys and 4-8 warps:
        # up to 10 KB on sm_80 and 7.8 KB on sm_90, ptxas falling back to 32 registers);
        # past the main sizes (D = 256, C = 256, the 512 rows of grouped-query attention)
        # 0-344 (before: up to 9.9 KB). With "tf32x3" products C = D = 128 still spills on
        # sm_80 (464-496 bytes; by hand, not in CI), "tf32" 0-8 bytes.
        num_warps = max(num_warps, 16 if BLOCK_C > 128 else 8)
    if bwd:
        num_warps = min(2 * num_warps, 16)
        if arch is not None and arch < 90 and num_warps == 16 and block_m <= 16:
            # sm_80 (mma.sync): the products share one layout with the warps along the
            # rows, so 16 warps over 16-key tiles hold copies; 8 warps spill less
            # (C = D = 128, bf16: stack 848 -> 528 bytes, AOT check)
            num_warps = 8
    # software-pipelining buffers of the k and v tiles: fewer stages for wide heads
    num_stages = 3 if wide <= 64 else (2 if wide <= 128 else 1)
    return BLOCK_C, block_m, BLOCK_D, BLOCK_DV, num_warps, num_stages


def _pad_arg(padding, ref):
    """(tensor, stride_b, stride_m) for the kernel; bool viewed as uint8 without a copy."""
    if padding is None:
        return ref, 0, 0
    p = padding.view(torch.uint8)
    return p, p.stride(0), p.stride(1)


def _f32(x):
    if x.dtype == torch.float32 and x.is_contiguous():   # C-sized; no copy (nor op call) when already so
        return x
    return x.to(torch.float32).contiguous()


def key_pass_split(w, k, v, padding, ss, subtract_norm, cu_seqlens=None, max_seqlen=0, *, block_m=None,
                   splits=None, block_c=None):
    """The first launch of ``key_pass_fwd``: (part, S), the per-split partials
    (S, B*H*C, 2 + Dv) float32 (Dv = 1 without values: max, sum of exp, [accumulator]),
    which ``combine_rows`` turns into Z and kap. Arguments as ``key_pass_fwd``."""
    B, H, C, D = w.shape
    varlen, M, cu = _common.layout(k, w, cu_seqlens, max_seqlen)
    has_v = v is not None
    DV = v.shape[-1] if has_v else 1
    dev = k.device
    w = _f32(w)
    BLOCK_C, BLOCK_M, BLOCK_D, BLOCK_DV, num_warps, num_stages = blocks(C, D, DV, block_m, block_c=block_c,
                                                                        arch=_common.arch(dev),
                                                                        fp32=k.dtype == torch.float32)
    S, per_split = _common.num_splits(_common.cdiv(M, BLOCK_M), B * H, dev, FWD_PER_SM, splits)

    NCB = _common.cdiv(C, BLOCK_C)
    part = _common.empty((S, B * H * C, 2 + DV), torch.float32, dev)
    vt = v if has_v else k
    pad, sp_b, sp_m = _pad_arg(padding, k)
    _common.launch(
        _key_fwd_kernel, (S * NCB * B * H,), dev,
        w, k, vt, pad, cu, part,
        *long_strides(k, varlen), *long_strides(vt, varlen), sp_b, sp_m,
        H, C, M, D, DV, float(ss), S, per_split,
        HAS_V=has_v, HAS_PAD=padding is not None, SUB_NORM=bool(subtract_norm), VARLEN=varlen,
        BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        NCB=NCB, PREC=_common.dot_precision(k.dtype), EMU=_common.emulated(dev),
        num_warps=num_warps, num_stages=num_stages,
    )
    return part, S


def key_pass_fwd(w, k, v, padding, ss, subtract_norm, cu_seqlens=None, max_seqlen=0, *, block_m=None, splits=None,
                 block_c=None):
    """Z (B, H, C) and kap (B, H, C, Dv) in float32 (kap is None when v is None).

    w (B, H, C, D) float32, any C; k (B, H, M, D) and v (B, H, M, Dv) in one float dtype
    and any strides; padding (B, M) bool (True = padding) or None. Packed layout:
    k (T, H, D), v (T, H, Dv), cu_seqlens (B + 1) int32, max_seqlen >= every length,
    padding None. A sequence without keys gets Z = -inf, kap = 0.
    """
    B, H, C, D = w.shape
    has_v = v is not None
    DV = v.shape[-1] if has_v else 1
    dev = k.device
    part, S = key_pass_split(w, k, v, padding, ss, subtract_norm, cu_seqlens, max_seqlen, block_m=block_m,
                             splits=splits, block_c=block_c)
    Z = _common.empty((B, H, C), torch.float32, dev)
    kap = _common.empty((B, H, C, DV), torch.float32, dev) if has_v else None
    R, BLOCK_R = B * H * C, 16
    _common.launch(
        _key_combine_kernel, (_common.cdiv(R, BLOCK_R),), dev,
        part, Z, kap if has_v else Z, R, DV, S,
        HAS_V=has_v, BLOCK_R=BLOCK_R, BLOCK_DV=_common.pow2(DV), num_warps=4,
    )
    return Z, kap


def key_pass_bwd_split(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, cu_seqlens=None, max_seqlen=0, *,
                       block_m=None, splits=None, block_c=None):
    """The launch of ``key_pass_bwd``: (dw_part, S, dk, dv or None), dw_part the per-split
    partials (S, B*H*C, D) float32 of dw (summed by the caller), dk and dv as
    ``key_pass_bwd``. Arguments as ``key_pass_bwd``."""
    B, H, C, D = w.shape
    varlen, M, cu = _common.layout(k, w, cu_seqlens, max_seqlen)
    has_v = v is not None
    DV = v.shape[-1] if has_v else 1
    dev = k.device
    w, Z = _f32(w), _f32(Z)
    dZ = torch.zeros_like(Z) if dZ is None else _f32(dZ)
    if has_v:
        kap = _f32(kap)
        dkap = torch.zeros_like(kap) if dkap is None else _f32(dkap)
    else:
        kap = dkap = Z
    prec = _common.dot_precision(k.dtype)
    fp32 = k.dtype == torch.float32
    BLOCK_C, BLOCK_M, BLOCK_D, BLOCK_DV, num_warps, num_stages = blocks(
        C, D, DV, block_m, bwd=True, block_c=block_c, arch=_common.arch(dev), fp32=fp32, prec=prec)
    S, per_split = _common.num_splits(_common.cdiv(M, BLOCK_M), B * H, dev, BWD_PER_SM, splits)

    NCB = _common.cdiv(C, BLOCK_C)
    dk = _common.empty(k.shape, k.dtype, dev)
    dv = _common.empty(v.shape, v.dtype, dev) if has_v else dk
    dw_part = _common.empty((S, B * H * C, D), torch.float32, dev)
    vt = v if has_v else k
    pad, sp_b, sp_m = _pad_arg(padding, k)
    common = (*long_strides(k, varlen), *long_strides(vt, varlen), sp_b, sp_m,
              *long_strides(dk, varlen), *long_strides(dv, varlen))
    flags = dict(HAS_V=has_v, HAS_PAD=padding is not None, SUB_NORM=bool(subtract_norm), VARLEN=varlen,
                 BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PREC=prec, EMU=_common.emulated(dev))
    # dw partials (and, with one C block, dk and dv): program (bh, split, C block)
    _common.launch(
        _key_bwd_kernel, (S * NCB * B * H,), dev,
        w, k, vt, pad, cu, Z, kap, dZ, dkap, dk, dv, dw_part, *common,
        H, C, M, D, DV, float(ss), S, per_split,
        BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, NCB=NCB, DKV=NCB == 1, **flags, num_warps=num_warps,
        num_stages=num_stages,
    )
    if NCB > 1:   # dk, dv: program (bh, split) over every C block of each key block
        # (its own blocks: ``block_c`` and ``block_m`` choose the dw programs' only)
        BLOCK_C, BLOCK_M, _, _, num_warps, num_stages = blocks(C, D, DV, arch=_common.arch(dev), dkv=True,
                                                               fp32=fp32, prec=prec)
        S2, per_split2 = _common.num_splits(_common.cdiv(M, BLOCK_M), B * H, dev, DKV_PER_SM, splits)
        _common.launch(
            _key_bwd_dkv_kernel, (S2 * B * H,), dev,
            w, k, vt, pad, cu, Z, kap, dZ, dkap, dk, dv, *common,
            H, C, M, D, DV, float(ss), S2, per_split2,
            BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, NCB=_common.cdiv(C, BLOCK_C), **flags, num_warps=num_warps,
            num_stages=num_stages,
        )
    return dw_part, S, dk, (dv if has_v else None)


def key_pass_bwd(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, cu_seqlens=None, max_seqlen=0, *,
                 block_m=None, splits=None, block_c=None):
    """Gradients (dw float32, dk in k's dtype, dv in v's dtype or None) of key_pass_fwd,
    dk and dv of k's and v's shape (packed: (T, H, D), (T, H, Dv)), every row written."""
    B, H, C, D = w.shape
    dw_part, S, dk, dv = key_pass_bwd_split(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, cu_seqlens,
                                            max_seqlen, block_m=block_m, splits=splits, block_c=block_c)
    dw = dw_part.sum(0).view(B, H, C, D)
    return dw, dk, dv
