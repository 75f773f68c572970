"""Key pass: C sample rows attending over a long axis (lara-math.md sections 4 and 5).

    l_cm  = w_c . kh_m  [- |kh_m|^2 / 2]     (-inf for padded or out-of-range m)
    Z_c   = LSE_m l_cm
    kap_c = sum_m softmax_m(l_c)_m v_m        (only when values are given)

The same kernel is the query normalizer (w = qt, keys = q, no values, no norm term):
Lam_c = LSE_n qt_c . qh_n.

Forward: split-K over the long axis. Program (s, cb, bh) holds a block of BLOCK_C rows of
w and runs an online log-sum-exp over the key blocks of split s, writing the partials
(max, sum of exp, accumulator) of that split; ``key_pass_fwd`` combines the splits (a few
C-sized torch ops). Backward (kernels.md): the same grid recomputes the C x M tiles from
w, k, v and Z and writes dk, dv per key block and dw per split, summed in torch
(deterministic: no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit(do_not_specialize=["M", "blocks_per_split"])
def _key_fwd_kernel(
    W, K, V, PAD, M_PART, L_PART, ACC_PART,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sp_b, sp_m,
    H, C, M, D, DV, ss, blocks_per_split,
    HAS_V: tl.constexpr, HAS_PAD: tl.constexpr, SUB_NORM: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    BH = tl.num_programs(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    rows = bh * C + c                                                  # rows of (B*H*C, ...)
    w = tl.load(W + rows[:, None] * D + d[None, :],
                mask=c_ok[:, None] & d_ok[None, :], other=0.0)         # [BLOCK_C, BLOCK_D]

    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    m_i = tl.full([BLOCK_C], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_C], tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
    for blk in range(0, blocks_per_split):
        m = (pid_s * blocks_per_split + blk) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_in = m < M
        m64 = m.to(tl.int64)
        valid = m_in
        if HAS_PAD:
            padded = tl.load(PAD + b * sp_b + m64 * sp_m, mask=m_in, other=1)
            valid = valid & (padded == 0)
        # padded keys and values are never read: whatever they hold (even inf/nan) stays out
        kh = tl.load(k_base + m64[:, None] * sk_m + d[None, :] * sk_d,
                     mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * ss  # [BLOCK_M, BLOCK_D]
        logit = tl.dot(w, tl.trans(kh), input_precision="ieee")     # [BLOCK_C, BLOCK_M]
        if SUB_NORM:
            logit -= 0.5 * tl.sum(kh * kh, axis=1)[None, :]
        logit = tl.where(valid[None, :], logit, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logit, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)           # all -inf so far: no shift
        p = tl.exp(logit - m_use[:, None])                             # [BLOCK_C, BLOCK_M]
        corr = tl.exp(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, axis=1)
        if HAS_V:
            vv = tl.load(v_base + m64[:, None] * sv_m + dv[None, :] * sv_d,
                         mask=valid[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DV]
            acc = acc * corr[:, None] + tl.dot(p, vv, input_precision="ieee")
        m_i = m_new

    prow = pid_s.to(tl.int64) * BH * C + rows                          # rows of (S*B*H*C, ...)
    tl.store(M_PART + prow, m_i, mask=c_ok)
    tl.store(L_PART + prow, l_i, mask=c_ok)
    if HAS_V:
        tl.store(ACC_PART + prow[:, None] * DV + dv[None, :], acc, mask=c_ok[:, None] & dv_ok[None, :])


@triton.jit(do_not_specialize=["M", "blocks_per_split"])
def _key_bwd_kernel(
    W, K, V, PAD, Z, DKAP, E, DK, DVO, DW_PART,
    sk_b, sk_h, sk_m, sk_d,
    sv_b, sv_h, sv_m, sv_d,
    sp_b, sp_m,
    sdk_s, sdk_b, sdk_h, sdk_m, sdk_d,
    sdv_s, sdv_b, sdv_h, sdv_m, sdv_d,
    H, C, M, D, DV, ss, blocks_per_split,
    HAS_V: tl.constexpr, HAS_PAD: tl.constexpr, SUB_NORM: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # S_cm = exp(l_cm - Z_c); E_c = dZ_c - dkap_c . kap_c (C-sized, from the wrapper)
    # dv_m = sum_c S_cm dkap_c;  dl_cm = S_cm (dkap_c . v_m + E_c)
    # dkh_m = sum_c dl_cm (w_c [- kh_m]);  dw_c = sum_m dl_cm kh_m
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    BH = tl.num_programs(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    cb = pid_c.to(tl.int64)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    rows = bh * C + c
    w = tl.load(W + rows[:, None] * D + d[None, :],
                mask=c_ok[:, None] & d_ok[None, :], other=0.0)         # [BLOCK_C, BLOCK_D]
    z = tl.load(Z + rows, mask=c_ok, other=0.0)
    e = tl.load(E + rows, mask=c_ok, other=0.0)
    if HAS_V:
        dkap = tl.load(DKAP + rows[:, None] * DV + dv[None, :],
                       mask=c_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_C, BLOCK_DV]

    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    dk_base = DK + cb * sdk_s + b * sdk_b + h * sdk_h
    dv_base = DVO + cb * sdv_s + b * sdv_b + h * sdv_h
    dw_acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for blk in range(0, blocks_per_split):
        m = (pid_s * blocks_per_split + blk) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_in = m < M
        m64 = m.to(tl.int64)
        valid = m_in
        if HAS_PAD:
            padded = tl.load(PAD + b * sp_b + m64 * sp_m, mask=m_in, other=1)
            valid = valid & (padded == 0)
        # padded keys and values are never read: whatever they hold (even inf/nan) stays out
        kh = tl.load(k_base + m64[:, None] * sk_m + d[None, :] * sk_d,
                     mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * ss  # [BLOCK_M, BLOCK_D]
        logit = tl.dot(w, tl.trans(kh), input_precision="ieee")     # [BLOCK_C, BLOCK_M]
        if SUB_NORM:
            logit -= 0.5 * tl.sum(kh * kh, axis=1)[None, :]
        sm = tl.where(valid[None, :] & c_ok[:, None], tl.exp(logit - z[:, None]), 0.0)  # [BLOCK_C, BLOCK_M]
        if HAS_V:
            vv = tl.load(v_base + m64[:, None] * sv_m + dv[None, :] * sv_d,
                         mask=valid[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DV]
            dv_blk = tl.dot(tl.trans(sm), dkap, input_precision="ieee")  # [BLOCK_M, BLOCK_DV]
            tl.store(dv_base + m64[:, None] * sdv_m + dv[None, :] * sdv_d,
                     dv_blk.to(DVO.dtype.element_ty), mask=m_in[:, None] & dv_ok[None, :])
            dp = tl.dot(dkap, tl.trans(vv), input_precision="ieee")   # [BLOCK_C, BLOCK_M]
            dl = sm * (dp + e[:, None])
        else:
            dl = sm * e[:, None]
        dkh = tl.dot(tl.trans(dl), w, input_precision="ieee")         # [BLOCK_M, BLOCK_D]
        if SUB_NORM:
            dkh -= tl.sum(dl, axis=0)[:, None] * kh
        tl.store(dk_base + m64[:, None] * sdk_m + d[None, :] * sdk_d,
                 (dkh * ss).to(DK.dtype.element_ty), mask=m_in[:, None] & d_ok[None, :])
        dw_acc += tl.dot(dl, kh, input_precision="ieee")               # [BLOCK_C, BLOCK_D]

    prow = pid_s.to(tl.int64) * BH * C + rows
    tl.store(DW_PART + prow[:, None] * D + d[None, :], dw_acc, mask=c_ok[:, None] & d_ok[None, :])


def _blocks(C, D, DV, block_c=None, block_m=None):
    BLOCK_D = _common.pow2(D)
    BLOCK_DV = _common.pow2(DV)
    wide = max(BLOCK_D, BLOCK_DV)
    if block_c is None:
        block_c = min(_common.pow2(C), 64 if wide <= 128 else 32)
    if block_m is None:
        block_m = 64 if wide <= 64 else 32
    num_warps = 4 if wide <= 64 else 8
    return block_c, block_m, BLOCK_D, BLOCK_DV, num_warps


def _stages(wide):
    # software-pipelining buffers: C = D = Dv = 256 in float32 needs 232 KB of shared memory
    # in the backward with 3 stages (over the H100's 227 KB), so fewer stages for wide heads
    return 3 if wide <= 64 else (2 if wide <= 128 else 1)


def _pad_arg(padding, ref):
    """(tensor, stride_b, stride_m) for the kernel; bool viewed as uint8 without a copy."""
    if padding is None:
        return ref, 0, 0
    p = padding.view(torch.uint8)
    return p, p.stride(0), p.stride(1)


def key_pass_fwd(w, k, v, padding, ss, subtract_norm, *, block_c=None, block_m=None, splits=None):
    """Z (B, H, C) and kap (B, H, C, Dv) in float32 (kap is None when v is None).

    w (B, H, C, D) float32; k (B, H, M, D) and v (B, H, M, Dv) in any float dtype and
    any strides; padding (B, M) bool (True = padding) or None.
    """
    B, H, C, D = w.shape
    M = k.shape[2]
    has_v = v is not None
    DV = v.shape[3] if has_v else 1
    dev = k.device
    w = w.to(torch.float32).contiguous()                 # C x D: tiny
    BLOCK_C, BLOCK_M, BLOCK_D, BLOCK_DV, num_warps = _blocks(C, D, DV, block_c, block_m)
    n_cb = _common.cdiv(C, BLOCK_C)
    S, per_split = _common.num_splits(_common.cdiv(M, BLOCK_M), B * H * n_cb, dev, splits)

    m_part = _common.empty((S, B, H, C), torch.float32, dev)
    l_part = _common.empty((S, B, H, C), torch.float32, dev)
    acc_part = _common.empty((S, B, H, C, DV), torch.float32, dev) if has_v else m_part
    vt = v if has_v else k
    pad, sp_b, sp_m = _pad_arg(padding, k)
    _key_fwd_kernel[(S, n_cb, B * H)](
        w, k, vt, pad, m_part, l_part, acc_part,
        *k.stride(), *vt.stride(), sp_b, sp_m,
        H, C, M, D, DV, float(ss), per_split,
        HAS_V=has_v, HAS_PAD=padding is not None, SUB_NORM=bool(subtract_norm),
        BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        num_warps=num_warps, num_stages=_stages(max(BLOCK_D, BLOCK_DV)),
    )
    # combine the splits: Z = mx + log(sum_s e_s l_s), kap = sum_s e_s acc_s / sum_s e_s l_s
    mx = m_part.amax(0)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    scale = torch.exp(m_part - mx)                       # empty splits: exp(-inf) = 0
    total = (scale * l_part).sum(0)
    Z = mx + torch.log(total)
    kap = None
    if has_v:
        kap = (scale[..., None] * acc_part).sum(0) / total[..., None]
    return Z, kap


def key_pass_bwd(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, *, block_c=None,
                 block_m=None, splits=None):
    """Gradients (dw float32, dk in k's dtype, dv in v's dtype or None) of key_pass_fwd."""
    B, H, C, D = w.shape
    M = k.shape[2]
    has_v = v is not None
    DV = v.shape[3] if has_v else 1
    dev = k.device
    w = w.to(torch.float32).contiguous()
    Z = Z.to(torch.float32).contiguous()
    dZ = torch.zeros_like(Z) if dZ is None else dZ.to(torch.float32)
    if has_v:
        dkap = torch.zeros_like(kap) if dkap is None else dkap.to(torch.float32)
        E = (dZ - (dkap * kap).sum(-1)).contiguous()
        dkap = dkap.contiguous()
    else:
        E = dZ.contiguous()
        dkap = Z
    BLOCK_C, BLOCK_M, BLOCK_D, BLOCK_DV, num_warps = _blocks(C, D, DV, block_c, block_m)
    n_cb = _common.cdiv(C, BLOCK_C)
    S, per_split = _common.num_splits(_common.cdiv(M, BLOCK_M), B * H * n_cb, dev, splits)

    # one block of samples: dk, dv written directly; several: per-block partials summed here
    if n_cb == 1:
        dk = _common.empty(k.shape, k.dtype, dev)
        dk_strides = (0,) + dk.stride()
        dv = _common.empty(v.shape, v.dtype, dev) if has_v else dk
    else:
        dk = _common.empty((n_cb,) + tuple(k.shape), torch.float32, dev)
        dk_strides = dk.stride()
        dv = _common.empty((n_cb,) + tuple(v.shape), torch.float32, dev) if has_v else dk
    dv_strides = ((0,) + dv.stride()) if dv.dim() == 4 else dv.stride()
    dw_part = _common.empty((S, B, H, C, D), torch.float32, dev)
    vt = v if has_v else k
    pad, sp_b, sp_m = _pad_arg(padding, k)
    _key_bwd_kernel[(S, n_cb, B * H)](
        w, k, vt, pad, Z, dkap, E, dk, dv, dw_part,
        *k.stride(), *vt.stride(), sp_b, sp_m, *dk_strides, *dv_strides,
        H, C, M, D, DV, float(ss), per_split,
        HAS_V=has_v, HAS_PAD=padding is not None, SUB_NORM=bool(subtract_norm),
        BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
        num_warps=num_warps, num_stages=_stages(max(BLOCK_D, BLOCK_DV)),
    )
    if n_cb > 1:
        dk = dk.sum(0).to(k.dtype)
        if has_v:
            dv = dv.sum(0).to(v.dtype)
    dw = dw_part.sum(0)
    return dw, dk, (dv if has_v else None)
