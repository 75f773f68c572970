"""The C x D and C x C steps of LARA as small kernels (docs/math.md sections 2, 3, 6; the
lean path, lara_kernels/_whole_triton.py), forward and backward.

Every kernel here works on float32 C-sized tensors, contiguous (B, H, C, ...): one
program per block of BLOCK_R = 16 sample rows (or columns) of one (b, h) on grid axis 0.
The C x C matrices are never held whole: they are formed in [16, 16] tiles (sample
blocks of KC = 16, the head dims contracted in chunks of KC), and every product
contracts over 16 (``tl.dot`` of float32 C-sized operands, "ieee" precision as torch's
float32 matmul in the pipeline; no half input, so no tensor cores), which keeps the
float32 operands of the products small enough not to spill. A softmax over samples takes
its log-normalizer from a first sweep of the tiles (or from the forward), then a second
sweep forms the probabilities and the product. Probabilities exp(s - lse) are clamped at
exp(0): the log-normalizer may come from another kernel (or tile shape) that summed the
products in another order, and near the input range bound (C x C products ~1e23, ulps
far above 88) a recomputed s can exceed it by ulps, whose exp overflows. There, too,
log(sum of exp) is below the ulp of the maximum and vanishes from max + log(sum): the
softmax of the "mixed" proposal therefore keeps (max, sum) and divides, exp(s - max) /
sum, which stays normalized at any size (with lse = max + log(sum) every weight became 1
and kmix C times too large). Outputs over D come in chunks of
BLOCK_DC <= 64 (a static loop, or the grid for the backward's column kernels).
Traffic: a program reads its C-sized rows and, per sweep, all C rows of the other
operand (C x D float32 per (b, h), from L2): C x D x C / 16 reads per (b, h), nothing
next to the long passes.

Active samples: c' < max(c_eff[b], 1) (c_eff = 0: sample 0 treated as active so that
everything stays finite; the query pass gives such rows output 0), as ``_pipeline``.

Forward:
- ``_proposal_kernel`` (rows c of (b, h)): reads qt (B, H, C, D), kt (B, H_kv, C, D) (the
  key landmarks of query head h are those of key/value head h // G), eps (B, H, C', D)
  float32 (any strides, optional), c_eff; writes mu and w = mu [+ eps] (B, H, C, D).
  segment: mu = qt + kt; mixed: mu = qt + kmix, kmix = softmax_c'(kt kt^T) kt over
  active c', which (with its rows' maxima and sums of exp, lse (B, H_kv, C, 2)) the programs of the
  first query head of each group also write, for the backward.
- ``_stats_kernel`` (rows c): reads the split partials of the key pass (S_k, B*H*C, 2 + Dv)
  and of the query normalizer (S_n, B*H*C, 3), w, mu, c_eff; writes Z, Lam, rho,
  log_den, bias, bh (B, H, C) and kap (B, H, C, Dv): Z, kap, Lam by
  ``key_pass.combine_rows`` (the pipeline's combine, same order);
  g_cc' = w_c . mu_c' - |mu_c'|^2 / 2, rho_c = g_cc, log_den_c = LSE_{active c'} g_cc';
  optimal: bh = exp(rho - log_den), bias = Z - rho; balance: bias = Z - log_den.

Backward (csrc/cpu/fused.cpp's header has the formulas; na = max(c_eff, 1)):
- ``_small_bwd_rows_kernel`` (rows c): sums the query pass's split partials
  (S_q, B*H*C, PW) into dw_q, dkap, dbias [, dqt_q, dbh, dLam]; dZ = dbias;
  optimal: drho = -dbias + dbh bh, dlog_den = -dbh bh; balance: drho = 0,
  dlog_den = -dbias; dg_cc' = dlog_den_c softmax_{c' < na}(g_c)_c' + [c = c'] drho_c
  (the softmax from the forward's log_den); writes dZ, dkap (the key pass backward's
  inputs), dLam (the normalizer's), drho, dlog_den (B, H, C), dw_r = dw_q + dg mu and
  dqt_q (B, H, C, D).
- ``_small_bwd_cols_kernel`` (program per (b, key/value head, block of columns c', D
  chunk), the G query heads of the group in a loop): sums the key pass's dw partials and
  the normalizer's dqt partials and forms dw = dw_r + dw_key,
  dmu = dw + dg^T w - (sum_c dg_cc') mu_c', dqt = dmu + dqt_q + dqt_norm; writes dqt
  (B, H, C, D) and dmuS = sum over the group of dmu (B, H_kv, C, D): the gradient of kt
  for "segment".
- ``_mixed_bwd_kernel`` ("mixed"; program per (b, key/value head, column block j, D
  chunk)): mu = qt + a kt with a = softmax_{c' < na}(kt kt^T) shared by the group, so
  with dmuS, da = dmuS kt^T, dA = a (da - rs), rs_c = sum_c' a_cc' da_cc' = dmuS_c . kmix_c:
  dkt_j = sum_c a_cj dmuS_c + sum_c dA_cj kt_c + sum_c' dA_jc' kt_c'; reads kt, dmuS,
  kmix, lse, c_eff; writes dkt (B, H_kv, C, D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from .key_pass import combine_rows

BLOCK_R = 16   # sample rows (or columns) of a program
KC = 16        # the contraction chunk of every product (samples and head dims)


@triton.jit
def _gram(A, B_, ra, ra_ok, rb, rb_ok, D, NORM: tl.constexpr, KC: tl.constexpr):
    """(A[ra] @ B[rb]^T [len(ra), len(rb)], |B[rb]|^2 or 0) over D in chunks of KC, in
    order; A, B rows of D float32 at A + row * D (int64 rows)."""
    acc = tl.zeros([ra.shape[0], rb.shape[0]], tl.float32)
    nrm = tl.zeros([rb.shape[0]], tl.float32)
    for k0 in range(0, D, KC):
        d = (k0 + tl.arange(0, KC)).to(tl.int64)
        d_ok = d < D
        a = tl.load(A + ra[:, None] * D + d[None, :], mask=ra_ok[:, None] & d_ok[None, :], other=0.0)
        bb = tl.load(B_ + rb[:, None] * D + d[None, :], mask=rb_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(bb), input_precision="ieee")
        if NORM:
            nrm += tl.sum(bb * bb, axis=1)
    return acc, nrm


@triton.jit
def _rowdot(A, B_, ra, ra_ok, D, KC: tl.constexpr):
    """A[ra] . B[ra] per row, over D in chunks of KC."""
    acc = tl.zeros([ra.shape[0]], tl.float32)
    for k0 in range(0, D, KC):
        d = (k0 + tl.arange(0, KC)).to(tl.int64)
        m = ra_ok[:, None] & (d < D)[None, :]
        acc += tl.sum(tl.load(A + ra[:, None] * D + d[None, :], mask=m, other=0.0)
                      * tl.load(B_ + ra[:, None] * D + d[None, :], mask=m, other=0.0), axis=1)
    return acc


@triton.jit
def _row_block(C, BLOCK_R: tl.constexpr):
    """(bh, r, r_ok, rows, R) of this program of the grid (bh, row block), row blocks
    fastest: its head bh (int64), its rows r of the head's C and their rows of the
    (B*H*C, ...) tensors, R = B * H * C."""
    pid = tl.program_id(0)
    NRB = tl.cdiv(C, BLOCK_R)
    bh = (pid // NRB).to(tl.int64)
    r = (pid % NRB) * BLOCK_R + tl.arange(0, BLOCK_R)
    R = (tl.num_programs(0) // NRB).to(tl.int64) * C
    return bh, r, r < C, bh * C + r, R


@triton.jit
def _col_block(C, BLOCK_R: tl.constexpr, N_DC: tl.constexpr):
    """(bk, dc, j, j_ok, number of bk) of this program of the grid (b * kv head, column
    block, D chunk), chunk fastest: bk (int64), its D chunk dc and its columns j of C."""
    pid = tl.program_id(0)
    NRB = tl.cdiv(C, BLOCK_R)
    bk = (pid // (N_DC * NRB)).to(tl.int64)
    j = ((pid // N_DC) % NRB) * BLOCK_R + tl.arange(0, BLOCK_R)
    return bk, pid % N_DC, j, j < C, (tl.num_programs(0) // (N_DC * NRB)).to(tl.int64)


@triton.jit
def _proposal_kernel(
    QT, KT, EPS, CEFF, MU, W, KMIX, LSE,
    se_b, se_h, se_c, se_d,
    H, G, C, D,
    HAS_EPS: tl.constexpr, MIXED: tl.constexpr,
    BLOCK_R: tl.constexpr, KC: tl.constexpr, BLOCK_DC: tl.constexpr, N_DC: tl.constexpr,
):
    bh, r, r_ok, rows, _ = _row_block(C, BLOCK_R)                      # (bh, row block), rows fastest
    b = bh // H
    h = bh % H
    bk = b * (H // G) + h // G                                         # key/value head of h
    krows = bk * C + r
    if MIXED:
        na = tl.maximum(tl.load(CEFF + b), 1)
        # sweep 1: the row log-normalizers of kt kt^T over the active samples (online)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, C, KC):
            c = c0 + tl.arange(0, KC)
            s, _n = _gram(KT, KT, krows, r_ok, bk * C + c, c < C, D, False, KC)
            s = tl.where(((c < C) & (c < na))[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
        first = (h % G) == 0
        if first:   # (max, sum of exp) per row, not their log-sum-exp (see the module doc)
            tl.store(LSE + krows * 2, m_i, mask=r_ok)
            tl.store(LSE + krows * 2 + 1, l_i, mask=r_ok)
    for i in tl.static_range(N_DC):
        d = (i * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
        d_ok = d < D
        m2 = r_ok[:, None] & d_ok[None, :]
        qt = tl.load(QT + rows[:, None] * D + d[None, :], mask=m2, other=0.0)
        if MIXED:
            # sweep 2: kmix = softmax(kt kt^T) kt, tile by tile
            mix = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
            for c0 in range(0, C, KC):
                c = c0 + tl.arange(0, KC)
                c_ok = c < C
                s, _n = _gram(KT, KT, krows, r_ok, bk * C + c, c_ok, D, False, KC)
                a = tl.where((c_ok & (c < na))[None, :], tl.exp(tl.minimum(s - m_i[:, None], 0.0)) / l_i[:, None],
                             0.0)
                ktc = tl.load(KT + (bk * C + c)[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :],
                              other=0.0)
                mix += tl.dot(a, ktc, input_precision="ieee")
            if first:
                tl.store(KMIX + krows[:, None] * D + d[None, :], mix, mask=m2)
            mu = qt + mix
        else:
            mu = qt + tl.load(KT + krows[:, None] * D + d[None, :], mask=m2, other=0.0)
        tl.store(MU + rows[:, None] * D + d[None, :], mu, mask=m2)
        if HAS_EPS:
            e = tl.load(EPS + b * se_b + h * se_h + r.to(tl.int64)[:, None] * se_c + d[None, :] * se_d, mask=m2,
                        other=0.0)
            mu = mu + e
            tl.store(W + rows[:, None] * D + d[None, :], mu, mask=m2)


@triton.jit(do_not_specialize=["SK", "SN"])
def _stats_kernel(
    KPART, NPART, W, MU, CEFF, Z, KAP, LAM, RHO, LOGDEN, BIAS, BHW,
    H, C, D, DV, SK, SN,
    OPTIMAL: tl.constexpr,
    BLOCK_R: tl.constexpr, KC: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh, r, r_ok, rows, R = _row_block(C, BLOCK_R)                      # (bh, row block), rows fastest
    b = bh // H
    z, kap = combine_rows(KPART, rows, r_ok, R, DV, SK, True, BLOCK_DV)
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    tl.store(Z + rows, z, mask=r_ok)
    tl.store(KAP + rows[:, None] * DV + dv[None, :], kap, mask=r_ok[:, None] & (dv < DV)[None, :])

    na = tl.maximum(tl.load(CEFF + b), 1)
    rho = tl.zeros([BLOCK_R], tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, KC):
        c = c0 + tl.arange(0, KC)
        g, nrm = _gram(W, MU, rows, r_ok, bh * C + c, c < C, D, True, KC)
        g = g - 0.5 * nrm[None, :]
        rho += tl.sum(tl.where(r[:, None] == c[None, :], g, 0.0), axis=1)
        gm = tl.where(((c < C) & (c < na))[None, :], g, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(gm, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(gm - m_new[:, None]), axis=1)
        m_i = m_new
    log_den = m_i + tl.log(l_i)
    tl.store(RHO + rows, rho, mask=r_ok)
    tl.store(LOGDEN + rows, log_den, mask=r_ok)
    if OPTIMAL:
        lam, _k = combine_rows(NPART, rows, r_ok, R, 1, SN, False, 16)
        tl.store(LAM + rows, lam, mask=r_ok)
        tl.store(BHW + rows, tl.exp(rho - log_den), mask=r_ok)
        tl.store(BIAS + rows, z - rho, mask=r_ok)
    else:
        tl.store(BIAS + rows, z - log_den, mask=r_ok)


@triton.jit(do_not_specialize=["SQ"])
def _small_bwd_rows_kernel(
    QPART, W, MU, BHW, LOGDEN, CEFF, DZ, DKAP, DLAM, DRHO, DLOGDEN, DWR, DQTQ,
    H, C, D, DV, SQ,
    OPTIMAL: tl.constexpr,
    BLOCK_R: tl.constexpr, KC: tl.constexpr, BLOCK_DC: tl.constexpr, N_DC: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    bh, r, r_ok, rows, R = _row_block(C, BLOCK_R)                      # (bh, row block), rows fastest
    b = bh // H
    PW = (2 * D + DV + 3) if OPTIMAL else (D + DV + 1)
    dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    mv = r_ok[:, None] & (dv < DV)[None, :]
    # the query pass's partials, summed in split order: [dw | dkap | dbias | dqt | dbh | dLam]
    dbias = tl.zeros([BLOCK_R], tl.float32)
    dbh = tl.zeros([BLOCK_R], tl.float32)
    dlam = tl.zeros([BLOCK_R], tl.float32)
    dkap = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s in range(0, SQ):
        prow = (s * R + rows) * PW
        dbias += tl.load(QPART + prow + D + DV, mask=r_ok, other=0.0)
        dkap += tl.load(QPART + prow[:, None] + D + dv[None, :], mask=mv, other=0.0)
        if OPTIMAL:
            dbh += tl.load(QPART + prow + 2 * D + DV + 1, mask=r_ok, other=0.0)
            dlam += tl.load(QPART + prow + 2 * D + DV + 2, mask=r_ok, other=0.0)
    tl.store(DZ + rows, dbias, mask=r_ok)
    tl.store(DKAP + rows[:, None] * DV + dv[None, :], dkap, mask=mv)
    if OPTIMAL:
        tl.store(DLAM + rows, dlam, mask=r_ok)
        bhw = tl.load(BHW + rows, mask=r_ok, other=0.0)
        drho = dbh * bhw - dbias
        dld = -dbh * bhw
    else:
        drho = tl.zeros([BLOCK_R], tl.float32)
        dld = -dbias
    tl.store(DRHO + rows, drho, mask=r_ok)
    tl.store(DLOGDEN + rows, dld, mask=r_ok)

    # dg_cc' = dlog_den_c softmax_{active c'}(g_c)_c' + [c = c'] drho_c;  dw_r = dw_q + dg mu
    na = tl.maximum(tl.load(CEFF + b), 1)
    ld = tl.load(LOGDEN + rows, mask=r_ok, other=0.0)
    for i in tl.static_range(N_DC):
        d = (i * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
        d_ok = d < D
        m2 = r_ok[:, None] & d_ok[None, :]
        dw = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
        dqt = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
        for s in range(0, SQ):
            prow = (s * R + rows) * PW
            dw += tl.load(QPART + prow[:, None] + d[None, :], mask=m2, other=0.0)
            if OPTIMAL:
                dqt += tl.load(QPART + prow[:, None] + (D + DV + 1) + d[None, :], mask=m2, other=0.0)
        for c0 in range(0, C, KC):
            c = c0 + tl.arange(0, KC)
            c_ok = c < C
            g, nrm = _gram(W, MU, rows, r_ok, bh * C + c, c_ok, D, True, KC)
            g = g - 0.5 * nrm[None, :]
            sm = tl.where((c_ok & (c < na))[None, :] & r_ok[:, None], tl.exp(tl.minimum(g - ld[:, None], 0.0)), 0.0)
            dg = dld[:, None] * sm + tl.where(r[:, None] == c[None, :], drho[:, None], 0.0)
            muc = tl.load(MU + (bh * C + c)[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            dw += tl.dot(dg, muc, input_precision="ieee")
        tl.store(DWR + rows[:, None] * D + d[None, :], dw, mask=m2)
        if OPTIMAL:
            tl.store(DQTQ + rows[:, None] * D + d[None, :], dqt, mask=m2)


@triton.jit(do_not_specialize=["SK", "SN"])
def _small_bwd_cols_kernel(
    W, MU, LOGDEN, DRHO, DLOGDEN, CEFF, DWR, KDW, DQTQ, NDQT, DQT, DMUS,
    H, G, C, D, SK, SN,
    OPTIMAL: tl.constexpr,
    BLOCK_R: tl.constexpr, KC: tl.constexpr, BLOCK_DC: tl.constexpr, N_DC: tl.constexpr,
):
    bk, dc, j, j_ok, n_bk = _col_block(C, BLOCK_R, N_DC)              # (b, kv head, column block, D chunk)
    HKV = H // G
    b = bk // HKV
    hk = bk % HKV
    R = n_bk * G * C                                                   # B * H * C
    na = tl.maximum(tl.load(CEFF + b), 1)
    act_j = j_ok & (j < na)
    d = (dc * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
    d_ok = d < D
    m2 = j_ok[:, None] & d_ok[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
    for gi in range(0, G):                                             # the query heads of the group
        bh = b * H + hk * G + gi
        jrow = bh * C + j
        dw = tl.load(DWR + jrow[:, None] * D + d[None, :], mask=m2, other=0.0)
        for s in range(0, SK):
            dw += tl.load(KDW + (s * R + jrow)[:, None] * D + d[None, :], mask=m2, other=0.0)
        # dg^T w and the column sums of dg, over the rows c in tiles
        dgw = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
        colsum = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, C, KC):
            c = c0 + tl.arange(0, KC)
            c_ok = c < C
            crow = bh * C + c
            gt, nrm = _gram(W, MU, crow, c_ok, jrow, j_ok, D, True, KC)  # g[c, j]
            gt = gt - 0.5 * nrm[None, :]
            ld = tl.load(LOGDEN + crow, mask=c_ok, other=0.0)
            dld = tl.load(DLOGDEN + crow, mask=c_ok, other=0.0)
            drho = tl.load(DRHO + crow, mask=c_ok, other=0.0)
            sm = tl.where(c_ok[:, None] & act_j[None, :], tl.exp(tl.minimum(gt - ld[:, None], 0.0)), 0.0)
            dg = dld[:, None] * sm + tl.where(c[:, None] == j[None, :], drho[:, None], 0.0)   # [KC, BLOCK_R]
            colsum += tl.sum(dg, axis=0)
            wc = tl.load(W + crow[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            dgw += tl.dot(tl.trans(dg), wc, input_precision="ieee")
        muj = tl.load(MU + jrow[:, None] * D + d[None, :], mask=m2, other=0.0)
        dmu = dw + dgw - colsum[:, None] * muj
        dqt = dmu
        if OPTIMAL:
            dqt += tl.load(DQTQ + jrow[:, None] * D + d[None, :], mask=m2, other=0.0)
            for s in range(0, SN):
                dqt += tl.load(NDQT + (s * R + jrow)[:, None] * D + d[None, :], mask=m2, other=0.0)
        tl.store(DQT + jrow[:, None] * D + d[None, :], dqt, mask=m2)
        acc += dmu
    tl.store(DMUS + (bk * C + j)[:, None] * D + d[None, :], acc, mask=m2)


@triton.jit
def _mixed_bwd_kernel(
    KT, DMUS, KMIX, LSE, CEFF, DKT,
    HKV, C, D,
    BLOCK_R: tl.constexpr, KC: tl.constexpr, BLOCK_DC: tl.constexpr, N_DC: tl.constexpr,
):
    bk, dc, j, j_ok, _ = _col_block(C, BLOCK_R, N_DC)                 # (b, kv head, column block, D chunk)
    b = bk // HKV
    base = bk * C
    na = tl.maximum(tl.load(CEFF + b), 1)
    act_j = j_ok & (j < na)
    d = (dc * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
    d_ok = d < D
    mx_j = tl.load(LSE + (base + j) * 2, mask=j_ok, other=0.0)
    l_j = tl.load(LSE + (base + j) * 2 + 1, mask=j_ok, other=1.0)
    rs_j = _rowdot(DMUS, KMIX, base + j, j_ok, D, KC)
    out = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
    for c0 in range(0, C, KC):                                         # dA[j, c'] kt_c'
        c = c0 + tl.arange(0, KC)
        c_ok = c < C
        s, _n = _gram(KT, KT, base + j, j_ok, base + c, c_ok, D, False, KC)
        a = tl.where(j_ok[:, None] & (c_ok & (c < na))[None, :],
                     tl.exp(tl.minimum(s - mx_j[:, None], 0.0)) / l_j[:, None], 0.0)
        da, _n = _gram(DMUS, KT, base + j, j_ok, base + c, c_ok, D, False, KC)
        ktc = tl.load(KT + (base + c)[:, None] * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        out += tl.dot(a * (da - rs_j[:, None]), ktc, input_precision="ieee")
    for r0 in range(0, C, KC):                                         # a[c, j] dmuS_c + dA[c, j] kt_c
        r = r0 + tl.arange(0, KC)
        r_ok = r < C
        mx_r = tl.load(LSE + (base + r) * 2, mask=r_ok, other=0.0)
        l_r = tl.load(LSE + (base + r) * 2 + 1, mask=r_ok, other=1.0)
        rs_r = _rowdot(DMUS, KMIX, base + r, r_ok, D, KC)
        s, _n = _gram(KT, KT, base + r, r_ok, base + j, j_ok, D, False, KC)
        a = tl.where(r_ok[:, None] & act_j[None, :],
                     tl.exp(tl.minimum(s - mx_r[:, None], 0.0)) / l_r[:, None], 0.0)   # [KC, BLOCK_R]
        da, _n = _gram(DMUS, KT, base + r, r_ok, base + j, j_ok, D, False, KC)
        m_r = r_ok[:, None] & d_ok[None, :]
        dmu_r = tl.load(DMUS + (base + r)[:, None] * D + d[None, :], mask=m_r, other=0.0)
        kt_r = tl.load(KT + (base + r)[:, None] * D + d[None, :], mask=m_r, other=0.0)
        out += tl.dot(tl.trans(a), dmu_r, input_precision="ieee")
        out += tl.dot(tl.trans(a * (da - rs_r[:, None])), kt_r, input_precision="ieee")
    tl.store(DKT + (base + j)[:, None] * D + d[None, :], out, mask=j_ok[:, None] & d_ok[None, :])


def blocks(C, D):
    """(BLOCK_R, KC, BLOCK_DC, N_DC, num_warps)."""
    BLOCK_DC = min(_common.pow2(D), 64)
    return BLOCK_R, KC, BLOCK_DC, _common.cdiv(D, BLOCK_DC), 4


def proposal_fwd(qt, kt, eps, c_eff, mixed):
    """(mu, w, kmix, lse) from qt (B, H, C, D), kt (B, H_kv, C, D) float32, eps
    (B, H, >= C, D) float32 or None, c_eff (B,) int64: mu, w (B, H, C, D) (w is mu without
    eps), and for "mixed" kmix (B, H_kv, C, D) and lse (B, H_kv, C, 2), the row maxima and
    sums of exp of its softmax (else None)."""
    B, H, C, D = qt.shape
    Hkv = kt.shape[1]
    dev = qt.device
    mu = _common.empty((B, H, C, D), torch.float32, dev)
    w = _common.empty((B, H, C, D), torch.float32, dev) if eps is not None else mu
    kmix = _common.empty((B, Hkv, C, D), torch.float32, dev) if mixed else None
    lse = _common.empty((B, Hkv, C, 2), torch.float32, dev) if mixed else None
    BR, kc, BLOCK_DC, N_DC, num_warps = blocks(C, D)
    es = eps.stride() if eps is not None else (0, 0, 0, 0)
    _common.launch(
        _proposal_kernel, (B * H * _common.cdiv(C, BR),), dev,
        qt, kt, eps if eps is not None else qt, c_eff, mu, w, kmix if mixed else mu, lse if mixed else mu, *es,
        H, H // Hkv, C, D,
        HAS_EPS=eps is not None, MIXED=bool(mixed),
        BLOCK_R=BR, KC=kc, BLOCK_DC=BLOCK_DC, N_DC=N_DC, num_warps=num_warps,
    )
    return mu, w, kmix, lse


def stats_fwd(kpart, SK, npart, SN, w, mu, c_eff, DV, optimal):
    """(Z, kap, Lam, rho, log_den, bias, bh) from the split partials (Lam, bh None for
    balance); shapes (B, H, C) and kap (B, H, C, Dv), float32."""
    B, H, C, D = w.shape
    dev = w.device
    e = lambda *s: _common.empty(s, torch.float32, dev)  # noqa: E731
    Z, kap, rho, log_den, bias = e(B, H, C), e(B, H, C, DV), e(B, H, C), e(B, H, C), e(B, H, C)
    lam, bhw = (e(B, H, C), e(B, H, C)) if optimal else (None, None)
    BR, kc, _, _, num_warps = blocks(C, D)
    _common.launch(
        _stats_kernel, (B * H * _common.cdiv(C, BR),), dev,
        kpart, npart if optimal else kpart, w, mu, c_eff, Z, kap, lam if optimal else Z, rho, log_den, bias,
        bhw if optimal else Z, H, C, D, DV, SK, SN if optimal else 1,
        OPTIMAL=bool(optimal), BLOCK_R=BR, KC=kc, BLOCK_DV=_common.pow2(DV), num_warps=num_warps,
    )
    return Z, kap, lam, rho, log_den, bias, bhw


def rows_bwd(qpart, SQ, w, mu, bhw, log_den, c_eff, DV, optimal):
    """(dZ, dkap, dLam, drho, dlog_den, dw_r, dqt_q) float32 from the query pass's split
    partials (dLam, dqt_q None for balance); see ``_small_bwd_rows_kernel``."""
    B, H, C, D = w.shape
    dev = w.device
    e = lambda *s: _common.empty(s, torch.float32, dev)  # noqa: E731
    dZ, dkap, drho, dld, dwr = e(B, H, C), e(B, H, C, DV), e(B, H, C), e(B, H, C), e(B, H, C, D)
    dlam, dqtq = (e(B, H, C), e(B, H, C, D)) if optimal else (None, None)
    BR, kc, BLOCK_DC, N_DC, num_warps = blocks(C, D)
    _common.launch(
        _small_bwd_rows_kernel, (B * H * _common.cdiv(C, BR),), dev,
        qpart, w, mu, bhw if optimal else w, log_den, c_eff, dZ, dkap, dlam if optimal else dZ, drho, dld, dwr,
        dqtq if optimal else dwr, H, C, D, DV, SQ,
        OPTIMAL=bool(optimal), BLOCK_R=BR, KC=kc, BLOCK_DC=BLOCK_DC, N_DC=N_DC,
        BLOCK_DV=_common.pow2(DV), num_warps=num_warps,
    )
    return dZ, dkap, dlam, drho, dld, dwr, dqtq


def cols_bwd(w, mu, log_den, drho, dld, c_eff, dwr, kdw, SK, dqtq, ndqt, SN, Hkv, optimal):
    """(dqt (B, H, C, D), dmuS (B, H_kv, C, D)) float32: dmuS = sum over the group of dmu
    (= dkt for "segment"); see ``_small_bwd_cols_kernel``."""
    B, H, C, D = w.shape
    dev = w.device
    dqt = _common.empty((B, H, C, D), torch.float32, dev)
    dmus = _common.empty((B, Hkv, C, D), torch.float32, dev)
    BR, kc, BLOCK_DC, N_DC, num_warps = blocks(C, D)
    _common.launch(
        _small_bwd_cols_kernel, (B * Hkv * _common.cdiv(C, BR) * N_DC,), dev,
        w, mu, log_den, drho, dld, c_eff, dwr, kdw, dqtq if optimal else dwr, ndqt if optimal else kdw, dqt, dmus,
        H, H // Hkv, C, D, SK, SN if optimal else 0,
        OPTIMAL=bool(optimal), BLOCK_R=BR, KC=kc, BLOCK_DC=BLOCK_DC, N_DC=N_DC, num_warps=num_warps,
    )
    return dqt, dmus


def mixed_bwd(kt, dmus, kmix, lse, c_eff):
    """dkt (B, H_kv, C, D) float32 of the "mixed" proposal; see ``_mixed_bwd_kernel``."""
    B, Hkv, C, D = kt.shape
    dev = kt.device
    dkt = _common.empty((B, Hkv, C, D), torch.float32, dev)
    BR, kc, BLOCK_DC, N_DC, num_warps = blocks(C, D)
    _common.launch(
        _mixed_bwd_kernel, (B * Hkv * _common.cdiv(C, BR) * N_DC,), dev,
        kt, dmus, kmix, lse, c_eff, dkt, Hkv, C, D,
        BLOCK_R=BR, KC=kc, BLOCK_DC=BLOCK_DC, N_DC=N_DC, num_warps=num_warps,
    )
    return dkt
