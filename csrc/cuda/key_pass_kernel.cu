// Key pass on the GPU: C rows of w attending over M keys (docs/math.md sections 4, 5;
// contract in csrc/lara_ops.h). Without values it is the query normalizer.
//
// Forward (key_fwd_kernel): split-K over the long axis. Block (c block, split, b*h) holds
// 8 * RPW rows of w in shared memory and walks the 32-key tiles of its split: lane m of
// every warp owns key m of the tile, warp w owns rows w, w + 8, ..., so the online
// log-sum-exp of a row is a warp reduction and the row's value accumulator sits in the
// registers of its warp (lane j holds columns j, j + 32, ...). The per-split partials
// (max, sum, accumulator) are combined by the caller.
// Traffic: w read once; the partials written once per split (splits x C x (Dv + 2) per
// (b, h)). k and v are read once per c block, cdiv(C, 8 * RPW) times (RPW <= 4: once
// for C <= 32). The c blocks of a (split, b, h) are adjacent in launch order and walk
// the same tiles, so DRAM sees k and v about once and the repeats are L2 hits; reading
// them once from L2 too would need the running state of all C rows on one SM
// (C x (Dv + 2) accumulators, 264 KB at C = Dv = 256), more than it has.
//
// Backward: two kernels that both recompute the C x 32 tiles of l from w and k.
// key_dkdv_kernel: one block per key tile loops over all C rows in chunks of 16, so the
// sums over c of dk and dv stay in registers and are written once (no partials over c).
// Traffic: k and v read once, dk and dv written once (the floor); w and dkap (C x (D +
// Dv)) read once per key tile from L2.
// key_dw_kernel: laid out like the forward; dw_c = sum_m dl_cm kh_m is accumulated per
// split in registers and written once as a partial. Traffic: as the forward (k, v once
// per c block), dw partials splits x C x D per (b, h). Sums run in a fixed order, no
// atomics.
#include "passes_kernel.h"

namespace lara {
namespace cuda {
namespace {

using namespace detail;

constexpr int kKeyTile = 32;   // keys per tile in the forward and dw kernels: one per lane
constexpr int kChunkRows = 16; // rows of w per chunk in the dk/dv kernel

// ----------------------------------------------------------------------------- forward

size_t key_fwd_smem(const KeyPassProblem& p, int rpw, size_t elem) {
  const int64_t v = p.v ? kKeyTile * pad32(p.Dv) : 0;
  return elem * static_cast<size_t>(kWarps * rpw * p.D + kKeyTile * pad32_odd(p.D) + v);
}

template <typename T, int RPW>
__global__ void __launch_bounds__(kThreads)
    key_fwd_kernel(const KeyPassProblem p, const SplitPlan plan, const int n_cb, const int64_t block0, typename Acc<T>::type* m_part,
                   typename Acc<T>::type* l_part, typename Acc<T>::type* acc_part) {
  using A = typename Acc<T>::type;
  constexpr int BC = kWarps * RPW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int KS = pad32_odd(D), VS = pad32(Dv), NV = VS / 32;
  const int64_t C = p.C, M = p.M, H = p.H, BH = p.B * p.H;
  const bool has_v = p.v != nullptr;

  int64_t blk = block0 + blockIdx.x;
  const int64_t c0 = (blk % n_cb) * BC;
  blk /= n_cb;
  const int64_t s = blk % plan.splits, bh = blk / plan.splits;
  const int64_t b = bh / H, h = bh % H;

  A* ws = smem_base<A>();              // [BC][D]  rows c0 ..; read as broadcasts
  A* ks = ws + BC * D;                 // [32][KS] kh of the tile; one row per lane
  A* vs = ks + kKeyTile * KS;          // [32][VS] v of the tile; one column per lane
  stage_small(static_cast<const A*>(p.w) + bh * C * D, c0, C, BC, D, D, ws);

  const T* kg = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vg = has_v ? static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1] : nullptr;
  const A ss = static_cast<A>(p.ss);

  A mrow[RPW], lrow[RPW], acc[RPW][8];
#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    mrow[j] = neg_inf<A>();
    lrow[j] = A(0);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[j][i] = A(0);
  }

  const int64_t n_tiles = cdiv(M, kKeyTile);
  const int64_t t0 = s * plan.tiles_per_split;
  const int64_t t1 = t0 + plan.tiles_per_split < n_tiles ? t0 + plan.tiles_per_split : n_tiles;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = t * kKeyTile;
    __syncthreads();  // the previous tile is consumed (for the first: ws is staged)
    stage_long(kg, p.sk[2], p.sk[3], m0, M, kKeyTile, D, KS, ss, p.pad, p.sp[0], p.sp[1], b, ks);
    if (has_v) stage_long(vg, p.sv[2], p.sv[3], m0, M, kKeyTile, Dv, VS, A(1), p.pad, p.sp[0], p.sp[1], b, vs);
    __syncthreads();

    const int64_t m = m0 + lane;
    const bool valid = m < M && !padded(p.pad, p.sp[0], p.sp[1], b, m);
    A dot[RPW];
#pragma unroll
    for (int j = 0; j < RPW; ++j) dot[j] = A(0);
    A nrm = A(0);
    const A* krow = ks + lane * KS;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      const A kv = krow[d];
      nrm += kv * kv;
#pragma unroll
      for (int j = 0; j < RPW; ++j) dot[j] += ws[(warp + kWarps * j) * D + d] * kv;
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
  }

#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    const int64_t c = c0 + warp + kWarps * j;
    if (c >= C) continue;
    const int64_t row = (s * BH + bh) * C + c;
    if (lane == 0) {
      m_part[row] = mrow[j];
      l_part[row] = lrow[j];
    }
    if (has_v) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int dv = lane + 32 * i;
        if (dv < Dv) acc_part[row * Dv + dv] = acc[j][i];
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward: dw

size_t key_dw_smem(const KeyPassProblem& p, int rpw, size_t elem) {
  const int64_t v = p.v ? kKeyTile * pad32_odd(p.Dv) : 0;
  return elem * static_cast<size_t>(kWarps * rpw * (p.D + p.Dv) + kKeyTile * pad32_odd(p.D) + v);
}

template <typename T, int RPW>
__global__ void __launch_bounds__(kThreads)
    key_dw_kernel(const KeyPassProblem p, const SplitPlan plan, const int n_cb, const int64_t block0,
                  const typename Acc<T>::type* Z,
                  const typename Acc<T>::type* E, const typename Acc<T>::type* dkap,
                  typename Acc<T>::type* dw_part) {
  using A = typename Acc<T>::type;
  constexpr int BC = kWarps * RPW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int KS = pad32_odd(D), VS = pad32_odd(Dv), ND = pad32(D) / 32;
  const int64_t C = p.C, M = p.M, H = p.H, BH = p.B * p.H;
  const bool has_v = p.v != nullptr;

  int64_t blk = block0 + blockIdx.x;
  const int64_t c0 = (blk % n_cb) * BC;
  blk /= n_cb;
  const int64_t s = blk % plan.splits, bh = blk / plan.splits;
  const int64_t b = bh / H, h = bh % H;

  A* ws = smem_base<A>();              // [BC][D]  rows c0 ..; broadcasts
  A* gs = ws + BC * D;                 // [BC][Dv] dkap rows c0 ..; broadcasts
  A* ks = gs + BC * Dv;                // [32][KS] kh: one row per lane, then one column per lane
  A* vs = ks + kKeyTile * KS;          // [32][VS] v: one row per lane
  stage_small(static_cast<const A*>(p.w) + bh * C * D, c0, C, BC, D, D, ws);
  if (has_v) stage_small(dkap + bh * C * Dv, c0, C, BC, Dv, Dv, gs);

  A zr[RPW], er[RPW], acc[RPW][8];
#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    const int64_t c = c0 + warp + kWarps * j;
    zr[j] = c < C ? Z[bh * C + c] : A(0);
    er[j] = c < C ? E[bh * C + c] : A(0);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[j][i] = A(0);
  }

  const T* kg = static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1];
  const T* vg = has_v ? static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1] : nullptr;
  const A ss = static_cast<A>(p.ss);
  const int64_t n_tiles = cdiv(M, kKeyTile);
  const int64_t t0 = s * plan.tiles_per_split;
  const int64_t t1 = t0 + plan.tiles_per_split < n_tiles ? t0 + plan.tiles_per_split : n_tiles;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m0 = t * kKeyTile;
    __syncthreads();
    stage_long(kg, p.sk[2], p.sk[3], m0, M, kKeyTile, D, KS, ss, p.pad, p.sp[0], p.sp[1], b, ks);
    if (has_v) stage_long(vg, p.sv[2], p.sv[3], m0, M, kKeyTile, Dv, VS, A(1), p.pad, p.sp[0], p.sp[1], b, vs);
    __syncthreads();

    const int64_t m = m0 + lane;
    const bool valid = m < M && !padded(p.pad, p.sp[0], p.sp[1], b, m);
    A dot[RPW], dp[RPW];
#pragma unroll
    for (int j = 0; j < RPW; ++j) dot[j] = dp[j] = A(0);
    A nrm = A(0);
    const A* krow = ks + lane * KS;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      const A kv = krow[d];
      nrm += kv * kv;
#pragma unroll
      for (int j = 0; j < RPW; ++j) dot[j] += ws[(warp + kWarps * j) * D + d] * kv;
    }
    if (has_v) {
      const A* vrow = vs + lane * VS;
#pragma unroll 4
      for (int d = 0; d < Dv; ++d) {
        const A vv = vrow[d];
#pragma unroll
        for (int j = 0; j < RPW; ++j) dp[j] += gs[(warp + kWarps * j) * Dv + d] * vv;
      }
    }

#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const bool row_ok = c0 + warp + kWarps * j < C;
      const A l = p.subtract_norm ? dot[j] - A(0.5) * nrm : dot[j];
      const A sm = (valid && row_ok) ? ex(l - zr[j]) : A(0);
      const A dl = sm * (dp[j] + er[j]);
      for (int src = 0; src < kKeyTile; ++src) {
        const A g = __shfl_sync(kFull, dl, src);
        const A* kcol = ks + src * KS + lane;
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < ND) acc[j][i] += g * kcol[32 * i];
      }
    }
  }

#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    const int64_t c = c0 + warp + kWarps * j;
    if (c >= C) continue;
    A* out = dw_part + ((s * BH + bh) * C + c) * D;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = lane + 32 * i;
      if (d < D) out[d] = acc[j][i];
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
  const int64_t C = p.C, M = p.M, H = p.H;
  const bool has_v = p.v != nullptr;

  const int64_t n_tiles = cdiv(M, BM);
  const int64_t blk = block0 + blockIdx.x;
  const int64_t tile = blk % n_tiles, bh = blk / n_tiles;
  const int64_t b = bh / H, h = bh % H;
  const int64_t m0 = tile * BM;

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
  stage_long(static_cast<const T*>(p.k) + b * p.sk[0] + h * p.sk[1], p.sk[2], p.sk[3], m0, M, BM, D, KS, ss,
             p.pad, p.sp[0], p.sp[1], b, ks);
  if (has_v)
    stage_long(static_cast<const T*>(p.v) + b * p.sv[0] + h * p.sv[1], p.sv[2], p.sv[3], m0, M, BM, Dv, VS, A(1),
               p.pad, p.sp[0], p.sp[1], b, vs);
  __syncthreads();
  for (int r = warp; r < BM; r += kWarps) {
    A part = A(0);
    for (int d = lane; d < D; d += 32) part += ks[r * KS + d] * ks[r * KS + d];
    part = warp_sum(part);
    if (lane == 0) {
      const int64_t m = m0 + r;
      knorm[r] = part;
      kval[r] = (m < M && !padded(p.pad, p.sp[0], p.sp[1], b, m)) ? A(1) : A(0);
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
    T* dkrow = dk + b * sdk.s[0] + h * sdk.s[1] + m * sdk.s[2];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = lane + 32 * i;
      if (d >= D) continue;
      A g = dka[q][i];
      if (p.subtract_norm) g -= dlsum[q] * ks[mm * KS + d];
      dkrow[d * sdk.s[3]] = from_acc<T>(ok ? ss * g : A(0));
    }
    if (has_v) {
      T* dvrow = dvo + b * sdv.s[0] + h * sdv.s[1] + m * sdv.s[2];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (d < Dv) dvrow[d * sdv.s[3]] = from_acc<T>(ok ? dva[q][i] : A(0));
      }
    }
  }
}

// ----------------------------------------------------------------------------- launchers

// Rows of w per block (8 * rpw): no more than C needs, cut while over the soft budget.
template <typename SmemFn>
int pick_rows_per_warp(const KeyPassProblem& p, size_t elem, SmemFn smem) {
  int rpw = p.C <= 8 ? 1 : (p.C <= 16 ? 2 : 4);
  while (rpw > 1 && smem(p, rpw, elem) > kSmemSoftBudget) rpw /= 2;
  return rpw;
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
  const int rpw = pick_rows_per_warp(p, sizeof(A), key_fwd_smem);
  const int n_cb = static_cast<int>(cdiv(p.C, kWarps * rpw));
  if (plan.splits < 1 || plan.tiles_per_split < 1 || plan.splits * plan.tiles_per_split < cdiv(p.M, kKeyTile))
    return cudaErrorInvalidValue;
  const int64_t blocks = BH * plan.splits * n_cb;
  const size_t smem = key_fwd_smem(p, rpw, sizeof(A));
  A* mp = static_cast<A*>(m_part);
  A* lp = static_cast<A*>(l_part);
  A* ap = static_cast<A*>(acc_part);
  auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t err = prepare_launch(kernel, smem, info);
    if (err != cudaSuccess) return err;
    return launch_1d(blocks, info, [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, smem, stream>>>(p, plan, n_cb, first, mp, lp, ap);
    });
  };
  switch (rpw) {
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
  const int rpw = pick_rows_per_warp(p, sizeof(A), key_dw_smem);
  const int n_cb = static_cast<int>(cdiv(p.C, kWarps * rpw));
  if (plan.splits < 1 || plan.tiles_per_split < 1 || plan.splits * plan.tiles_per_split < cdiv(p.M, kKeyTile))
    return cudaErrorInvalidValue;
  const int64_t blocks = BH * plan.splits * n_cb;
  const size_t smem = key_dw_smem(p, rpw, sizeof(A));
  A* out = static_cast<A*>(dw_part);
  auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t err = prepare_launch(kernel, smem, info);
    if (err != cudaSuccess) return err;
    return launch_1d(blocks, info, [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, smem, stream>>>(p, plan, n_cb, first, z, e, g, out);
    });
  };
  switch (rpw) {
    case 1: return go(key_dw_kernel<T, 1>);
    case 2: return go(key_dw_kernel<T, 2>);
    default: return go(key_dw_kernel<T, 4>);
  }
}

}  // namespace

SplitPlan key_pass_split_plan(const KeyPassProblem& p, bool backward) {
  const size_t elem = elem_size(p.dtype);
  const int rpw = backward ? pick_rows_per_warp(p, elem, key_dw_smem) : pick_rows_per_warp(p, elem, key_fwd_smem);
  return split_plan(cdiv(p.M, kKeyTile), p.B * p.H * cdiv(p.C, kWarps * rpw), device_info());
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
