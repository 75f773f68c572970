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
#include <array>
#include <vector>

#include "../lara_ops.h"
#include "cpu_math.h"
#include "passes.h"
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

// The grain of an at::parallel_for over tasks of `work` multiply-adds each: tasks are
// handed out in groups of about kParallelWork, so that a small problem runs inline on the
// calling thread (no parallel region to start) and a large one is split per task. Which
// task runs where never changes a result (each writes only its own rows and partials).
constexpr int64_t kParallelWork = int64_t(1) << 16;
inline int64_t grain_for(int64_t work) { return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, work)); }

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
  at::parallel_for(0, B * H, grain_for(size * std::max<int64_t>(1, ch.total() / std::max<int64_t>(1, B))),
                   [&](int64_t begin, int64_t end) {
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

// K scratch buffers of n[0], ..., n[K - 1] elements in one allocation, each starting on a
// 64-byte boundary. Not zeroed: every element is written before it is read; in test mode
// (lara_ops.h) they start as NaN, so that a tile or a partial read before it is written
// shows up. Allocated through torch's allocator so that memory profiles (lara-bench,
// bench/efficiency.py) count it.
template <typename T, size_t K>
struct Scratch {
  at::Tensor t;
  std::array<T*, K> p;
  T* operator[](size_t i) const { return p[i]; }
};

template <typename T, size_t K>
Scratch<T, K> scratch(const std::array<int64_t, K>& n) {
  constexpr int64_t align = 64 / int64_t(sizeof(T));
  std::array<int64_t, K> off;
  int64_t total = 0;
  for (size_t i = 0; i < K; ++i) {
    off[i] = total;
    total += (n[i] + align - 1) / align * align;
  }
  Scratch<T, K> s;
  s.t = new_output({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* base = s.t.template data_ptr<T>();
  for (size_t i = 0; i < K; ++i) s.p[i] = base + off[i];
  return s;
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

// Query tile n0 .. n0 + nr of (b, h): qh = ss q rows (padded rows 0) and p (nr x C) =
// softmax_c(L); with the MIS term also r and alpha (see query_probs). c_eff[b] >= 1.
template <typename S, typename T>
void query_tile_probs(const QueryArgs<T>& a, const Seqs& sq, int64_t b, int64_t h, int64_t n0, int64_t nr, T ss,
                      T beta, T* qh, T* p, T* r, T* al) {
  const int64_t D = a.D, C = a.C, bh = b * sq.H + h;
  load_rows(sq.in<S>(a.q, b, h), n0, nr, D, ss, sq.pad_rows(b), qh);
  gemm(false, true, nr, C, D, T(1), qh, D, a.w + bh * C * D, D, T(0), p, C);
  if (a.mis) gemm(false, true, nr, C, D, T(1), qh, D, a.qt + bh * C * D, D, T(0), r, C);
  query_probs(p, a.mis ? r : nullptr, a.mis ? al : nullptr, nr, C, a.c_eff[b], a.bias + bh * C,
              a.mis ? a.lam + bh * C : nullptr, a.mis ? a.bh + bh * C : nullptr, beta);
}

// ---------------------------------------------------------------------------------
// Key pass: tasks (sequence b, head h, chunk s of b's keys); each keeps the running
// (max, sum, accumulator) of its chunk as a partial, combined per (b, h) in chunk order.

template <typename S, typename T>
void key_fwd_impl(const T* wp, int64_t C, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                  bool sub_norm, T* Zp, T* kapp) {
  const int64_t H = sq.H, D = k.size(-1);
  const bool has_v = v.defined();
  const int64_t DV = has_v ? v.size(-1) : 0;
  const Chunks ch = row_chunks(sq);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t ntask = ch.total() * H;
  // partial (running max, sum, unnormalized acc) per task
  const auto part = scratch<T, 3>({ntask * C, ntask * C, ntask * C * DV});
  T *m_part = part[0], *l_part = part[1], *acc_part = part[2];
  const int64_t task_work = std::min<int64_t>(sq.L, chunking(sq.L).len) * C * (D + DV);

  at::parallel_for(0, ntask, grain_for(task_work), [&](int64_t begin, int64_t end) {
    const auto buf = scratch<T, 5>({tr * D, tr * std::max<int64_t>(DV, 1), C * tr, tr, C});
    T *kh = buf[0], *vt = buf[1], *lg = buf[2], *nb = buf[3], *resc = buf[4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / H, h = task % H, b = ch.owner[g], s = g - ch.first[b];
      T* mrun = m_part + task * C;
      T* lrun = l_part + task * C;
      T* acc = acc_part + task * C * DV;
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
        key_tile_logits(kr, prow, m0, nr, tr, D, ss, sub_norm, wbh, C, kh, nb, lg);
        key_fwd_tile(lg, tr, C, nr, nb, mrun, lrun, resc);
        if (has_v) {
          load_rows(vr, m0, nr, DV, T(1), prow, vt);
          for (int64_t c = 0; c < C; ++c)
            for (int64_t d = 0; d < DV; ++d) acc[c * DV + d] *= resc[c];
          gemm(false, false, C, DV, nr, T(1), lg, tr, vt, DV, T(1), acc, DV);
        }
      }
    }
  });

  // combine the chunks: Z = mx + log(sum_s e_s l_s), kap = sum_s e_s acc_s / sum_s e_s l_s
  at::parallel_for(0, sq.B * H * C, grain_for(ch.total() / std::max<int64_t>(1, sq.B) * (DV + 1)),
                   [&](int64_t begin, int64_t end) {
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
          const T* a = acc_part + pi * DV;
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
void key_bwd_impl(const T* wp, int64_t C, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                  bool sub_norm, const T* Zp, const T* kapp, const T* dZp, const T* dkapp, T* dw, at::Tensor& dk,
                  at::Tensor& dv) {
  const int64_t H = sq.H, D = k.size(-1);
  const bool has_v = v.defined();
  const int64_t DV = has_v ? v.size(-1) : 0;
  const Chunks ch = row_chunks(sq);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t BH = sq.B * H, ntask = ch.total() * H;
  // per-task partials of dw, and E_c = dZ_c - dkap_c . kap_c
  const auto part = scratch<T, 2>({ntask * C * D, BH * C});
  T *dw_part = part[0], *E = part[1];
  for (int64_t i = 0; i < BH * C; ++i) {
    T e = dZp[i];
    for (int64_t d = 0; d < DV; ++d) e -= dkapp[i * DV + d] * kapp[i * DV + d];
    E[i] = e;
  }
  S* dkp = dk.data_ptr<S>();
  S* dvp = has_v ? dv.data_ptr<S>() : nullptr;
  const int64_t task_work = std::min<int64_t>(sq.L, chunking(sq.L).len) * C * (3 * D + 2 * DV);

  at::parallel_for(0, ntask, grain_for(task_work), [&](int64_t begin, int64_t end) {
    const int64_t DVa = std::max<int64_t>(DV, 1);
    const auto buf = scratch<T, 9>({tr * D, tr * DVa, C * tr, has_v ? C * tr : 0, has_v ? C * tr : 0, tr, tr,
                                    tr * D, tr * DVa});
    T *kh = buf[0], *vt = buf[1], *lg = buf[2], *g = buf[3], *sm = buf[4], *nb = buf[5], *colsum = buf[6],
      *dkh = buf[7], *dvt = buf[8];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gi = task / H, h = task % H, b = ch.owner[gi], s = gi - ch.first[b], bh = b * H + h;
      T* dwp = dw_part + task * C * D;
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
        key_tile_logits(kr, prow, m0, nr, tr, D, ss, sub_norm, wbh, C, kh, nb, lg);
        if (has_v) {
          load_rows(vr, m0, nr, DV, T(1), prow, vt);
          gemm(false, true, C, nr, DV, T(1), dkbh, DV, vt, DV, T(0), g, tr);
        }
        key_bwd_tile(lg, has_v ? g : nullptr, has_v ? sm : nullptr, tr, C, nr, nb, Zp + bh * C, E + bh * C, colsum);
        // dkh = dl^T w - colsum * kh;  dw += dl kh;  dv = S^T dkap
        gemm(true, false, nr, D, C, T(1), lg, tr, wbh, D, T(0), dkh, D);
        if (sub_norm)
          for (int64_t j = 0; j < nr; ++j)
            for (int64_t d = 0; d < D; ++d) dkh[j * D + d] -= colsum[j] * kh[j * D + d];
        gemm(false, false, C, D, nr, T(1), lg, tr, kh, D, T(1), dwp, D);
        store_rows(dkh, m0, nr, D, ss, prow, dk_out, ldk);
        if (has_v) {
          gemm(true, false, nr, DV, C, T(1), sm, tr, dkbh, DV, T(0), dvt, DV);
          store_rows(dvt, m0, nr, DV, T(1), prow, dv_out, ldv);
        }
      }
    }
  });
  reduce_chunks(dw_part, ch, H, C * D, dw);
}

// ---------------------------------------------------------------------------------
// Query pass: the forward's tasks are (sequence b, head h, tile of b's queries); the
// backward's are (b, h, chunk of b's queries), with per-task partials of the C-sized sums
// reduced per (b, h) in chunk order. Rows of an element with c_eff[b] = 0 (no active
// sample) get y = 0 and dq = 0 and add nothing.

template <typename S, typename T>
void query_fwd_impl(const QueryArgs<T>& a, const Seqs& sq, T ss, T beta, at::Tensor& y) {
  const int64_t H = sq.H, D = a.D, C = a.C, DV = a.DV;
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const Chunks tiles = make_chunks(sq.B, [&](int64_t b) { return (sq.len(b) + tr - 1) / tr; });
  const int64_t* cep = a.c_eff;
  S* yp = y.data_ptr<S>();
  const int64_t task_work = std::min(tr, sq.L) * C * ((a.mis ? 2 : 1) * D + DV);

  at::parallel_for(0, tiles.total() * H, grain_for(task_work), [&](int64_t begin, int64_t end) {
    const auto buf = scratch<T, 5>({tr * D, tr * C, a.mis ? tr * C : 0, a.mis ? tr * C : 0, tr * DV});
    T *qh = buf[0], *sc = buf[1], *t = buf[2], *al = buf[3], *yt = buf[4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / H, h = task % H, b = tiles.owner[g], bh = b * H + h;
      const int64_t n0 = (g - tiles.first[b]) * tr, nr = std::min(tr, sq.len(b) - n0);
      int64_t ld = 0;
      S* y_out = sq.out(yp, DV, b, h, ld);
      if (cep[b] == 0) {
        zero_rows(n0, nr, DV, y_out, ld);
        continue;
      }
      query_tile_probs<S, T>(a, sq, b, h, n0, nr, ss, beta, qh, sc, t, al);
      gemm(false, false, nr, DV, C, T(1), sc, C, a.kap + bh * C * DV, DV, T(0), yt, DV);
      store_rows(yt, n0, nr, DV, T(1), sq.pad_rows(b), y_out, ld);
    }
  });
}

template <typename S, typename T>
void query_bwd_impl(const QueryArgs<T>& a, const Seqs& sq, T ss, T beta, const at::Tensor& dy, at::Tensor& dq,
                    T* dw, T* dbias, T* dkap, T* dqt, T* dlam, T* dbh) {
  const int64_t H = sq.H, D = a.D, C = a.C, DV = a.DV;
  const Chunks ch = row_chunks(sq);
  const int64_t tr = tile_rows(std::max({C, D, DV}));
  const int64_t ntask = ch.total() * H;
  const bool mis = a.mis;
  // per-task partials of the C-sized sums
  const auto part = scratch<T, 6>({ntask * C * D, ntask * C * DV, ntask * C, mis ? ntask * C * D : 0,
                                   mis ? ntask * C : 0, mis ? ntask * C : 0});
  T *dw_part = part[0], *dkap_part = part[1], *db_part = part[2], *dqt_part = part[3], *dbh_part = part[4],
    *dlam_part = part[5];
  const int64_t* cep = a.c_eff;
  S* dqp = dq.data_ptr<S>();
  const int64_t task_work = std::min<int64_t>(sq.L, chunking(sq.L).len) * C * ((mis ? 5 : 3) * D + 2 * DV);

  at::parallel_for(0, ntask, grain_for(task_work), [&](int64_t begin, int64_t end) {
    const auto buf = scratch<T, 7>({tr * D, tr * DV, tr * C, tr * C, mis ? tr * C : 0, mis ? tr * C : 0, tr * D});
    T *qh = buf[0], *dyt = buf[1], *p = buf[2], *g = buf[3], *r = buf[4], *al = buf[5], *dqh = buf[6];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gi = task / H, h = task % H, b = ch.owner[gi], s = gi - ch.first[b], bh = b * H + h;
      const int64_t ce = cep[b];
      T* dwp = dw_part + task * C * D;
      T* dkp = dkap_part + task * C * DV;
      T* dbp = db_part + task * C;
      T* dqtp = mis ? dqt_part + task * C * D : nullptr;
      T* dbhp = mis ? dbh_part + task * C : nullptr;
      T* dlp = mis ? dlam_part + task * C : nullptr;
      std::fill(dwp, dwp + C * D, T(0));
      std::fill(dkp, dkp + C * DV, T(0));
      std::fill(dbp, dbp + C, T(0));
      if (mis) {
        std::fill(dqtp, dqtp + C * D, T(0));
        std::fill(dbhp, dbhp + C, T(0));
        std::fill(dlp, dlp + C, T(0));
      }
      const T* wbh = a.w + bh * C * D;
      const T* kbh = a.kap + bh * C * DV;
      const T* qtbh = mis ? a.qt + bh * C * D : nullptr;
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
        query_tile_probs<S, T>(a, sq, b, h, n0, nr, ss, beta, qh, p, r, al);
        load_rows(dyr, n0, nr, DV, T(1), prow, dyt);
        gemm(false, true, nr, C, DV, T(1), dyt, DV, kbh, DV, T(0), g, C);
        query_bwd_rows(p, g, mis ? r : nullptr, mis ? al : nullptr, nr, C, ce, beta, dbp, dbhp, dlp);
        // dkap += P^T dy;  dw += dL^T qh;  dqh = dL w [+ dt qt];  dqt += dt^T qh
        gemm(true, false, C, DV, nr, T(1), p, C, dyt, DV, T(1), dkp, DV);
        gemm(true, false, C, D, nr, T(1), g, C, qh, D, T(1), dwp, D);
        gemm(false, false, nr, D, C, T(1), g, C, wbh, D, T(0), dqh, D);
        if (mis) {
          gemm(false, false, nr, D, C, T(1), r, C, qtbh, D, T(1), dqh, D);
          gemm(true, false, C, D, nr, T(1), r, C, qh, D, T(1), dqtp, D);
        }
        store_rows(dqh, n0, nr, D, ss, prow, dq_out, ld);
      }
    }
  });
  reduce_chunks(dw_part, ch, H, C * D, dw);
  reduce_chunks(dkap_part, ch, H, C * DV, dkap);
  reduce_chunks(db_part, ch, H, C, dbias);
  if (mis) {
    reduce_chunks(dqt_part, ch, H, C * D, dqt);
    reduce_chunks(dbh_part, ch, H, C, dbh);
    reduce_chunks(dlam_part, ch, H, C, dlam);
  }
}

// Runs f(S{}) with S the element type of `st` when T is its compute type (float for
// float32/float16/bfloat16, double for float64); the callers have checked that it is.
template <typename T, typename F>
void with_input_type(at::ScalarType st, const char* name, const F& f) {
  if constexpr (std::is_same_v<T, double>) {
    TORCH_CHECK(st == at::kDouble, name, ": float64 compute type for a ", st, " input");
    f(double{});
  } else {
    switch (st) {
      case at::kFloat: f(float{}); break;
      case at::kHalf: f(at::Half{}); break;
      case at::kBFloat16: f(at::BFloat16{}); break;
      default: TORCH_CHECK(false, name, ": float32 compute type for a ", st, " input");
    }
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

// The query pass's inputs as pointers (after the shared checks: the C-sized ones are
// contiguous compute-type tensors), with the range of c_eff checked.
template <typename T>
QueryArgs<T> query_args(const char* op, const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap,
                        const Tensor& c_eff, const OptTensor& qt, const OptTensor& lam, const OptTensor& bh) {
  const bool mis = qt.has_value();
  const int64_t C = w.size(2);
  const int64_t* ce = c_eff.data_ptr<int64_t>();
  for (int64_t b = 0; b < c_eff.numel(); ++b)
    TORCH_CHECK(ce[b] >= 0 && ce[b] <= C, op, ": c_eff must lie in [0, ", C, "], got c_eff[", b, "] = ", ce[b]);
  return {q,
          w.data_ptr<T>(),
          bias.data_ptr<T>(),
          kap.data_ptr<T>(),
          ce,
          mis ? qt->data_ptr<T>() : nullptr,
          mis ? lam->data_ptr<T>() : nullptr,
          mis ? bh->data_ptr<T>() : nullptr,
          C,
          q.size(-1),
          kap.size(3),
          mis};
}

}  // namespace

// ---------------------------------------------------------------------------------
// Bodies (passes.h)

template <typename T>
void key_pass_fwd_body(const T* w, int64_t C, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                       bool sub_norm, T* Z, T* kap) {
  with_input_type<T>(k.scalar_type(), "key_pass_fwd_cpu", [&](auto tag) {
    key_fwd_impl<decltype(tag), T>(w, C, k, v, sq, ss, sub_norm, Z, kap);
  });
}

template <typename T>
void key_pass_bwd_body(const T* w, int64_t C, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                       bool sub_norm, const T* Z, const T* kap, const T* dZ, const T* dkap, T* dw, at::Tensor& dk,
                       at::Tensor& dv) {
  with_input_type<T>(k.scalar_type(), "key_pass_bwd_cpu", [&](auto tag) {
    key_bwd_impl<decltype(tag), T>(w, C, k, v, sq, ss, sub_norm, Z, kap, dZ, dkap, dw, dk, dv);
  });
}

template <typename T>
void query_pass_fwd_body(const QueryArgs<T>& a, const Seqs& sq, T ss, T beta, at::Tensor& y) {
  with_input_type<T>(a.q.scalar_type(), "query_pass_fwd_cpu",
                     [&](auto tag) { query_fwd_impl<decltype(tag), T>(a, sq, ss, beta, y); });
}

template <typename T>
void query_pass_bwd_body(const QueryArgs<T>& a, const Seqs& sq, T ss, T beta, const at::Tensor& dy,
                         at::Tensor& dq, T* dw, T* dbias, T* dkap, T* dqt, T* dlam, T* dbh) {
  with_input_type<T>(a.q.scalar_type(), "query_pass_bwd_cpu", [&](auto tag) {
    query_bwd_impl<decltype(tag), T>(a, sq, ss, beta, dy, dq, dw, dbias, dkap, dqt, dlam, dbh);
  });
}

#define LARA_INSTANTIATE_BODIES(T)                                                                              \
  template void key_pass_fwd_body<T>(const T*, int64_t, const at::Tensor&, const at::Tensor&, const Seqs&, T,   \
                                     bool, T*, T*);                                                             \
  template void key_pass_bwd_body<T>(const T*, int64_t, const at::Tensor&, const at::Tensor&, const Seqs&, T,   \
                                     bool, const T*, const T*, const T*, const T*, T*, at::Tensor&,             \
                                     at::Tensor&);                                                              \
  template void query_pass_fwd_body<T>(const QueryArgs<T>&, const Seqs&, T, T, at::Tensor&);                    \
  template void query_pass_bwd_body<T>(const QueryArgs<T>&, const Seqs&, T, T, const at::Tensor&, at::Tensor&,  \
                                       T*, T*, T*, T*, T*, T*);
LARA_INSTANTIATE_BODIES(float)
LARA_INSTANTIATE_BODIES(double)
#undef LARA_INSTANTIATE_BODIES

}  // namespace cpu

// ---------------------------------------------------------------------------------
// Entry points (registered in lara_ops.cpp): the shared checks, the outputs, the body.

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
  if (w.scalar_type() == at::kDouble) {
    cpu::key_pass_fwd_body<double>(w.data_ptr<double>(), C, k, vt, sq, ss, subtract_norm, Z.data_ptr<double>(),
                                   kap.data_ptr<double>());
  } else {
    cpu::key_pass_fwd_body<float>(w.data_ptr<float>(), C, k, vt, sq, float(ss), subtract_norm, Z.data_ptr<float>(),
                                  kap.data_ptr<float>());
  }
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
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    cpu::key_pass_bwd_body<T>(w.data_ptr<T>(), C, k, vt, sq, T(ss), subtract_norm, Z.data_ptr<T>(), ptr(kapt),
                              dZ.data_ptr<T>(), ptr(dkapt), dw.data_ptr<T>(), dk, dv);
  };
  if (ct == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
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
  const int64_t DV = kap.size(3);
  Tensor y = sq.packed() ? new_output({sq.L, sq.H, DV}, q.options()) : new_output({sq.B, sq.H, sq.L, DV}, q.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto a = cpu::query_args<T>(op, q, w, bias, kap, c_eff, qt, lam, bh);
    cpu::query_pass_fwd_body<T>(a, sq, T(ss), T(beta), y);
  };
  if (w.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
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
  const bool mis = qt.has_value();
  const auto opts = w.options();
  Tensor dq = sq.packed() ? new_output({sq.L, H, D}, q.options()) : new_output({B, H, sq.L, D}, q.options());
  Tensor dw = new_output({B, H, C, D}, opts), dbias = new_output({B, H, C}, opts),
         dkap = new_output({B, H, C, DV}, opts);
  Tensor dqt = mis ? new_output({B, H, C, D}, opts) : new_output({0}, opts);
  Tensor dlam = mis ? new_output({B, H, C}, opts) : new_output({0}, opts);
  Tensor dbh = mis ? new_output({B, H, C}, opts) : new_output({0}, opts);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto a = cpu::query_args<T>(op, q, w, bias, kap, c_eff, qt, lam, bh);
    cpu::query_pass_bwd_body<T>(a, sq, T(ss), T(beta), dy, dq, dw.data_ptr<T>(), dbias.data_ptr<T>(),
                                dkap.data_ptr<T>(), mis ? dqt.data_ptr<T>() : nullptr,
                                mis ? dlam.data_ptr<T>() : nullptr, mis ? dbh.data_ptr<T>() : nullptr);
  };
  if (w.scalar_type() == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return {dq, dw, dbias, dkap, dqt, dlam, dbh};
}

}  // namespace lara
