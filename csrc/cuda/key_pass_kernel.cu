// Key pass on the GPU: C rows of w attending over M keys (docs/math.md sections 4, 5;
// contract in csrc/lara_ops.h). Without values it is the query normalizer.
//
// Forward (key_fwd_kernel): split-K over the long axis. Block (c block, split, b*h) holds
// its rows of w in shared memory, in groups of 8 * RPW rows, and walks the 32-key tiles
// of its split: each tile of k and v is staged in shared memory once and applied to every
// group in turn. Within a group lane m of every warp owns key m of the tile, warp w owns
// rows w, w + 8, ..., so the online log-sum-exp of a row is a warp reduction and the
// row's value accumulator sits in the registers of its warp (lane j holds columns j,
// j + 32, ...). With more than one group the running state of every row (max, sum,
// accumulator: C x (Dv + 2)) stays in shared memory between tiles, each element read and
// written by the thread that owns it. The per-split partials (max, sum, accumulator) are
// combined by the caller.
// Traffic: w read once; k and v read once per c block; the partials written once per
// split (splits x C x (Dv + 2) per (b, h)). A block takes all C rows (one c block: k and
// v read once, the floor) when w and the state of all rows fit the shared memory the
// device offers (plan_rows; on an A100's 163 KB): in float32 up to C x D = C x Dv =
// 128 x 128 or 256 x 64, in float64 up to 128 x 64 (csrc/cuda/resource_usage.md has the
// counts). Past that the fallback cuts C into the fewest c blocks of equal
// groups that fit, and k and v are read once per c block (e.g. twice at C = 256,
// D = Dv = 128 in float32; at D = Dv = 256 one group per block, 8 rows in float64, 32 in
// float32). The c blocks of a (split, b, h) are adjacent in launch order and walk the
// same tiles, so DRAM sees k and v about once and the repeats are L2 hits.
//
// Backward: two kernels that both recompute the C x 32 tiles of l from w and k.
// key_dkdv_kernel: one block per key tile loops over all C rows in chunks of 16, so the
// sums over c of dk and dv stay in registers and are written once (no partials over c).
// Traffic: k and v read once, dk and dv written once (the floor); w and dkap (C x (D +
// Dv)) read once per key tile from L2.
// key_dw_kernel: laid out like the forward (w, dkap, Z and E of the block's rows in shared
// memory, each k/v tile loaded once and applied to every group of rows); dw_c = sum_m
// dl_cm kh_m is accumulated per split in registers for the current group (in shared
// memory between tiles when there are several groups, C x D) and written once as a
// partial. Traffic: k and v once per c block (once when w, dkap and the accumulators of
// all C rows fit: in float32 up to C = 64 at D = Dv = 128 and C = 128 at D = Dv = 64,
// in float64 up to C = 64 at D = Dv = 64; otherwise the same fallback as the forward),
// dw partials splits x C x D per (b, h). Sums run in a fixed order, no atomics.
//
// Packed layout (cu_seqlens; passes_kernel.h): the grids are those of a padded batch of
// max_seqlen keys per sequence; each block finds its sequence's keys at cu[b] (seq_rows)
// and walks only the tiles below its length. A forward or dw block whose split starts past
// the end writes its neutral partial ((-inf, 0, 0), or zeros for dw) and reads nothing; a
// dk/dv block past the end exits (the rows it would cover belong to the next sequence,
// whose own blocks write them). A sequence without keys so gets Z = -inf, kap = 0, dw = 0.
//
// An element with live[b] == 0 (KeyPassProblem::live; the whole op's elements dropped by
// their masks) is taken as having no key: the forward and dw blocks write their neutral
// partial, the dk/dv blocks write zero rows, and nothing of its rows enters any sum.
//
// Any number of rows C: grouped-query attention sends the G x C rows of the query heads
// sharing a key/value head. The forward and dw kernels take them in groups and c blocks
// (plan_rows: as many groups per block as the shared memory holds, the rest in further c
// blocks), the dk/dv kernel in chunks of 16; only D and Dv are limited (kMaxWidth).
#include "passes_kernel.h"

namespace lara {
namespace cuda {
namespace {

using namespace detail;

constexpr int kKeyTile = 32;   // keys per tile in the forward and dw kernels: one per lane
constexpr int kChunkRows = 16; // rows of w per chunk in the dk/dv kernel

// ----------------------------------------------------------------------------- forward

// Rows of w a block holds: `groups` groups of 8 * rpw rows (one row per warp and register
// slot). The running state of a group lives in registers while the group is applied to a
// tile; with more than one group it is kept in shared memory between tiles.
size_t key_fwd_smem(const KeyPassProblem& p, int rpw, int groups, size_t elem) {
  const int64_t rows = static_cast<int64_t>(kWarps) * rpw * groups;
  const int64_t v = p.v ? kKeyTile * pad32(p.Dv) : 0;
  const int64_t state = groups > 1 ? rows * (2 + (p.v ? pad32(p.Dv) : 0)) : 0;
  return elem * static_cast<size_t>(rows * p.D + kKeyTile * pad32_odd(p.D) + v + state);
}

template <typename T, int RPW>
__global__ void __launch_bounds__(kThreads)
    key_fwd_kernel(const KeyPassProblem p, const SplitPlan plan, const int n_cb, const int groups, const int64_t block0,
                   typename Acc<T>::type* m_part, typename Acc<T>::type* l_part, typename Acc<T>::type* acc_part) {
  using A = typename Acc<T>::type;
  constexpr int BC = kWarps * RPW;
  const int CB = BC * groups;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int KS = pad32_odd(D), VS = pad32(Dv), NV = VS / 32;
  const int64_t C = p.C, H = p.H, BH = p.B * p.H;
  const bool has_v = p.v != nullptr;
  const bool in_smem = groups > 1;     // state of the rows kept in shared memory between tiles
  const int SW = 2 + (has_v ? VS : 0); // state row: max, sum, accumulator

  int64_t blk = block0 + blockIdx.x;
  const int64_t c0 = (blk % n_cb) * CB;
  blk /= n_cb;
  const int64_t s = blk % plan.splits, bh = blk / plan.splits;
  const int64_t b = bh / H, h = bh % H;
  const SeqRows seq = seq_rows(p.cu, b, p.M);  // the keys of b
  const int64_t M = (p.live != nullptr && p.live[b] == 0) ? 0 : seq.len;  // live[b] = 0: taken as no key
  const int64_t n_tiles = cdiv(M, kKeyTile);
  const int64_t t0 = s * plan.tiles_per_split;
  const int64_t t1 = t0 + plan.tiles_per_split < n_tiles ? t0 + plan.tiles_per_split : n_tiles;
  if (t0 >= t1) {  // no key of b in this split (packed layout; M = 0): the neutral partial, nothing read
    const int rows = C - c0 < CB ? static_cast<int>(C - c0) : CB;
    const int64_t row0 = (s * BH + bh) * C + c0;
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      m_part[row0 + r] = neg_inf<A>();
      l_part[row0 + r] = A(0);
    }
    if (has_v)
      for (int64_t i = threadIdx.x; i < static_cast<int64_t>(rows) * Dv; i += kThreads) acc_part[row0 * Dv + i] = A(0);
    return;  // the whole block, before any barrier
  }

  A* ws = smem_base<A>();                   // [CB][D]  rows c0 ..; read as broadcasts
  A* ks = ws + static_cast<int64_t>(CB) * D; // [32][KS] kh of the tile; one row per lane
  A* vs = ks + kKeyTile * KS;               // [32][VS] v of the tile; one column per lane
  A* st = vs + (has_v ? kKeyTile * VS : 0); // [CB][SW] running state (in_smem only)
  stage_small(static_cast<const A*>(p.w) + bh * C * D, c0, C, CB, D, D, ws);
  if (in_smem)
    for (int i = threadIdx.x; i < CB * SW; i += kThreads) st[i] = i % SW == 0 ? neg_inf<A>() : A(0);

  const T* kg = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1] + seq.first * p.sk[2];
  const T* vg = has_v ? static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1] + seq.first * p.sv[2] : nullptr;
  const A ss = static_cast<A>(p.ss);

  // the state of the current group (of the only group when !in_smem)
  A mrow[RPW], lrow[RPW], acc[RPW][8];
#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    mrow[j] = neg_inf<A>();
    lrow[j] = A(0);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[j][i] = A(0);
  }

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = t * kKeyTile;
    __syncthreads();  // the previous tile is consumed (for the first: ws and st are staged)
    stage_long(kg, p.sk[2], p.sk[3], m0, M, kKeyTile, D, KS, ss, p.pad, p.sp[0], p.sp[1], b, ks);
    if (has_v) stage_long(vg, p.sv[2], p.sv[3], m0, M, kKeyTile, Dv, VS, A(1), p.pad, p.sp[0], p.sp[1], b, vs);
    __syncthreads();

    const int64_t m = m0 + lane;
    const bool valid = m < M && !padded(p.pad, p.sp[0], p.sp[1], b, m);
    const A* krow = ks + lane * KS;
    A nrm = A(0);
    if (p.subtract_norm)
      for (int d = 0; d < D; ++d) nrm += krow[d] * krow[d];

    // the tile, loaded once, is applied to every group of rows in turn
    for (int g = 0; g < groups; ++g) {
      const int r0 = g * BC;
      if (in_smem) {
#pragma unroll
        for (int j = 0; j < RPW; ++j) {
          const A* sr = st + (r0 + warp + kWarps * j) * SW;
          mrow[j] = sr[0];
          lrow[j] = sr[1];
          if (has_v) {
#pragma unroll
            for (int i = 0; i < 8; ++i)
              if (i < NV) acc[j][i] = sr[2 + lane + 32 * i];
          }
        }
      }
      A dot[RPW];
#pragma unroll
      for (int j = 0; j < RPW; ++j) dot[j] = A(0);
#pragma unroll 4
      for (int d = 0; d < D; ++d) {
        const A kv = krow[d];
#pragma unroll
        for (int j = 0; j < RPW; ++j) dot[j] += ws[(r0 + warp + kWarps * j) * D + d] * kv;
      }

#pragma unroll
      for (int j = 0; j < RPW; ++j) {
        const A l = valid ? (p.subtract_norm ? dot[j] - A(0.5) * nrm : dot[j]) : neg_inf<A>();
        const A mnew = amax(mrow[j], warp_max(l));
        const A muse = mnew == neg_inf<A>() ? A(0) : mnew;  // nothing valid yet: no shift
        const A e = ex(l - muse);                           // 0 for invalid keys
        const A corr = ex(mrow[j] - muse);
        lrow[j] = lrow[j] * corr + warp_sum(e);
        mrow[j] = mnew;
        if (has_v) {
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[j][i] *= corr;
          for (int src = 0; src < kKeyTile; ++src) {
            const A pe = __shfl_sync(kFull, e, src);
            const A* vrow = vs + src * VS + lane;
#pragma unroll
            for (int i = 0; i < 8; ++i)
              if (i < NV) acc[j][i] += pe * vrow[32 * i];
          }
        }
      }
      if (in_smem) {  // each state element is written and read by the same thread
#pragma unroll
        for (int j = 0; j < RPW; ++j) {
          A* sr = st + (r0 + warp + kWarps * j) * SW;
          if (lane == 0) {
            sr[0] = mrow[j];
            sr[1] = lrow[j];
          }
          if (has_v) {
#pragma unroll
            for (int i = 0; i < 8; ++i)
              if (i < NV) sr[2 + lane + 32 * i] = acc[j][i];
          }
        }
      }
    }
  }

  for (int g = 0; g < groups; ++g) {
#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const int r = g * BC + warp + kWarps * j;
      const int64_t c = c0 + r;
      if (c >= C) continue;
      const A* sr = st + r * SW;
      const int64_t row = (s * BH + bh) * C + c;
      if (lane == 0) {  // lane 0 wrote sr[0], sr[1]
        m_part[row] = in_smem ? sr[0] : mrow[j];
        l_part[row] = in_smem ? sr[1] : lrow[j];
      }
      if (has_v) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int dv = lane + 32 * i;
          if (dv < Dv) acc_part[row * Dv + dv] = in_smem ? sr[2 + dv] : acc[j][i];
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward: dw

size_t key_dw_smem(const KeyPassProblem& p, int rpw, int groups, size_t elem) {
  const int64_t rows = static_cast<int64_t>(kWarps) * rpw * groups;
  const int64_t v = p.v ? kKeyTile * pad32_odd(p.Dv) : 0;
  const int64_t state = groups > 1 ? rows * pad32(p.D) : 0;
  return elem * static_cast<size_t>(rows * (p.D + (p.v ? p.Dv : 0) + 2) + kKeyTile * pad32_odd(p.D) + v + state);
}

template <typename T, int RPW>
__global__ void __launch_bounds__(kThreads)
    key_dw_kernel(const KeyPassProblem p, const SplitPlan plan, const int n_cb, const int groups, const int64_t block0,
                  const typename Acc<T>::type* Z,
                  const typename Acc<T>::type* E, const typename Acc<T>::type* dkap,
                  typename Acc<T>::type* dw_part) {
  using A = typename Acc<T>::type;
  constexpr int BC = kWarps * RPW;
  const int CB = BC * groups;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int KS = pad32_odd(D), VS = pad32_odd(Dv), DS = pad32(D), ND = DS / 32;
  const int64_t C = p.C, H = p.H, BH = p.B * p.H;
  const bool has_v = p.v != nullptr;
  const bool in_smem = groups > 1;  // dw accumulators of the rows kept in shared memory between tiles

  int64_t blk = block0 + blockIdx.x;
  const int64_t c0 = (blk % n_cb) * CB;
  blk /= n_cb;
  const int64_t s = blk % plan.splits, bh = blk / plan.splits;
  const int64_t b = bh / H, h = bh % H;
  const SeqRows seq = seq_rows(p.cu, b, p.M);  // the keys of b
  const int64_t M = (p.live != nullptr && p.live[b] == 0) ? 0 : seq.len;  // live[b] = 0: taken as no key
  const int64_t n_tiles = cdiv(M, kKeyTile);
  const int64_t t0 = s * plan.tiles_per_split;
  const int64_t t1 = t0 + plan.tiles_per_split < n_tiles ? t0 + plan.tiles_per_split : n_tiles;
  if (t0 >= t1) {  // no key of b in this split (packed layout; M = 0): a zero partial, nothing read
    const int rows = C - c0 < CB ? static_cast<int>(C - c0) : CB;
    A* out = dw_part + ((s * BH + bh) * C + c0) * D;
    for (int64_t i = threadIdx.x; i < static_cast<int64_t>(rows) * D; i += kThreads) out[i] = A(0);
    return;  // the whole block, before any barrier
  }

  A* ws = smem_base<A>();                            // [CB][D]  rows c0 ..; broadcasts
  A* gs = ws + static_cast<int64_t>(CB) * D;          // [CB][Dv] dkap rows c0 ..; broadcasts (has_v)
  A* zs = gs + (has_v ? static_cast<int64_t>(CB) * Dv : 0); // [CB] Z
  A* es = zs + CB;                                   // [CB] E
  A* ks = es + CB;                                   // [32][KS] kh: one row per lane, then one column per lane
  A* vs = ks + kKeyTile * KS;                        // [32][VS] v: one row per lane
  A* st = vs + (has_v ? kKeyTile * VS : 0);          // [CB][DS] dw accumulators (in_smem only)
  stage_small(static_cast<const A*>(p.w) + bh * C * D, c0, C, CB, D, D, ws);
  if (has_v) stage_small(dkap + bh * C * Dv, c0, C, CB, Dv, Dv, gs);
  for (int r = threadIdx.x; r < CB; r += kThreads) {
    const int64_t c = c0 + r;
    zs[r] = c < C ? Z[bh * C + c] : A(0);
    es[r] = c < C ? E[bh * C + c] : A(0);
  }
  if (in_smem)
    for (int i = threadIdx.x; i < CB * DS; i += kThreads) st[i] = A(0);

  A acc[RPW][8];  // the current group's accumulators (the only group's when !in_smem)
#pragma unroll
  for (int j = 0; j < RPW; ++j) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[j][i] = A(0);
  }

  const T* kg = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1] + seq.first * p.sk[2];
  const T* vg = has_v ? static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1] + seq.first * p.sv[2] : nullptr;
  const A ss = static_cast<A>(p.ss);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = t * kKeyTile;
    __syncthreads();  // the previous tile is consumed (for the first: ws, gs, zs, es, st are staged)
    stage_long(kg, p.sk[2], p.sk[3], m0, M, kKeyTile, D, KS, ss, p.pad, p.sp[0], p.sp[1], b, ks);
    if (has_v) stage_long(vg, p.sv[2], p.sv[3], m0, M, kKeyTile, Dv, VS, A(1), p.pad, p.sp[0], p.sp[1], b, vs);
    __syncthreads();

    const int64_t m = m0 + lane;
    const bool valid = m < M && !padded(p.pad, p.sp[0], p.sp[1], b, m);
    const A* krow = ks + lane * KS;
    A nrm = A(0);
    if (p.subtract_norm)
      for (int d = 0; d < D; ++d) nrm += krow[d] * krow[d];

    // the tile, loaded once, is applied to every group of rows in turn
    for (int g = 0; g < groups; ++g) {
      const int r0 = g * BC;
      if (in_smem) {
#pragma unroll
        for (int j = 0; j < RPW; ++j) {
          const A* sr = st + (r0 + warp + kWarps * j) * DS + lane;
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (i < ND) acc[j][i] = sr[32 * i];
        }
      }
      A dot[RPW], dp[RPW];
#pragma unroll
      for (int j = 0; j < RPW; ++j) dot[j] = dp[j] = A(0);
#pragma unroll 4
      for (int d = 0; d < D; ++d) {
        const A kv = krow[d];
#pragma unroll
        for (int j = 0; j < RPW; ++j) dot[j] += ws[(r0 + warp + kWarps * j) * D + d] * kv;
      }
      if (has_v) {
        const A* vrow = vs + lane * VS;
#pragma unroll 4
        for (int d = 0; d < Dv; ++d) {
          const A vv = vrow[d];
#pragma unroll
          for (int j = 0; j < RPW; ++j) dp[j] += gs[(r0 + warp + kWarps * j) * Dv + d] * vv;
        }
      }

#pragma unroll
      for (int j = 0; j < RPW; ++j) {
        const int r = r0 + warp + kWarps * j;
        const bool row_ok = c0 + r < C;
        const A l = p.subtract_norm ? dot[j] - A(0.5) * nrm : dot[j];
        const A sm = (valid && row_ok) ? ex(l - zs[r]) : A(0);
        const A dl = sm * (dp[j] + es[r]);
        for (int src = 0; src < kKeyTile; ++src) {
          const A gv = __shfl_sync(kFull, dl, src);
          const A* kcol = ks + src * KS + lane;
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (i < ND) acc[j][i] += gv * kcol[32 * i];
        }
      }
      if (in_smem) {  // each accumulator is written and read by the same thread
#pragma unroll
        for (int j = 0; j < RPW; ++j) {
          A* sr = st + (r0 + warp + kWarps * j) * DS + lane;
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (i < ND) sr[32 * i] = acc[j][i];
        }
      }
    }
  }

  for (int g = 0; g < groups; ++g) {
#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const int r = g * BC + warp + kWarps * j;
      const int64_t c = c0 + r;
      if (c >= C) continue;
      A* out = dw_part + ((s * BH + bh) * C + c) * D;
      const A* sr = st + r * DS;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (d < D) out[d] = in_smem ? sr[d] : acc[j][i];
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward: dk, dv

// 32 keys per block (16 for float64, to stay within an A100's shared memory).
template <typename A> __host__ __device__ constexpr int dkdv_keys() { return sizeof(A) == 8 ? 16 : 32; }

size_t key_dkdv_smem(const KeyPassProblem& p, int bm, size_t elem) {
  const int64_t widths = pad32_odd(p.D) + (p.v ? pad32_odd(p.Dv) : 0);
  return elem * static_cast<size_t>((bm + kChunkRows) * widths + 2 * kChunkRows + 2 * kChunkRows * bm + 2 * bm);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    key_dkdv_kernel(const KeyPassProblem p, const int64_t block0, const typename Acc<T>::type* Z, const typename Acc<T>::type* E,
                    const typename Acc<T>::type* dkap, T* dk, const Strides4 sdk, T* dvo, const Strides4 sdv) {
  using A = typename Acc<T>::type;
  constexpr int BM = dkdv_keys<A>();
  constexpr int BC = kChunkRows;
  constexpr int KPW = BM / kWarps;  // keys per warp when summing over c
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int KS = pad32_odd(D), VS = pad32_odd(Dv), ND = pad32(D) / 32, NV = pad32(Dv) / 32;
  const int64_t C = p.C, H = p.H;
  const bool has_v = p.v != nullptr;

  const int64_t n_tiles = cdiv(p.M, BM);  // of the grid: max_seqlen in the packed layout
  const int64_t blk = block0 + blockIdx.x;
  const int64_t tile = blk % n_tiles, bh = blk / n_tiles;
  const int64_t b = bh / H, h = bh % H;
  const int64_t m0 = tile * BM;
  const SeqRows seq = seq_rows(p.cu, b, p.M);  // the keys of b
  const int64_t M = seq.len;
  if (m0 >= M) return;  // past the sequence's end (packed layout): the whole block, before any barrier
  const bool dead = p.live != nullptr && p.live[b] == 0;  // b taken as having no key: zero dk, dv

  A* ks = smem_base<A>();              // [BM][KS] kh of the tile
  A* vs = ks + BM * KS;                // [BM][VS] v of the tile (when has_v)
  A* ws = vs + (has_v ? BM * VS : 0);  // [BC][KS] a chunk of w rows
  A* gs = ws + BC * KS;                // [BC][VS] the same chunk of dkap rows (when has_v)
  A* zs = gs + (has_v ? BC * VS : 0);  // [BC] Z of the chunk
  A* es = zs + BC;                     // [BC] E of the chunk
  A* sms = es + BC;                    // [BC][BM] S_cm
  A* dls = sms + BC * BM;              // [BC][BM] dl_cm
  A* knorm = dls + BC * BM;            // [BM] |kh_m|^2
  A* kval = knorm + BM;                // [BM] 1 for a valid key, else 0

  const A ss = static_cast<A>(p.ss);
  stage_long(static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1] + seq.first * p.sk[2], p.sk[2], p.sk[3], m0,
             M, BM, D, KS, ss, p.pad, p.sp[0], p.sp[1], b, ks);
  if (has_v)
    stage_long(static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1] + seq.first * p.sv[2], p.sv[2], p.sv[3], m0,
               M, BM, Dv, VS, A(1), p.pad, p.sp[0], p.sp[1], b, vs);
  __syncthreads();
  for (int r = warp; r < BM; r += kWarps) {
    A part = A(0);
    for (int d = lane; d < D; d += 32) part += ks[r * KS + d] * ks[r * KS + d];
    part = warp_sum(part);
    if (lane == 0) {
      const int64_t m = m0 + r;
      knorm[r] = part;
      kval[r] = (m < M && !dead && !padded(p.pad, p.sp[0], p.sp[1], b, m)) ? A(1) : A(0);
    }
  }

  A dka[KPW][8], dva[KPW][8], dlsum[KPW];
#pragma unroll
  for (int q = 0; q < KPW; ++q) {
    dlsum[q] = A(0);
#pragma unroll
    for (int i = 0; i < 8; ++i) dka[q][i] = dva[q][i] = A(0);
  }

  const A* wg = static_cast<const A*>(p.w) + bh * C * D;
  const A* gg = has_v ? dkap + bh * C * Dv : nullptr;
  for (int64_t c0 = 0; c0 < C; c0 += BC) {
    __syncthreads();  // the previous chunk is consumed (for the first: knorm, kval are written)
    stage_small(wg, c0, C, BC, D, KS, ws);
    if (has_v) stage_small(gg, c0, C, BC, Dv, VS, gs);
    if (threadIdx.x < BC) {
      const int64_t c = c0 + threadIdx.x;
      zs[threadIdx.x] = c < C ? Z[bh * C + c] : A(0);
      es[threadIdx.x] = c < C ? E[bh * C + c] : A(0);
    }
    __syncthreads();

    // S and dl for every (row, key) pair of the chunk, one pair per thread at a time
    for (int pi = threadIdx.x; pi < BC * BM; pi += kThreads) {
      const int r = pi / BM, mm = pi % BM;
      A sm = A(0), dl = A(0);
      if (c0 + r < C && kval[mm] != A(0)) {
        const A* wr = ws + r * KS;
        const A* kr = ks + mm * KS;
        A l = A(0);
#pragma unroll 4
        for (int d = 0; d < D; ++d) l += wr[d] * kr[d];
        if (p.subtract_norm) l -= A(0.5) * knorm[mm];
        sm = ex(l - zs[r]);
        A dp = A(0);
        if (has_v) {
          const A* gr = gs + r * VS;
          const A* vr = vs + mm * VS;
#pragma unroll 4
          for (int d = 0; d < Dv; ++d) dp += gr[d] * vr[d];
        }
        dl = sm * (dp + es[r]);
      }
      sms[pi] = sm;
      dls[pi] = dl;
    }
    __syncthreads();

    // sums over the chunk's rows: warp w owns keys w, w + 8, ...; lane j columns j + 32 i
    const int rows = C - c0 < BC ? static_cast<int>(C - c0) : BC;
    for (int r = 0; r < rows; ++r) {
      A sv[KPW], gv[KPW];
#pragma unroll
      for (int q = 0; q < KPW; ++q) {
        sv[q] = sms[r * BM + warp + kWarps * q];
        gv[q] = dls[r * BM + warp + kWarps * q];
        dlsum[q] += gv[q];
      }
      const A* wcol = ws + r * KS + lane;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < ND) {
          const A x = wcol[32 * i];
#pragma unroll
          for (int q = 0; q < KPW; ++q) dka[q][i] += gv[q] * x;
        }
      }
      if (has_v) {
        const A* gcol = gs + r * VS + lane;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (i < NV) {
            const A x = gcol[32 * i];
#pragma unroll
            for (int q = 0; q < KPW; ++q) dva[q][i] += sv[q] * x;
          }
        }
      }
    }
  }

  // dk = ss (sum_c dl w_c - [subtract_norm] (sum_c dl) kh); padded keys get exact zeros
#pragma unroll
  for (int q = 0; q < KPW; ++q) {
    const int mm = warp + kWarps * q;
    const int64_t m = m0 + mm;
    if (m >= M) continue;
    const bool ok = kval[mm] != A(0);
    T* dkrow = dk + b * sdk.s[0] + h * sdk.s[1] + (seq.first + m) * sdk.s[2];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = lane + 32 * i;
      if (d >= D) continue;
      A g = dka[q][i];
      if (p.subtract_norm) g -= dlsum[q] * ks[mm * KS + d];
      dkrow[d * sdk.s[3]] = from_acc<T>(ok ? ss * g : A(0));
    }
    if (has_v) {
      T* dvrow = dvo + b * sdv.s[0] + h * sdv.s[1] + (seq.first + m) * sdv.s[2];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (d < Dv) dvrow[d * sdv.s[3]] = from_acc<T>(ok ? dva[q][i] : A(0));
      }
    }
  }
}

// ----------------------------------------------------------------------------- launchers

// Rows of w per block: groups of 8 * rpw rows (rpw: no more than C needs, cut while one
// group's block is over the soft budget or the device's opt-in), then as many groups as C needs when their state
// fits the shared memory the device offers; else the fewest c blocks of equal groups that
// fit (the fallback: k and v read once per c block).
struct RowPlan {
  int rpw = 1;     // rows per warp in a group
  int groups = 1;  // groups per block
  int n_cb = 1;    // c blocks per (b, h, split)
};

template <typename SmemFn>
RowPlan plan_rows(const KeyPassProblem& p, size_t elem, const DeviceInfo& info, SmemFn smem) {
  RowPlan r;
  const size_t optin = static_cast<size_t>(info.smem_optin);
  const size_t soft = kSmemSoftBudget < optin ? kSmemSoftBudget : optin;
  r.rpw = p.C <= 8 ? 1 : (p.C <= 16 ? 2 : 4);
  while (r.rpw > 1 && smem(p, r.rpw, 1, elem) > soft) r.rpw /= 2;
  if (p.C <= 0) {
    r.n_cb = 0;  // no rows: nothing to launch
    return r;
  }
  const int64_t need = cdiv(p.C, kWarps * r.rpw);  // groups all C rows take
  int64_t g = need;
  while (g > 1 && smem(p, r.rpw, static_cast<int>(g), elem) > optin) --g;
  r.n_cb = static_cast<int>(cdiv(need, g));
  r.groups = static_cast<int>(cdiv(need, r.n_cb));  // balanced: the c blocks differ by at most a group
  return r;
}

size_t elem_size(DType t) { return t == DType::kFloat64 ? sizeof(double) : sizeof(float); }

template <typename T>
cudaError_t fwd(const KeyPassProblem& p, SplitPlan plan, void* m_part, void* l_part, void* acc_part,
                cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t BH = p.B * p.H;
  if (p.D > kMaxWidth || p.Dv > kMaxWidth) return cudaErrorInvalidValue;
  if (BH == 0) return cudaSuccess;
  const DeviceInfo info = device_info();
  const RowPlan rp = plan_rows(p, sizeof(A), info, key_fwd_smem);
  const int n_cb = rp.n_cb, groups = rp.groups;
  if (plan.splits < 1 || plan.tiles_per_split < 1 || plan.splits * plan.tiles_per_split < cdiv(p.M, kKeyTile))
    return cudaErrorInvalidValue;
  const int64_t blocks = BH * plan.splits * n_cb;
  const size_t smem = key_fwd_smem(p, rp.rpw, groups, sizeof(A));
  A* mp = static_cast<A*>(m_part);
  A* lp = static_cast<A*>(l_part);
  A* ap = static_cast<A*>(acc_part);
  auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t err = prepare_launch(kernel, smem, info);
    if (err != cudaSuccess) return err;
    return launch_1d(blocks, info, [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, smem, stream>>>(p, plan, n_cb, groups, first, mp, lp, ap);
    });
  };
  switch (rp.rpw) {
    case 1: return go(key_fwd_kernel<T, 1>);
    case 2: return go(key_fwd_kernel<T, 2>);
    default: return go(key_fwd_kernel<T, 4>);
  }
}

template <typename T>
cudaError_t bwd(const KeyPassProblem& p, SplitPlan plan, const void* Z, const void* E, const void* dkap, void* dk,
                const int64_t sdk[4], void* dv, const int64_t sdv[4], void* dw_part, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t BH = p.B * p.H;
  if (p.D > kMaxWidth || p.Dv > kMaxWidth) return cudaErrorInvalidValue;
  if (BH == 0) return cudaSuccess;
  const DeviceInfo info = device_info();
  const A* z = static_cast<const A*>(Z);
  const A* e = static_cast<const A*>(E);
  const A* g = static_cast<const A*>(dkap);

  if (p.M > 0) {  // dk, dv
    const int bm = dkdv_keys<A>();
    const int64_t blocks = BH * cdiv(p.M, bm);
    const size_t smem = key_dkdv_smem(p, bm, sizeof(A));
    Strides4 a{}, c{};
    for (int i = 0; i < 4; ++i) {
      a.s[i] = sdk[i];
      c.s[i] = p.v ? sdv[i] : 0;
    }
    auto kernel = key_dkdv_kernel<T>;
    cudaError_t err = prepare_launch(kernel, smem, info);
    if (err != cudaSuccess) return err;
    err = launch_1d(blocks, info, [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, smem, stream>>>(p, first, z, e, g, static_cast<T*>(dk), a, static_cast<T*>(dv), c);
    });
    if (err != cudaSuccess) return err;
  }

  // dw partials
  const RowPlan rp = plan_rows(p, sizeof(A), info, key_dw_smem);
  const int n_cb = rp.n_cb, groups = rp.groups;
  if (plan.splits < 1 || plan.tiles_per_split < 1 || plan.splits * plan.tiles_per_split < cdiv(p.M, kKeyTile))
    return cudaErrorInvalidValue;
  const int64_t blocks = BH * plan.splits * n_cb;
  const size_t smem = key_dw_smem(p, rp.rpw, groups, sizeof(A));
  A* out = static_cast<A*>(dw_part);
  auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t err = prepare_launch(kernel, smem, info);
    if (err != cudaSuccess) return err;
    return launch_1d(blocks, info, [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, smem, stream>>>(p, plan, n_cb, groups, first, z, e, g, out);
    });
  };
  switch (rp.rpw) {
    case 1: return go(key_dw_kernel<T, 1>);
    case 2: return go(key_dw_kernel<T, 2>);
    default: return go(key_dw_kernel<T, 4>);
  }
}

}  // namespace

SplitPlan key_pass_split_plan(const KeyPassProblem& p, bool backward) {
  const size_t elem = elem_size(p.dtype);
  const DeviceInfo info = device_info();
  const RowPlan rp = backward ? plan_rows(p, elem, info, key_dw_smem) : plan_rows(p, elem, info, key_fwd_smem);
  return split_plan(cdiv(p.M, kKeyTile), p.B * p.H * rp.n_cb, info);
}

cudaError_t key_pass_forward(const KeyPassProblem& p, SplitPlan plan, void* m_part, void* l_part, void* acc_part,
                             cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat64: return fwd<double>(p, plan, m_part, l_part, acc_part, stream);
    case DType::kFloat32: return fwd<float>(p, plan, m_part, l_part, acc_part, stream);
    case DType::kFloat16: return fwd<__half>(p, plan, m_part, l_part, acc_part, stream);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(p, plan, m_part, l_part, acc_part, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t key_pass_backward(const KeyPassProblem& p, SplitPlan plan, const void* Z, const void* E,
                              const void* dkap, void* dk, const int64_t sdk[4], void* dv, const int64_t sdv[4],
                              void* dw_part, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat64: return bwd<double>(p, plan, Z, E, dkap, dk, sdk, dv, sdv, dw_part, stream);
    case DType::kFloat32: return bwd<float>(p, plan, Z, E, dkap, dk, sdk, dv, sdv, dw_part, stream);
    case DType::kFloat16: return bwd<__half>(p, plan, Z, E, dkap, dk, sdk, dv, sdv, dw_part, stream);
    case DType::kBFloat16: return bwd<__nv_bfloat16>(p, plan, Z, E, dkap, dk, sdk, dv, sdv, dw_part, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lara
