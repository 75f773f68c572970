"""Query pass: N query rows attending over C samples (lara-math.md sections 6 and 7).

    L_nc = qh_n . w_c + bias_c [+ log(max(alpha_nc, 1e-8))]     (-inf for c >= c_eff[b])
    alpha_nc = bh_c + beta * (r_nc - mean over active c' of r_nc'),  r_nc = exp(qh_n . qt_c - Lam_c)
    y_n  = sum_c softmax_c(L_n)_c kap_c                          (0 for padded rows)

The MIS term is present when ``qt`` is given ("optimal" weighting); RFA and "balance"
weighting use L_nc = qh_n . w_c + bias_c.

Forward: program (nb, bh) holds all C samples (padded to a power of two >= 16 and
masked) and a block of queries; the head dims are walked in chunks (BLOCK_DC of D,
BLOCK_VC of Dv), so the C x D tiles stay small even for C = D = 256.

Backward (kernels.md): program (s, j, bh) recomputes the N x C tiles of the query
blocks of split s and produces chunk j of the head dims: dq[:, chunk j], and the
per-split partials of dw, dqt (D chunk j), dkap (Dv chunk j) and, for j = 0, the
C-sized ones (dbias, dbh, dLam). With one chunk (D, Dv <= the chunk size) nothing is
recomputed; with several, the N x C logits are recomputed once per chunk, which keeps
the register accumulators at C x chunk. Partials are summed in torch (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

ALPHA_FLOOR = tl.constexpr(1e-8)


@triton.jit
def _logits(q_base, sq_n, sq_d, n64, n_ok, W, QT, rows, c_ok, D, ss,
            MIS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_DC: tl.constexpr, N_DC: tl.constexpr):
    """qh . w^T and qh . qt^T, [BLOCK_N, BLOCK_C] each, over the D chunks."""
    s = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    t = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for i in tl.static_range(N_DC):
        d = i * BLOCK_DC + tl.arange(0, BLOCK_DC)
        d_ok = d < D
        qh = tl.load(q_base + n64[:, None] * sq_n + d[None, :] * sq_d,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * ss   # [BLOCK_N, BLOCK_DC]
        wc = tl.load(W + rows[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        s += tl.dot(qh, tl.trans(wc), input_precision="ieee")
        if MIS:
            qtc = tl.load(QT + rows[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            t += tl.dot(qh, tl.trans(qtc), input_precision="ieee")
    return s, t


@triton.jit(do_not_specialize=["N"])
def _query_fwd_kernel(
    Q, W, BIAS, KAP, CEFF, PAD, QT, LAM, BHW, Y,
    sq_b, sq_h, sq_n, sq_d,
    sp_b, sp_n,
    sy_b, sy_h, sy_n, sy_d,
    H, N, C, D, DV, ss, beta,
    HAS_PAD: tl.constexpr, MIS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_DC: tl.constexpr, N_DC: tl.constexpr, BLOCK_VC: tl.constexpr, N_VC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < N
    n64 = n.to(tl.int64)
    row_ok = n_in
    if HAS_PAD:
        padded = tl.load(PAD + b * sp_b + n64 * sp_n, mask=n_in, other=1)
        row_ok = row_ok & (padded == 0)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    ce = tl.load(CEFF + b)
    act = c < ce
    rows = bh * C + c
    bias = tl.load(BIAS + rows, mask=c_ok, other=0.0)

    q_base = Q + b * sq_b + h * sq_h
    # padded queries are never read (loaded as 0): whatever they hold stays out
    s, t = _logits(q_base, sq_n, sq_d, n64, row_ok, W, QT, rows, c_ok, D, ss,
                   MIS, BLOCK_N, BLOCK_C, BLOCK_DC, N_DC)
    logit = s + bias[None, :]                                          # [BLOCK_N, BLOCK_C]
    if MIS:
        lam = tl.load(LAM + rows, mask=c_ok, other=0.0)
        bhw = tl.load(BHW + rows, mask=c_ok, other=0.0)
        r = tl.exp(t - lam[None, :])
        r_mean = tl.sum(tl.where(act[None, :], r, 0.0), axis=1) / ce.to(tl.float32)
        alpha = bhw[None, :] + beta * (r - r_mean[:, None])
        logit += tl.log(tl.maximum(alpha, ALPHA_FLOOR))
    logit = tl.where(act[None, :], logit, float("-inf"))
    mx = tl.max(logit, axis=1)
    p = tl.exp(logit - mx[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(row_ok[:, None], p, 0.0)                              # padded rows: y = 0

    y_base = Y + b * sy_b + h * sy_h
    for j in tl.static_range(N_VC):
        dv = j * BLOCK_VC + tl.arange(0, BLOCK_VC)
        dv_ok = dv < DV
        kap = tl.load(KAP + rows[:, None] * DV + dv[None, :], mask=c_ok[:, None] & dv_ok[None, :], other=0.0)
        y = tl.dot(p, kap, input_precision="ieee")                    # [BLOCK_N, BLOCK_VC]
        tl.store(y_base + n64[:, None] * sy_n + dv[None, :] * sy_d, y.to(Y.dtype.element_ty),
                 mask=n_in[:, None] & dv_ok[None, :])


@triton.jit(do_not_specialize=["N", "blocks_per_split"])
def _query_bwd_kernel(
    Q, W, BIAS, KAP, CEFF, PAD, QT, LAM, BHW, DY,
    DQ, DW_PART, DKAP_PART, DB_PART, DQT_PART, DBH_PART, DLAM_PART,
    sq_b, sq_h, sq_n, sq_d,
    sp_b, sp_n,
    sdy_b, sdy_h, sdy_n, sdy_d,
    sdq_b, sdq_h, sdq_n, sdq_d,
    H, N, C, D, DV, ss, beta, blocks_per_split,
    HAS_PAD: tl.constexpr, MIS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_DC: tl.constexpr, N_DC: tl.constexpr, BLOCK_VC: tl.constexpr, N_VC: tl.constexpr,
):
    # P = softmax_c(L); dp_nc = dy_n . kap_c; delta_n = sum_c P_nc dp_nc = dy_n . y_n
    # dL = P (dp - delta);  dkap_c = sum_n P_nc dy_n;  dqh_n = sum_c dL_nc w_c (+ dt_cn qt_c)
    # dw_c = sum_n dL_nc qh_n;  dbias_c = sum_n dL_nc
    # MIS: dalpha = dL / alpha where alpha > 1e-8 (kernels.md); dbh_c = sum_n dalpha_nc
    #      dr = beta (dalpha - mean over active c' of dalpha); dt = dr r
    #      dLam_c = -sum_n dt_cn;  dqt_c = sum_n dt_cn qh_n
    pid_s = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_bh = tl.program_id(2)
    BH = tl.num_programs(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    ce = tl.load(CEFF + b)
    act = c < ce
    rows = bh * C + c
    bias = tl.load(BIAS + rows, mask=c_ok, other=0.0)
    if MIS:
        lam = tl.load(LAM + rows, mask=c_ok, other=0.0)
        bhw = tl.load(BHW + rows, mask=c_ok, other=0.0)
    # this program's chunk of the head dims
    dj = pid_j * BLOCK_DC + tl.arange(0, BLOCK_DC)
    dj_ok = dj < D
    vj = pid_j * BLOCK_VC + tl.arange(0, BLOCK_VC)
    vj_ok = vj < DV
    wj = tl.load(W + rows[:, None] * D + dj[None, :], mask=c_ok[:, None] & dj_ok[None, :], other=0.0)
    if MIS:
        qtj = tl.load(QT + rows[:, None] * D + dj[None, :], mask=c_ok[:, None] & dj_ok[None, :], other=0.0)

    q_base = Q + b * sq_b + h * sq_h
    dy_base = DY + b * sdy_b + h * sdy_h
    dq_base = DQ + b * sdq_b + h * sdq_h
    acc_dw = tl.zeros([BLOCK_C, BLOCK_DC], tl.float32)
    acc_dqt = tl.zeros([BLOCK_C, BLOCK_DC], tl.float32)
    acc_dkap = tl.zeros([BLOCK_C, BLOCK_VC], tl.float32)
    acc_db = tl.zeros([BLOCK_C], tl.float32)
    acc_dbh = tl.zeros([BLOCK_C], tl.float32)
    acc_dlam = tl.zeros([BLOCK_C], tl.float32)
    for blk in range(0, blocks_per_split):
        n = (pid_s * blocks_per_split + blk) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = n < N
        n64 = n.to(tl.int64)
        row_ok = n_in
        if HAS_PAD:
            padded = tl.load(PAD + b * sp_b + n64 * sp_n, mask=n_in, other=1)
            row_ok = row_ok & (padded == 0)
        keep = row_ok[:, None] & act[None, :]                          # [BLOCK_N, BLOCK_C]

        s, t = _logits(q_base, sq_n, sq_d, n64, row_ok, W, QT, rows, c_ok, D, ss,
                       MIS, BLOCK_N, BLOCK_C, BLOCK_DC, N_DC)
        logit = s + bias[None, :]
        if MIS:
            r = tl.exp(t - lam[None, :])
            r_mean = tl.sum(tl.where(act[None, :], r, 0.0), axis=1) / ce.to(tl.float32)
            alpha = bhw[None, :] + beta * (r - r_mean[:, None])
            logit += tl.log(tl.maximum(alpha, ALPHA_FLOOR))
        logit = tl.where(act[None, :], logit, float("-inf"))
        mx = tl.max(logit, axis=1)
        p = tl.exp(logit - mx[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        p = tl.where(keep, p, 0.0)                                     # [BLOCK_N, BLOCK_C]

        dp = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for i in tl.static_range(N_VC):
            dv = i * BLOCK_VC + tl.arange(0, BLOCK_VC)
            dv_ok = dv < DV
            dyc = tl.load(dy_base + n64[:, None] * sdy_n + dv[None, :] * sdy_d,
                          mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
            kapc = tl.load(KAP + rows[:, None] * DV + dv[None, :], mask=c_ok[:, None] & dv_ok[None, :], other=0.0)
            dp += tl.dot(dyc, tl.trans(kapc), input_precision="ieee")
        delta = tl.sum(p * dp, axis=1)
        dl = tl.where(keep, p * (dp - delta[:, None]), 0.0)            # [BLOCK_N, BLOCK_C]

        dyj = tl.load(dy_base + n64[:, None] * sdy_n + vj[None, :] * sdy_d,
                      mask=row_ok[:, None] & vj_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_VC]
        acc_dkap += tl.dot(tl.trans(p), dyj, input_precision="ieee")
        qhj = tl.load(q_base + n64[:, None] * sq_n + dj[None, :] * sq_d,
                      mask=row_ok[:, None] & dj_ok[None, :], other=0.0).to(tl.float32) * ss  # [BLOCK_N, BLOCK_DC]
        dqh = tl.dot(dl, wj, input_precision="ieee")                   # [BLOCK_N, BLOCK_DC]
        acc_dw += tl.dot(tl.trans(dl), qhj, input_precision="ieee")
        acc_db += tl.sum(dl, axis=0)
        if MIS:
            ok = keep & (alpha > ALPHA_FLOOR)                          # no gradient at or below the floor
            dal = tl.where(ok, dl / tl.where(ok, alpha, 1.0), 0.0)
            acc_dbh += tl.sum(dal, axis=0)
            dal_mean = tl.sum(dal, axis=1) / ce.to(tl.float32)
            dt = tl.where(keep, beta * (dal - dal_mean[:, None]) * r, 0.0)
            acc_dlam -= tl.sum(dt, axis=0)
            dqh += tl.dot(dt, qtj, input_precision="ieee")
            acc_dqt += tl.dot(tl.trans(dt), qhj, input_precision="ieee")
        dqh = tl.where(row_ok[:, None], dqh * ss, 0.0)
        tl.store(dq_base + n64[:, None] * sdq_n + dj[None, :] * sdq_d, dqh.to(DQ.dtype.element_ty),
                 mask=n_in[:, None] & dj_ok[None, :])

    prow = pid_s.to(tl.int64) * BH * C + rows                          # rows of (S*B*H*C, ...)
    tl.store(DW_PART + prow[:, None] * D + dj[None, :], acc_dw, mask=c_ok[:, None] & dj_ok[None, :])
    tl.store(DKAP_PART + prow[:, None] * DV + vj[None, :], acc_dkap, mask=c_ok[:, None] & vj_ok[None, :])
    if MIS:
        tl.store(DQT_PART + prow[:, None] * D + dj[None, :], acc_dqt, mask=c_ok[:, None] & dj_ok[None, :])
    if pid_j == 0:                                                     # C-sized partials: chunk 0 only
        tl.store(DB_PART + prow, acc_db, mask=c_ok)
        if MIS:
            tl.store(DBH_PART + prow, acc_dbh, mask=c_ok)
            tl.store(DLAM_PART + prow, acc_dlam, mask=c_ok)


def _blocks(C, D, DV, block_n=None, d_chunk=None):
    BLOCK_C = _common.pow2(C)
    chunk = d_chunk if d_chunk is not None else (64 if BLOCK_C <= 64 else 32)
    BLOCK_DC = min(_common.pow2(D), chunk)
    BLOCK_VC = min(_common.pow2(DV), chunk)
    if block_n is None:
        block_n = 64 if BLOCK_C <= 32 else (32 if BLOCK_C <= 128 else 16)
    num_warps = 4 if BLOCK_C <= 64 else 8
    return block_n, BLOCK_C, BLOCK_DC, _common.cdiv(D, BLOCK_DC), BLOCK_VC, _common.cdiv(DV, BLOCK_VC), num_warps


def _bwd_stages(BLOCK_C, N_DC, N_VC):
    # Software pipelining multiplies the shared-memory buffers of the loop's loads: with
    # several head-dim chunks or C > 64 the backward only fits (sm_90: 117 KB for
    # C = D = Dv = 256, measured by an AOT compile) with one stage.
    return 2 if BLOCK_C <= 64 and N_DC == 1 and N_VC == 1 else 1


def _pad_arg(padding, ref):
    if padding is None:
        return ref, 0, 0
    p = padding.view(torch.uint8)
    return p, p.stride(0), p.stride(1)


def _small(x):
    return x.to(torch.float32).contiguous()


def _prepare(w, bias, kap, c_eff, qt, lam, bh, dev):
    """The C-sized inputs as contiguous float32 (c_eff as int64); without the MIS term
    qt, lam, bh are stand-in pointers the kernel never reads."""
    w, bias, kap = _small(w), _small(bias), _small(kap)
    qt, lam, bh = (_small(qt), _small(lam), _small(bh)) if qt is not None else (w, bias, bias)
    return w, bias, kap, c_eff.to(device=dev, dtype=torch.int64).contiguous(), qt, lam, bh


def query_pass_fwd(q, w, bias, kap, c_eff, padding, ss, qt=None, lam=None, bh=None, beta=0.0, *,
                   block_n=None, d_chunk=None):
    """y (B, H, N, Dv) in q's dtype. The MIS term is used when ``qt`` is given."""
    B, H, N, D = q.shape
    C, DV, dev, mis = w.shape[2], kap.shape[3], q.device, qt is not None
    w, bias, kap, c_eff, qt, lam, bh = _prepare(w, bias, kap, c_eff, qt, lam, bh, dev)
    BLOCK_N, BLOCK_C, BLOCK_DC, N_DC, BLOCK_VC, N_VC, num_warps = _blocks(C, D, DV, block_n, d_chunk)
    y = _common.empty((B, H, N, DV), q.dtype, dev)
    pad, sp_b, sp_n = _pad_arg(padding, q)
    _query_fwd_kernel[(_common.cdiv(N, BLOCK_N), B * H)](
        q, w, bias, kap, c_eff, pad, qt, lam, bh, y,
        *q.stride(), sp_b, sp_n, *y.stride(),
        H, N, C, D, DV, float(ss), float(beta),
        HAS_PAD=padding is not None, MIS=mis,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_DC=BLOCK_DC, N_DC=N_DC, BLOCK_VC=BLOCK_VC, N_VC=N_VC,
        num_warps=num_warps,
    )
    return y


def query_pass_bwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, *,
                   block_n=None, d_chunk=None, splits=None):
    """Returns (dq in q's dtype, dw, dbias, dkap, dqt, dlam, dbh) (float32; the last three
    None without the MIS term)."""
    B, H, N, D = q.shape
    C, DV, dev, mis = w.shape[2], kap.shape[3], q.device, qt is not None
    w, bias, kap, c_eff, qt, lam, bh = _prepare(w, bias, kap, c_eff, qt, lam, bh, dev)
    BLOCK_N, BLOCK_C, BLOCK_DC, N_DC, BLOCK_VC, N_VC, num_warps = _blocks(C, D, DV, block_n, d_chunk)
    NJ = max(N_DC, N_VC)
    S, per_split = _common.num_splits(_common.cdiv(N, BLOCK_N), B * H * NJ, dev, splits)

    f32 = torch.float32
    dq = _common.empty(q.shape, q.dtype, dev)
    dw_part = _common.empty((S, B, H, C, D), f32, dev)
    dkap_part = _common.empty((S, B, H, C, DV), f32, dev)
    db_part = _common.empty((S, B, H, C), f32, dev)
    if mis:
        dqt_part = _common.empty((S, B, H, C, D), f32, dev)
        dbh_part = _common.empty((S, B, H, C), f32, dev)
        dlam_part = _common.empty((S, B, H, C), f32, dev)
    else:
        dqt_part = dbh_part = dlam_part = db_part
    pad, sp_b, sp_n = _pad_arg(padding, q)
    _query_bwd_kernel[(S, NJ, B * H)](
        q, w, bias, kap, c_eff, pad, qt, lam, bh, dy,
        dq, dw_part, dkap_part, db_part, dqt_part, dbh_part, dlam_part,
        *q.stride(), sp_b, sp_n, *dy.stride(), *dq.stride(),
        H, N, C, D, DV, float(ss), float(beta), per_split,
        HAS_PAD=padding is not None, MIS=mis,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_DC=BLOCK_DC, N_DC=N_DC, BLOCK_VC=BLOCK_VC, N_VC=N_VC,
        num_warps=num_warps, num_stages=_bwd_stages(BLOCK_C, N_DC, N_VC),
    )
    dw, dkap, dbias = dw_part.sum(0), dkap_part.sum(0), db_part.sum(0)
    if not mis:
        return dq, dw, dbias, dkap, None, None, None
    return dq, dw, dbias, dkap, dqt_part.sum(0), dlam_part.sum(0), dbh_part.sum(0)
