"""Query pass: N query rows attending over C samples (docs/math.md sections 6 and 7).

    L_nc = qh_n . w_c + bias_c [+ log(max(alpha_nc, 1e-8))]     (-inf for c >= c_eff[b])
    alpha_nc = bh_c + beta * (r_nc - mean over active c' of r_nc'),  r_nc = exp(qh_n . qt_c - Lam_c)
    y_n  = sum_c softmax_c(L_n)_c kap_c                          (0 for padded rows)

The MIS term is present when ``qt`` is given ("optimal" weighting); RFA and "balance"
weighting use L_nc = qh_n . w_c + bias_c. With c_eff[b] = 0 (a sequence with no keys)
every sample is inactive: y = 0 and dq = 0 on its rows, which add nothing to the
C-sized gradients, and the mean over active samples divides by max(c_eff, 1) (no NaN).

Reads q, dy (any strides, one float dtype), the C-sized w, bias, kap, c_eff and with MIS
qt, Lam, bh (float32), the padding mask or cu_seqlens; writes y in q's dtype (forward),
dq of q's shape and dtype (every row) and the float32 C-sized gradients (backward).

Layouts (constexpr VARLEN):
- padded: q (B, H, N, D), y, dy (B, H, N, Dv), an optional (B, N) padding mask; query n
  of element b at Q + b sq_b + h sq_h + n sq_n, valid when n < N and not padded.
- packed: q (T, H, D), y, dy (T, H, Dv), cu_seqlens (B + 1) int32; sequence b is rows
  start = cu[b] .. cu[b + 1] - 1, query n at Q + h sq_h + (start + n) sq_n (int64), valid
  when n < length. The forward's grid covers max_seqlen and a program (b, h, n block)
  whose block starts at or past the length exits at once (nothing to write); the
  backward's splits cover max_seqlen, and a split past the length loads nothing and
  writes zero partials.

The scale is folded into the C rows (ss w and ss qt, rounded once to the input dtype),
so q goes into ``tl.dot`` as loaded (precision rules: _common.py).

Forward: program (bh, nb) (one grid axis, n blocks fastest) holds all C samples (padded
to a power of two >= 16 and masked) and a block of queries; the head dims are walked in
chunks (BLOCK_DC of D, BLOCK_VC of Dv), so the C x D tiles stay small even for
C = D = 256. Traffic: q read once and y written once (the floor); the C-sized w, qt,
kap, bias (C x (2D + Dv) float32 per head) once per program, from L2. With float32
inputs the chunks (16 wide) are a loop, neither unrolled nor pipelined, as in the
backward: the products are FMAs without tensor cores at the default precision, each
thread holding its share of both operands whole, and the unrolled chunks of the half
dtypes (32-64 wide) spilled up to 7.9 KB per thread (``blocks``; now 0 bytes).

Backward (docs/design.md, "Backward"): program (bh, j, s) recomputes the N x C tiles of
the query blocks of split s and produces chunk j of the head dims: dq[:, chunk j], and
the per-split partials of dw, dqt (D chunk j), dkap (Dv chunk j) and, for j = 0, the
C-sized ones (dbias, dbh, dLam), all in one (S, B*H*C, width) float32 buffer summed by
one torch op (deterministic; ``query_pass_bwd_split`` is the launch alone, whose
partials the lean path sums in triton_kernels/small.py). With one chunk (D, Dv <= the
chunk size: 64 for C <= 64 in a half dtype on sm_90, else 32) q and dy are read once
and dq written once (the floor); with NJ chunks the N x C logits are recomputed once per
chunk and q, dy read NJ times, which keeps the register accumulators at C x chunk.
S comes from the occupancy (BWD_PER_SM programs per SM).

Registers of the backward: its tiles are held transposed, C x BLOCK_N (samples along
the rows), and dq as its transpose chunk x BLOCK_N. The tensor-core layout of sm_80
(mma.sync, one layout for all the products of a kernel) puts the warps along a
product's rows: with 16 query rows along them, 8 warps held 8 copies of every N x C
tile (64 float32 registers per thread for each of about ten tiles at C = 128), and
ptxas spilled 1-7 KB per thread; along C the warps split the tiles (8 registers each).
The loops over the head-dim chunks inside the query block (the logits, dy . kap) are
loops, neither unrolled nor pipelined, so one chunk's loads are live at a time. Stack
frames at the main configurations (D, C <= 128, AOT check, tests/test_triton_aot.py):
sm_80 0-16 bytes in float16/bfloat16 (112 in the lean path's specialization at
C = D = 128) and up to 176 in float32 (before: up to 7.6 KB);
sm_90 0 in float16/bfloat16 (before: up to 272) and up to 192 in float32 (before: up
to 4.8 KB). The forward's: 0 bytes on both architectures in every dtype (float32 before
its own blocks: 0.2-7.9 KB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import long_strides, mma, rnd

ALPHA_FLOOR = tl.constexpr(1e-8)
# Programs of the backward resident per SM at the main configurations (AOT check).
BWD_PER_SM = 1


@triton.jit
def _logits_chunk(i, s, t, q_base, sq_n, sq_d, n64, n_ok, W, QT, rows, c_ok, D, ss,
                  MIS: tl.constexpr, BLOCK_DC: tl.constexpr,
                  DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """s, t plus the products of D chunk i (``_logits``)."""
    d = (i * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
    d_ok = d < D
    qc = tl.load(q_base + n64[:, None] * sq_n + d[None, :] * sq_d,
                 mask=n_ok[:, None] & d_ok[None, :], other=0.0)        # [BLOCK_N, BLOCK_DC]
    wc = tl.load(W + rows[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    s += mma(qc, tl.trans(rnd(wc * ss, DT, EMU)), DT, PREC, EMU)
    if MIS:
        qtc = tl.load(QT + rows[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        t += mma(qc, tl.trans(rnd(qtc * ss, DT, EMU)), DT, PREC, EMU)
    return s, t


@triton.jit
def _logits(q_base, sq_n, sq_d, n64, n_ok, W, QT, rows, c_ok, D, ss,
            MIS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_DC: tl.constexpr, N_DC: tl.constexpr, UNROLL: tl.constexpr,
            DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """qh . w^T and qh . qt^T, [BLOCK_N, BLOCK_C] each, over the D chunks: q as loaded
    times the C rows scaled by ss and rounded to the input dtype. UNROLL: the chunks
    unrolled (half dtypes); else a loop, neither unrolled nor pipelined (float32)."""
    s = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    t = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    if UNROLL:
        for i in tl.static_range(N_DC):
            s, t = _logits_chunk(i, s, t, q_base, sq_n, sq_d, n64, n_ok, W, QT, rows, c_ok, D, ss,
                                 MIS, BLOCK_DC, DT, PREC, EMU)
    else:
        for i in tl.range(0, N_DC, num_stages=1):
            s, t = _logits_chunk(i, s, t, q_base, sq_n, sq_d, n64, n_ok, W, QT, rows, c_ok, D, ss,
                                 MIS, BLOCK_DC, DT, PREC, EMU)
    return s, t


@triton.jit
def _y_chunk(j, p, KAP, rows, c_ok, DV, y_base, sy_n, sy_d, n64, n_in,
             BLOCK_VC: tl.constexpr, YT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """Stores chunk j of y = p . kap (Dv columns j BLOCK_VC ..) in YT."""
    dv = (j * BLOCK_VC + tl.arange(0, BLOCK_VC)).to(tl.int64)
    dv_ok = dv < DV
    kap = tl.load(KAP + rows[:, None] * DV + dv[None, :], mask=c_ok[:, None] & dv_ok[None, :], other=0.0)
    y = mma(p, kap, DT, PREC, EMU)                                     # [BLOCK_N, BLOCK_VC]
    tl.store(y_base + n64[:, None] * sy_n + dv[None, :] * sy_d, rnd(y, YT, EMU),
             mask=n_in[:, None] & dv_ok[None, :])


@triton.jit(do_not_specialize=["N"])
def _query_fwd_kernel(
    Q, W, BIAS, KAP, CEFF, PAD, CU, QT, LAM, BHW, Y,
    sq_b, sq_h, sq_n, sq_d,
    sp_b, sp_n,
    sy_b, sy_h, sy_n, sy_d,
    H, N, C, D, DV, ss, beta,
    HAS_PAD: tl.constexpr, MIS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_DC: tl.constexpr, N_DC: tl.constexpr, BLOCK_VC: tl.constexpr, N_VC: tl.constexpr,
    UNROLL: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    DT: tl.constexpr = Q.dtype.element_ty
    NB = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)                                             # (bh, n block), n fastest
    pid_n = pid % NB
    pid_bh = pid // NB
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    q_base = Q + b * sq_b + h * sq_h
    y_base = Y + b * sy_b + h * sy_h
    seqlen = N
    if VARLEN:   # packed: rows CU[b] .. CU[b + 1] - 1 of (T, H, .), sq_b = sy_b = 0; N = max_seqlen
        start = tl.load(CU + b).to(tl.int64)
        seqlen = tl.load(CU + b + 1).to(tl.int64) - start
        if pid_n.to(tl.int64) * BLOCK_N >= seqlen:                     # a block past the sequence's end
            return
        q_base += start * sq_n
        y_base += start * sy_n
    n64 = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n64 < seqlen
    row_ok = n_in
    if HAS_PAD:
        padded = tl.load(PAD + b * sp_b + n64 * sp_n, mask=n_in, other=1)
        row_ok = row_ok & (padded == 0)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    ce = tl.load(CEFF + b)
    act = c < ce
    n_act = tl.maximum(ce, 1).to(tl.float32)                          # c_eff = 0: no NaN from the mean
    rows = bh * C + c
    bias = tl.load(BIAS + rows, mask=c_ok, other=0.0)

    # padded queries are never read (loaded as 0): whatever they hold stays out
    s, t = _logits(q_base, sq_n, sq_d, n64, row_ok, W, QT, rows, c_ok, D, ss,
                   MIS, BLOCK_N, BLOCK_C, BLOCK_DC, N_DC, UNROLL, DT, PREC, EMU)
    logit = s + bias[None, :]                                          # [BLOCK_N, BLOCK_C]
    if MIS:
        lam = tl.load(LAM + rows, mask=c_ok, other=0.0)
        bhw = tl.load(BHW + rows, mask=c_ok, other=0.0)
        r = tl.exp(t - lam[None, :])
        r_mean = tl.sum(tl.where(act[None, :], r, 0.0), axis=1) / n_act
        alpha = bhw[None, :] + beta * (r - r_mean[:, None])
        logit += tl.log(tl.maximum(alpha, ALPHA_FLOOR))
    logit = tl.where(act[None, :], logit, float("-inf"))
    mx = tl.max(logit, axis=1)
    p = tl.exp(logit - mx[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(row_ok[:, None] & act[None, :], p, 0.0)               # padded rows, c_eff = 0: y = 0

    if UNROLL:
        for j in tl.static_range(N_VC):
            _y_chunk(j, p, KAP, rows, c_ok, DV, y_base, sy_n, sy_d, n64, n_in,
                     BLOCK_VC, Y.dtype.element_ty, DT, PREC, EMU)
    else:   # as in _logits: one chunk of kap live at a time
        for j in tl.range(0, N_VC, num_stages=1):
            _y_chunk(j, p, KAP, rows, c_ok, DV, y_base, sy_n, sy_d, n64, n_in,
                     BLOCK_VC, Y.dtype.element_ty, DT, PREC, EMU)


@triton.jit
def _logits_t(q_base, sq_n, sq_d, n64, n_ok, W, QT, rows, c_ok, D, ss,
              MIS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_DC: tl.constexpr, N_DC: tl.constexpr,
              DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """The transposed logits of ``_logits``, w . qh^T and qt . qh^T, [BLOCK_C, BLOCK_N]
    each (samples along the rows: the backward's orientation)."""
    s = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    # a loop, not unrolled and not pipelined: one chunk's loads are live at a time
    for i in tl.range(0, tl.cdiv(D, BLOCK_DC), num_stages=1):
        d = (i * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
        d_ok = d < D
        qc = tl.load(q_base + n64[:, None] * sq_n + d[None, :] * sq_d,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)    # [BLOCK_N, BLOCK_DC]
        wc = tl.load(W + rows[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        s += mma(rnd(wc * ss, DT, EMU), tl.trans(qc), DT, PREC, EMU)
        if MIS:
            qtc = tl.load(QT + rows[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            t += mma(rnd(qtc * ss, DT, EMU), tl.trans(qc), DT, PREC, EMU)
    return s, t


@triton.jit(do_not_specialize=["N", "blocks_per_split", "S"])
def _query_bwd_kernel(
    Q, W, BIAS, KAP, CEFF, PAD, CU, QT, LAM, BHW, DY, DQ, PART,
    sq_b, sq_h, sq_n, sq_d,
    sp_b, sp_n,
    sdy_b, sdy_h, sdy_n, sdy_d,
    sdq_b, sdq_h, sdq_n, sdq_d,
    H, N, C, D, DV, ss, beta, S, blocks_per_split,
    HAS_PAD: tl.constexpr, MIS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_DC: tl.constexpr, N_DC: tl.constexpr, BLOCK_VC: tl.constexpr, N_VC: tl.constexpr,
    NJ: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr,
):
    # P = softmax_c(L); dp_nc = dy_n . kap_c; delta_n = sum_c P_nc dp_nc = dy_n . y_n
    # dL = P (dp - delta);  dkap_c = sum_n P_nc dy_n;  dqh_n = sum_c dL_nc w_c (+ dt_cn qt_c)
    # dw_c = sum_n dL_nc qh_n;  dbias_c = sum_n dL_nc
    # MIS: dalpha = dL / alpha where alpha > 1e-8 (docs/design.md); dbh_c = sum_n dalpha_nc
    #      dr = beta (dalpha - mean over active c' of dalpha); dt = dr r
    #      dLam_c = -sum_n dt_cn;  dqt_c = sum_n dt_cn qh_n
    # Every C x N tile is held transposed, [BLOCK_C, BLOCK_N] (samples along the rows):
    # the tensor-core layout puts the warps along a product's rows, and BLOCK_C >= BLOCK_N,
    # so the warps split the samples instead of holding copies of a few query rows.
    # Partials of split s, one row of PART (S, B*H*C, PW) per sample:
    #      [dw (D) | dkap (Dv) | dbias | dqt (D) | dbh | dLam]   (the last three with MIS)
    DT: tl.constexpr = Q.dtype.element_ty
    pid = tl.program_id(0)                                             # (bh, j, s), s fastest
    pid_s = pid % S
    pid_j = (pid // S) % NJ
    pid_bh = pid // (S * NJ)
    BH = (tl.num_programs(0) // (S * NJ)).to(tl.int64)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)

    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    q_base = Q + b * sq_b + h * sq_h
    dy_base = DY + b * sdy_b + h * sdy_h
    dq_base = DQ + b * sdq_b + h * sdq_h
    seqlen = N
    n_blk = blocks_per_split
    c_ld = c_ok
    if VARLEN:   # packed: rows CU[b] .. CU[b + 1] - 1, sq_b = sdy_b = sdq_b = 0; N = max_seqlen
        start = tl.load(CU + b).to(tl.int64)
        seqlen = tl.load(CU + b + 1).to(tl.int64) - start
        first = (pid_s * blocks_per_split).to(tl.int64) * BLOCK_N     # first query of the split
        # the query blocks of split s that hold rows of b; none: no loads, zero partials
        n_blk = tl.maximum(tl.minimum(tl.cdiv(seqlen - first, BLOCK_N), blocks_per_split), 0).to(tl.int32)
        c_ld = tl.where(first < seqlen, c_ok, False)
        q_base += start * sq_n
        dy_base += start * sdy_n
        dq_base += start * sdq_n
    ce = tl.load(CEFF + b)
    act = c < ce
    n_act = tl.maximum(ce, 1).to(tl.float32)                          # c_eff = 0: no NaN from the mean
    rows = bh * C + c
    bias = tl.load(BIAS + rows, mask=c_ld, other=0.0)
    if MIS:
        lam = tl.load(LAM + rows, mask=c_ld, other=0.0)
        bhw = tl.load(BHW + rows, mask=c_ld, other=0.0)
    # this program's chunk of the head dims
    dj = (pid_j * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
    dj_ok = dj < D
    vj = (pid_j * BLOCK_VC + tl.arange(0, BLOCK_VC)).to(tl.int64)
    vj_ok = vj < DV
    wj = tl.load(W + rows[:, None] * D + dj[None, :], mask=c_ld[:, None] & dj_ok[None, :], other=0.0)
    wj = rnd(wj * ss, DT, EMU)                                         # [BLOCK_C, BLOCK_DC]
    if MIS:
        qtj = tl.load(QT + rows[:, None] * D + dj[None, :], mask=c_ld[:, None] & dj_ok[None, :], other=0.0)
        qtj = rnd(qtj * ss, DT, EMU)

    acc_dw = tl.zeros([BLOCK_C, BLOCK_DC], tl.float32)
    acc_dqt = tl.zeros([BLOCK_C, BLOCK_DC], tl.float32)
    acc_dkap = tl.zeros([BLOCK_C, BLOCK_VC], tl.float32)
    acc_db = tl.zeros([BLOCK_C], tl.float32)
    acc_dbh = tl.zeros([BLOCK_C], tl.float32)
    acc_dlam = tl.zeros([BLOCK_C], tl.float32)
    for blk in range(0, n_blk):
        n64 = (pid_s * blocks_per_split + blk).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = n64 < seqlen
        row_ok = n_in
        if HAS_PAD:
            padded = tl.load(PAD + b * sp_b + n64 * sp_n, mask=n_in, other=1)
            row_ok = row_ok & (padded == 0)
        keep = act[:, None] & row_ok[None, :]                          # [BLOCK_C, BLOCK_N]

        s, t = _logits_t(q_base, sq_n, sq_d, n64, row_ok, W, QT, rows, c_ok, D, ss,
                         MIS, BLOCK_N, BLOCK_C, BLOCK_DC, N_DC, DT, PREC, EMU)
        logit = s + bias[:, None]
        if MIS:
            r = tl.exp(t - lam[:, None])
            r_mean = tl.sum(tl.where(act[:, None], r, 0.0), axis=0) / n_act
            alpha = bhw[:, None] + beta * (r - r_mean[None, :])
            logit += tl.log(tl.maximum(alpha, ALPHA_FLOOR))
        logit = tl.where(act[:, None], logit, float("-inf"))
        mx = tl.max(logit, axis=0)
        p = tl.exp(logit - mx[None, :])
        p = p / tl.sum(p, axis=0)[None, :]
        p = tl.where(keep, p, 0.0)                                     # [BLOCK_C, BLOCK_N]

        dp = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
        for i in tl.range(0, tl.cdiv(DV, BLOCK_VC), num_stages=1):    # as in _logits_t
            dv = (i * BLOCK_VC + tl.arange(0, BLOCK_VC)).to(tl.int64)
            dv_ok = dv < DV
            dyc = tl.load(dy_base + n64[:, None] * sdy_n + dv[None, :] * sdy_d,
                          mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            kapc = tl.load(KAP + rows[:, None] * DV + dv[None, :], mask=c_ok[:, None] & dv_ok[None, :], other=0.0)
            dp += mma(kapc, tl.trans(dyc), DT, PREC, EMU)
        delta = tl.sum(p * dp, axis=0)
        dl = tl.where(keep, p * (dp - delta[None, :]), 0.0)            # [BLOCK_C, BLOCK_N]

        dyj = tl.load(dy_base + n64[:, None] * sdy_n + vj[None, :] * sdy_d,
                      mask=row_ok[:, None] & vj_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_VC]
        acc_dkap += mma(p, dyj, DT, PREC, EMU)
        qj = tl.load(q_base + n64[:, None] * sq_n + dj[None, :] * sq_d,
                     mask=row_ok[:, None] & dj_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DC]
        dq = mma(tl.trans(wj), dl, DT, PREC, EMU)                      # [BLOCK_DC, BLOCK_N] (dq^T)
        acc_dw += mma(dl, qj, DT, PREC, EMU)
        acc_db += tl.sum(dl, axis=1)
        if MIS:
            ok = keep & (alpha > ALPHA_FLOOR)                          # no gradient at or below the floor
            dal = tl.where(ok, dl / tl.where(ok, alpha, 1.0), 0.0)
            acc_dbh += tl.sum(dal, axis=1)
            dal_mean = tl.sum(dal, axis=0) / n_act
            dt = tl.where(keep, beta * (dal - dal_mean[None, :]) * r, 0.0)
            acc_dlam -= tl.sum(dt, axis=1)
            dq += mma(tl.trans(qtj), dt, DT, PREC, EMU)
            acc_dqt += mma(dt, qj, DT, PREC, EMU)
        dq = tl.where(row_ok[None, :], dq, 0.0)
        tl.store(dq_base + n64[None, :] * sdq_n + dj[:, None] * sdq_d, rnd(dq, DQ.dtype.element_ty, EMU),
                 mask=n_in[None, :] & dj_ok[:, None])

    PW = (2 * D + DV + 3) if MIS else (D + DV + 1)
    prow = ((pid_s.to(tl.int64) * BH + bh) * C + c) * PW               # rows of (S, B*H*C, PW)
    tl.store(PART + prow[:, None] + dj[None, :], acc_dw * ss, mask=c_ok[:, None] & dj_ok[None, :])
    tl.store(PART + prow[:, None] + D + vj[None, :], acc_dkap, mask=c_ok[:, None] & vj_ok[None, :])
    if MIS:
        tl.store(PART + prow[:, None] + (D + DV + 1) + dj[None, :], acc_dqt * ss,
                 mask=c_ok[:, None] & dj_ok[None, :])
    if pid_j == 0:                                                     # C-sized partials: chunk 0 only
        tl.store(PART + prow + D + DV, acc_db, mask=c_ok)
        if MIS:
            tl.store(PART + prow + 2 * D + DV + 1, acc_dbh, mask=c_ok)
            tl.store(PART + prow + 2 * D + DV + 2, acc_dlam, mask=c_ok)


def blocks(C, D, DV, block_n=None, d_chunk=None, bwd=False, arch=None, fp32=False):
    """(BLOCK_N, BLOCK_C, BLOCK_DC, N_DC, BLOCK_VC, N_VC, num_warps) of the forward (or
    the backward) query kernel for compute capability ``arch`` (``_common.arch``; None:
    the newest) and inputs in float32 (``fp32``) or a half dtype; the backward holds
    three C x chunk accumulators and about ten C x N tiles, so twice the warps."""
    BLOCK_C = _common.pow2(C)
    if fp32 and not bwd:
        # The float32 forward (the launcher loops over the head-dim chunks, UNROLL False):
        # without tensor cores ("ieee") ``tl.dot`` is a sequence of FMAs whose operands
        # each thread holds whole, its rows x the K dimension of A and K x its columns of
        # B, so chunks of 16 and 8 warps; BLOCK_N 64 up to C = 64, 32 at C = 128.
        # Stack frames (bytes per thread, AOT check, both layouts, D in {64, 128}): 0 on
        # sm_80 and sm_90 at C in {16, 64, 128}, 106-242 registers (before, the half-dtype
        # blocks with their chunks of 32-64 unrolled: up to 7.9 KB on sm_80 and 6.2 KB on
        # sm_90, ptxas falling back to 32 registers). The same blocks hold the "tf32x3"
        # and "tf32" products without spills at C = D = 64 and 128 (0 bytes).
        chunk = d_chunk if d_chunk is not None else 16
        BLOCK_DC = min(_common.pow2(D), chunk)
        BLOCK_VC = min(_common.pow2(DV), chunk)
        if block_n is None:
            block_n = 64 if BLOCK_C <= 64 else (32 if BLOCK_C <= 128 else 16)
        return block_n, BLOCK_C, BLOCK_DC, _common.cdiv(D, BLOCK_DC), BLOCK_VC, _common.cdiv(DV, BLOCK_VC), 8
    chunk = d_chunk if d_chunk is not None else (64 if BLOCK_C <= 64 else 32)
    if d_chunk is None and bwd and BLOCK_C >= 64 and (fp32 or (arch is not None and arch < 90)):
        # sm_80 (mma.sync), and float32 operands (twice the registers of half ones), spill
        # with chunks of 64 at C = 64: chunks of 32 (stack, bytes per thread, AOT check:
        # sm_80 bfloat16 264 -> 0, float32 360 -> 16; sm_90 float32 272-424 -> 8-32)
        chunk = 32
    BLOCK_DC = min(_common.pow2(D), chunk)
    BLOCK_VC = min(_common.pow2(DV), chunk)
    tile = BLOCK_C * max(_common.pow2(D), _common.pow2(DV))
    if block_n is None:   # fewer query rows as the N x C tiles and C x D operands grow
        block_n = 64 if tile <= 32 * 64 and not bwd else (32 if tile <= 64 * 64 and not bwd else 16)
    num_warps = 8 if bwd or tile > 64 * 64 else 4
    return block_n, BLOCK_C, BLOCK_DC, _common.cdiv(D, BLOCK_DC), BLOCK_VC, _common.cdiv(DV, BLOCK_VC), num_warps


def bwd_stages(BLOCK_C, N_DC, N_VC):
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
    if x.dtype == torch.float32 and x.is_contiguous():   # C-sized; no copy (nor op call) when already so
        return x
    return x.to(torch.float32).contiguous()


def _prepare(w, bias, kap, c_eff, qt, lam, bh, dev):
    """The C-sized inputs as contiguous float32 (c_eff as int64); without the MIS term
    qt, lam, bh are stand-in pointers the kernel never reads."""
    w, bias, kap = _small(w), _small(bias), _small(kap)
    qt, lam, bh = (_small(qt), _small(lam), _small(bh)) if qt is not None else (w, bias, bias)
    if not (c_eff.dtype == torch.int64 and c_eff.device == dev and c_eff.is_contiguous()):
        c_eff = c_eff.to(device=dev, dtype=torch.int64).contiguous()
    return w, bias, kap, c_eff, qt, lam, bh


def query_pass_fwd(q, w, bias, kap, c_eff, padding, ss, qt=None, lam=None, bh=None, beta=0.0, cu_seqlens=None,
                   max_seqlen=0, *, block_n=None, d_chunk=None):
    """y (B, H, N, Dv) in q's dtype (packed: q (T, H, D) -> y (T, H, Dv), cu_seqlens
    (B + 1) int32, max_seqlen >= every length). The MIS term is used when ``qt`` is given.
    Rows of a sequence with c_eff = 0 get y = 0."""
    B, H, C, D = w.shape
    varlen, N, cu = _common.layout(q, w, cu_seqlens, max_seqlen)
    DV, dev, mis = kap.shape[3], q.device, qt is not None
    w, bias, kap, c_eff, qt, lam, bh = _prepare(w, bias, kap, c_eff, qt, lam, bh, dev)
    fp32 = q.dtype == torch.float32
    BLOCK_N, BLOCK_C, BLOCK_DC, N_DC, BLOCK_VC, N_VC, num_warps = blocks(C, D, DV, block_n, d_chunk,
                                                                       arch=_common.arch(dev), fp32=fp32)
    y = _common.empty(tuple(q.shape[:-1]) + (DV,), q.dtype, dev)
    pad, sp_b, sp_n = _pad_arg(padding, q)
    _common.launch(
        _query_fwd_kernel, (_common.cdiv(N, BLOCK_N) * B * H,), dev,
        q, w, bias, kap, c_eff, pad, cu, qt, lam, bh, y,
        *long_strides(q, varlen), sp_b, sp_n, *long_strides(y, varlen),
        H, N, C, D, DV, float(ss), float(beta),
        HAS_PAD=padding is not None, MIS=mis, VARLEN=varlen,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_DC=BLOCK_DC, N_DC=N_DC, BLOCK_VC=BLOCK_VC, N_VC=N_VC,
        UNROLL=not fp32, PREC=_common.dot_precision(q.dtype), EMU=_common.emulated(dev),
        num_warps=num_warps,
    )
    return y


def query_pass_bwd_split(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, cu_seqlens=None, max_seqlen=0,
                         *, block_n=None, d_chunk=None, splits=None):
    """The launch of ``query_pass_bwd``: (dq, part, S), dq in q's dtype and shape (every
    row written) and the per-split partials (S, B*H*C, PW) float32, rows
    [dw (D) | dkap (Dv) | dbias | dqt (D) | dbh | dLam] (the last three with the MIS term,
    PW = 2 D + Dv + 3; else PW = D + Dv + 1). Arguments as ``query_pass_bwd``."""
    B, H, C, D = w.shape
    varlen, N, cu = _common.layout(q, w, cu_seqlens, max_seqlen)
    DV, dev, mis = kap.shape[3], q.device, qt is not None
    w, bias, kap, c_eff, qt, lam, bh = _prepare(w, bias, kap, c_eff, qt, lam, bh, dev)
    BLOCK_N, BLOCK_C, BLOCK_DC, N_DC, BLOCK_VC, N_VC, num_warps = blocks(C, D, DV, block_n, d_chunk, bwd=True,
                                                                       arch=_common.arch(dev),
                                                                       fp32=q.dtype == torch.float32)
    NJ = max(N_DC, N_VC)
    S, per_split = _common.num_splits(_common.cdiv(N, BLOCK_N), B * H * NJ, dev, BWD_PER_SM, splits)

    dq = _common.empty(q.shape, q.dtype, dev)
    PW = (2 * D + DV + 3) if mis else (D + DV + 1)
    part = _common.empty((S, B * H * C, PW), torch.float32, dev)
    pad, sp_b, sp_n = _pad_arg(padding, q)
    _common.launch(
        _query_bwd_kernel, (S * NJ * B * H,), dev,
        q, w, bias, kap, c_eff, pad, cu, qt, lam, bh, dy, dq, part,
        *long_strides(q, varlen), sp_b, sp_n, *long_strides(dy, varlen), *long_strides(dq, varlen),
        H, N, C, D, DV, float(ss), float(beta), S, per_split,
        HAS_PAD=padding is not None, MIS=mis, VARLEN=varlen,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_DC=BLOCK_DC, N_DC=N_DC, BLOCK_VC=BLOCK_VC, N_VC=N_VC,
        NJ=NJ, PREC=_common.dot_precision(q.dtype), EMU=_common.emulated(dev),
        num_warps=num_warps, num_stages=bwd_stages(BLOCK_C, N_DC, N_VC),
    )
    return dq, part, S


def query_pass_bwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, cu_seqlens=None, max_seqlen=0, *,
                   block_n=None, d_chunk=None, splits=None):
    """Returns (dq in q's dtype, dw, dbias, dkap, dqt, dlam, dbh) (float32; the last three
    None without the MIS term); dq of q's shape, every row written (0 on rows of a
    sequence with c_eff = 0, which add nothing to the C-sized gradients)."""
    B, H, C, D = w.shape
    DV, mis = kap.shape[3], qt is not None
    dq, part, S = query_pass_bwd_split(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, cu_seqlens,
                                       max_seqlen, block_n=block_n, d_chunk=d_chunk, splits=splits)
    PW = part.shape[-1]
    tot = part.sum(0).view(B, H, C, PW)                                # one reduction for all partials
    dw, dkap, dbias = tot[..., :D], tot[..., D:D + DV], tot[..., D + DV]
    if not mis:
        return dq, dw, dbias, dkap, None, None, None
    o = D + DV + 1
    return dq, dw, dbias, dkap, tot[..., o:o + D], tot[..., o + D + 1], tot[..., o + D]
