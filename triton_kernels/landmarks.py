"""Landmarks: the segment means of q and of k in one launch (docs/math.md section 1), with
C_eff derived on the device, and their backward (the lean path, lara_kernels/_whole_triton.py).

    seg(p) = floor(p * C_eff / L)       (p: index among the L valid rows of a sequence)
    qt_c   = ss * mean of q_n over the valid n with seg(n) = c          (0 for c >= C_eff)
    kt_c   = ss * mean of k_m over the valid m with seg(m) = c

C_eff of element b is min(C, N_valid, M_valid): padded layout, the valid counts of the
(B, N) and (B, M) masks (N and M without masks); packed layout, the lengths
cu[b + 1] - cu[b]. An element without a valid query or key gets C_eff = 0, and with it
landmarks 0; the later kernels give it output 0 and gradients 0 (docs/design.md, packed
layout: the same contract as an empty sequence).

Grid (both kernels, axis 0 only): program (side-head, segment block s, D chunk j), the
chunk fastest: the B*H query heads first and then the B*H_kv key/value heads (key
landmarks once per key/value head: GQA shares them), each sequence cut into N_S =
cdiv(C, BLOCK_C) blocks of BLOCK_C consecutive segments. Block s owns the valid rows at
positions pa <= p < pb, pa = ceil(s * BLOCK_C * nv / C_eff) (the first position of
segment s * BLOCK_C; nv the valid rows of its side), pb the next block's (both at most
nv), and with them every row from the row of position pa (row 0 for s = 0) up to the row
of position pb (the sequence's end where pb = nv): the blocks partition the rows, padded
ones included, and those past C_eff own none (C_eff = 0: block 0 owns every row). Without
a mask rows are positions; packed, rows of sequence b start at cu[b]; with a mask each
program finds its two boundary rows by one scan of its mask row (``_block_rows``).

Choice (``blocks``): BLOCK_C is a power of two >= 16 (the product's least rows) and >=
ROWS * C / L (L = max(N, M)), so a program reads about ROWS = 1024 rows or more and tiny
sizes keep one block (C <= 16 or L <= ROWS: the grid of one program per side-head and
chunk, as before the split); the D chunk (at most 64, the forward's BLOCK_C x BLOCK_DC
float32 accumulator at most 8192) halves, down to 16, while the grid has fewer than two
programs per SM. At B*H = 96 (H_kv = H), N = M = 8192, C = 64, D = 64: BLOCK_C = 16,
N_S = 4, one chunk of 64: 192 x 4 = 768 programs (5.8 per SM of an H100/H200), each reading
2048 rows of 64; at B = 1, H = 8, N = 32768: 16 x 4 side-head blocks, chunks of 16: 256
programs (one chunk of 64 would give 64).

Forward, ``_landmarks_fwd_kernel``: each program counts the valid rows of both sides of
its element (to get C_eff; the masks are bytes, N + M per program, in steps of BLOCK_P),
computes its segments' first and end positions (``_bounds``: ceil(c * nv / C_eff), the
only divisions, BLOCK_C per program), then walks the rows of its block in blocks of
BLOCK_L: position p by a running count and ``tl.cumsum`` of the mask, membership as a
one-hot [BLOCK_C, BLOCK_L] tile (p against the bounds), and the sums as one product
one-hot @ x per block (exact: the one-hot is 0/1 in any dtype, float32 accumulation; for
float32 inputs in "ieee" precision). Reads q (B, H, N, D) / (T, H, D) and k in their
dtype (any strides) and the masks or cu_seqlens; writes qt (B, H, C, D), kt (B, H_kv, C,
D) float32 (scaled by ss; row c by block c // BLOCK_C, so each once; rows c >= C_eff 0)
and c_eff (B,) int64 (by the program of query head 0, block 0, chunk 0). Traffic: q and
k read once (the floor; padded rows and rows of elements with C_eff = 0 are not read);
the masks 2N + M bytes per program with a mask (the counts of both sides and the boundary
scan; L2-resident: at the shape above 24 KB against 256 KB of rows), none without. Work:
BLOCK_C multiply-adds per element read (the one-hot product), on tensor cores for half
inputs.

Backward, ``_landmarks_bwd_kernel``: the same grid and row partition; adds
ss * dqt_seg(n) / |segment| to the other gradients of each valid row (0 at padded rows
and at rows of elements with C_eff = 0): dq = dq_a [+ dq_b] + landmark part, dk = dk_a +
landmark part (dkt already summed over the G query heads of a key/value head), every row
written once, by the block that owns it. The landmark part of a block of rows is one
product one-hot [BLOCK_L, BLOCK_C] @ W, W the program's BLOCK_C rows of dqt (dkt) scaled
by ss / |segment|, read once (float32 "ieee": exact, one nonzero term per row). Reads
dq_a, dq_b (q's shape and dtype), dk_a (k's), dqt (B, H, C, D) and dkt (B, H_kv, C, D)
float32, c_eff and the masks; writes dq and dk in their dtype (the float32 sum rounded
once, to nearest even), every row. Traffic: the floor (each gradient buffer read once,
the result written once, dqt and dkt once), plus the masks (N + M per program with a
mask: the own side's count and the boundary scan).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import long_strides, mma, rnd


@triton.jit
def _valid_count(PAD, CU, b, L, sp_b, sp_l, HAS_PAD: tl.constexpr, VARLEN: tl.constexpr, BLOCK_P: tl.constexpr):
    """Valid rows of element b (int64): its length (packed), the unpadded count of its mask
    row (read in blocks of BLOCK_P bytes), or L."""
    if VARLEN:
        return (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int64)
    elif HAS_PAD:
        cnt = tl.zeros([BLOCK_P], tl.int32)
        for l0 in range(0, L, BLOCK_P):
            l = (l0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            padded = tl.load(PAD + b * sp_b + l * sp_l, mask=l < L, other=1)
            cnt += (padded == 0).to(tl.int32)
        return tl.sum(cnt, axis=0).to(tl.int64)
    else:
        return L.to(tl.int64)


@triton.jit
def _c_eff(QPAD, KPAD, CUQ, CUK, b, N, M, C, sqp_b, sqp_n, skp_b, skp_m,
           HAS_QPAD: tl.constexpr, HAS_KPAD: tl.constexpr, VARLEN: tl.constexpr, BLOCK_P: tl.constexpr):
    """(C_eff, valid queries, valid keys) of element b, int64."""
    nq = _valid_count(QPAD, CUQ, b, N, sqp_b, sqp_n, HAS_QPAD, VARLEN, BLOCK_P)
    mk = _valid_count(KPAD, CUK, b, M, skp_b, skp_m, HAS_KPAD, VARLEN, BLOCK_P)
    return tl.minimum(tl.minimum(nq, mk), C), nq, mk


@triton.jit
def _rows_of(X, PAD, CU, b, h, L, sx_b, sx_h, sx_l, sp_b, sp_l, VARLEN: tl.constexpr):
    """(row-0 pointer, row count) of element b, head h: padded (B, H, L, D) rows
    0 .. L - 1; packed rows CU[b] .. CU[b + 1] - 1 of (T, H, D) (sx_b = 0)."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        return X + h * sx_h + start * sx_l, tl.load(CU + b + 1).to(tl.int64) - start
    else:
        return X + b * sx_b + h * sx_h, L.to(tl.int64)


@triton.jit
def _block_rows(PAD, b, lim, sp_b, sp_l, nv, ce, s, HAS_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """(first row, end row, valid rows before the first row) of segment block s (segments
    s * BLOCK_C .. s * BLOCK_C + BLOCK_C - 1) of element b's lim rows, nv of them valid.
    Its valid rows are those at positions pa <= p < pb, pa = ceil(s * BLOCK_C * nv / ce)
    (the first p with seg(p) >= s * BLOCK_C) and pb the next block's, both at most nv;
    its rows run from the row of position pa (row 0 for s = 0) up to the row of position
    pb (lim where pb = nv), so the blocks partition rows 0 .. lim - 1, padded rows
    included, and the blocks past C_eff get none. C_eff = 0: block 0 owns every row.
    With a mask the two rows are found by one scan of the mask row (BLOCK_P bytes a step);
    otherwise rows are positions."""
    ce1 = tl.maximum(ce, 1)
    lo = s.to(tl.int64) * BLOCK_C
    pa = tl.where(s == 0, 0, tl.where(ce > 0, tl.minimum((lo * nv + ce1 - 1) // ce1, nv), nv))
    pb = tl.where(ce > 0, tl.minimum(((lo + BLOCK_C) * nv + ce1 - 1) // ce1, nv), nv)
    if HAS_PAD:
        ra = lim
        rb = lim
        cnt = lim * 0
        for l0 in range(0, lim, BLOCK_P):
            l = (l0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            v = tl.load(PAD + b * sp_b + l * sp_l, mask=l < lim, other=1) == 0
            inc = cnt + tl.cumsum(v.to(tl.int32), axis=0).to(tl.int64)   # valid rows in 0 .. l
            ra = tl.minimum(ra, tl.min(tl.where(v & (inc == pa + 1), l, lim), axis=0))
            rb = tl.minimum(rb, tl.min(tl.where(v & (inc == pb + 1), l, lim), axis=0))
            cnt += tl.sum(v.to(tl.int32), axis=0).to(tl.int64)
        return tl.where(s == 0, 0, ra), rb, pa
    else:
        return pa, pb, pa


@triton.jit
def _bounds(nv, ce, c0, BLOCK_C: tl.constexpr):
    """(first, end) positions (int32 [BLOCK_C]) of segments c0 .. c0 + BLOCK_C - 1 of a
    side with nv valid rows: segment c holds the positions ceil(c * nv / ce) <= p <
    ceil((c + 1) * nv / ce) (those with seg(p) = c), both clipped to nv, so segments
    c >= ce and every segment of an element with ce = 0 are empty. The only divisions of
    the kernels (BLOCK_C per program, int64); rows then compare their position."""
    c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    ce1 = tl.maximum(ce, 1)
    lo = tl.where(ce > 0, tl.minimum((c * nv + ce1 - 1) // ce1, nv), nv)
    hi = tl.where(ce > 0, tl.minimum(((c + 1) * nv + ce1 - 1) // ce1, nv), nv)
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _positions(l, lim, PAD, b, sp_b, sp_l, p0, HAS_PAD: tl.constexpr):
    """(valid, position (int32), number of valid rows in the block) of rows l (int64) of
    element b, below lim; p0 valid rows come before the block (positions of rows that are
    not valid are meaningless)."""
    valid = l < lim
    if HAS_PAD:
        padded = tl.load(PAD + b * sp_b + l * sp_l, mask=valid, other=1)
        valid = valid & (padded == 0)
        vi = valid.to(tl.int32)
        pos = p0.to(tl.int32) + tl.cumsum(vi, axis=0) - 1
        n_in = tl.sum(vi, axis=0).to(tl.int64)
    else:
        pos = l.to(tl.int32)
        n_in = tl.sum(valid.to(tl.int32), axis=0).to(tl.int64)
    return valid, pos, n_in


@triton.jit
def _means(X, PAD, CU, OUT, b, h, HX, L, nv, ce, C, D, sx_b, sx_h, sx_l, sx_d, sp_b, sp_l, ss, j, s,
           HAS_PAD: tl.constexpr, VARLEN: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
           BLOCK_DC: tl.constexpr, BLOCK_P: tl.constexpr, EMU: tl.constexpr):
    """OUT[b, h, segments of block s, chunk j] = ss * segment means (float32) of the valid
    rows of X[b, h]; reads only the rows of block s."""
    DT: tl.constexpr = X.dtype.element_ty
    base, lim = _rows_of(X, PAD, CU, b, h, L, sx_b, sx_h, sx_l, sp_b, sp_l, VARLEN)
    r0, r1, p0 = _block_rows(PAD, b, lim, sp_b, sp_l, nv, ce, s, HAS_PAD, BLOCK_C, BLOCK_P)
    c0 = s.to(tl.int64) * BLOCK_C
    lo, hi = _bounds(nv, ce, c0, BLOCK_C)
    d = (j * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
    d_ok = d < D
    acc = tl.zeros([BLOCK_C, BLOCK_DC], tl.float32)
    for l0 in range(r0, r1, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        valid, pos, n_in = _positions(l, r1, PAD, b, sp_b, sp_l, p0, HAS_PAD)
        p0 += n_in
        member = valid[None, :] & (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
        # the valid rows of the block are its members (ce > 0); padded rows and rows of an
        # element with C_eff = 0 are never read (a where: the interpreter's load rejects the
        # mask of a scalar bool & a bool vector)
        read = tl.where(ce > 0, valid, False)
        x = tl.load(base + l[:, None] * sx_l + d[None, :] * sx_d, mask=read[:, None] & d_ok[None, :], other=0.0)
        acc += mma(tl.where(member, 1.0, 0.0), x, DT, "ieee", EMU)      # one-hot [BLOCK_C, BLOCK_L] @ rows
    out = acc / tl.maximum(hi - lo, 1).to(tl.float32)[:, None] * ss
    cs = c0 + tl.arange(0, BLOCK_C)
    rows = (b * HX + h) * C + cs
    tl.store(OUT + rows[:, None] * D + d[None, :], out, mask=(cs < C)[:, None] & d_ok[None, :])


@triton.jit
def _program(H, HKV, C, BLOCK_C: tl.constexpr, N_DC: tl.constexpr):
    """(is_k, b, h, segment block s, D chunk j) of this program of the grid (side-head,
    segment block, D chunk), chunk fastest; the side-heads are the B * H query heads, then
    the B * HKV key heads (is_k)."""
    pid = tl.program_id(0)
    N_S = tl.maximum((C + BLOCK_C - 1) // BLOCK_C, 1)
    j = pid % N_DC
    s = (pid // N_DC) % N_S
    x = (pid // (N_DC * N_S)).to(tl.int64)
    B = (tl.num_programs(0) // (N_DC * N_S * (H + HKV))).to(tl.int64)
    is_k = x >= B * H
    b = tl.where(is_k, (x - B * H) // HKV, x // H)
    h = tl.where(is_k, (x - B * H) % HKV, x % H)
    return is_k, b, h, s, j


@triton.jit(do_not_specialize=["N", "M", "C"])
def _landmarks_fwd_kernel(
    Q, K, QPAD, KPAD, CUQ, CUK, QT, KT, CEFF,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sqp_b, sqp_n, skp_b, skp_m,
    H, HKV, N, M, C, D, ss,
    HAS_QPAD: tl.constexpr, HAS_KPAD: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, N_DC: tl.constexpr,
    BLOCK_P: tl.constexpr, EMU: tl.constexpr,
):
    is_k, b, h, s, j = _program(H, HKV, C, BLOCK_C, N_DC)
    ce, nq, mk = _c_eff(QPAD, KPAD, CUQ, CUK, b, N, M, C, sqp_b, sqp_n, skp_b, skp_m,
                        HAS_QPAD, HAS_KPAD, VARLEN, BLOCK_P)
    if is_k:
        _means(K, KPAD, CUK, KT, b, h, HKV, M, mk, ce, C, D, sk_b, sk_h, sk_m, sk_d, skp_b, skp_m, ss, j, s,
               HAS_KPAD, VARLEN, BLOCK_L, BLOCK_C, BLOCK_DC, BLOCK_P, EMU)
    else:
        _means(Q, QPAD, CUQ, QT, b, h, H, N, nq, ce, C, D, sq_b, sq_h, sq_n, sq_d, sqp_b, sqp_n, ss, j, s,
               HAS_QPAD, VARLEN, BLOCK_L, BLOCK_C, BLOCK_DC, BLOCK_P, EMU)
        if (h == 0) & (j == 0) & (s == 0):
            tl.store(CEFF + b, ce)


@triton.jit
def _scatter(GA, GB, OUT, DXT, b, h, HX, L, nv, ce, C, D, sx_b, sx_h, sx_l, sx_d, so_b, so_h, so_l, so_d,
             sp_b, sp_l, PAD, CU, ss, j, s, HAS_B: tl.constexpr, HAS_PAD: tl.constexpr, VARLEN: tl.constexpr,
             BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_P: tl.constexpr,
             EMU: tl.constexpr):
    """OUT[rows of segment block s of b, h] = GA [+ GB] + ss * DXT[b, h, seg(n)] / |segment|,
    chunk j of D, every row of the block (padded ones included); GA, GB share their
    strides (sx_*), OUT has its own (so_*). The landmarks' part as one-hot @ W, W the
    block's BLOCK_C rows of DXT scaled by ss / |segment| (read once; exact: one term per
    row, float32 "ieee"); the float32 sum rounded once to OUT's dtype (to nearest even,
    also under the interpreter)."""
    a_base, lim = _rows_of(GA, PAD, CU, b, h, L, sx_b, sx_h, sx_l, sp_b, sp_l, VARLEN)
    b_base, _ = _rows_of(GB, PAD, CU, b, h, L, sx_b, sx_h, sx_l, sp_b, sp_l, VARLEN)
    o_base, _ = _rows_of(OUT, PAD, CU, b, h, L, so_b, so_h, so_l, sp_b, sp_l, VARLEN)
    r0, r1, p0 = _block_rows(PAD, b, lim, sp_b, sp_l, nv, ce, s, HAS_PAD, BLOCK_C, BLOCK_P)
    c0 = s.to(tl.int64) * BLOCK_C
    lo, hi = _bounds(nv, ce, c0, BLOCK_C)
    d = (j * BLOCK_DC + tl.arange(0, BLOCK_DC)).to(tl.int64)
    d_ok = d < D
    cs = c0 + tl.arange(0, BLOCK_C)
    live = hi > lo                                                      # segments with rows (c < ce)
    w = tl.load(DXT + ((b * HX + h) * C + cs)[:, None] * D + d[None, :], mask=live[:, None] & d_ok[None, :],
                other=0.0)
    w = w * (ss / tl.maximum(hi - lo, 1).to(tl.float32))[:, None]      # [BLOCK_C, BLOCK_DC]
    for l0 in range(r0, r1, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        l_in = l < r1
        valid, pos, n_in = _positions(l, r1, PAD, b, sp_b, sp_l, p0, HAS_PAD)
        p0 += n_in
        member = valid[:, None] & (pos[:, None] >= lo[None, :]) & (pos[:, None] < hi[None, :])
        g = mma(tl.where(member, 1.0, 0.0), w, tl.float32, "ieee", EMU)  # [BLOCK_L, BLOCK_DC]
        m2 = l_in[:, None] & d_ok[None, :]
        g += tl.load(a_base + l[:, None] * sx_l + d[None, :] * sx_d, mask=m2, other=0.0).to(tl.float32)
        if HAS_B:
            g += tl.load(b_base + l[:, None] * sx_l + d[None, :] * sx_d, mask=m2, other=0.0).to(tl.float32)
        tl.store(o_base + l[:, None] * so_l + d[None, :] * so_d, rnd(g, OUT.dtype.element_ty, EMU), mask=m2)


@triton.jit(do_not_specialize=["N", "M", "C"])
def _landmarks_bwd_kernel(
    DQA, DQB, DKA, DQT, DKT, CEFF, QPAD, KPAD, CUQ, CUK, DQ, DK,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_m, sk_d,
    sdq_b, sdq_h, sdq_n, sdq_d,
    sdk_b, sdk_h, sdk_m, sdk_d,
    sqp_b, sqp_n, skp_b, skp_m,
    H, HKV, N, M, C, D, ss,
    HAS_B: tl.constexpr, HAS_QPAD: tl.constexpr, HAS_KPAD: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, N_DC: tl.constexpr,
    BLOCK_P: tl.constexpr, EMU: tl.constexpr,
):
    is_k, b, h, s, j = _program(H, HKV, C, BLOCK_C, N_DC)
    ce = tl.load(CEFF + b)
    if is_k:
        mk = _valid_count(KPAD, CUK, b, M, skp_b, skp_m, HAS_KPAD, VARLEN, BLOCK_P)
        _scatter(DKA, DKA, DK, DKT, b, h, HKV, M, mk, ce, C, D, sk_b, sk_h, sk_m, sk_d, sdk_b, sdk_h, sdk_m,
                 sdk_d, skp_b, skp_m, KPAD, CUK, ss, j, s, False, HAS_KPAD, VARLEN, BLOCK_L, BLOCK_C, BLOCK_DC,
                 BLOCK_P, EMU)
    else:
        nq = _valid_count(QPAD, CUQ, b, N, sqp_b, sqp_n, HAS_QPAD, VARLEN, BLOCK_P)
        _scatter(DQA, DQB, DQ, DQT, b, h, H, N, nq, ce, C, D, sq_b, sq_h, sq_n, sq_d, sdq_b, sdq_h, sdq_n,
                 sdq_d, sqp_b, sqp_n, QPAD, CUQ, ss, j, s, HAS_B, HAS_QPAD, VARLEN, BLOCK_L, BLOCK_C, BLOCK_DC,
                 BLOCK_P, EMU)


ROWS = 1024     # rows of a sequence (at its longest) that one program reads at least, where C allows
BLOCK_P = 512   # mask bytes per step of the mask scans


def blocks(C, D, L, heads, device, bwd=False):
    """(BLOCK_L, BLOCK_C, BLOCK_DC, N_DC, N_S, num_warps) of both kernels for C segments,
    head dim D, sequences of up to L rows (the longer side) and ``heads`` = B * (H + H_kv)
    side-heads (module doc): programs of BLOCK_C segments, N_S = cdiv(C, BLOCK_C) of them
    per side-head, BLOCK_C a power of two >= 16 (the product's least rows) and >= ROWS * C
    / L, so that a program reads about ROWS rows or more; and of a D chunk of BLOCK_DC,
    which halves (down to 16) while the grid has fewer than two programs per SM. The
    forward's BLOCK_C x BLOCK_DC accumulator stays at 8192 float32; its rows in blocks of
    32 once it passes 2048 (sm_90, C = D = 64 in one block, bf16: 64 rows spilled 536
    bytes, 32 rows none). 8 warps for tiles of 64 rows x 64 columns (AOT check, sm_90,
    bf16, C = D = 64: with 4 warps both kernels took 255 registers and spilled, the
    forward 8-24 bytes, the backward up to 1.1 KB; with 8, 116-202 registers, none)."""
    BLOCK_C = min(_common.pow2(C), _common.pow2(_common.cdiv(ROWS * max(C, 1), max(L, 1))))
    N_S = max(1, _common.cdiv(C, BLOCK_C))
    BLOCK_DC = min(_common.pow2(D), max(16, 8192 // BLOCK_C), 64)
    while BLOCK_DC > 16 and heads * N_S * _common.cdiv(D, BLOCK_DC) < 2 * _common.sm_count(device):
        BLOCK_DC //= 2
    BLOCK_L = 64 if bwd or BLOCK_C * BLOCK_DC <= 2048 else 32
    num_warps = 8 if BLOCK_L * BLOCK_DC >= 4096 or BLOCK_C * BLOCK_DC > 4096 else 4
    return BLOCK_L, BLOCK_C, BLOCK_DC, _common.cdiv(D, BLOCK_DC), N_S, num_warps


def _mask(padding, ref):
    """(tensor, stride_b, stride_l): bool viewed as uint8 (no copy); ``ref`` stands in."""
    if padding is None:
        return ref, 0, 0
    p = padding.view(torch.uint8)
    return p, p.stride(0), p.stride(1)


def _layout(q, k, cu_q, cu_k, max_q, max_k):
    if cu_q is None:
        return False, q.shape[2], k.shape[2], q, q
    return True, int(max_q), int(max_k), cu_q, cu_k


def landmarks_fwd(q, k, qpad, kpad, C, ss, cu_q=None, cu_k=None, max_q=0, max_k=0):
    """(qt (B, H, C, D), kt (B, H_kv, C, D) float32, scaled by ss; c_eff (B,) int64).
    Padded layout: q (B, H, N, D), k (B, H_kv, M, D), masks (B, N), (B, M) bool or None;
    packed: q (T_q, H, D), k (T_k, H_kv, D), cu_q, cu_k (B + 1) int32, masks None."""
    varlen, N, M, cuq, cuk = _layout(q, k, cu_q, cu_k, max_q, max_k)
    B = cu_q.shape[0] - 1 if varlen else q.shape[0]
    H, HKV, D = q.shape[-2] if varlen else q.shape[1], k.shape[-2] if varlen else k.shape[1], q.shape[-1]
    dev = q.device
    qt = _common.empty((B, H, C, D), torch.float32, dev)
    kt = _common.empty((B, HKV, C, D), torch.float32, dev)
    c_eff = _common.empty((B,), torch.int64, dev)   # (the tests' poison: the most negative int64)
    BLOCK_L, BLOCK_C, BLOCK_DC, N_DC, N_S, num_warps = blocks(C, D, max(N, M), B * (H + HKV), dev)
    qp, sqp_b, sqp_n = _mask(qpad, q)
    kp, skp_b, skp_m = _mask(kpad, q)
    _common.launch(
        _landmarks_fwd_kernel, (B * (H + HKV) * N_S * N_DC,), dev,
        q, k, qp, kp, cuq, cuk, qt, kt, c_eff,
        *long_strides(q, varlen), *long_strides(k, varlen), sqp_b, sqp_n, skp_b, skp_m,
        H, HKV, N, M, C, D, float(ss),
        HAS_QPAD=qpad is not None, HAS_KPAD=kpad is not None, VARLEN=varlen,
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, BLOCK_DC=BLOCK_DC, N_DC=N_DC, BLOCK_P=BLOCK_P,
        EMU=_common.emulated(dev), num_warps=num_warps,
    )
    return qt, kt, c_eff


def landmarks_bwd(dq_a, dq_b, dk_a, dqt, dkt, c_eff, q, k, qpad, kpad, ss, cu_q=None, cu_k=None, max_q=0,
                  max_k=0):
    """(dq, dk) in q's and k's shape and dtype: dq_a [+ dq_b] and dk_a (gradients of q, k
    from the passes, in q's and k's shape and dtype, dq_b may be None) plus the landmarks'
    part from dqt (B, H, C, D), dkt (B, H_kv, C, D) float32 (gradients of qt, kt)."""
    varlen, N, M, cuq, cuk = _layout(q, k, cu_q, cu_k, max_q, max_k)
    B, H, C, D = dqt.shape
    HKV = dkt.shape[1]
    dev = q.device
    dq = _common.empty(q.shape, q.dtype, dev)
    dk = _common.empty(k.shape, k.dtype, dev)
    BLOCK_L, BLOCK_C, BLOCK_DC, N_DC, N_S, num_warps = blocks(C, D, max(N, M), B * (H + HKV), dev, bwd=True)
    qp, sqp_b, sqp_n = _mask(qpad, q)
    kp, skp_b, skp_m = _mask(kpad, q)
    if dq_b is not None:
        assert dq_b.stride() == dq_a.stride(), (dq_a.stride(), dq_b.stride())
    _common.launch(
        _landmarks_bwd_kernel, (B * (H + HKV) * N_S * N_DC,), dev,
        dq_a, dq_a if dq_b is None else dq_b, dk_a, dqt, dkt, c_eff, qp, kp, cuq, cuk, dq, dk,
        *long_strides(dq_a, varlen), *long_strides(dk_a, varlen), *long_strides(dq, varlen),
        *long_strides(dk, varlen), sqp_b, sqp_n, skp_b, skp_m,
        H, HKV, N, M, C, D, float(ss),
        HAS_B=dq_b is not None, HAS_QPAD=qpad is not None, HAS_KPAD=kpad is not None, VARLEN=varlen,
        BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, BLOCK_DC=BLOCK_DC, N_DC=N_DC, BLOCK_P=BLOCK_P,
        EMU=_common.emulated(dev), num_warps=num_warps,
    )
    return dq, dk
