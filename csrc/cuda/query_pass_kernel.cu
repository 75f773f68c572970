// Query pass on the GPU: N query rows attending over C samples (docs/math.md sections
// 6, 7; contract in csrc/lara_ops.h), with or without the MIS term.
//
// Forward (query_fwd_kernel): block (query tile, b*h) holds BN = 8 * RPW rows of qh and
// all C samples. Warp w owns rows w, w + 8, ...; lane j owns samples j, j + 32, ... (NC
// per lane), so the logits of a row sit in its warp's registers and the mean over samples,
// the max and the softmax are warp reductions. The logits are a small GEMM whose w / qt
// operand goes through shared memory in chunks of DK head-dim columns; y = P kap reads
// kap in chunks of 32 samples and takes P from the owning lane by shuffles.
// Traffic: q read once and y written once (the floor); the C-sized inputs (w, qt, kap:
// C x (2 D + Dv), bias, lam, bh) are read once per tile of BN rows, from L2 (they are
// small and shared by all tiles of a (b, h)).
//
// Backward (query_bwd_kernel): block (sample group, split, b*h) walks the query tiles of
// its split, recomputes the logits, P, dL and dt of a tile (and dy . kap the same way)
// for all C samples (the softmax needs them all), and adds the tile's share of the sums
// over n (dw, dqt, dkap) for the samples of its group into shared memory, where they stay
// across all its tiles; at the end it writes them once, as its split's partial (each
// element by one block, no atomics). The group is all C samples whenever they fit the
// device's shared memory (bwd_group), so in the common case there is one group and no
// recomputation; for large C x (2 D + Dv) the groups' blocks each recompute the logits.
// The group-0 block writes dq of its tiles. The C-sized sums (dbias, dbh, dlam) are
// per-lane registers, reduced across warps once at the end.
// Traffic: q, dy read once per group (the groups' blocks of a tile are adjacent in launch
// order, so beyond the first it is mostly L2), dq written once (the floor); the C-sized
// inputs read once per tile from L2; the partials written once per block:
// splits x B x H x C x (2 D + Dv) elements, splits ~ 4 x SMs / (B x H x groups).
//
// Packed layout (cu_seqlens; passes_kernel.h): the grids are those of a padded batch of
// max_seqlen queries per sequence; a block finds its sequence's rows at cu[b] (seq_rows).
// A forward block past the end exits; a backward block walks only the tiles of its split
// below the length (none: it writes zero partials). c_eff[b] = 0 (a sequence without keys,
// either layout): y = 0 and dq = 0 on its rows, zero partials; its C-sized inputs (Z =
// -inf in the bias) are never read. Without c_eff (the whole op's padded layout without masks,
// and its packed layout) the kernels take C, or min(C, queries, keys) of the sequence from
// the two offsets (active_samples in passes_kernel.h).
#include "passes_kernel.h"

namespace lara {
namespace cuda {
namespace {

using namespace detail;

// Head-dim columns per staged chunk of the GEMM operand (rows padded to DK + 1, odd).
template <typename A> __host__ __device__ constexpr int gemm_chunk() { return sizeof(A) == 8 ? 16 : 32; }
// Query rows per warp: fewer for many samples (the per-thread logits are RPW x NC
// registers, several such arrays live at once in the backward) and for float64.
template <typename A, int NC> __host__ __device__ constexpr int rows_per_warp() {
  return sizeof(A) == 8 ? 1 : (NC == 8 ? 2 : 4);
}
constexpr double kAlphaFloor = 1e-8;

int samples_per_lane(int64_t C) { return C <= 32 ? 1 : (C <= 64 ? 2 : (C <= 128 ? 4 : 8)); }
int query_rows(DType t, int nc) {
  const int rpw = t == DType::kFloat64 ? 1 : (nc == 8 ? 2 : 4);
  return kWarps * rpw;
}

// Shared memory, in elements: rows of qh (and of dy in the backward), row flags, and a
// region used first for the staged GEMM operands, then for kap (forward) or P, dL, dt
// and the final cross-warp sums (backward).
int64_t fwd_region(const QueryPassProblem& p, int nc, int dks) {
  const int64_t stage = int64_t(32) * nc * dks * (p.qt ? 2 : 1);
  const int64_t kap = int64_t(32) * pad32(p.Dv);
  return stage > kap ? stage : kap;
}
size_t fwd_smem(const QueryPassProblem& p, int nc, int bn, int dks, size_t elem) {
  return elem * static_cast<size_t>(bn * pad32(p.D) + bn + fwd_region(p, nc, dks));
}
__host__ __device__ inline int64_t bwd_region(const QueryPassProblem& p, int nc, int bn, int dks) {
  const int64_t stage = int64_t(32) * nc * dks * (p.qt ? 2 : 1);
  const int64_t post = int64_t(p.qt ? 3 : 2) * bn * 32 * nc;  // >= the 8 x C cross-warp sums
  return stage > post ? stage : post;
}
// ... plus `group` rows of the partial sums over n (dw, dqt, dkap) the block keeps.
size_t bwd_smem(const QueryPassProblem& p, int nc, int bn, int dks, int group, size_t elem) {
  const int64_t part = int64_t(group) * (p.D * (p.qt ? 2 : 1) + p.Dv);
  return elem * static_cast<size_t>(bn * (pad32(p.D) + pad32(p.Dv)) + bn + bwd_region(p, nc, bn, dks) + part);
}

// Samples per group of the backward: a block keeps its group's rows of dw, dqt and dkap
// in shared memory across all the tiles it walks, and writes them once. All C samples
// when they fit the device's shared memory (no recomputation), else as few groups as fit,
// of balanced sizes (multiples of 8): each group's block then recomputes the tile's
// logits. float32 with MIS, for instance, has one group up to D = Dv = 64, C = 128 on an
// A100 (163 KB) and an H100 (227 KB), two or three at D = Dv = 64, C = 256, and 8 (H100)
// or 16 (A100) at D = Dv = C = 256.
int bwd_group(const QueryPassProblem& p, size_t elem, const DeviceInfo& info) {
  const int nc = samples_per_lane(p.C);
  const int bn = query_rows(p.dtype, nc);
  const int dks = (elem == 8 ? 16 : 32) + 1;
  const int all = static_cast<int>(cdiv(p.C, 8) * 8);
  const size_t base = bwd_smem(p, nc, bn, dks, 0, elem);
  const size_t row = elem * static_cast<size_t>(p.D * (p.qt ? 2 : 1) + p.Dv);
  const size_t limit = static_cast<size_t>(info.smem_optin);
  if (row == 0 || base + all * row <= limit) return all > 0 ? all : 8;
  const int64_t fit = base < limit ? static_cast<int64_t>((limit - base) / row) : 0;
  const int64_t most = fit >= 8 ? fit / 8 * 8 : 8;
  const int64_t groups = cdiv(p.C, most);  // as few as fit, then balanced
  return static_cast<int>(cdiv(cdiv(p.C, groups), 8) * 8);
}

// o1[j][i] += sum_k X[row j][k] B1[c_i][k] (and o2 with B2 when TWO), row j = warp + 8 j
// of X (shared memory, row stride xs), c_i = lane + 32 i, B1, B2 contiguous (C, K) in
// global memory, staged through `stage` DK columns at a time (rows >= C as zeros).
template <typename A, int RPW, int NC, bool TWO>
__device__ __forceinline__ void gemm_rows(const A* X, int xs, int K, const A* __restrict__ B1,
                                          const A* __restrict__ B2, int64_t C, A* stage, A (&o1)[RPW][NC],
                                          A (&o2)[RPW][NC]) {
  constexpr int DK = gemm_chunk<A>();
  constexpr int DKS = DK + 1;
  constexpr int CP = 32 * NC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A* s1 = stage;
  A* s2 = stage + CP * DKS;
  for (int k0 = 0; k0 < K; k0 += DK) {
    const int kw = K - k0 < DK ? K - k0 : DK;
    __syncthreads();  // the previous chunk (or whatever used `stage`) is consumed; X is written
    for (int idx = threadIdx.x; idx < CP * DK; idx += kThreads) {
      const int c = idx / DK, kk = idx % DK;
      const bool in = c < C && kk < kw;
      s1[c * DKS + kk] = in ? B1[c * K + k0 + kk] : A(0);
      if (TWO) s2[c * DKS + kk] = in ? B2[c * K + k0 + kk] : A(0);
    }
    __syncthreads();
#pragma unroll 2
    for (int kk = 0; kk < kw; ++kk) {
      A xv[RPW];
#pragma unroll
      for (int j = 0; j < RPW; ++j) xv[j] = X[(warp + kWarps * j) * xs + k0 + kk];
#pragma unroll
      for (int i = 0; i < NC; ++i) {
        const A b1 = s1[(lane + 32 * i) * DKS + kk];
#pragma unroll
        for (int j = 0; j < RPW; ++j) o1[j][i] += xv[j] * b1;
        if (TWO) {
          const A b2 = s2[(lane + 32 * i) * DKS + kk];
#pragma unroll
          for (int j = 0; j < RPW; ++j) o2[j][i] += xv[j] * b2;
        }
      }
    }
  }
}

// The logits of rows warp + 8 j: s = qh . w + bias (t = qh . qt for MIS), read from qs.
template <typename A, int RPW, int NC>
__device__ __forceinline__ void logits(const QueryPassProblem& p, int64_t bh, const A* qs, int qstride, A* stage,
                                       A (&sdot)[RPW][NC], A (&tdot)[RPW][NC]) {
#pragma unroll
  for (int j = 0; j < RPW; ++j)
#pragma unroll
    for (int i = 0; i < NC; ++i) sdot[j][i] = tdot[j][i] = A(0);
  const int64_t off = bh * p.C * p.D;
  const A* w = static_cast<const A*>(p.w) + off;
  if (p.qt != nullptr)
    gemm_rows<A, RPW, NC, true>(qs, qstride, static_cast<int>(p.D), w, static_cast<const A*>(p.qt) + off, p.C, stage,
                                sdot, tdot);
  else
    gemm_rows<A, RPW, NC, false>(qs, qstride, static_cast<int>(p.D), w, w, p.C, stage, sdot, tdot);
}

// Per-lane copies of the C-sized inputs of samples lane + 32 i.
template <typename A, int NC> struct SampleConsts {
  A bias[NC], lam[NC], bhw[NC];
  __device__ __forceinline__ void load(const QueryPassProblem& p, int64_t bh) {
    const int lane = threadIdx.x & 31;
    const bool mis = p.qt != nullptr;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int64_t c = lane + 32 * i;
      const bool in = c < p.C;
      bias[i] = in ? static_cast<const A*>(p.bias)[bh * p.C + c] : A(0);
      lam[i] = (in && mis) ? static_cast<const A*>(p.lam)[bh * p.C + c] : A(0);
      bhw[i] = (in && mis) ? static_cast<const A*>(p.bh)[bh * p.C + c] : A(0);
    }
  }
};

// One row's softmax over the active samples (c < ce): e = exp(L - max) (0 for inactive
// samples) and its sum; r and alpha of the MIS term when given.
template <typename A, int NC>
__device__ __forceinline__ A row_softmax(const QueryPassProblem& p, const SampleConsts<A, NC>& k, int ce,
                                         const A (&sdot)[NC], const A (&tdot)[NC], A (&e)[NC], A (&r)[NC],
                                         A (&alpha)[NC]) {
  const int lane = threadIdx.x & 31;
  const bool mis = p.qt != nullptr;
  const A beta = static_cast<A>(p.beta);
  A rmean = A(0);
  if (mis) {
    A rsum = A(0);
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      r[i] = ex(tdot[i] - k.lam[i]);
      if (lane + 32 * i < ce) rsum += r[i];
    }
    rmean = warp_sum(rsum) / static_cast<A>(ce);
  }
  A mx = neg_inf<A>();
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    A l = sdot[i] + k.bias[i];
    if (mis) {
      alpha[i] = k.bhw[i] + beta * (r[i] - rmean);
      l += lg(amax(alpha[i], static_cast<A>(kAlphaFloor)));
    } else {
      r[i] = alpha[i] = A(0);
    }
    e[i] = lane + 32 * i < ce ? l : neg_inf<A>();
    mx = amax(mx, e[i]);
  }
  mx = warp_max(mx);  // finite: sample 0 is always active
  A sum = A(0);
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    e[i] = ex(e[i] - mx);
    sum += e[i];
  }
  return warp_sum(sum);
}

// ----------------------------------------------------------------------------- forward

template <typename T, int NC>
__global__ void __launch_bounds__(kThreads)
    query_fwd_kernel(const QueryPassProblem p, T* y, const Strides4 sy, const int64_t n_tiles, const int64_t block0) {
  using A = typename Acc<T>::type;
  constexpr int RPW = rows_per_warp<A, NC>();
  constexpr int BN = kWarps * RPW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int QS = pad32(D), VS = pad32(Dv), NV = VS / 32;
  const int64_t H = p.H;

  const int64_t blk = block0 + blockIdx.x;
  const int64_t tile = blk % n_tiles, bh = blk / n_tiles;
  const int64_t b = bh / H, h = bh % H;
  const int64_t n0 = tile * BN;
  const SeqRows seq = seq_rows(p.cu, b, p.N);  // the queries of b
  const int64_t N = seq.len;
  if (n0 >= N) return;  // past the sequence's end (packed layout): the whole block, before any barrier
  T* yg = y + b * sy.s[0] + h * sy.s[1] + seq.first * sy.s[2];
  const int64_t ce64 = active_samples(p, b);
  if (ce64 == 0) {  // no active sample (b has no key): y = 0 on the tile's rows, nothing else read
    for (int r = warp; r < BN; r += kWarps) {
      const int64_t n = n0 + r;
      if (n >= N) break;
      for (int dv = lane; dv < Dv; dv += 32) yg[n * sy.s[2] + dv * sy.s[3]] = from_acc<T>(A(0));
    }
    return;
  }
  const int ce = static_cast<int>(ce64);

  A* qs = smem_base<A>();      // [BN][QS] qh of the tile, zero rows where not valid
  A* rowok = qs + BN * QS;     // [BN] 1 for a valid query row
  A* region = rowok + BN;      // GEMM staging, then kap chunks [32][VS]

  if (threadIdx.x < BN) {
    const int64_t n = n0 + threadIdx.x;
    rowok[threadIdx.x] = (n < N && !padded(p.pad, p.sp[0], p.sp[1], b, n)) ? A(1) : A(0);
  }
  stage_long(static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1] + seq.first * p.sq[2], p.sq[2], p.sq[3], n0, N,
             BN, D, QS, static_cast<A>(p.ss), p.pad, p.sp[0], p.sp[1], b, qs);

  SampleConsts<A, NC> k;
  k.load(p, bh);

  A sdot[RPW][NC], tdot[RPW][NC];
  logits<A, RPW, NC>(p, bh, qs, QS, region, sdot, tdot);

  A P[RPW][NC];
#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    A e[NC], r[NC], alpha[NC];
    const A sum = row_softmax<A, NC>(p, k, ce, sdot[j], tdot[j], e, r, alpha);
    const bool ok = rowok[warp + kWarps * j] != A(0);
#pragma unroll
    for (int i = 0; i < NC; ++i) P[j][i] = ok ? e[i] / sum : A(0);  // padded rows: y = 0
  }

  A acc[RPW][8];
#pragma unroll
  for (int j = 0; j < RPW; ++j)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[j][i] = A(0);
  const A* kap = static_cast<const A*>(p.kap) + bh * p.C * Dv;
#pragma unroll
  for (int ic = 0; ic < NC; ++ic) {
    __syncthreads();  // the GEMM staging (or the previous kap chunk) is consumed
    stage_small(kap, 32 * ic, p.C, 32, Dv, VS, region);
    __syncthreads();
    for (int src = 0; src < 32; ++src) {
      const A* kr = region + src * VS + lane;
#pragma unroll
      for (int j = 0; j < RPW; ++j) {
        const A pj = __shfl_sync(kFull, P[j][ic], src);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < NV) acc[j][i] += pj * kr[32 * i];
      }
    }
  }

#pragma unroll
  for (int j = 0; j < RPW; ++j) {
    const int64_t n = n0 + warp + kWarps * j;
    if (n >= N) continue;
    T* yr = yg + n * sy.s[2];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int dv = lane + 32 * i;
      if (dv < Dv) yr[dv * sy.s[3]] = from_acc<T>(acc[j][i]);
    }
  }
}

// ----------------------------------------------------------------------------- backward

// part[c - g0][d] += sum_n coef[n][c] X[n][d] for g0 <= c < g1, d < width: the tile's
// share of a sum over n, added into the block's partial in shared memory (row stride
// width). Warp w owns samples cb + w + 8 q of each group of 32, lane j columns j + 32 i;
// an element of part is always updated by the same thread, so the tiles need no barrier
// between their updates.
template <typename A, int BN>
__device__ __forceinline__ void add_partial(const A* coef, int cstride, const A* X, int xs, int g0, int g1,
                                            int width, A* part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int NX = xs / 32;
  for (int cb = g0; cb < g1; cb += 32) {
    A acc[4][8];
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[q][i] = A(0);
    for (int n = 0; n < BN; ++n) {
      A xv[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[i] = i < NX ? X[n * xs + lane + 32 * i] : A(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int c = cb + warp + kWarps * q;
        const A cv = c < g1 ? coef[n * cstride + c] : A(0);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < NX) acc[q][i] += cv * xv[i];
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int c = cb + warp + kWarps * q;
      if (c >= g1) continue;
      A* row = part + (c - g0) * width;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = lane + 32 * i;
        if (d < width) row[d] += acc[q][i];
      }
    }
  }
}

template <typename T, typename TY, int NC>
__global__ void __launch_bounds__(kThreads)
    query_bwd_kernel(const QueryPassProblem p, const SplitPlan plan, const int64_t n_tiles, const int group,
                     const int64_t block0, const TY* dy,
                     const Strides4 sdy, T* dq, const Strides4 sdq, typename Acc<T>::type* dw_part,
                     typename Acc<T>::type* db_part, typename Acc<T>::type* dkap_part,
                     typename Acc<T>::type* dqt_part, typename Acc<T>::type* dlam_part,
                     typename Acc<T>::type* dbh_part) {
  using A = typename Acc<T>::type;
  constexpr int RPW = rows_per_warp<A, NC>();
  constexpr int BN = kWarps * RPW;
  constexpr int CP = 32 * NC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = static_cast<int>(p.D), Dv = static_cast<int>(p.Dv);
  const int QS = pad32(D), YS = pad32(Dv), ND = QS / 32;
  const int64_t H = p.H, C = p.C, BH = p.B * p.H;
  const bool mis = p.qt != nullptr;
  const A beta = static_cast<A>(p.beta);
  const A ss = static_cast<A>(p.ss);

  const int n_groups = static_cast<int>(cdiv(C, group));
  int64_t blk = block0 + blockIdx.x;
  const int cg = static_cast<int>(blk % n_groups);
  blk /= n_groups;
  const int64_t s = blk % plan.splits, bh = blk / plan.splits;
  const int64_t b = bh / H, h = bh % H;
  const int g0 = cg * group, g1 = static_cast<int>(C - g0 < group ? C : g0 + group);  // samples g0 .. g1
  const SeqRows seq = seq_rows(p.cu, b, p.N);  // the queries of b
  const int64_t N = seq.len;

  A* qs = smem_base<A>();      // [BN][QS] qh of the tile
  A* ys = qs + BN * QS;        // [BN][YS] dy of the tile
  A* rowok = ys + BN * YS;     // [BN]
  A* region = rowok + BN;      // GEMM staging, then:
  A* Ps = region;              // [BN][CP] P
  A* dLs = Ps + BN * CP;       // [BN][CP] dL
  A* dTs = dLs + BN * CP;      // [BN][CP] dt (MIS)
  A* dws = region + bwd_region(p, NC, BN, gemm_chunk<A>() + 1);  // [group][D] the block's rows g0 .. of dw,
  A* dqts = dws + group * D;                                      // [group][D] of dqt (MIS),
  A* dkaps = dqts + (mis ? group * D : 0);                        // [group][Dv] of dkap, over all tiles
  for (int i = threadIdx.x; i < group * (D * (mis ? 2 : 1) + Dv); i += kThreads) dws[i] = A(0);

  const int64_t ce64 = active_samples(p, b);
  const int ce = static_cast<int>(ce64);
  SampleConsts<A, NC> k;
  k.load(p, bh);
  const A* w = static_cast<const A*>(p.w) + bh * C * D;
  const A* qt = mis ? static_cast<const A*>(p.qt) + bh * C * D : nullptr;
  const A* kap = static_cast<const A*>(p.kap) + bh * C * Dv;
  const T* qg = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1] + seq.first * p.sq[2];
  const TY* dyg = dy + b * sdy.s[0] + h * sdy.s[1] + seq.first * sdy.s[2];
  T* dqg = dq + b * sdq.s[0] + h * sdq.s[1] + seq.first * sdq.s[2];

  A cdb[NC], cdbh[NC], cdlam[NC];  // this lane's share of the C-sized sums
#pragma unroll
  for (int i = 0; i < NC; ++i) cdb[i] = cdbh[i] = cdlam[i] = A(0);

  // the split's tiles within sequence b (n_tiles, of the grid, is max_seqlen's in the packed layout)
  const int64_t n_tiles_b = cdiv(N, BN) < n_tiles ? cdiv(N, BN) : n_tiles;
  const int64_t t0 = s * plan.tiles_per_split;
  int64_t t1 = t0 + plan.tiles_per_split < n_tiles_b ? t0 + plan.tiles_per_split : n_tiles_b;
  if (ce == 0) {  // no active sample (b has no key): dq = 0 on the split's rows, zero partials
    if (cg == 0)
      for (int64_t n = t0 * BN + warp; n < t1 * BN && n < N; n += kWarps)
        for (int d = lane; d < D; d += 32) dqg[n * sdq.s[2] + d * sdq.s[3]] = from_acc<T>(A(0));
    t1 = t0;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * BN;
    __syncthreads();  // the previous tile is consumed
    if (threadIdx.x < BN) {
      const int64_t n = n0 + threadIdx.x;
      rowok[threadIdx.x] = (n < N && !padded(p.pad, p.sp[0], p.sp[1], b, n)) ? A(1) : A(0);
    }
    stage_long(qg, p.sq[2], p.sq[3], n0, N, BN, D, QS, ss, p.pad, p.sp[0], p.sp[1], b, qs);
    stage_long(dyg, sdy.s[2], sdy.s[3], n0, N, BN, Dv, YS, A(1), p.pad, p.sp[0], p.sp[1], b, ys);

    A sdot[RPW][NC], tdot[RPW][NC], dp[RPW][NC];
    logits<A, RPW, NC>(p, bh, qs, QS, region, sdot, tdot);
#pragma unroll
    for (int j = 0; j < RPW; ++j)
#pragma unroll
      for (int i = 0; i < NC; ++i) dp[j][i] = A(0);
    gemm_rows<A, RPW, NC, false>(ys, YS, Dv, kap, kap, C, region, dp, dp);
    __syncthreads();  // the staging region is consumed: it now takes P, dL, dt

#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const int row = warp + kWarps * j;
      const bool ok = rowok[row] != A(0);
      A e[NC], r[NC], alpha[NC];
      const A sum = row_softmax<A, NC>(p, k, ce, sdot[j], tdot[j], e, r, alpha);
      A delta = A(0);
#pragma unroll
      for (int i = 0; i < NC; ++i) {
        e[i] = ok ? e[i] / sum : A(0);  // P; zero for padded rows and inactive samples
        delta += e[i] * dp[j][i];
      }
      delta = warp_sum(delta);
      A dl[NC], dal[NC], dsum = A(0);
#pragma unroll
      for (int i = 0; i < NC; ++i) {
        const bool keep = ok && lane + 32 * i < ce;
        dl[i] = keep ? e[i] * (dp[j][i] - delta) : A(0);
        // the clamp at 1e-8 passes no gradient below it
        dal[i] = (mis && keep && alpha[i] > static_cast<A>(kAlphaFloor)) ? dl[i] / alpha[i] : A(0);
        dsum += dal[i];
        cdb[i] += dl[i];
        cdbh[i] += dal[i];
        Ps[row * CP + lane + 32 * i] = e[i];
        dLs[row * CP + lane + 32 * i] = dl[i];
      }
      if (mis) {
        const A dmean = warp_sum(dsum) / static_cast<A>(ce);
#pragma unroll
        for (int i = 0; i < NC; ++i) {
          const bool keep = ok && lane + 32 * i < ce;
          const A dt = keep ? beta * (dal[i] - dmean) * r[i] : A(0);
          cdlam[i] -= dt;
          dTs[row * CP + lane + 32 * i] = dt;
        }
      }
    }
    __syncthreads();

    // dq_n = ss (sum_c dL_nc w_c + sum_c dt_nc qt_c), by the group-0 block of the tile
    // (every group block has all of dL and dt); w and qt rows are read through L1
    if (cg == 0) {
      A acc[RPW][8];
#pragma unroll
      for (int j = 0; j < RPW; ++j)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[j][i] = A(0);
      for (int c = 0; c < C; ++c) {
        A gl[RPW], gt[RPW];
#pragma unroll
        for (int j = 0; j < RPW; ++j) {
          gl[j] = dLs[(warp + kWarps * j) * CP + c];
          gt[j] = mis ? dTs[(warp + kWarps * j) * CP + c] : A(0);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int d = lane + 32 * i;
          if (i < ND && d < D) {
            const A wv = w[c * D + d];
            const A tv = mis ? qt[c * D + d] : A(0);
#pragma unroll
            for (int j = 0; j < RPW; ++j) acc[j][i] += gl[j] * wv + gt[j] * tv;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < RPW; ++j) {
        const int row = warp + kWarps * j;
        const int64_t n = n0 + row;
        if (n >= N) continue;
        const bool ok = rowok[row] != A(0);
        T* dqr = dqg + n * sdq.s[2];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int d = lane + 32 * i;
          if (d < D) dqr[d * sdq.s[3]] = from_acc<T>(ok ? ss * acc[j][i] : A(0));
        }
      }
    }

    add_partial<A, BN>(dLs, CP, qs, QS, g0, g1, D, dws);
    if (mis) add_partial<A, BN>(dTs, CP, qs, QS, g0, g1, D, dqts);
    add_partial<A, BN>(Ps, CP, ys, YS, g0, g1, Dv, dkaps);
  }

  // C-sized sums: per-warp values through shared memory, added in warp order
  A* red = region;  // [3][8][CP]
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NC; ++i) {
    const int c = lane + 32 * i;
    red[(0 * kWarps + warp) * CP + c] = cdb[i];
    if (mis) {
      red[(1 * kWarps + warp) * CP + c] = cdbh[i];
      red[(2 * kWarps + warp) * CP + c] = cdlam[i];
    }
  }
  __syncthreads();
  // the group's rows of the sums over n, written once: contiguous runs of (g1 - g0) rows
  {
    const int64_t row0 = (s * BH + bh) * C + g0;
    const int nd = (g1 - g0) * D, nv = (g1 - g0) * Dv;
    for (int i = threadIdx.x; i < nd; i += kThreads) {
      dw_part[row0 * D + i] = dws[i];
      if (mis) dqt_part[row0 * D + i] = dqts[i];
    }
    for (int i = threadIdx.x; i < nv; i += kThreads) dkap_part[row0 * Dv + i] = dkaps[i];
  }
  const int c = static_cast<int>(threadIdx.x);
  if (c >= g0 && c < g1) {
    const int64_t o = (s * BH + bh) * C + c;
    A v0 = A(0), v1 = A(0), v2 = A(0);
    for (int wi = 0; wi < kWarps; ++wi) {
      v0 += red[(0 * kWarps + wi) * CP + c];
      if (mis) {
        v1 += red[(1 * kWarps + wi) * CP + c];
        v2 += red[(2 * kWarps + wi) * CP + c];
      }
    }
    db_part[o] = v0;
    if (mis) {
      dbh_part[o] = v1;
      dlam_part[o] = v2;
    }
  }
}

// ----------------------------------------------------------------------------- launchers

template <typename T>
cudaError_t fwd(const QueryPassProblem& p, void* y, const int64_t sy[4], cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t BH = p.B * p.H;
  if (p.D > kMaxWidth || p.Dv > kMaxWidth || p.C > kMaxWidth) return cudaErrorInvalidValue;
  if (BH == 0 || p.N == 0) return cudaSuccess;
  const DeviceInfo info = device_info();
  const int nc = samples_per_lane(p.C);
  const int bn = query_rows(p.dtype, nc);
  const int64_t n_tiles = cdiv(p.N, bn);
  const int64_t blocks = BH * n_tiles;
  const size_t smem = fwd_smem(p, nc, bn, gemm_chunk<A>() + 1, sizeof(A));
  Strides4 st{};
  for (int i = 0; i < 4; ++i) st.s[i] = sy[i];
  T* out = static_cast<T*>(y);
  auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t err = prepare_launch(kernel, smem, info);
    if (err != cudaSuccess) return err;
    return launch_1d(blocks, info, [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, smem, stream>>>(p, out, st, n_tiles, first);
    });
  };
  switch (nc) {
    case 1: return go(query_fwd_kernel<T, 1>);
    case 2: return go(query_fwd_kernel<T, 2>);
    case 4: return go(query_fwd_kernel<T, 4>);
    default: return go(query_fwd_kernel<T, 8>);
  }
}

template <typename T, typename TY>
cudaError_t bwd(const QueryPassProblem& p, SplitPlan plan, const void* dy, const int64_t sdy[4], void* dq,
                const int64_t sdq[4], void* dw_part, void* db_part, void* dkap_part, void* dqt_part, void* dlam_part,
                void* dbh_part, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t BH = p.B * p.H;
  if (p.D > kMaxWidth || p.Dv > kMaxWidth || p.C > kMaxWidth) return cudaErrorInvalidValue;
  if (BH == 0) return cudaSuccess;
  const DeviceInfo info = device_info();
  const int nc = samples_per_lane(p.C);
  const int bn = query_rows(p.dtype, nc);
  const int64_t n_tiles = cdiv(p.N, bn);
  if (plan.splits < 1 || plan.tiles_per_split < 1 || plan.splits * plan.tiles_per_split < n_tiles)
    return cudaErrorInvalidValue;
  const int group = bwd_group(p, sizeof(A), info);
  const int64_t blocks = BH * plan.splits * cdiv(p.C, group);
  const size_t smem = bwd_smem(p, nc, bn, gemm_chunk<A>() + 1, group, sizeof(A));
  Strides4 a{}, c{};
  for (int i = 0; i < 4; ++i) {
    a.s[i] = sdy[i];
    c.s[i] = sdq[i];
  }
  const TY* g = static_cast<const TY*>(dy);
  T* out = static_cast<T*>(dq);
  A* parts[6] = {static_cast<A*>(dw_part),  static_cast<A*>(db_part),   static_cast<A*>(dkap_part),
                 static_cast<A*>(dqt_part), static_cast<A*>(dlam_part), static_cast<A*>(dbh_part)};
  auto go = [&](auto kernel) -> cudaError_t {
    const cudaError_t err = prepare_launch(kernel, smem, info);
    if (err != cudaSuccess) return err;
    return launch_1d(blocks, info, [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, smem, stream>>>(p, plan, n_tiles, group, first, g, a, out, c, parts[0], parts[1],
                                            parts[2], parts[3], parts[4], parts[5]);
    });
  };
  switch (nc) {
    case 1: return go(query_bwd_kernel<T, TY, 1>);
    case 2: return go(query_bwd_kernel<T, TY, 2>);
    case 4: return go(query_bwd_kernel<T, TY, 4>);
    default: return go(query_bwd_kernel<T, TY, 8>);
  }
}

template <typename T>
cudaError_t bwd_dy(const QueryPassProblem& p, SplitPlan plan, DType dy_dtype, const void* dy, const int64_t sdy[4],
                   void* dq, const int64_t sdq[4], void* dw, void* db, void* dkap, void* dqt, void* dlam, void* dbh,
                   cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const DType acc_dtype = sizeof(A) == 8 ? DType::kFloat64 : DType::kFloat32;
  if (dy_dtype == p.dtype) return bwd<T, T>(p, plan, dy, sdy, dq, sdq, dw, db, dkap, dqt, dlam, dbh, stream);
  if (dy_dtype == acc_dtype) return bwd<T, A>(p, plan, dy, sdy, dq, sdq, dw, db, dkap, dqt, dlam, dbh, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

SplitPlan query_pass_split_plan(const QueryPassProblem& p) {
  const DeviceInfo info = device_info();
  const int bn = query_rows(p.dtype, samples_per_lane(p.C));
  const int group = bwd_group(p, p.dtype == DType::kFloat64 ? 8 : 4, info);
  return split_plan(cdiv(p.N, bn), p.B * p.H * cdiv(p.C, group), info);
}

cudaError_t query_pass_forward(const QueryPassProblem& p, void* y, const int64_t sy[4], cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat64: return fwd<double>(p, y, sy, stream);
    case DType::kFloat32: return fwd<float>(p, y, sy, stream);
    case DType::kFloat16: return fwd<__half>(p, y, sy, stream);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(p, y, sy, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t query_pass_backward(const QueryPassProblem& p, SplitPlan plan, DType dy_dtype, const void* dy,
                                const int64_t sdy[4], void* dq, const int64_t sdq[4], void* dw_part,
                                void* dbias_part, void* dkap_part, void* dqt_part, void* dlam_part,
                                void* dbh_part, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat64:
      return bwd_dy<double>(p, plan, dy_dtype, dy, sdy, dq, sdq, dw_part, dbias_part, dkap_part, dqt_part,
                            dlam_part, dbh_part, stream);
    case DType::kFloat32:
      return bwd_dy<float>(p, plan, dy_dtype, dy, sdy, dq, sdq, dw_part, dbias_part, dkap_part, dqt_part,
                           dlam_part, dbh_part, stream);
    case DType::kFloat16:
      return bwd_dy<__half>(p, plan, dy_dtype, dy, sdy, dq, sdq, dw_part, dbias_part, dkap_part, dqt_part,
                            dlam_part, dbh_part, stream);
    case DType::kBFloat16:
      return bwd_dy<__nv_bfloat16>(p, plan, dy_dtype, dy, sdy, dq, sdq, dw_part, dbias_part, dkap_part, dqt_part,
                                   dlam_part, dbh_part, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lara
