// Fused LARA passes on the CPU (formulas in docs/math.md; contract in lara_ops.h): the key pass
// (also the query normalizer, without values) and the query pass, forward and backward.
//
// Work is cut into tasks of (sequence b, head h, chunk of b's rows) that at::parallel_for
// runs (OpenMP). In the padded layout every element has L rows (padded ones masked); in
// the packed layout (cu_seqlens) sequence b is rows cu[b] .. cu[b + 1] - 1 of the (T, H, D)
// tensors, read and written in place through the offsets (seqs.h): no padded copy, and
// no task covers a row that does not exist. The chunk length depends on the sequence's
// length only, never on the thread count, and per-chunk partials are reduced in chunk
// order, so results are bitwise reproducible for any number of threads. A task walks its
// chunk in tiles of tr rows (128, fewer when C, D or Dv exceed 256; tile_rows): rows are
// converted to the compute type (scaled by ss, padded rows zeroed), the tile's matrix
// products go to BLAS, and the elementwise work between them (exp, online softmax, MIS
// weights) runs on C x tr buffers that stay in cache, in loops compiled per ISA. No
// N x C or M x C tensor is allocated. Every buffer is sized by the problem, so D, Dv and
// C have no limit here (the BLAS sizes are int); the key pass takes any number of rows C
// in w (grouped-query attention passes G * C rows per key/value head).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../lara_ops.h"
#include "cpu_math.h"
#include "seqs.h"

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

template <typename S, typename T>
void load_rows(const Seqs::In<S>& x, int64_t r0, int64_t nr, int64_t D, T scale, const bool* pad, T* out) {
  load_rows(x.p, x.s_row, x.s_col, r0, nr, D, scale, pad, out);
}

// rows r0 .. r0 + nr of an output whose rows are ld apart (dst: row 0) = scale * tile
// (nr x D), 0 where padded.
template <typename S, typename T>
void store_rows(const T* tile, int64_t r0, int64_t nr, int64_t D, T scale, const bool* pad, S* dst, int64_t ld) {
  for (int64_t i = 0; i < nr; ++i) {
    S* o = dst + (r0 + i) * ld;
    const bool zero = pad != nullptr && pad[r0 + i];
    const T* t = tile + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] = zero ? S(0) : static_cast<S>(scale * t[d]);
  }
}

// rows r0 .. r0 + nr of an output whose rows are ld apart = 0.
template <typename S>
void zero_rows(int64_t r0, int64_t nr, int64_t D, S* dst, int64_t ld) {
  for (int64_t i = 0; i < nr; ++i) std::fill(dst + (r0 + i) * ld, dst + (r0 + i) * ld + D, S(0));
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

// out (B, H, size) = per (b, h), the sum of the partials (size each) of b's chunks for
// head h, in chunk order (deterministic); 0 for an element without chunks. Partial t is
// that of task t (Chunks).
template <typename T>
void reduce_chunks(const T* part, const Chunks& ch, int64_t H, int64_t size, T* out) {
  const int64_t B = int64_t(ch.first.size()) - 1;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      T* o = out + bh * size;
      if (ch.count(b) == 0) {
        std::fill(o, o + size, T(0));
        continue;
      }
      const T* p0 = part + (ch.first[b] * H + h) * size;
      std::copy(p0, p0 + size, o);
      for (int64_t g = ch.first[b] + 1; g < ch.first[b + 1]; ++g) {
        const T* p = part + (g * H + h) * size;
        for (int64_t i = 0; i < size; ++i) o[i] += p[i];
      }
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

// Chunks of the chunked passes (key pass, query backward): chunking(L_b) of each
// sequence, at least one per element (even empty: its task sets the partials of a
// sequence without rows, and reads none).
Chunks row_chunks(const Seqs& sq) {
  return make_chunks(sq.B, [&](int64_t b) { return chunking(sq.len(b)).count; });
}

// ---------------------------------------------------------------------------------
// The tile computations that a forward does and its backward redoes (recomputation must
// be the same arithmetic, so both call these).

// Key tile m0 .. m0 + nr of one (b, h) (k: its row 0): kh = ss k rows (padded rows 0),
// nb = column offsets, lg (C x nr, leading dim tr) = w kh^T.
template <typename S, typename T>
void key_tile_logits(const Seqs::In<S>& k, const bool* prow, int64_t m0, int64_t nr, int64_t tr, int64_t D, T ss,
                     bool sub_norm, const T* wbh, int64_t C, T* kh, T* nb, T* lg) {
  load_rows(k, m0, nr, D, ss, prow, kh);
  column_offsets(kh, nr, D, sub_norm, prow, m0, nb);
  gemm(false, true, C, nr, D, T(1), wbh, D, kh, D, T(0), lg, tr);
}

struct QueryArgs {
  at::Tensor q, w, bias, kap, c_eff, qt, lam, bh;
  bool mis;
};

// Query tile n0 .. n0 + nr of (b, h): qh = ss q rows (padded rows 0) and p (nr x C) =
// softmax_c(L); with the MIS term also r and alpha (see query_probs). c_eff[b] >= 1.
template <typename S, typename T>
void query_tile_probs(const QueryArgs& a, const Seqs& sq, int64_t b, int64_t h, int64_t n0, int64_t nr, T ss,
                      T beta, T* qh, T* p, T* r, T* al) {
  const int64_t D = a.q.size(-1), C = a.w.size(2), bh = b * sq.H + h;
  load_rows(sq.in<S>(a.q, b, h), n0, nr, D, ss, sq.pad_rows(b), qh);
  gemm(false, true, nr, C, D, T(1), qh, D, a.w.data_ptr<T>() + bh * C * D, D, T(0), p, C);
  if (a.mis) gemm(false, true, nr, C, D, T(1), qh, D, a.qt.data_ptr<T>() + bh * C * D, D, T(0), r, C);
  query_probs(p, a.mis ? r : nullptr, a.mis ? al : nullptr, nr, C, a.c_eff.data_ptr<int64_t>()[b],
              a.bias.data_ptr<T>() + bh * C, a.mis ? a.lam.data_ptr<T>() + bh * C : nullptr,
              a.mis ? a.bh.data_ptr<T>() + bh * C : nullptr, beta);
}

// ---------------------------------------------------------------------------------
// Key pass: tasks (sequence b, head h, chunk s of b's keys); each keeps the running
// (max, sum, accumulator) of its chunk as a partial, combined per (b, h) in chunk order.

template <typename S, typename T>
void key_fwd_impl(const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                  bool sub_norm, at::Tensor& Z, at::Tensor& kap) {
  const int64_t H = sq.H, D = k.size(-1), C = w.size(2);
  const bool has_v = v.defined();
  const int64_t DV = has_v ? v.size(-1) : 0;
  const Chunks ch = row_chunks(sq);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t ntask = ch.total() * H;
  // partial (running max, sum, unnormalized acc) per task
  auto m_part = scratch<T>(ntask * C);
  auto l_part = scratch<T>(ntask * C);
  auto acc_part = scratch<T>(ntask * C * DV);
  const T* wp = w.data_ptr<T>();

  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    auto kh = scratch<T>(tr * D);
    auto vt = scratch<T>(tr * std::max<int64_t>(DV, 1));
    auto lg = scratch<T>(C * tr);
    auto nb = scratch<T>(tr);
    auto resc = scratch<T>(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / H, h = task % H, b = ch.owner[g], s = g - ch.first[b];
      T* mrun = m_part.data() + task * C;
      T* lrun = l_part.data() + task * C;
      T* acc = acc_part.data() + task * C * DV;
      std::fill(mrun, mrun + C, kNegInf<T>);
      std::fill(lrun, lrun + C, T(0));
      std::fill(acc, acc + C * DV, T(0));
      const T* wbh = wp + (b * H + h) * C * D;
      const auto kr = sq.in<S>(k, b, h);
      const auto vr = has_v ? sq.in<S>(v, b, h) : Seqs::In<S>{nullptr, 0, 0};
      const bool* prow = sq.pad_rows(b);
      const int64_t len = sq.len(b), clen = chunking(len).len;
      const int64_t m_end = std::min(len, (s + 1) * clen);
      for (int64_t m0 = s * clen; m0 < m_end; m0 += tr) {
        const int64_t nr = std::min(tr, m_end - m0);
        key_tile_logits(kr, prow, m0, nr, tr, D, ss, sub_norm, wbh, C, kh.data(), nb.data(), lg.data());
        key_fwd_tile(lg.data(), tr, C, nr, nb.data(), mrun, lrun, resc.data());
        if (has_v) {
          load_rows(vr, m0, nr, DV, T(1), prow, vt.data());
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
  at::parallel_for(0, sq.B * H * C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / C, c = i % C, b = bh / H, h = bh % H;
      const int64_t g0 = ch.first[b], g1 = ch.first[b + 1];
      T mx = kNegInf<T>;
      for (int64_t g = g0; g < g1; ++g) mx = std::max(mx, m_part[(g * H + h) * C + c]);
      if (mx == kNegInf<T>) {  // no key (a sequence without keys, or all padded): Z = -inf, kap = 0
        Zp[i] = kNegInf<T>;
        if (has_v) std::fill(kapp + i * DV, kapp + (i + 1) * DV, T(0));
        continue;
      }
      T total = T(0);
      if (has_v) std::fill(kapp + i * DV, kapp + (i + 1) * DV, T(0));
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t pi = (g * H + h) * C + c;
        const T e = std::exp(m_part[pi] - mx);
        total += e * l_part[pi];
        if (has_v) {
          const T* a = acc_part.data() + pi * DV;
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
void key_bwd_impl(const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                  bool sub_norm, const at::Tensor& Z, const at::Tensor& kap, const at::Tensor& dZ,
                  const at::Tensor& dkap, at::Tensor& dw, at::Tensor& dk, at::Tensor& dv) {
  const int64_t H = sq.H, D = k.size(-1), C = w.size(2);
  const bool has_v = v.defined();
  const int64_t DV = has_v ? v.size(-1) : 0;
  const Chunks ch = row_chunks(sq);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t BH = sq.B * H, ntask = ch.total() * H;
  auto dw_part = scratch<T>(ntask * C * D);
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
  const T* wp = w.data_ptr<T>();
  const T* Zp = Z.data_ptr<T>();
  S* dkp = dk.data_ptr<S>();
  S* dvp = has_v ? dv.data_ptr<S>() : nullptr;

  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
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
      const int64_t gi = task / H, h = task % H, b = ch.owner[gi], s = gi - ch.first[b], bh = b * H + h;
      T* dwp = dw_part.data() + task * C * D;
      std::fill(dwp, dwp + C * D, T(0));
      const T* wbh = wp + bh * C * D;
      const T* dkbh = has_v ? dkapp + bh * C * DV : nullptr;
      const auto kr = sq.in<S>(k, b, h);
      const auto vr = has_v ? sq.in<S>(v, b, h) : Seqs::In<S>{nullptr, 0, 0};
      int64_t ldk = 0, ldv = 0;
      S* dk_out = sq.out(dkp, D, b, h, ldk);
      S* dv_out = has_v ? sq.out(dvp, DV, b, h, ldv) : nullptr;
      const bool* prow = sq.pad_rows(b);
      const int64_t len = sq.len(b), clen = chunking(len).len;
      const int64_t m_end = std::min(len, (s + 1) * clen);
      for (int64_t m0 = s * clen; m0 < m_end; m0 += tr) {
        const int64_t nr = std::min(tr, m_end - m0);
        key_tile_logits(kr, prow, m0, nr, tr, D, ss, sub_norm, wbh, C, kh.data(), nb.data(), lg.data());
        if (has_v) {
          load_rows(vr, m0, nr, DV, T(1), prow, vt.data());
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
        store_rows(dkh.data(), m0, nr, D, ss, prow, dk_out, ldk);
        if (has_v) {
          gemm(true, false, nr, DV, C, T(1), sm.data(), tr, dkbh, DV, T(0), dvt.data(), DV);
          store_rows(dvt.data(), m0, nr, DV, T(1), prow, dv_out, ldv);
        }
      }
    }
  });
  reduce_chunks(dw_part.data(), ch, H, C * D, dw.data_ptr<T>());
}

// ---------------------------------------------------------------------------------
// Query pass: the forward's tasks are (sequence b, head h, tile of b's queries); the
// backward's are (b, h, chunk of b's queries), with per-task partials of the C-sized sums
// reduced per (b, h) in chunk order. Rows of an element with c_eff[b] = 0 (no active
// sample) get y = 0 and dq = 0 and add nothing.

template <typename S, typename T>
void query_fwd_impl(const QueryArgs& a, const Seqs& sq, T ss, T beta, at::Tensor& y) {
  const int64_t H = sq.H, D = a.q.size(-1), C = a.w.size(2), DV = a.kap.size(3);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const Chunks tiles = make_chunks(sq.B, [&](int64_t b) { return (sq.len(b) + tr - 1) / tr; });
  const T* kapp = a.kap.data_ptr<T>();
  const int64_t* cep = a.c_eff.data_ptr<int64_t>();
  S* yp = y.data_ptr<S>();

  at::parallel_for(0, tiles.total() * H, 1, [&](int64_t begin, int64_t end) {
    auto qh = scratch<T>(tr * D);
    auto sc = scratch<T>(tr * C);
    auto t = scratch<T>(a.mis ? tr * C : 0);
    auto al = scratch<T>(a.mis ? tr * C : 0);
    auto yt = scratch<T>(tr * DV);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / H, h = task % H, b = tiles.owner[g], bh = b * H + h;
      const int64_t n0 = (g - tiles.first[b]) * tr, nr = std::min(tr, sq.len(b) - n0);
      int64_t ld = 0;
      S* y_out = sq.out(yp, DV, b, h, ld);
      if (cep[b] == 0) {
        zero_rows(n0, nr, DV, y_out, ld);
        continue;
      }
      query_tile_probs<S, T>(a, sq, b, h, n0, nr, ss, beta, qh.data(), sc.data(), t.data(), al.data());
      gemm(false, false, nr, DV, C, T(1), sc.data(), C, kapp + bh * C * DV, DV, T(0), yt.data(), DV);
      store_rows(yt.data(), n0, nr, DV, T(1), sq.pad_rows(b), y_out, ld);
    }
  });
}

template <typename S, typename T>
void query_bwd_impl(const QueryArgs& a, const Seqs& sq, T ss, T beta, const at::Tensor& dy, at::Tensor& dq,
                    at::Tensor& dw, at::Tensor& dbias, at::Tensor& dkap, at::Tensor& dqt, at::Tensor& dlam,
                    at::Tensor& dbh) {
  const int64_t H = sq.H, D = a.q.size(-1), C = a.w.size(2), DV = a.kap.size(3);
  const Chunks ch = row_chunks(sq);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t ntask = ch.total() * H;
  const bool mis = a.mis;
  // per-task partials of the C-sized sums
  auto dw_part = scratch<T>(ntask * C * D);
  auto dkap_part = scratch<T>(ntask * C * DV);
  auto db_part = scratch<T>(ntask * C);
  auto dqt_part = scratch<T>(mis ? ntask * C * D : 0);
  auto dbh_part = scratch<T>(mis ? ntask * C : 0);
  auto dlam_part = scratch<T>(mis ? ntask * C : 0);
  const T *wp = a.w.data_ptr<T>(), *kapp = a.kap.data_ptr<T>();
  const T* qtp = mis ? a.qt.data_ptr<T>() : nullptr;
  const int64_t* cep = a.c_eff.data_ptr<int64_t>();
  S* dqp = dq.data_ptr<S>();

  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    auto qh = scratch<T>(tr * D);
    auto dyt = scratch<T>(tr * DV);
    auto p = scratch<T>(tr * C);
    auto g = scratch<T>(tr * C);
    auto r = scratch<T>(mis ? tr * C : 0);
    auto al = scratch<T>(mis ? tr * C : 0);
    auto dqh = scratch<T>(tr * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gi = task / H, h = task % H, b = ch.owner[gi], s = gi - ch.first[b], bh = b * H + h;
      const int64_t ce = cep[b];
      T* dwp = dw_part.data() + task * C * D;
      T* dkp = dkap_part.data() + task * C * DV;
      T* dbp = db_part.data() + task * C;
      T* dqtp = mis ? dqt_part.data() + task * C * D : nullptr;
      T* dbhp = mis ? dbh_part.data() + task * C : nullptr;
      T* dlp = mis ? dlam_part.data() + task * C : nullptr;
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
      const bool* prow = sq.pad_rows(b);
      const auto dyr = sq.in<S>(dy, b, h);
      int64_t ld = 0;
      S* dq_out = sq.out(dqp, D, b, h, ld);
      const int64_t len = sq.len(b), clen = chunking(len).len;
      const int64_t n_end = std::min(len, (s + 1) * clen);
      for (int64_t n0 = s * clen; n0 < n_end; n0 += tr) {
        const int64_t nr = std::min(tr, n_end - n0);
        if (ce == 0) {
          zero_rows(n0, nr, D, dq_out, ld);
          continue;
        }
        query_tile_probs<S, T>(a, sq, b, h, n0, nr, ss, beta, qh.data(), p.data(), r.data(), al.data());
        load_rows(dyr, n0, nr, DV, T(1), prow, dyt.data());
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
        store_rows(dqh.data(), n0, nr, D, ss, prow, dq_out, ld);
      }
    }
  });
  reduce_chunks(dw_part.data(), ch, H, C * D, dw.data_ptr<T>());
  reduce_chunks(dkap_part.data(), ch, H, C * DV, dkap.data_ptr<T>());
  reduce_chunks(db_part.data(), ch, H, C, dbias.data_ptr<T>());
  if (mis) {
    reduce_chunks(dqt_part.data(), ch, H, C * D, dqt.data_ptr<T>());
    reduce_chunks(dbh_part.data(), ch, H, C, dbh.data_ptr<T>());
    reduce_chunks(dlam_part.data(), ch, H, C, dlam.data_ptr<T>());
  }
}

at::Tensor padding_or_undefined(const OptTensor& padding) {
  return padding.has_value() ? padding->contiguous() : at::Tensor();
}

// The sequences of an op whose long tensor is x: (B, H, L, D) with the padding mask pad
// (contiguous, or undefined; it must outlive the result), or packed (T, H, D) with
// cu_seqlens (after the shared checks).
Seqs seqs_of(const char* op, const at::Tensor& x, const at::Tensor& pad, const OptTensor& cu_seqlens) {
  Seqs sq;
  sq.H = x.size(1);
  if (cu_seqlens.has_value()) {
    sq.B = cu_seqlens->size(0) - 1;
    sq.L = x.size(0);
    sq.cu = packed_offsets(op, cu_seqlens, sq.L);
  } else {
    sq.B = x.size(0);
    sq.L = x.size(2);
    sq.pad = pad.defined() ? pad.data_ptr<bool>() : nullptr;
  }
  return sq;
}

QueryArgs query_args(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap, const Tensor& c_eff,
                     const OptTensor& qt, const OptTensor& lam, const OptTensor& bh) {
  const bool mis = qt.has_value();
  const auto ce = c_eff.contiguous();
  const int64_t C = w.size(2);
  TORCH_CHECK(ce.numel() == 0 || (ce.min().item<int64_t>() >= 0 && ce.max().item<int64_t>() <= C),
              "lara_kernels::query_pass: c_eff must lie in [0, ", C, "], got ", c_eff);
  return {q, w, bias, kap, ce, mis ? *qt : at::Tensor(), mis ? *lam : at::Tensor(), mis ? *bh : at::Tensor(), mis};
}

}  // namespace
}  // namespace cpu

// ---------------------------------------------------------------------------------
// Entry points (registered in lara_ops.cpp)

std::tuple<Tensor, Tensor> key_pass_fwd_cpu(const Tensor& w, const Tensor& k, const OptTensor& v,
                                            const OptTensor& padding, double ss, bool subtract_norm,
                                            const OptTensor& cu_seqlens, int64_t max_seqlen) {
  const char* op = "lara_kernels::key_pass_fwd";
  check_key_pass_args(op, w, k, v, padding, cu_seqlens, max_seqlen);
  const Tensor pad = cpu::padding_or_undefined(padding);
  const cpu::Seqs sq = cpu::seqs_of(op, k, pad, cu_seqlens);
  const int64_t C = w.size(2), DV = v.has_value() ? v->size(-1) : 0;
  const auto opts = w.options();
  Tensor Z = new_output({sq.B, sq.H, C}, opts), kap = new_output({sq.B, sq.H, C, DV}, opts);
  const Tensor vt = v.has_value() ? *v : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "key_pass_fwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::key_fwd_impl<scalar_t, T>(w, k, vt, sq, T(ss), subtract_norm, Z, kap);
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
  const Tensor pad = cpu::padding_or_undefined(padding);
  const cpu::Seqs sq = cpu::seqs_of(op, k, pad, cu_seqlens);
  const int64_t B = sq.B, H = sq.H, D = k.size(-1), C = w.size(2);
  const auto ct = w.scalar_type();
  TORCH_CHECK(Z.sizes() == at::IntArrayRef({B, H, C}) && Z.scalar_type() == ct && Z.is_contiguous(), op,
              ": Z must be contiguous ", ct, " of shape (", B, ", ", H, ", ", C, "), got ", Z.scalar_type(), " ",
              Z.sizes());
  TORCH_CHECK(dZ.sizes() == Z.sizes() && dZ.scalar_type() == ct && dZ.is_contiguous(), op,
              ": dZ must be contiguous ", ct, " of Z's shape, got ", dZ.scalar_type(), " ", dZ.sizes());
  Tensor vt, kapt, dkapt;
  if (v.has_value()) {
    vt = *v;
    const int64_t DV = v->size(-1);
    TORCH_CHECK(kap.has_value() && dkap.has_value(), op, ": kap and dkap are required with v");
    for (const auto* t : {&*kap, &*dkap})
      TORCH_CHECK(t->sizes() == at::IntArrayRef({B, H, C, DV}) && t->scalar_type() == ct && t->is_contiguous(),
                  op, ": kap and dkap must be contiguous ", ct, " of shape (", B, ", ", H, ", ", C, ", ", DV,
                  "), got ", t->scalar_type(), " ", t->sizes());
    kapt = *kap;
    dkapt = *dkap;
  }
  // dk, dv: k's and v's shapes, contiguous: (B, H, M, .) or packed (T, H, .)
  auto grad_shape = [&](int64_t W) {
    return sq.packed() ? std::vector<int64_t>{sq.L, H, W} : std::vector<int64_t>{B, H, sq.L, W};
  };
  Tensor dw = new_output({B, H, C, D}, w.options());
  Tensor dk = new_output(grad_shape(D), k.options());
  Tensor dv = v.has_value() ? new_output(grad_shape(v->size(-1)), v->options()) : new_output({0}, k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "key_pass_bwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::key_bwd_impl<scalar_t, T>(w, k, vt, sq, T(ss), subtract_norm, Z, kapt, dZ, dkapt, dw, dk, dv);
  });
  return {dw, dk, dv};
}

Tensor query_pass_fwd_cpu(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap,
                          const Tensor& c_eff, const OptTensor& padding, double ss, const OptTensor& qt,
                          const OptTensor& lam, const OptTensor& bh, double beta, const OptTensor& cu_seqlens,
                          int64_t max_seqlen) {
  const char* op = "lara_kernels::query_pass_fwd";
  check_query_pass_args(op, q, w, bias, kap, c_eff, padding, qt, lam, bh, cu_seqlens, max_seqlen);
  const Tensor pad = cpu::padding_or_undefined(padding);
  const cpu::Seqs sq = cpu::seqs_of(op, q, pad, cu_seqlens);
  const auto a = cpu::query_args(q, w, bias, kap, c_eff, qt, lam, bh);
  const int64_t DV = kap.size(3);
  Tensor y = sq.packed() ? new_output({sq.L, sq.H, DV}, q.options()) : new_output({sq.B, sq.H, sq.L, DV}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_pass_fwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::query_fwd_impl<scalar_t, T>(a, sq, T(ss), T(beta), y);
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> query_pass_bwd_cpu(
    const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap, const Tensor& c_eff,
    const OptTensor& padding, double ss, const OptTensor& qt, const OptTensor& lam, const OptTensor& bh,
    double beta, const Tensor& dy, const OptTensor& cu_seqlens, int64_t max_seqlen) {
  const char* op = "lara_kernels::query_pass_bwd";
  check_query_pass_args(op, q, w, bias, kap, c_eff, padding, qt, lam, bh, cu_seqlens, max_seqlen);
  const Tensor pad = cpu::padding_or_undefined(padding);
  const cpu::Seqs sq = cpu::seqs_of(op, q, pad, cu_seqlens);
  const int64_t B = sq.B, H = sq.H, D = q.size(-1), C = w.size(2), DV = kap.size(3);
  // (braces: TORCH_CHECK is an if of its own)
  if (sq.packed()) {
    TORCH_CHECK(dy.sizes() == at::IntArrayRef({sq.L, H, DV}) && dy.scalar_type() == q.scalar_type(), op,
                ": dy must be ", q.scalar_type(), " of shape (", sq.L, ", ", H, ", ", DV, "), got ", dy.scalar_type(),
                " ", dy.sizes());
  } else {
    TORCH_CHECK(dy.sizes() == at::IntArrayRef({B, H, sq.L, DV}) && dy.scalar_type() == q.scalar_type(), op,
                ": dy must be ", q.scalar_type(), " of shape (", B, ", ", H, ", ", sq.L, ", ", DV, "), got ",
                dy.scalar_type(), " ", dy.sizes());
  }
  TORCH_CHECK(dy.device() == q.device(), op, ": dy is on ", dy.device(), " but q is on ", q.device());
  const auto a = cpu::query_args(q, w, bias, kap, c_eff, qt, lam, bh);
  const auto opts = w.options();
  Tensor dq = sq.packed() ? new_output({sq.L, H, D}, q.options()) : new_output({B, H, sq.L, D}, q.options());
  Tensor dw = new_output({B, H, C, D}, opts), dbias = new_output({B, H, C}, opts),
         dkap = new_output({B, H, C, DV}, opts);
  Tensor dqt = a.mis ? new_output({B, H, C, D}, opts) : new_output({0}, opts);
  Tensor dlam = a.mis ? new_output({B, H, C}, opts) : new_output({0}, opts);
  Tensor dbh = a.mis ? new_output({B, H, C}, opts) : new_output({0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "query_pass_bwd_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cpu::query_bwd_impl<scalar_t, T>(a, sq, T(ss), T(beta), dy, dq, dw, dbias, dkap, dqt, dlam, dbh);
  });
  return {dq, dw, dbias, dkap, dqt, dlam, dbh};
}

}  // namespace lara
