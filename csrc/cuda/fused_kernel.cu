// The whole-op path's own kernels (declarations and contracts in fused_kernel.h): everything
// of lara_fwd / lara_bwd on the GPU that is not a long pass. All run 256-thread blocks on a
// 1-D grid (launch_1d); none uses atomics, every sum runs in a fixed order.
//
// Forward (launch order in fused_cuda.cpp):
//  prep_kernel        (masked padded layout only) one block per batch element: reads its
//                     query and key masks, writes counts (valid queries, valid keys, c_eff,
//                     active samples) and the rank / order tables of the masked sides.
//  landmarks_kernel   one warp per landmark row (b, h, c) of q and of k: reads the segment's
//                     rows of q or k once (or row c of the given landmarks), writes qt / kt of
//                     the state (kt to the G query heads of its key/value head). For the
//                     segment proposal with H_kv = H (or given k landmarks) one warp computes
//                     both rows c and writes mu and w too, and the proposal kernel is skipped.
//  proposal_kernel    (unless fused above) one warp per sample row: reads qt, kt (mixed:
//                     all C rows of kt; attend: the attend key pass's partials of the row)
//                     and eps; writes mu, w (mixed: the row of a; attend: Z_att, mean_k).
//  weights_kernel     one warp per sample row: reads the key pass's and the normalizer's
//                     partials of the row, w_c and all C rows of mu; writes Z, kap, lam, rho,
//                     log_den, bh and the bias.
// Backward:
//  bwd_sums_kernel    one warp per sample row: sums the query pass's partials of the row
//                     (dbias, dkap, dlam, dbh), writes them and E = dbias - dkap . kap.
//  small_bwd_kernel   one block per (b, h, 8 sample rows), per (b, h) for mixed (whose
//                     last two phases need all rows of dmu): the backward of densities,
//                     weights, samples and proposal means (fused.cpp's header has the
//                     formulas), recomputing g from w and mu; reads the sums and the dw / dqt
//                     partials of the three passes; writes gq, gk (and the attend key pass's
//                     dkap and E; for mixed dmu and dA, scratch it reads back after a barrier).
//  bwd_attend_kernel  (attend only) one warp per sample row: gq += ss * dqt of the attend pass.
//  final_kernel       one thread per element of dq, dk and the given landmarks' gradients:
//                     adds the passes' second and third dq / dk and the landmarks' backward
//                     (the segment of each position from its rank), or copies gq / gk.
//
// Dropped elements (padded layout with masks, an element without a valid query or key): the
// pipeline runs them on zeroed inputs with all-valid masks and zeroes their output. Here
// they have c_eff = 0 (the query pass gives y = 0, dq = 0) and the passes take them as
// having no key (KeyPassProblem::live), so no gradient reaches them; the C-sized results the
// pipeline gets for them are constants written here (qt = kt = 0, Z = Z_att = log M, kap =
// mean_k = 0, lam = log N), so the state equals the CPU op's.
#include "fused_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lara {
namespace cuda {
namespace {

using namespace detail;

template <typename A> __device__ __forceinline__ A load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat64: return static_cast<A>(static_cast<const double*>(p)[i]);
    case DType::kFloat32: return static_cast<A>(static_cast<const float*>(p)[i]);
    case DType::kFloat16: return static_cast<A>(__half2float(static_cast<const __half*>(p)[i]));
    default: return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
  }
}
template <typename A> __device__ __forceinline__ void store_any(void* p, DType t, int64_t i, A v) {
  switch (t) {
    case DType::kFloat64: static_cast<double*>(p)[i] = static_cast<double>(v); return;
    case DType::kFloat32: static_cast<float*>(p)[i] = static_cast<float>(v); return;
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half(static_cast<float>(v)); return;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(static_cast<float>(v)); return;
  }
}

struct Elem {
  int64_t nq, nk, ce, nact;
  bool dropped;
};
__device__ __forceinline__ Elem elem_of(const Elements& e, int64_t b) {
  Elem r;
  if (e.counts != nullptr) {
    r.nq = e.counts[b];
    r.nk = e.counts[e.B + b];
    r.ce = e.counts[2 * e.B + b];
    r.nact = e.counts[3 * e.B + b];
    r.dropped = r.ce == 0;
  } else if (e.cu_q != nullptr) {
    r.nq = static_cast<int64_t>(e.cu_q[b + 1]) - e.cu_q[b];
    r.nk = static_cast<int64_t>(e.cu_k[b + 1]) - e.cu_k[b];
    r.ce = r.nq < r.nk ? r.nq : r.nk;
    r.ce = r.ce < e.C ? r.ce : e.C;
    r.nact = r.ce > 1 ? r.ce : 1;  // the C x C steps treat sample 0 as active (_pipeline)
    r.dropped = false;
  } else {
    r.nq = e.N;
    r.nk = e.M;
    r.ce = e.C;
    r.nact = e.C;
    r.dropped = false;
  }
  return r;
}

// First position (rank) of segment c of n positions cut into ce segments: ceil(c n / ce).
__device__ __forceinline__ int64_t seg_start(int64_t c, int64_t n, int64_t ce) { return (c * n + ce - 1) / ce; }

// The value of lane `src`'s slot `slot` of a per-lane register array x[8], to every lane.
template <typename A> __device__ __forceinline__ A bcast(const A (&x)[8], int idx) {
  A v = x[0];
#pragma unroll
  for (int j = 1; j < 8; ++j)
    if ((idx >> 5) == j) v = x[j];
  return __shfl_sync(kFull, v, idx & 31);
}

// Split partials (max, sum[, acc]) of one row combined: Z = mx + log(sum_s e^(m_s - mx) l_s),
// acc = sum_s e^(m_s - mx) acc_s / that sum (0 where no key); lanes hold columns lane + 32 i.
template <typename A>
__device__ __forceinline__ A combine(Parts m, Parts l, Parts acc, int64_t rows, int64_t row, int W, A (&out)[8]) {
  const A* mp = static_cast<const A*>(m.p);
  const A* lp = static_cast<const A*>(l.p);
  const A* ap = static_cast<const A*>(acc.p);
  A mx = neg_inf<A>();
  for (int64_t s = 0; s < m.splits; ++s) mx = amax(mx, mp[s * rows + row]);
  if (mx == neg_inf<A>()) mx = A(0);
  A total = A(0);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = A(0);
  for (int64_t s = 0; s < m.splits; ++s) {
    const A f = ex(mp[s * rows + row] - mx);
    total += f * lp[s * rows + row];
    if (ap != nullptr) {
      const A* a = ap + (s * rows + row) * W;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int d = (threadIdx.x & 31) + 32 * i;
        if (d < W) out[i] += f * a[d];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = total > A(0) ? out[i] / total : A(0);
  return mx + lg(total);
}

// sum over splits of row `row` of width-W partials, column d
template <typename A> __device__ __forceinline__ A part_sum(Parts q, int64_t rows, int64_t row, int W, int d) {
  const A* p = static_cast<const A*>(q.p);
  A s = A(0);
  for (int64_t k = 0; k < q.splits; ++k) s += p[(k * rows + row) * W + d];
  return s;
}

// ----------------------------------------------------------------------------- prep

__device__ int64_t block_count(Mask m, int64_t b, int64_t L, int64_t* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t n = 0;
  for (int64_t l = threadIdx.x; l < L; l += kThreads) n += m.p[b * m.sb + l * m.sl] ? 0 : 1;
  n = warp_sum(n);
  __syncthreads();  // red is free
  if (lane == 0) red[warp] = n;
  __syncthreads();
  int64_t t = 0;
  for (int w = 0; w < kWarps; ++w) t += red[w];
  return t;
}

// rank[b, l] = rank of position l among the valid ones (-1 if padded, or for a dropped
// element), order[b, r] = position of rank r; chunks of 256 positions, a block-wide scan each.
__device__ void rank_table(Mask m, int64_t b, int64_t L, bool dropped, int32_t* rank, int32_t* order,
                           int64_t* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t base = 0;
  for (int64_t l0 = 0; l0 < L; l0 += kThreads) {
    const int64_t l = l0 + threadIdx.x;
    const int v = (l < L && !m.p[b * m.sb + l * m.sl]) ? 1 : 0;
    int x = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_sync(kFull, x, lane >= off ? lane - off : lane);
      if (lane >= off) x += y;
    }
    __syncthreads();  // red is free
    if (lane == 31) red[warp] = x;
    __syncthreads();
    int64_t before = base, total = base;
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) before += red[w];
      total += red[w];
    }
    const int64_t r = before + x - v;
    if (l < L) {
      rank[b * L + l] = (v && !dropped) ? static_cast<int32_t>(r) : -1;
      if (v) order[b * L + r] = static_cast<int32_t>(l);
    }
    base = total;
  }
}

__global__ void __launch_bounds__(kThreads)
    prep_kernel(const FusedProblem p, const Mask qm, const Mask km, int64_t* counts, int32_t* rank_q,
                int32_t* order_q, int32_t* rank_k, int32_t* order_k, const int64_t block0) {
  const int64_t b = block0 + blockIdx.x, B = p.e.B;
  int64_t* red = smem_base<int64_t>();  // [kWarps]
  const int64_t nq = qm.p != nullptr ? block_count(qm, b, p.e.N, red) : p.e.N;
  const int64_t nk = km.p != nullptr ? block_count(km, b, p.e.M, red) : p.e.M;
  const bool dropped = nq == 0 || nk == 0;
  int64_t ce = nq < nk ? nq : nk;
  ce = ce < p.e.C ? ce : p.e.C;
  if (threadIdx.x == 0) {
    counts[b] = nq;
    counts[B + b] = nk;
    counts[2 * B + b] = dropped ? 0 : ce;
    counts[3 * B + b] = dropped ? p.e.C : ce;
  }
  if (qm.p != nullptr) rank_table(qm, b, p.e.N, dropped, rank_q, order_q, red);
  if (km.p != nullptr) rank_table(km, b, p.e.M, dropped, rank_k, order_k, red);
}

// ----------------------------------------------------------------------------- landmarks

// Row c of the landmarks of element b, head h of one side (x = q or k, heads of x), scaled by
// ss, into lanes' columns lane + 32 i: row c of the given landmarks lm, or the mean of the
// positions of segment c (0 for c >= c_eff, and for a dropped element).
template <typename T, typename A>
__device__ __forceinline__ void landmark_row(const FusedProblem& p, const Elem& el, bool side_k, const Long& x,
                                             const Small4& lm, int64_t b, int64_t h, int64_t c, A (&out)[8]) {
  const Elements& e = p.e;
  const int lane = threadIdx.x & 31;
  const int64_t D = p.D;
  const A ss = static_cast<A>(p.ss);
  if (lm.p != nullptr) {  // given: ss * row c; 0 for a dropped element (its inputs are zeroed)
    const int64_t base = b * lm.s[0] + h * lm.s[1] + c * lm.s[2];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t d = lane + 32 * i;
      out[i] = (d < D && !el.dropped) ? ss * load_any<A>(lm.p, lm.dtype, base + d * lm.s[3]) : A(0);
    }
    return;
  }
  const int64_t n = side_k ? el.nk : el.nq, L = side_k ? e.M : e.N, ce = el.ce;
  const int32_t* cu = side_k ? e.cu_k : e.cu_q;
  const int32_t* order = side_k ? e.order_k : e.order_q;
  int64_t p0 = 0, p1 = 0;
  if (c < ce) {
    p0 = seg_start(c, n, ce);
    p1 = seg_start(c + 1, n, ce);
  }
  const A inv = p1 > p0 ? A(1) / static_cast<A>(p1 - p0) : A(0);
  const T* xb = static_cast<const T*>(x.p) + b * x.s[0] + h * x.s[1] + (cu != nullptr ? cu[b] : 0) * x.s[2];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t d = lane + 32 * i;
    A sum = A(0);
    if (d < D) {
      const T* xd = xb + d * x.s[3];
      for (int64_t r = p0; r < p1; ++r) sum += to_acc<A>(xd[(order != nullptr ? order[b * L + r] : r) * x.s[2]]);
    }
    out[i] = sum * inv * ss;
  }
}

// Separate landmarks (fuse = false): one warp per row of qt (B x H x C tasks) and of kt (B x
// H_kv x C, each written to the G query heads of its key/value head; B x H x C when given).
// Fused with the segment proposal (fuse = true: "segment" with H_kv = H or given k
// landmarks): one warp per sample row computes qt_c and kt_c and writes qt, kt, mu = qt + kt
// and w = mu + eps, so the proposal kernel does not run.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    landmarks_kernel(const FusedProblem p, const Long q, const Long k, const Small4 qlm, const Small4 klm,
                     const Small4 eps, const bool fuse, A* st, const int64_t block0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Elements& e = p.e;
  const int64_t C = e.C, H = p.H, D = p.D;
  const int64_t task = (block0 + blockIdx.x) * kWarps + warp;
  const int64_t rq = e.B * H * C, rk = fuse ? 0 : e.B * (klm.p != nullptr ? H : p.Hkv) * C;
  if (task >= rq + rk) return;  // no barrier in this kernel
  const bool side_k = task >= rq;
  const int64_t t = side_k ? task - rq : task;
  const int64_t heads = (side_k && klm.p == nullptr) ? p.Hkv : H;
  const int64_t c = t % C, bh = t / C, b = bh / heads, h = bh % heads;
  const Elem el = elem_of(e, b);
  A x[8];
  landmark_row<T, A>(p, el, side_k, side_k ? k : q, side_k ? klm : qlm, b, h, c, x);
  if (!fuse) {
    const int64_t reps = (side_k && klm.p == nullptr) ? p.G : 1;
    A* out = st + (side_k ? p.so.kt : p.so.qt);
    for (int64_t g = 0; g < reps; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) out[((b * H + h * reps + g) * C + c) * D + d] = x[i];
      }
    }
    return;
  }
  A y[8];
  landmark_row<T, A>(p, el, true, k, klm, b, h, c, y);  // H_kv = H here, or given
  const int64_t row = t, eb = b * eps.s[0] + h * eps.s[1] + c * eps.s[2];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t d = lane + 32 * i;
    if (d >= D) continue;
    const A m = x[i] + y[i];
    st[p.so.qt + row * D + d] = x[i];
    st[p.so.kt + row * D + d] = y[i];
    st[p.so.mu + row * D + d] = m;
    st[p.so.w + row * D + d] = eps.p != nullptr ? m + load_any<A>(eps.p, eps.dtype, eb + d * eps.s[3]) : m;
  }
}

// ----------------------------------------------------------------------------- proposal

template <typename A>
__global__ void __launch_bounds__(kThreads)
    proposal_kernel(const FusedProblem p, const Small4 eps, const Parts am, const Parts al, const Parts aacc, A* st,
                    const int64_t block0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t C = p.e.C, H = p.H, D = p.D, rows = p.e.B * H * C;
  const int64_t row = (block0 + blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // no barrier in this kernel
  const int64_t c = row % C, bh = row / C, b = bh / H, h = bh % H;
  const Elem el = elem_of(p.e, b);
  const A* qt = st + p.so.qt + bh * C * D;
  const A* kt = st + p.so.kt + bh * C * D;
  A* mu = st + p.so.mu + row * D;
  A* w = st + p.so.w + row * D;
  A m[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t d = lane + 32 * i;
    m[i] = d < D ? qt[c * D + d] : A(0);
  }
  if (p.proposal == kSegment) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < D) m[i] += kt[c * D + d];
    }
  } else if (p.proposal == kMixed) {
    // a_c = softmax over the active c' of kt_c . kt_c' (lane j holds c' = j + 32 i)
    const int64_t na = el.nact;
    A a[8];
    A mx = neg_inf<A>();
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t cp = lane + 32 * i;
      a[i] = neg_inf<A>();
      if (cp < na) {
        A dot = A(0);
        for (int64_t d = 0; d < D; ++d) dot += kt[c * D + d] * kt[cp * D + d];
        a[i] = dot;
      }
      mx = amax(mx, a[i]);
    }
    mx = warp_max(mx);
    A s = A(0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t cp = lane + 32 * i;
      a[i] = cp < na ? ex(a[i] - mx) : A(0);
      s += a[i];
    }
    s = warp_sum(s);
    A* arow = st + p.so.amix + row * C;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t cp = lane + 32 * i;
      a[i] = a[i] / s;
      if (cp < C) arow[cp] = a[i];
    }
    for (int64_t cp = 0; cp < C; ++cp) {  // mu = qt + a kt, summed in the order of c'
      const A av = bcast(a, static_cast<int>(cp));
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) m[i] += av * kt[cp * D + d];
      }
    }
  } else {  // attend: mu = qt + ss mean_k, from the attend key pass (values k, no norm term)
    A mk[8];
    A z = combine<A>(am, al, aacc, rows, row, static_cast<int>(D), mk);
    if (el.dropped) {  // the pipeline's key pass on zero keys, all valid
      z = lg(static_cast<A>(p.e.M));
#pragma unroll
      for (int i = 0; i < 8; ++i) mk[i] = A(0);
    }
    if (lane == 0) st[p.so.zatt + row] = z;
    const A ss = static_cast<A>(p.ss);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < D) {
        st[p.so.katt + row * D + d] = mk[i];
        m[i] += ss * mk[i];
      }
    }
  }
  const int64_t eb = b * eps.s[0] + h * eps.s[1] + c * eps.s[2];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < D) {
      mu[d] = m[i];
      w[d] = eps.p != nullptr ? m[i] + load_any<A>(eps.p, eps.dtype, eb + d * eps.s[3]) : m[i];
    }
  }
}

// ----------------------------------------------------------------------------- weights

template <typename A>
__global__ void __launch_bounds__(kThreads)
    weights_kernel(const FusedProblem p, const Parts km, const Parts kl, const Parts kacc, const Parts nm,
                   const Parts nl, A* st, const int64_t block0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t C = p.e.C, H = p.H, D = p.D, Dv = p.Dv, rows = p.e.B * H * C;
  const int64_t row = (block0 + blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // no barrier in this kernel
  const int64_t c = row % C, bh = row / C, b = bh / H;
  const Elem el = elem_of(p.e, b);
  // 4. key statistics and 5. the normalizer, from the passes' split partials
  A kap[8];
  A Z = combine<A>(km, kl, kacc, rows, row, static_cast<int>(Dv), kap);
  A lam = A(0);
  if (p.optimal) {
    A none[8];
    lam = combine<A>(nm, nl, Parts{}, rows, row, 0, none);
  }
  if (el.dropped) {  // the pipeline's passes on zero inputs, all valid
    Z = lg(static_cast<A>(p.e.M));
    lam = lg(static_cast<A>(p.e.N));
#pragma unroll
    for (int i = 0; i < 8; ++i) kap[i] = A(0);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < Dv) st[p.so.kap + row * Dv + d] = kap[i];
  }
  // 6. g_cc' = w_c . mu_c' - |mu_c'|^2 / 2 (lane j: c' = j + 32 i), rho, LSE over active c'
  const A* w = st + p.so.w + row * D;
  const A* mu = st + p.so.mu + bh * C * D;
  const int64_t na = el.nact;
  A g[8];
  A mx = neg_inf<A>();
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t cp = lane + 32 * i;
    g[i] = A(0);
    if (cp < C) {
      A dot = A(0), nrm = A(0);
      for (int64_t d = 0; d < D; ++d) {
        const A x = mu[cp * D + d];
        dot += w[d] * x;
        nrm += x * x;
      }
      g[i] = dot - A(0.5) * nrm;
      if (cp < na) mx = amax(mx, g[i]);
    }
  }
  mx = warp_max(mx);
  A s = A(0);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (lane + 32 * i < na) s += ex(g[i] - mx);
  s = warp_sum(s);
  const A rho = bcast(g, static_cast<int>(c));
  if (lane == 0) {
    const A ld = mx + lg(s);
    st[p.so.Z + row] = Z;
    st[p.so.rho + row] = rho;
    st[p.so.logden + row] = ld;
    if (p.optimal) {
      st[p.so.lam + row] = lam;
      st[p.so.bh + row] = ex(rho - ld);
      st[p.so.bias + row] = Z - rho;
    } else {
      st[p.so.bias + row] = Z - ld;
    }
  }
}

// ----------------------------------------------------------------------------- backward

template <typename A>
__global__ void __launch_bounds__(kThreads)
    bwd_sums_kernel(const FusedProblem p, const A* st, const Parts db, const Parts dkap, const Parts dlam,
                    const Parts dbh, A* sums, const int64_t block0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t rows = p.e.B * p.H * p.e.C, Dv = p.Dv;
  const int64_t row = (block0 + blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // no barrier in this kernel
  A dot = A(0);
  for (int64_t d = lane; d < Dv; d += 32) {
    const A g = part_sum<A>(dkap, rows, row, static_cast<int>(Dv), static_cast<int>(d));
    sums[4 * rows + row * Dv + d] = g;
    dot += g * st[p.so.kap + row * Dv + d];
  }
  dot = warp_sum(dot);
  if (lane == 0) {
    const A b = part_sum<A>(db, rows, row, 1, 0);
    sums[row] = b;
    sums[rows + row] = p.optimal ? part_sum<A>(dlam, rows, row, 1, 0) : A(0);
    sums[2 * rows + row] = p.optimal ? part_sum<A>(dbh, rows, row, 1, 0) : A(0);
    sums[3 * rows + row] = b - dot;  // E = dZ - dkap . kap of the key pass (dZ = dbias)
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    small_bwd_kernel(const FusedProblem p, const A* st, const A* sums, const Parts qdw, const Parts qdqt,
                     const Parts kdw, const Parts ndw, A* gq, A* gk, A* att, A* dmu_s, A* dA_s, const int64_t block0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t C = p.e.C, H = p.H, D = p.D, rows = p.e.B * H * C;
  // block (b, h, chunk of rows): nblk = 1 for mixed (its later phases need every row of
  // dmu), else one row per warp and cdiv(C, 8) blocks per (b, h)
  const int64_t nblk = p.proposal == kMixed ? 1 : cdiv(C, kWarps);
  const int64_t blk = block0 + blockIdx.x, bh = blk / nblk, chunk = blk % nblk, b = bh / H;
  const Elem el = elem_of(p.e, b);
  const int64_t na = el.nact;
  const A ss = static_cast<A>(p.ss);
  A* dld = smem_base<A>();  // [C] dlog_den
  A* drho = dld + C;        // [C]
  A* ld = drho + C;         // [C] log_den
  A* hn = ld + C;           // [C] |mu_c|^2 / 2
  const A* w = st + p.so.w + bh * C * D;
  const A* mu = st + p.so.mu + bh * C * D;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const int64_t row = bh * C + c;
    const A db = sums[row];
    if (p.optimal) {  // bias = Z - rho, bh = exp(rho - log_den)
      const A t = sums[2 * rows + row] * st[p.so.bh + row];
      drho[c] = t - db;
      dld[c] = -t;
    } else {  // bias = Z - log_den
      drho[c] = A(0);
      dld[c] = -db;
    }
    ld[c] = st[p.so.logden + row];
    A n = A(0);
    for (int64_t d = 0; d < D; ++d) n += mu[c * D + d] * mu[c * D + d];
    hn[c] = A(0.5) * n;
  }
  __syncthreads();

  // per row j: dg_jc = [c < na] dld_j softmax(g_j)_c + [c = j] drho_j (softmax = exp(g - log_den));
  // dw_j = dw1_j + dw3_j + sum_c dg_jc mu_c; dmu_j = dw_j + sum_c dg_cj w_c - (sum_c dg_cj) mu_j
  for (int64_t j = chunk * kWarps + warp; j < C; j += kWarps * nblk) {
    A dw[8], wa[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) dw[i] = wa[i] = A(0);
    A colsum = A(0);
    for (int64_t c0 = 0; c0 < C; c0 += 32) {
      const int64_t c = c0 + lane;
      A dgr = A(0), dgc = A(0);
      if (c < C) {
        A gjc = A(0), gcj = A(0);
        for (int64_t d = 0; d < D; ++d) {
          gjc += w[j * D + d] * mu[c * D + d];
          gcj += w[c * D + d] * mu[j * D + d];
        }
        gjc -= hn[c];
        gcj -= hn[j];
        dgr = (c < na ? dld[j] * ex(gjc - ld[j]) : A(0)) + (c == j ? drho[j] : A(0));
        dgc = (j < na ? dld[c] * ex(gcj - ld[c]) : A(0)) + (c == j ? drho[c] : A(0));
      }
      colsum += dgc;
      for (int src = 0; src < 32; ++src) {
        const A r = __shfl_sync(kFull, dgr, src);
        const A q = __shfl_sync(kFull, dgc, src);
        const int64_t cc = c0 + src;
        if (cc >= C) continue;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int64_t d = lane + 32 * i;
          if (d < D) {
            dw[i] += r * mu[cc * D + d];
            wa[i] += q * w[cc * D + d];
          }
        }
      }
    }
    colsum = warp_sum(colsum);
    const int64_t row = bh * C + j;
    A eatt = A(0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int d = lane + 32 * i;
      if (d >= D) continue;
      const A dwv = part_sum<A>(qdw, rows, row, static_cast<int>(D), d) + part_sum<A>(kdw, rows, row, static_cast<int>(D), d) + dw[i];
      const A dm = dwv - colsum * mu[j * D + d] + wa[i];
      A gv = dm;
      if (p.optimal) gv += part_sum<A>(qdqt, rows, row, static_cast<int>(D), d) + part_sum<A>(ndw, rows, row, static_cast<int>(D), d);
      gq[row * D + d] = ss * gv;
      if (p.proposal == kSegment) {
        gk[row * D + d] = ss * dm;
      } else if (p.proposal == kMixed) {
        dmu_s[row * D + d] = dm;
      } else {  // attend: the mean keys' incoming gradient dka = ss dmu, E = -dka . mean_k
        const A dka = ss * dm;
        att[rows + row * D + d] = dka;
        eatt -= dka * st[p.so.katt + row * D + d];
      }
    }
    if (p.proposal == kAttend) {
      eatt = warp_sum(eatt);
      if (lane == 0) att[row] = eatt;
    }
  }
  if (p.proposal != kMixed) return;  // the whole block

  // mixed: mu = qt + a kt, a = softmax(kt kt^T) over active c'
  __syncthreads();  // dmu of every row is written (global memory, visible to the block)
  const A* kt = st + p.so.kt + bh * C * D;
  const A* a = st + p.so.amix + bh * C * C;
  const A* dm = dmu_s + bh * C * D;
  A* dA = dA_s + bh * C * C;
  for (int64_t c = warp; c < C; c += kWarps) {  // da_c = dmu_c kt^T, dA_c = a_c (da_c - a_c . da_c)
    A da[8];
    A s = A(0);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t cp = lane + 32 * i;
      da[i] = A(0);
      if (cp < C) {
        A dot = A(0);
        for (int64_t d = 0; d < D; ++d) dot += dm[c * D + d] * kt[cp * D + d];
        da[i] = dot;
        s += a[c * C + cp] * dot;
      }
    }
    s = warp_sum(s);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t cp = lane + 32 * i;
      if (cp < C) dA[c * C + cp] = a[c * C + cp] * (da[i] - s);
    }
  }
  __syncthreads();  // dA of every row is written
  for (int64_t c = warp; c < C; c += kWarps) {  // dkt_c = sum_j a_jc dmu_j + sum_j dA_cj kt_j + sum_j dA_jc kt_j
    A acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = A(0);
    for (int64_t jj = 0; jj < C; ++jj) {
      const A f = a[jj * C + c];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) acc[i] += f * dm[jj * D + d];
      }
    }
    for (int64_t jj = 0; jj < C; ++jj) {
      const A f = dA[c * C + jj];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) acc[i] += f * kt[jj * D + d];
      }
    }
    for (int64_t jj = 0; jj < C; ++jj) {
      const A f = dA[jj * C + c];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) acc[i] += f * kt[jj * D + d];
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < D) gk[(bh * C + c) * D + d] = ss * acc[i];
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    bwd_attend_kernel(const FusedProblem p, const Parts adw, A* gq, const int64_t block0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t rows = p.e.B * p.H * p.e.C, D = p.D;
  const int64_t row = (block0 + blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // no barrier in this kernel
  const A ss = static_cast<A>(p.ss);
  for (int64_t d = lane; d < D; d += 32)
    gq[row * D + d] += ss * part_sum<A>(adw, rows, row, static_cast<int>(D), static_cast<int>(d));
}

// Regions of the final kernel's grid, in blocks: [0, r1) dq, [r1, r2) dk, [r2, r3) dqlm, [r3, r4) dklm.
struct Regions {
  int64_t r1 = 0, r2 = 0, r3 = 0, r4 = 0;
};

// The landmarks' backward at position n (of L) of element b: grad_c / |segment c| for the
// segment c of its rank, summed over `reps` consecutive heads of grad (B, H, C, D).
template <typename A>
__device__ __forceinline__ A lm_grad(const A* grad, const int32_t* rank, int64_t b, int64_t n, int64_t L,
                                     int64_t len, int64_t ce, int64_t h0, int64_t reps, int64_t H, int64_t C,
                                     int64_t D, int64_t d) {
  if (ce <= 0) return A(0);
  const int64_t r = rank != nullptr ? rank[b * L + n] : n;
  if (r < 0) return A(0);
  const int64_t c = r * ce / len;
  A g = A(0);
  for (int64_t k = 0; k < reps; ++k) g += grad[((b * H + h0 + k) * C + c) * D + d];
  return g / static_cast<A>(seg_start(c + 1, len, ce) - seg_start(c, len, ce));
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    final_kernel(const FusedProblem p, const FinalGrads f, const Regions rg, const int64_t block0) {
  const Elements& e = p.e;
  const int64_t blk = block0 + blockIdx.x;
  const int64_t D = p.D, C = e.C, H = p.H;
  const bool packed = e.cu_q != nullptr;
  if (blk < rg.r2) {  // dq or dk
    const bool side_k = blk >= rg.r1;
    const int64_t i = (blk - (side_k ? rg.r1 : 0)) * kThreads + threadIdx.x;
    const int64_t heads = side_k ? p.Hkv : H, L = side_k ? e.M : e.N;
    if (i >= e.B * heads * L * D) return;
    int64_t b, h, n, idx;
    const int64_t d = i % D;
    if (packed) {  // (b, position < max_seqlen, h, d), d fastest
      h = (i / D) % heads;
      n = (i / (D * heads)) % L;
      b = i / (D * heads * L);
      const int32_t* cu = side_k ? e.cu_k : e.cu_q;
      if (n >= static_cast<int64_t>(cu[b + 1]) - cu[b]) return;  // past the sequence's end
      idx = ((cu[b] + n) * heads + h) * D + d;
    } else {
      n = (i / D) % L;
      h = (i / (D * L)) % heads;
      b = i / (D * L * heads);
      idx = i;
    }
    const Elem el = elem_of(e, b);
    T* out = static_cast<T*>(side_k ? f.dk : f.dq);
    A v = to_acc<A>(out[idx]);
    if (!side_k) {
      if (f.dq2 != nullptr) v += to_acc<A>(static_cast<const T*>(f.dq2)[idx]);
      if (f.q_landmarks)
        v += lm_grad<A>(static_cast<const A*>(f.gq), e.rank_q, b, n, L, el.nq, el.ce, h, 1, H, C, D, d);
    } else {
      if (f.dk2 != nullptr) v += to_acc<A>(static_cast<const T*>(f.dk2)[idx]);
      if (f.dk3 != nullptr) v += to_acc<A>(static_cast<const T*>(f.dk3)[idx]);
      if (f.k_landmarks)
        v += lm_grad<A>(static_cast<const A*>(f.gk), e.rank_k, b, n, L, el.nk, el.ce, h * p.G, p.G, H, C, D, d);
    }
    out[idx] = from_acc<T>(v);
    return;
  }
  // the given landmarks' gradients (B, H, NS, D): gq / gk in rows c < C, 0 beyond and when dropped
  const bool side_k = blk >= rg.r3;
  const int64_t i = (blk - (side_k ? rg.r3 : rg.r2)) * kThreads + threadIdx.x;
  if (i >= e.B * H * p.NS * D) return;
  const int64_t d = i % D, c = (i / D) % p.NS, bh = i / (D * p.NS), b = bh / H;
  const A* g = static_cast<const A*>(side_k ? f.gk : f.gq);
  const A v = (c < C && !elem_of(e, b).dropped) ? g[(bh * C + c) * D + d] : A(0);
  store_any<A>(side_k ? f.dklm : f.dqlm, side_k ? f.klm_dtype : f.qlm_dtype, i, v);
}

// ----------------------------------------------------------------------------- launchers

template <typename Kernel, typename... Args>
cudaError_t run(Kernel kernel, int64_t blocks, size_t smem, cudaStream_t stream, Args... args) {
  if (blocks <= 0) return cudaSuccess;
  const DeviceInfo info = device_info();
  const cudaError_t err = prepare_launch(kernel, smem, info);
  if (err != cudaSuccess) return err;
  return launch_1d(blocks, info, [&](int64_t first, unsigned n) {
    kernel<<<n, kThreads, smem, stream>>>(args..., first);
  });
}

bool is64(const FusedProblem& p) { return p.dtype == DType::kFloat64; }

template <typename T>
cudaError_t landmarks_t(const FusedProblem& p, Long q, Long k, Small4 qlm, Small4 klm, Small4 eps, void* state,
                        cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const bool fuse = landmarks_fuse_proposal(p, klm.p != nullptr);
  const int64_t tasks = p.e.B * p.e.C * (p.H + (fuse ? 0 : (klm.p != nullptr ? p.H : p.Hkv)));
  return run(landmarks_kernel<T, A>, cdiv(tasks, kWarps), 0, stream, p, q, k, qlm, klm, eps, fuse,
             static_cast<A*>(state));
}

template <typename T>
cudaError_t final_t(const FusedProblem& p, const FinalGrads& f, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const Elements& e = p.e;
  const bool packed = e.cu_q != nullptr;
  (void)packed;
  Regions rg;
  const bool do_q = f.dq2 != nullptr || f.q_landmarks;
  const bool do_k = f.dk2 != nullptr || f.dk3 != nullptr || f.k_landmarks;
  rg.r1 = do_q ? cdiv(e.B * p.H * e.N * p.D, kThreads) : 0;
  rg.r2 = rg.r1 + (do_k ? cdiv(e.B * p.Hkv * e.M * p.D, kThreads) : 0);
  rg.r3 = rg.r2 + (f.dqlm != nullptr ? cdiv(e.B * p.H * p.NS * p.D, kThreads) : 0);
  rg.r4 = rg.r3 + (f.dklm != nullptr ? cdiv(e.B * p.H * p.NS * p.D, kThreads) : 0);
  return run(final_kernel<T, A>, rg.r4, 0, stream, p, f, rg);
}

}  // namespace

cudaError_t fused_prep(const FusedProblem& p, Mask qm, Mask km, int64_t* counts, int32_t* rank_q, int32_t* order_q,
                       int32_t* rank_k, int32_t* order_k, cudaStream_t stream) {
  return run(prep_kernel, p.e.B, kWarps * sizeof(int64_t), stream, p, qm, km, counts, rank_q, order_q, rank_k,
             order_k);
}

cudaError_t fused_landmarks(const FusedProblem& p, Long q, Long k, Small4 qlm, Small4 klm, Small4 eps, void* state,
                            cudaStream_t stream) {
  if (p.D > kMaxWidth) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat64: return landmarks_t<double>(p, q, k, qlm, klm, eps, state, stream);
    case DType::kFloat32: return landmarks_t<float>(p, q, k, qlm, klm, eps, state, stream);
    case DType::kFloat16: return landmarks_t<__half>(p, q, k, qlm, klm, eps, state, stream);
    case DType::kBFloat16: return landmarks_t<__nv_bfloat16>(p, q, k, qlm, klm, eps, state, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t fused_proposal(const FusedProblem& p, Small4 eps, Parts am, Parts al, Parts aacc, void* state,
                           cudaStream_t stream) {
  if (p.D > kMaxWidth || p.e.C > kMaxWidth) return cudaErrorInvalidValue;
  const int64_t blocks = cdiv(p.e.B * p.H * p.e.C, kWarps);
  if (is64(p)) return run(proposal_kernel<double>, blocks, 0, stream, p, eps, am, al, aacc, static_cast<double*>(state));
  return run(proposal_kernel<float>, blocks, 0, stream, p, eps, am, al, aacc, static_cast<float*>(state));
}

cudaError_t fused_weights(const FusedProblem& p, Parts km, Parts kl, Parts kacc, Parts nm, Parts nl, void* state,
                          cudaStream_t stream) {
  if (p.D > kMaxWidth || p.Dv > kMaxWidth || p.e.C > kMaxWidth) return cudaErrorInvalidValue;
  const int64_t blocks = cdiv(p.e.B * p.H * p.e.C, kWarps);
  if (is64(p)) return run(weights_kernel<double>, blocks, 0, stream, p, km, kl, kacc, nm, nl, static_cast<double*>(state));
  return run(weights_kernel<float>, blocks, 0, stream, p, km, kl, kacc, nm, nl, static_cast<float*>(state));
}

cudaError_t fused_bwd_sums(const FusedProblem& p, const void* state, Parts db, Parts dkap, Parts dlam, Parts dbh,
                           void* sums, cudaStream_t stream) {
  const int64_t blocks = cdiv(p.e.B * p.H * p.e.C, kWarps);
  if (is64(p))
    return run(bwd_sums_kernel<double>, blocks, 0, stream, p, static_cast<const double*>(state), db, dkap, dlam, dbh,
               static_cast<double*>(sums));
  return run(bwd_sums_kernel<float>, blocks, 0, stream, p, static_cast<const float*>(state), db, dkap, dlam, dbh,
             static_cast<float*>(sums));
}

cudaError_t fused_bwd_small(const FusedProblem& p, const void* state, const void* sums, Parts qdw, Parts qdqt,
                            Parts kdw, Parts ndw, void* gq, void* gk, void* att, void* dmu, void* dA,
                            cudaStream_t stream) {
  if (p.D > kMaxWidth || p.e.C > kMaxWidth) return cudaErrorInvalidValue;
  const int64_t blocks = p.e.B * p.H * (p.proposal == kMixed ? 1 : cdiv(p.e.C, kWarps));
  if (is64(p))
    return run(small_bwd_kernel<double>, blocks, 4 * p.e.C * sizeof(double), stream, p,
               static_cast<const double*>(state), static_cast<const double*>(sums), qdw, qdqt, kdw, ndw,
               static_cast<double*>(gq), static_cast<double*>(gk), static_cast<double*>(att),
               static_cast<double*>(dmu), static_cast<double*>(dA));
  return run(small_bwd_kernel<float>, blocks, 4 * p.e.C * sizeof(float), stream, p, static_cast<const float*>(state),
             static_cast<const float*>(sums), qdw, qdqt, kdw, ndw, static_cast<float*>(gq), static_cast<float*>(gk),
             static_cast<float*>(att), static_cast<float*>(dmu), static_cast<float*>(dA));
}

cudaError_t fused_bwd_attend(const FusedProblem& p, Parts adw, void* gq, cudaStream_t stream) {
  const int64_t blocks = cdiv(p.e.B * p.H * p.e.C, kWarps);
  if (is64(p)) return run(bwd_attend_kernel<double>, blocks, 0, stream, p, adw, static_cast<double*>(gq));
  return run(bwd_attend_kernel<float>, blocks, 0, stream, p, adw, static_cast<float*>(gq));
}

cudaError_t fused_final(const FusedProblem& p, const FinalGrads& f, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat64: return final_t<double>(p, f, stream);
    case DType::kFloat32: return final_t<float>(p, f, stream);
    case DType::kFloat16: return final_t<__half>(p, f, stream);
    case DType::kBFloat16: return final_t<__nv_bfloat16>(p, f, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lara
