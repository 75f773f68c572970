// Fused LARA passes on the CPU (formulas in docs/math.md; contract in lara_ops.h): the key pass
// (also the query normalizer, without values) and the query pass, forward and backward.
//
// Work is cut into tasks of (batch * head, chunk of the long axis) that at::parallel_for
// runs (OpenMP). The chunk length depends on the shapes only, never on the thread count,
// and per-chunk partials are reduced in chunk order, so results are bitwise reproducible
// for any number of threads. A task walks its chunk in tiles of tr rows (128, fewer when
// C, D or Dv exceed 256; tile_rows): rows are converted to the compute type (scaled by ss,
// padded rows zeroed), the tile's matrix products go to BLAS, and the elementwise work
// between them (exp, online softmax, MIS weights) runs on C x tr buffers that stay in
// cache, in loops compiled per ISA. No N x C or M x C tensor is allocated. Every buffer is
// sized by the problem, so D, Dv and C have no limit here (the BLAS sizes are int).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../lara_ops.h"
#include "cpu_math.h"

namespace lara {
namespace cpu {
namespace {

constexpr int64_t kTile = 128;       // rows per tile, at most: C x kTile logits of 32 KiB at C = 64 (float)
constexpr int64_t kMinTile = 16;     // rows per tile, at least (fewer: the per-call BLAS overhead dominates)
constexpr int64_t kTileElems = 256 * kTile;  // elements of one tile buffer (C, D or Dv wide), at most
constexpr int64_t kMinChunk = 512;   // rows per task, at least
constexpr int64_t kMaxChunks = 64;   // partial buffers per (batch, head), at most
constexpr double kAlphaFloor = 1e-8;

struct Chunking {
  int64_t len, count;
};

// Chunk lengths are multiples of kTile, so of every tile height below.
Chunking chunking(int64_t L) {
  const int64_t per = (L + kMaxChunks - 1) / kMaxChunks;
  const int64_t len = std::max(kMinChunk, (per + kTile - 1) / kTile * kTile);
  return {len, std::max<int64_t>(1, (L + len - 1) / len)};
}

// Rows per tile for tile buffers `width` = max(C, D, Dv) wide: kTile up to width 256, then
// halved (down to kMinTile) to keep each buffer within kTileElems, so that the working set
// of a task stays in cache for any D, Dv and C. Depends on the shapes only (determinism).
int64_t tile_rows(int64_t width) {
  int64_t tr = kTile;
  while (tr > kMinTile && tr * width > kTileElems) tr /= 2;
  return tr;
}

// ---------------------------------------------------------------------------------
// Elementwise kernels, one clone per ISA (cpu_math.h). `nb` is the per-column offset:
// |kh|^2 / 2 (or 0) for valid columns, +inf for padded ones.

template <typename T>
LARA_INLINE void key_fwd_tile_impl(T* lg, int64_t ld, int64_t C, int64_t nr, const T* nb, T* mrun, T* lrun,
                                   T* rescale) {
  for (int64_t c = 0; c < C; ++c) {
    T* row = lg + c * ld;
    T mx = kNegInf<T>;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < nr; ++j) {
      const T x = row[j] - nb[j];
      row[j] = x;
      mx = x > mx ? x : mx;
    }
    const T mnew = mrun[c] > mx ? mrun[c] : mx;
    if (mnew == kNegInf<T>) {  // no valid key yet in this row
      rescale[c] = T(1);
      for (int64_t j = 0; j < nr; ++j) row[j] = T(0);
      continue;
    }
    rescale[c] = vexp(mrun[c] - mnew);
    T s = T(0);
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < nr; ++j) {
      const T p = vexp(row[j] - mnew);
      row[j] = p;
      s += p;
    }
    lrun[c] = lrun[c] * rescale[c] + s;
    mrun[c] = mnew;
  }
}

// S = exp(l - Z) into s_out (when has_g), dl = S (g + E) into lg, colsum[j] = sum_c dl.
template <typename T>
LARA_INLINE void key_bwd_tile_impl(T* lg, const T* g, T* s_out, int64_t ld, int64_t C, int64_t nr, const T* nb,
                                   const T* Z, const T* E, T* colsum) {
  for (int64_t j = 0; j < nr; ++j) colsum[j] = T(0);
  for (int64_t c = 0; c < C; ++c) {
    T* row = lg + c * ld;
    const T z = Z[c], e = E[c];
    if (g != nullptr) {
      const T* grow = g + c * ld;
      T* srow = s_out + c * ld;
#pragma omp simd
      for (int64_t j = 0; j < nr; ++j) {
        const T s = vexp(row[j] - nb[j] - z);
        srow[j] = s;
        const T dl = s * (grow[j] + e);
        row[j] = dl;
        colsum[j] += dl;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < nr; ++j) {
        const T dl = vexp(row[j] - nb[j] - z) * e;
        row[j] = dl;
        colsum[j] += dl;
      }
    }
  }
}

// Query rows: s (nr x C) holds qh . w on entry and P = softmax_c(L) on exit; with the MIS
// term, t holds qh . qt on entry and r on exit, and alpha (unclamped) goes to a.
template <typename T>
LARA_INLINE void query_probs_impl(T* s, T* t, T* a, int64_t nr, int64_t C, int64_t ce, const T* bias,
                                  const T* lam, const T* bh, T beta) {
  const T floor = T(kAlphaFloor);
  for (int64_t n = 0; n < nr; ++n) {
    T* srow = s + n * C;
    T mx = kNegInf<T>;
#pragma omp simd reduction(max : mx)
    for (int64_t c = 0; c < ce; ++c) {
      const T x = srow[c] + bias[c];
      srow[c] = x;
      mx = x > mx ? x : mx;
    }
    T sum = T(0);
    if (t != nullptr) {
      T* trow = t + n * C;
      T* arow = a + n * C;
      T rsum = T(0);
#pragma omp simd reduction(+ : rsum)
      for (int64_t c = 0; c < ce; ++c) {
        const T r = vexp(trow[c] - lam[c]);
        trow[c] = r;
        rsum += r;
      }
      const T rbar = rsum / T(ce);
      // exp(L) = max(alpha, 1e-8) exp(s): alpha <= 1 + beta and the largest term is at
      // least 1e-8, so the product form needs no log and cannot overflow or vanish.
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < ce; ++c) {
        const T al = bh[c] + beta * (trow[c] - rbar);
        arow[c] = al;
        const T p = vexp(srow[c] - mx) * (al > floor ? al : floor);
        srow[c] = p;
        sum += p;
      }
      for (int64_t c = ce; c < C; ++c) trow[c] = arow[c] = T(0);
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < ce; ++c) {
        const T p = vexp(srow[c] - mx);
        srow[c] = p;
        sum += p;
      }
    }
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t c = 0; c < ce; ++c) srow[c] *= inv;
    for (int64_t c = ce; c < C; ++c) srow[c] = T(0);
  }
}

// Backward of the query rows. In: p = P, g = dy . kap, (r, a) as left by query_probs.
// Out: g = dL, and with MIS a = dalpha and r = dt; C-sized sums accumulated.
template <typename T>
LARA_INLINE void query_bwd_rows_impl(const T* p, T* g, T* r, T* a, int64_t nr, int64_t C, int64_t ce, T beta,
                                     T* dbias, T* dbh, T* dlam) {
  const T floor = T(kAlphaFloor);
  for (int64_t n = 0; n < nr; ++n) {
    const T* prow = p + n * C;
    T* grow = g + n * C;
    T delta = T(0);
#pragma omp simd reduction(+ : delta)
    for (int64_t c = 0; c < ce; ++c) delta += prow[c] * grow[c];
#pragma omp simd
    for (int64_t c = 0; c < ce; ++c) {
      const T dl = prow[c] * (grow[c] - delta);
      grow[c] = dl;
      dbias[c] += dl;
    }
    for (int64_t c = ce; c < C; ++c) grow[c] = T(0);
    if (r != nullptr) {
      T* rrow = r + n * C;
      T* arow = a + n * C;
      T dsum = T(0);
#pragma omp simd reduction(+ : dsum)
      for (int64_t c = 0; c < ce; ++c) {
        const T da = arow[c] > floor ? grow[c] / arow[c] : T(0);
        arow[c] = da;
        dsum += da;
      }
      const T mean = dsum / T(ce);
#pragma omp simd
      for (int64_t c = 0; c < ce; ++c) {
        dbh[c] += arow[c];
        const T dt = beta * (arow[c] - mean) * rrow[c];
        rrow[c] = dt;
        dlam[c] -= dt;
      }
      for (int64_t c = ce; c < C; ++c) rrow[c] = T(0);
    }
  }
}

#define LARA_DEFINE_CLONES(T)                                                                                   \
  LARA_CLONES void key_fwd_tile(T* lg, int64_t ld, int64_t C, int64_t nr, const T* nb, T* mrun, T* lrun,        \
                                T* rescale) {                                                                   \
    key_fwd_tile_impl<T>(lg, ld, C, nr, nb, mrun, lrun, rescale);                                               \
  }                                                                                                             \
  LARA_CLONES void key_bwd_tile(T* lg, const T* g, T* s_out, int64_t ld, int64_t C, int64_t nr, const T* nb,    \
                                const T* Z, const T* E, T* colsum) {                                            \
    key_bwd_tile_impl<T>(lg, g, s_out, ld, C, nr, nb, Z, E, colsum);                                            \
  }                                                                                                             \
  LARA_CLONES void query_probs(T* s, T* t, T* a, int64_t nr, int64_t C, int64_t ce, const T* bias,              \
                               const T* lam, const T* bh, T beta) {                                             \
    query_probs_impl<T>(s, t, a, nr, C, ce, bias, lam, bh, beta);                                               \
  }                                                                                                             \
  LARA_CLONES void query_bwd_rows(const T* p, T* g, T* r, T* a, int64_t nr, int64_t C, int64_t ce, T beta,      \
                                  T* dbias, T* dbh, T* dlam) {                                                  \
    query_bwd_rows_impl<T>(p, g, r, a, nr, C, ce, beta, dbias, dbh, dlam);                                      \
  }

LARA_DEFINE_CLONES(float)
LARA_DEFINE_CLONES(double)
#undef LARA_DEFINE_CLONES

// ---------------------------------------------------------------------------------
// Loads and stores between strided inputs/outputs and contiguous tiles.

// out (nr x D) = scale * x[r0 : r0 + nr] in T; rows with pad[r] set are 0 and never read.
template <typename S, typename T>
void load_rows(const S* x, int64_t s_row, int64_t s_col, int64_t r0, int64_t nr, int64_t D, T scale,
               const bool* pad, T* out) {
  for (int64_t i = 0; i < nr; ++i) {
    T* o = out + i * D;
    if (pad != nullptr && pad[r0 + i]) {
      std::fill(o, o + D, T(0));
      continue;
    }
    const S* src = x + (r0 + i) * s_row;
    if (s_col == 1) {
      for (int64_t d = 0; d < D; ++d) o[d] = scale * static_cast<T>(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = scale * static_cast<T>(src[d * s_col]);
    }
  }
}

// dst rows r0 .. r0 + nr of a contiguous (L x D) output = scale * tile, 0 where padded.
template <typename S, typename T>
void store_rows(const T* tile, int64_t r0, int64_t nr, int64_t D, T scale, const bool* pad, S* dst) {
  for (int64_t i = 0; i < nr; ++i) {
    S* o = dst + (r0 + i) * D;
    const bool zero = pad != nullptr && pad[r0 + i];
    const T* t = tile + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] = zero ? S(0) : static_cast<S>(scale * t[d]);
  }
}

// Column offsets of a key tile: |kh|^2 / 2 (or 0) where valid, +inf where padded.
template <typename T>
void column_offsets(const T* kh, int64_t nr, int64_t D, bool sub_norm, const bool* pad, int64_t r0, T* nb) {
  for (int64_t j = 0; j < nr; ++j) {
    if (pad != nullptr && pad[r0 + j]) {
      nb[j] = std::numeric_limits<T>::infinity();
      continue;
    }
    T s = T(0);
    if (sub_norm) {
      const T* row = kh + j * D;
      for (int64_t d = 0; d < D; ++d) s += row[d] * row[d];
    }
    nb[j] = T(0.5) * s;
  }
}

// out[i] = sum over chunks s of part[s][i], in chunk order (deterministic).
template <typename T>
void reduce_chunks(const T* part, int64_t count, int64_t size, T* out) {
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = part[i];
    for (int64_t s = 1; s < count; ++s) {
      const T* p = part + s * size;
      for (int64_t i = begin; i < end; ++i) out[i] += p[i];
    }
  });
}

// Scratch of n elements: zeros, or NaN in test mode (lara_ops.h), so that a tile or a
// partial read before it is written shows up. Allocated through torch's allocator so
// that memory profiles (lara-bench, bench/efficiency.py) count it.
template <typename T>
struct Scratch {
  at::Tensor t;
  T* p;
  T* data() { return p; }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
};

template <typename T>
Scratch<T> scratch(int64_t n) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor t = poison_outputs() ? new_output({n}, opts) : at::zeros({n}, opts);
  return {t, t.data_ptr<T>()};
}

const bool* padding_rows(const at::Tensor& pad, int64_t b) {
  return pad.defined() ? pad.data_ptr<bool>() + b * pad.size(1) : nullptr;
}

// ---------------------------------------------------------------------------------
// The tile computations that a forward does and its backward redoes (recomputation must
// be the same arithmetic, so both call these).

// Key tile m0 .. m0 + nr of one (b, h): kh = ss k rows (padded rows 0), nb = column
// offsets, lg (C x nr, leading dim tr) = w kh^T.
template <typename S, typename T>
void key_tile_logits(const at::Tensor& k, const S* kbh, const bool* prow, int64_t m0, int64_t nr, int64_t tr,
                     T ss, bool sub_norm, const T* wbh, int64_t C, T* kh, T* nb, T* lg) {
  const int64_t D = k.size(3);
  load_rows(kbh, k.stride(2), k.stride(3), m0, nr, D, ss, prow, kh);
  column_offsets(kh, nr, D, sub_norm, prow, m0, nb);
  gemm(false, true, C, nr, D, T(1), wbh, D, kh, D, T(0), lg, tr);
}

struct QueryArgs {
  at::Tensor q, w, bias, kap, c_eff, pad, qt, lam, bh;
  bool mis;
};

// Query tile n0 .. n0 + nr of (b, h) = (bh / H, bh % H): qh = ss q rows (padded rows 0)
// and p (nr x C) = softmax_c(L); with the MIS term also r and alpha (see query_probs).
template <typename S, typename T>
void query_tile_probs(const QueryArgs& a, int64_t bh, const bool* prow, int64_t n0, int64_t nr, T ss, T beta,
                      T* qh, T* p, T* r, T* al) {
  const at::Tensor& q = a.q;
  const int64_t H = q.size(1), D = q.size(3), C = a.w.size(2), b = bh / H, h = bh % H;
  const S* qbh = q.data_ptr<S>() + b * q.stride(0) + h * q.stride(1);
  load_rows(qbh, q.stride(2), q.stride(3), n0, nr, D, ss, prow, qh);
  gemm(false, true, nr, C, D, T(1), qh, D, a.w.data_ptr<T>() + bh * C * D, D, T(0), p, C);
  if (a.mis) gemm(false, true, nr, C, D, T(1), qh, D, a.qt.data_ptr<T>() + bh * C * D, D, T(0), r, C);
  query_probs(p, a.mis ? r : nullptr, a.mis ? al : nullptr, nr, C, a.c_eff.data_ptr<int64_t>()[b],
              a.bias.data_ptr<T>() + bh * C, a.mis ? a.lam.data_ptr<T>() + bh * C : nullptr,
              a.mis ? a.bh.data_ptr<T>() + bh * C : nullptr, beta);
}

// ---------------------------------------------------------------------------------
// Key pass

template <typename S, typename T>
void key_fwd_impl(const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pad, T ss,
                  bool sub_norm, at::Tensor& Z, at::Tensor& kap) {
  const int64_t B = k.size(0), H = k.size(1), M = k.size(2), D = k.size(3), C = w.size(2);
  const bool has_v = v.defined();
  const int64_t DV = has_v ? v.size(3) : 0;
  const Chunking ch = chunking(M);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t BH = B * H;
  // partial (running max, sum, unnormalized acc) per (chunk, b*h)
  auto m_part = scratch<T>(ch.count * BH * C);
  auto l_part = scratch<T>(ch.count * BH * C);
  auto acc_part = scratch<T>(ch.count * BH * C * DV);
  const S* kp = k.data_ptr<S>();
  const S* vp = has_v ? v.data_ptr<S>() : nullptr;
  const T* wp = w.data_ptr<T>();

  at::parallel_for(0, BH * ch.count, 1, [&](int64_t begin, int64_t end) {
    auto kh = scratch<T>(tr * D);
    auto vt = scratch<T>(tr * std::max<int64_t>(DV, 1));
    auto lg = scratch<T>(C * tr);
    auto nb = scratch<T>(tr);
    auto resc = scratch<T>(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / ch.count, s = task % ch.count, b = bh / H, h = bh % H;
      const int64_t idx = s * BH + bh;
      T* mrun = m_part.data() + idx * C;
      T* lrun = l_part.data() + idx * C;
      T* acc = acc_part.data() + idx * C * DV;
      std::fill(mrun, mrun + C, kNegInf<T>);
      std::fill(lrun, lrun + C, T(0));
      std::fill(acc, acc + C * DV, T(0));
      const T* wbh = wp + bh * C * D;
      const S* kbh = kp + b * k.stride(0) + h * k.stride(1);
      const S* vbh = has_v ? vp + b * v.stride(0) + h * v.stride(1) : nullptr;
      const bool* prow = padding_rows(pad, b);
      const int64_t m_end = std::min(M, (s + 1) * ch.len);
      for (int64_t m0 = s * ch.len; m0 < m_end; m0 += tr) {
        const int64_t nr = std::min(tr, m_end - m0);
        key_tile_logits(k, kbh, prow, m0, nr, tr, ss, sub_norm, wbh, C, kh.data(), nb.data(), lg.data());
        key_fwd_tile(lg.data(), tr, C, nr, nb.data(), mrun, lrun, resc.data());
        if (has_v) {
          load_rows(vbh, v.stride(2), v.stride(3), m0, nr, DV, T(1), prow, vt.data());
          for (int64_t c = 0; c < C; ++c)
            for (int64_t d = 0; d < DV; ++d) acc[c * DV + d] *= resc[c];
          gemm(false, false, C, DV, nr, T(1), lg.data(), tr, vt.data(), DV, T(1), acc, DV);
        }
      }
    }
  });

  // combine the chunks: Z = mx + log(sum_s e_s l_s), kap = sum_s e_s acc_s / sum_s e_s l_s
  T* Zp = Z.data_ptr<T>();
  T* kapp = has_v ? kap.data_ptr<T>() : nullptr;
  at::parallel_for(0, BH * C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T mx = kNegInf<T>;
      for (int64_t s = 0; s < ch.count; ++s) mx = std::max(mx, m_part[s * BH * C + i]);
      if (mx == kNegInf<T>) {  // no valid key (the caller guarantees one; stay finite)
        Zp[i] = kNegInf<T>;
        if (has_v) std::fill(kapp + i * DV, kapp + (i + 1) * DV, T(0));
        continue;
      }
      T total = T(0);
      if (has_v) std::fill(kapp + i * DV, kapp + (i + 1) * DV, T(0));
      for (int64_t s = 0; s < ch.count; ++s) {
        const T e = std::exp(m_part[s * BH * C + i] - mx);
        total += e * l_part[s * BH * C + i];
        if (has_v) {
          const T* a = acc_part.data() + (s * BH * C + i) * DV;
          for (int64_t d = 0; d < DV; ++d) kapp[i * DV + d] += e * a[d];
        }
      }
      Zp[i] = mx + std::log(total);
      if (has_v)
        for (int64_t d = 0; d < DV; ++d) kapp[i * DV + d] /= total;
    }
  });
}

template <typename S, typename T>
void key_bwd_impl(const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pad, T ss,
                  bool sub_norm, const at::Tensor& Z, const at::Tensor& kap, const at::Tensor& dZ,
                  const at::Tensor& dkap, at::Tensor& dw, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = k.size(0), H = k.size(1), M = k.size(2), D = k.size(3), C = w.size(2);
  const bool has_v = v.defined();
  const int64_t DV = has_v ? v.size(3) : 0;
  const Chunking ch = chunking(M);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t BH = B * H;
  auto dw_part = scratch<T>(ch.count * BH * C * D);
  // E_c = dZ_c - dkap_c . kap_c
  auto E = scratch<T>(BH * C);
  const T* dZp = dZ.data_ptr<T>();
  const T* kapp = has_v ? kap.data_ptr<T>() : nullptr;
  const T* dkapp = has_v ? dkap.data_ptr<T>() : nullptr;
  for (int64_t i = 0; i < BH * C; ++i) {
    T e = dZp[i];
    for (int64_t d = 0; d < DV; ++d) e -= dkapp[i * DV + d] * kapp[i * DV + d];
    E[i] = e;
  }
  const S* kp = k.data_ptr<S>();
  const S* vp = has_v ? v.data_ptr<S>() : nullptr;
  const T* wp = w.data_ptr<T>();
  const T* Zp = Z.data_ptr<T>();
  S* dkp = dk.data_ptr<S>();
  S* dvp = has_v ? dv.data_ptr<S>() : nullptr;

  at::parallel_for(0, BH * ch.count, 1, [&](int64_t begin, int64_t end) {
    const int64_t DVa = std::max<int64_t>(DV, 1);
    auto kh = scratch<T>(tr * D);
    auto vt = scratch<T>(tr * DVa);
    auto lg = scratch<T>(C * tr);
    auto g = scratch<T>(has_v ? C * tr : 0);
    auto sm = scratch<T>(has_v ? C * tr : 0);
    auto nb = scratch<T>(tr);
    auto colsum = scratch<T>(tr);
    auto dkh = scratch<T>(tr * D);
    auto dvt = scratch<T>(tr * DVa);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / ch.count, s = task % ch.count, b = bh / H, h = bh % H;
      T* dwp = dw_part.data() + (s * BH + bh) * C * D;
      std::fill(dwp, dwp + C * D, T(0));
      const T* wbh = wp + bh * C * D;
      const T* dkbh = has_v ? dkapp + bh * C * DV : nullptr;
      const S* kbh = kp + b * k.stride(0) + h * k.stride(1);
      const S* vbh = has_v ? vp + b * v.stride(0) + h * v.stride(1) : nullptr;
      const bool* prow = padding_rows(pad, b);
      const int64_t m_end = std::min(M, (s + 1) * ch.len);
      for (int64_t m0 = s * ch.len; m0 < m_end; m0 += tr) {
        const int64_t nr = std::min(tr, m_end - m0);
        key_tile_logits(k, kbh, prow, m0, nr, tr, ss, sub_norm, wbh, C, kh.data(), nb.data(), lg.data());
        if (has_v) {
          load_rows(vbh, v.stride(2), v.stride(3), m0, nr, DV, T(1), prow, vt.data());
          gemm(false, true, C, nr, DV, T(1), dkbh, DV, vt.data(), DV, T(0), g.data(), tr);
        }
        key_bwd_tile(lg.data(), has_v ? g.data() : nullptr, has_v ? sm.data() : nullptr, tr, C, nr, nb.data(),
                     Zp + bh * C, E.data() + bh * C, colsum.data());
        // dkh = dl^T w - colsum * kh;  dw += dl kh;  dv = S^T dkap
        gemm(true, false, nr, D, C, T(1), lg.data(), tr, wbh, D, T(0), dkh.data(), D);
        if (sub_norm)
          for (int64_t j = 0; j < nr; ++j)
            for (int64_t d = 0; d < D; ++d) dkh[j * D + d] -= colsum[j] * kh[j * D + d];
        gemm(false, false, C, D, nr, T(1), lg.data(), tr, kh.data(), D, T(1), dwp, D);
        store_rows(dkh.data(), m0, nr, D, ss, prow, dkp + bh * M * D);
        if (has_v) {
          gemm(true, false, nr, DV, C, T(1), sm.data(), tr, dkbh, DV, T(0), dvt.data(), DV);
          store_rows(dvt.data(), m0, nr, DV, T(1), prow, dvp + bh * M * DV);
        }
      }
    }
  });
  reduce_chunks(dw_part.data(), ch.count, BH * C * D, dw.data_ptr<T>());
}

// ---------------------------------------------------------------------------------
// Query pass

template <typename S, typename T>
void query_fwd_impl(const QueryArgs& a, T ss, T beta, at::Tensor& y) {
  const at::Tensor& q = a.q;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), C = a.w.size(2), DV = a.kap.size(3);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t BH = B * H, ntiles = (N + tr - 1) / tr;
  const T* kapp = a.kap.data_ptr<T>();
  S* yp = y.data_ptr<S>();

  at::parallel_for(0, BH * ntiles, 1, [&](int64_t begin, int64_t end) {
    auto qh = scratch<T>(tr * D);
    auto sc = scratch<T>(tr * C);
    auto t = scratch<T>(a.mis ? tr * C : 0);
    auto al = scratch<T>(a.mis ? tr * C : 0);
    auto yt = scratch<T>(tr * DV);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / ntiles, n0 = (task % ntiles) * tr;
      const int64_t nr = std::min(tr, N - n0);
      const bool* prow = padding_rows(a.pad, bh / H);
      query_tile_probs<S, T>(a, bh, prow, n0, nr, ss, beta, qh.data(), sc.data(), t.data(), al.data());
      gemm(false, false, nr, DV, C, T(1), sc.data(), C, kapp + bh * C * DV, DV, T(0), yt.data(), DV);
      store_rows(yt.data(), n0, nr, DV, T(1), prow, yp + bh * N * DV);
    }
  });
}

template <typename S, typename T>
void query_bwd_impl(const QueryArgs& a, T ss, T beta, const at::Tensor& dy, at::Tensor& dq, at::Tensor& dw,
                    at::Tensor& dbias, at::Tensor& dkap, at::Tensor& dqt, at::Tensor& dlam, at::Tensor& dbh) {
  const at::Tensor& q = a.q;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), C = a.w.size(2), DV = a.kap.size(3);
  const int64_t BH = B * H;
  const Chunking ch = chunking(N);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const bool mis = a.mis;
  // per-chunk partials of the C-sized sums
  auto dw_part = scratch<T>(ch.count * BH * C * D);
  auto dkap_part = scratch<T>(ch.count * BH * C * DV);
  auto db_part = scratch<T>(ch.count * BH * C);
  auto dqt_part = scratch<T>(mis ? ch.count * BH * C * D : 0);
  auto dbh_part = scratch<T>(mis ? ch.count * BH * C : 0);
  auto dlam_part = scratch<T>(mis ? ch.count * BH * C : 0);
  const S* dyp = dy.data_ptr<S>();
  const T *wp = a.w.data_ptr<T>(), *kapp = a.kap.data_ptr<T>();
  const T* qtp = mis ? a.qt.data_ptr<T>() : nullptr;
  const int64_t* cep = a.c_eff.data_ptr<int64_t>();
  S* dqp = dq.data_ptr<S>();

  at::parallel_for(0, BH * ch.count, 1, [&](int64_t begin, int64_t end) {
    auto qh = scratch<T>(tr * D);
    auto dyt = scratch<T>(tr * DV);
    auto p = scratch<T>(tr * C);
    auto g = scratch<T>(tr * C);
    auto r = scratch<T>(mis ? tr * C : 0);
    auto al = scratch<T>(mis ? tr * C : 0);
    auto dqh = scratch<T>(tr * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / ch.count, s = task % ch.count, b = bh / H, h = bh % H;
      const int64_t idx = s * BH + bh, ce = cep[b];
      T* dwp = dw_part.data() + idx * C * D;
      T* dkp = dkap_part.data() + idx * C * DV;
      T* dbp = db_part.data() + idx * C;
      T* dqtp = mis ? dqt_part.data() + idx * C * D : nullptr;
      T* dbhp = mis ? dbh_part.data() + idx * C : nullptr;
      T* dlp = mis ? dlam_part.data() + idx * C : nullptr;
      std::fill(dwp, dwp + C * D, T(0));
      std::fill(dkp, dkp + C * DV, T(0));
      std::fill(dbp, dbp + C, T(0));
      if (mis) {
        std::fill(dqtp, dqtp + C * D, T(0));
        std::fill(dbhp, dbhp + C, T(0));
        std::fill(dlp, dlp + C, T(0));
      }
      const T* wbh = wp + bh * C * D;
      const T* kbh = kapp + bh * C * DV;
      const T* qtbh = mis ? qtp + bh * C * D : nullptr;
      const bool* prow = padding_rows(a.pad, b);
      const S* dybh = dyp + b * dy.stride(0) + h * dy.stride(1);
      const int64_t n_end = std::min(N, (s + 1) * ch.len);
      for (int64_t n0 = s * ch.len; n0 < n_end; n0 += tr) {
        const int64_t nr = std::min(tr, n_end - n0);
        query_tile_probs<S, T>(a, bh, prow, n0, nr, ss, beta, qh.data(), p.data(), r.data(), al.data());
        load_rows(dybh, dy.stride(2), dy.stride(3), n0, nr, DV, T(1), prow, dyt.data());
        gemm(false, true, nr, C, DV, T(1), dyt.data(), DV, kbh, DV, T(0), g.data(), C);
        query_bwd_rows(p.data(), g.data(), mis ? r.data() : nullptr, mis ? al.data() : nullptr, nr, C, ce, beta,
                       dbp, dbhp, dlp);
        // dkap += P^T dy;  dw += dL^T qh;  dqh = dL w [+ dt qt];  dqt += dt^T qh
        gemm(true, false, C, DV, nr, T(1), p.data(), C, dyt.data(), DV, T(1), dkp, DV);
        gemm(true, false, C, D, nr, T(1), g.data(), C, qh.data(), D, T(1), dwp, D);
        gemm(false, false, nr, D, C, T(1), g.data(), C, wbh, D, T(0), dqh.data(), D);
        if (mis) {
          gemm(false, false, nr, D, C, T(1), r.data(), C, qtbh, D, T(1), dqh.data(), D);
          gemm(true, false, C, D, nr, T(1), r.data(), C, qh.data(), D, T(1), dqtp, D);
        }
        store_rows(dqh.data(), n0, nr, D, ss, prow, dqp + bh * N * D);
      }
    }
  });
  reduce_chunks(dw_part.data(), ch.count, BH * C * D, dw.data_ptr<T>());
  reduce_chunks(dkap_part.data(), ch.count, BH * C * DV, dkap.data_ptr<T>());
  reduce_chunks(db_part.data(), ch.count, BH * C, dbias.data_ptr<T>());
  if (mis) {
    reduce_chunks(dqt_part.data(), ch.count, BH * C * D, dqt.data_ptr<T>());
    reduce_chunks(dbh_part.data(), ch.count, BH * C, dbh.data_ptr<T>());
    reduce_chunks(dlam_part.data(), ch.count, BH * C, dlam.data_ptr<T>());
  }
}

at::Tensor padding_or_undefined(const OptTensor& padding) {
  return padding.has_value() ? padding->contiguous() : at::Tensor();
}

QueryArgs query_args(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap, const Tensor& c_eff,
                     const OptTensor& padding, const OptTensor& qt, const OptTensor& lam, const OptTensor& bh) {
  const bool mis = qt.has_value();
  const auto ce = c_eff.contiguous();
  const int64_t C = w.size(2);
  TORCH_CHECK(ce.numel() == 0 || (ce.min().item<int64_t>() >= 0 && ce.max().item<int64_t>() <= C),
              "lara_kernels::query_pass: c_eff must lie in [0, ", C, "], got ", c_eff);
  return {q, w, bias, kap, ce, padding_or_undefined(padding), mis ? *qt : at::Tensor(),
          mis ? *lam : at::Tensor(), mis ? *bh : at::Tensor(), mis};
}

}  // namespace
}  // namespace cpu

// ---------------------------------------------------------------------------------
// Entry points (registered in lara_ops.cpp)

std::tuple<Tensor, Tensor> key_pass_fwd_cpu(const Tensor& w, const Tensor& k, const OptTensor& v,
                                            const OptTensor& padding, double ss, bool subtract_norm,
                                            const OptTensor& cu_seqlens, int64_t max_seqlen) {
  check_key_pass_args("lara_kernels::key_pass_fwd", w, k, v, padding, cu_seqlens, max_seqlen);
  TORCH_CHECK(!cu_seqlens.has_value(), "lara_kernels::key_pass_fwd (CPU): cu_seqlens (the packed layout) is not implemented yet");
  const int64_t B = k.size(0), H = k.size(1), C = w.size(2);
  const int64_t DV = v.has_value() ? v->size(3) : 0;
  const auto opts = w.options();
  Tensor Z = new_output({B, H, C}, opts), kap = new_output({B, H, C, DV}, opts);
  const Tensor vt = v.has_value() ? *v : Tensor();
  const Tensor pad = cpu::padding_or_undefined(padding);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "key_pass_fwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::key_fwd_impl<scalar_t, T>(w, k, vt, pad, T(ss), subtract_norm, Z, kap);
  });
  return {Z, kap};
}

std::tuple<Tensor, Tensor, Tensor> key_pass_bwd_cpu(const Tensor& w, const Tensor& k, const OptTensor& v,
                                                    const OptTensor& padding, double ss, bool subtract_norm,
                                                    const Tensor& Z, const OptTensor& kap, const Tensor& dZ,
                                                    const OptTensor& dkap, const OptTensor& cu_seqlens,
                                                    int64_t max_seqlen) {
  const char* op = "lara_kernels::key_pass_bwd";
  check_key_pass_args(op, w, k, v, padding, cu_seqlens, max_seqlen);
  TORCH_CHECK(!cu_seqlens.has_value(), op, " (CPU): cu_seqlens (the packed layout) is not implemented yet");
  const int64_t B = k.size(0), H = k.size(1), M = k.size(2), D = k.size(3), C = w.size(2);
  const auto ct = w.scalar_type();
  TORCH_CHECK(Z.sizes() == at::IntArrayRef({B, H, C}) && Z.scalar_type() == ct && Z.is_contiguous(), op,
              ": Z must be contiguous ", ct, " of shape (", B, ", ", H, ", ", C, "), got ", Z.scalar_type(), " ",
              Z.sizes());
  TORCH_CHECK(dZ.sizes() == Z.sizes() && dZ.scalar_type() == ct && dZ.is_contiguous(), op,
              ": dZ must be contiguous ", ct, " of Z's shape, got ", dZ.scalar_type(), " ", dZ.sizes());
  Tensor vt, kapt, dkapt;
  if (v.has_value()) {
    vt = *v;
    const int64_t DV = v->size(3);
    TORCH_CHECK(kap.has_value() && dkap.has_value(), op, ": kap and dkap are required with v");
    for (const auto* t : {&*kap, &*dkap})
      TORCH_CHECK(t->sizes() == at::IntArrayRef({B, H, C, DV}) && t->scalar_type() == ct && t->is_contiguous(),
                  op, ": kap and dkap must be contiguous ", ct, " of shape (", B, ", ", H, ", ", C, ", ", DV,
                  "), got ", t->scalar_type(), " ", t->sizes());
    kapt = *kap;
    dkapt = *dkap;
  }
  Tensor dw = new_output({B, H, C, D}, w.options());
  Tensor dk = new_output({B, H, M, D}, k.options());
  Tensor dv = v.has_value() ? new_output({B, H, M, v->size(3)}, v->options())
                            : new_output({0}, k.options());
  const Tensor pad = cpu::padding_or_undefined(padding);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "key_pass_bwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::key_bwd_impl<scalar_t, T>(w, k, vt, pad, T(ss), subtract_norm, Z, kapt, dZ, dkapt, dw, dk, dv);
  });
  return {dw, dk, dv};
}

Tensor query_pass_fwd_cpu(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap,
                          const Tensor& c_eff, const OptTensor& padding, double ss, const OptTensor& qt,
                          const OptTensor& lam, const OptTensor& bh, double beta, const OptTensor& cu_seqlens,
                          int64_t max_seqlen) {
  check_query_pass_args("lara_kernels::query_pass_fwd", q, w, bias, kap, c_eff, padding, qt, lam, bh, cu_seqlens,
                        max_seqlen);
  TORCH_CHECK(!cu_seqlens.has_value(), "lara_kernels::query_pass_fwd (CPU): cu_seqlens (the packed layout) is not implemented yet");
  const auto a = cpu::query_args(q, w, bias, kap, c_eff, padding, qt, lam, bh);
  Tensor y = new_output({q.size(0), q.size(1), q.size(2), kap.size(3)},
                       q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_pass_fwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::query_fwd_impl<scalar_t, T>(a, T(ss), T(beta), y);
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> query_pass_bwd_cpu(
    const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap, const Tensor& c_eff,
    const OptTensor& padding, double ss, const OptTensor& qt, const OptTensor& lam, const OptTensor& bh,
    double beta, const Tensor& dy, const OptTensor& cu_seqlens, int64_t max_seqlen) {
  const char* op = "lara_kernels::query_pass_bwd";
  check_query_pass_args(op, q, w, bias, kap, c_eff, padding, qt, lam, bh, cu_seqlens, max_seqlen);
  TORCH_CHECK(!cu_seqlens.has_value(), op, " (CPU): cu_seqlens (the packed layout) is not implemented yet");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), C = w.size(2), DV = kap.size(3);
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({B, H, N, DV}) && dy.scalar_type() == q.scalar_type(), op,
              ": dy must be ", q.scalar_type(), " of shape (", B, ", ", H, ", ", N, ", ", DV, "), got ",
              dy.scalar_type(), " ", dy.sizes());
  TORCH_CHECK(dy.device() == q.device(), op, ": dy is on ", dy.device(), " but q is on ", q.device());
  const auto a = cpu::query_args(q, w, bias, kap, c_eff, padding, qt, lam, bh);
  const auto opts = w.options();
  Tensor dq = new_output({B, H, N, D}, q.options());
  Tensor dw = new_output({B, H, C, D}, opts), dbias = new_output({B, H, C}, opts),
         dkap = new_output({B, H, C, DV}, opts);
  Tensor dqt = a.mis ? new_output({B, H, C, D}, opts) : new_output({0}, opts);
  Tensor dlam = a.mis ? new_output({B, H, C}, opts) : new_output({0}, opts);
  Tensor dbh = a.mis ? new_output({B, H, C}, opts) : new_output({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_pass_bwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::query_bwd_impl<scalar_t, T>(a, T(ss), T(beta), dy, dq, dw, dbias, dkap, dqt, dlam, dbh);
  });
  return {dq, dw, dbias, dkap, dqt, dlam, dbh};
}

}  // namespace lara
