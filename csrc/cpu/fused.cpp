// The whole LARA computation on the CPU as one op per direction (lara_fwd, lara_bwd): the
// sequence of lara_kernels/_pipeline.py's lara_forward (landmarks, proposal means, samples,
// key pass, query normalizer, densities and weights, query pass; docs/math.md sections 1-7)
// with its C x D and C x C steps as loops here instead of torch ops, and their backward
// written out (docs/design.md has the passes' backward; the small steps' is below).
//
// The long passes are the CPU pass implementations of csrc/cpu (landmarks.cpp, passes.cpp),
// called directly, not through the dispatcher. Both layouts (padded with masks, packed with
// offsets), grouped-query attention, given landmarks, training noise, every proposal and
// weighting. The forward returns y and one flat compute-type "state" tensor holding the
// C-sized results the backward needs (no N x C or M x C tensor is kept):
//
//   qt, kt, mu, w (B, H, C, D) | Z, bias, rho, log_den (B, H, C) | kap (B, H, C, Dv)
//   | optimal: lam, bh (B, H, C) | mixed: a (B, H, C, C) | attend: Z_att (B, H, C), mean_k (B, H, C, D)
//
// (C = min(num_samples, N, M): the pipeline runs only the rows that can be active; padded
// layout N, M the lengths, packed the longest lengths max_seqlen_q, max_seqlen_k.)
//
// Backward of the small steps, per (b, h), with na active samples (c' < na):
//   g_cc' = w_c . mu_c' - |mu_c'|^2 / 2, rho_c = g_cc, log_den_c = LSE_{c' < na} g_cc'
//   optimal: bias = Z - rho, bh = exp(rho - log_den):
//       dZ = dbias, drho = -dbias + dbh bh, dlog_den = -dbh bh
//   balance: bias = Z - log_den: dZ = dbias, drho = 0, dlog_den = -dbias
//   dg_cc' = dlog_den_c softmax_{c' < na}(g_c)_c' + [c = c'] drho_c
//   dw = dw(query pass) + dw(key pass) + dg mu
//   dmu = dw + dg^T w - (sum_c dg_cc') mu_c'                       (w = mu + eps)
//   segment (mu = qt + kt): dqt += dmu, dkt = dmu
//   mixed (mu = qt + a kt, a = softmax_{c' < na}(kt kt^T)): dqt += dmu, dkt = a^T dmu,
//       da = dmu kt^T, dA_cc' = a_cc' (da_cc' - sum_j a_cj da_cj), dkt += (dA + dA^T) kt
//   attend (mu = qt + ss mean_k, a key pass with values k): dqt += dmu, and the key pass
//       backward with dkap = ss dmu, dZ = 0 gives dqt, dk (keys) and dk (values)
//   qt = ss landmarks(q) (or ss q_landmarks), kt = ss landmarks(k) repeated to the G query
//   heads of a key/value head (or ss k_landmarks): their backward scales by ss, sums kt's
//   gradient over the group, and runs landmarks_backward.
// Batch elements without a valid query or key (padded layout) are run as the pipeline runs
// them (masks made all-valid, inputs zeroed) and give output 0 and gradients 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../lara_ops.h"
#include "cpu_math.h"
#include "seqs.h"

namespace lara {
namespace {

constexpr int64_t kSegment = 0, kMixed = 1, kAttend = 2;
constexpr int64_t kOptimal = 0, kBalance = 1;

// The call's shape and layout, as the pipeline derives them (prepare_masks, drop_inputs,
// packed_sizes), shared by forward and backward.
struct Problem {
  bool packed = false;
  int64_t B = 0, H = 0, Hkv = 0, G = 1, N = 0, M = 0, Lq = 0, Lk = 0, C = 0, NS = 0, D = 0, DV = 0;
  int64_t proposal = kSegment, weighting = kOptimal;
  bool dropped = false;           // some element has no valid query or key (padded layout)
  std::vector<int64_t> nact;      // samples active in the C x C steps, per element
  std::vector<uint8_t> keep;      // padded layout: 0 for the dropped elements
  at::Tensor c_eff;               // (B,) int64
  at::Tensor keep4;               // (B, 1, 1, 1) bool, only when dropped
  OptTensor q_pad, k_pad;         // the passes' masks (dropped elements made all-valid)
  at::Tensor q, k, v;             // dropped elements zeroed
  OptTensor cu_q, cu_k;
  int64_t max_q = 0, max_k = 0;
  at::ScalarType ct = at::kFloat;
  bool optimal() const { return weighting == kOptimal; }
};

void check_mask(const char* op, const char* name, const OptTensor& m, int64_t B, int64_t L) {
  if (!m.has_value()) return;
  TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 2 && m->size(0) == B && m->size(1) == L, op, ": ", name,
              " must be bool of shape (", B, ", ", L, "), got ", m->scalar_type(), " ", m->sizes());
  TORCH_CHECK(m->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

int64_t valid_count(const bool* row, int64_t L) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) n += !row[l];
  return n;
}

Problem setup(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& qlm,
              const OptTensor& klm, const OptTensor& qpm, const OptTensor& kpm, const OptTensor& cu_q,
              const OptTensor& cu_k, int64_t max_q, int64_t max_k, int64_t num_samples, int64_t proposal,
              int64_t weighting) {
  Problem p;
  p.packed = cu_q.has_value();
  TORCH_CHECK(cu_k.has_value() == p.packed, op, ": cu_seqlens_q and cu_seqlens_k are given together or not at all");
  TORCH_CHECK(proposal >= 0 && proposal <= 2, op, ": proposal must be 0 (segment), 1 (mixed) or 2 (attend), got ",
              proposal);
  TORCH_CHECK(weighting == kOptimal || weighting == kBalance, op,
              ": weighting must be 0 (optimal) or 1 (balance), got ", weighting);
  TORCH_CHECK(num_samples >= 1, op, ": num_samples must be >= 1, got ", num_samples);
  const int64_t dims = p.packed ? 3 : 4;
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == dims, op, ": q, k, v must be ", dims, "-D, got shape ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), op, ": q, k, v must be CPU tensors");
  }
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": q must be float64, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k, v must have one dtype");
  p.proposal = proposal;
  p.weighting = weighting;
  p.NS = num_samples;
  p.ct = compute_type(st);
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.D = q.size(-1);
  p.DV = v.size(-1);
  TORCH_CHECK(p.Hkv >= 1 && p.H % p.Hkv == 0, op, ": the key/value heads ", p.Hkv, " must divide the query heads ",
              p.H);
  p.G = p.H / p.Hkv;
  TORCH_CHECK(k.size(-1) == p.D, op, ": k must have q's head dim ", p.D, ", got ", k.size(-1));
  TORCH_CHECK(v.size(1) == p.Hkv, op, ": v must have k's heads ", p.Hkv, ", got ", v.size(1));
  p.q = q;
  p.k = k;
  p.v = v;
  if (p.packed) {
    TORCH_CHECK(!qpm.has_value() && !kpm.has_value(), op, ": padding masks are not taken with cu_seqlens");
    TORCH_CHECK(cu_q->dim() == 1 && cu_k->dim() == 1 && cu_q->size(0) == cu_k->size(0) && cu_q->size(0) >= 1, op,
                ": cu_seqlens_q and cu_seqlens_k must be 1-D of one size B + 1, got ", cu_q->sizes(), " and ",
                cu_k->sizes());
    for (const auto* cu : {&*cu_q, &*cu_k})
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->is_contiguous(), op,
                  ": cu_seqlens must be contiguous int32");
    TORCH_CHECK(v.size(0) == k.size(0), op, ": v must have k's rows");
    p.B = cu_q->size(0) - 1;
    p.Lq = q.size(0);
    p.Lk = k.size(0);
    p.N = max_q;
    p.M = max_k;
    p.cu_q = cu_q;
    p.cu_k = cu_k;
    p.max_q = max_q;
    p.max_k = max_k;
  } else {
    p.B = q.size(0);
    TORCH_CHECK(k.size(0) == p.B && v.size(0) == p.B && v.size(2) == k.size(2), op,
                ": q, k, v must be (B, H, N, D), (B, H_kv, M, D), (B, H_kv, M, Dv)");
    p.Lq = p.N = q.size(2);
    p.Lk = p.M = k.size(2);
    check_mask(op, "query_padding", qpm, p.B, p.N);
    check_mask(op, "key_padding", kpm, p.B, p.M);
  }
  p.C = std::min({num_samples, p.N, p.M});
  TORCH_CHECK(p.C >= 1 && p.D >= 1 && p.DV >= 1, op, ": needs at least one query, key, sample and feature, got C = ",
              p.C, ", D = ", p.D, ", Dv = ", p.DV);
  for (const auto* lm : {&qlm, &klm}) {
    if (!lm->has_value()) continue;
    TORCH_CHECK((*lm)->dim() == 4 && (*lm)->size(0) == p.B && (*lm)->size(1) == p.H && (*lm)->size(2) == num_samples &&
                    (*lm)->size(3) == p.D,
                op, ": landmarks must be (", p.B, ", ", p.H, ", ", num_samples, ", ", p.D, "), got ", (*lm)->sizes());
    TORCH_CHECK((*lm)->device().is_cpu(), op, ": landmarks must be CPU tensors");
  }

  const int64_t B = p.B, C = p.C;
  p.c_eff = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  int64_t* ce = p.c_eff.data_ptr<int64_t>();
  p.nact.assign(B, C);
  p.keep.assign(B, 1);
  if (p.packed) {
    const int32_t* oq = cpu::packed_offsets(op, cu_q, p.Lq);
    const int32_t* ok = cpu::packed_offsets(op, cu_k, p.Lk);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = int64_t(oq[b + 1]) - oq[b], m = int64_t(ok[b + 1]) - ok[b];
      TORCH_CHECK(n <= max_q && m <= max_k, op, ": sequence ", b, " (", n, " queries, ", m,
                  " keys) is longer than max_seqlen (", max_q, ", ", max_k, ")");
      ce[b] = std::min({C, n, m});
      p.nact[b] = std::max<int64_t>(ce[b], 1);   // the C x C steps treat sample 0 as active (_pipeline)
    }
    return p;
  }
  if (!qpm.has_value() && !kpm.has_value()) {
    std::fill(ce, ce + B, C);
    return p;
  }
  // prepare_masks: an element with no valid query or key is dropped (masks made valid,
  // inputs zeroed, output zeroed); C_eff = min(C, valid queries, valid keys)
  at::Tensor qm = qpm.has_value() ? qpm->contiguous() : at::Tensor();
  at::Tensor km = kpm.has_value() ? kpm->contiguous() : at::Tensor();
  std::vector<int64_t> nv(B, p.N), mv(B, p.M);
  for (int64_t b = 0; b < B; ++b) {
    if (qm.defined()) nv[b] = valid_count(qm.data_ptr<bool>() + b * p.N, p.N);
    if (km.defined()) mv[b] = valid_count(km.data_ptr<bool>() + b * p.M, p.M);
    if (nv[b] == 0 || mv[b] == 0) {
      p.keep[b] = 0;
      p.dropped = true;
      nv[b] = p.N;
      mv[b] = p.M;
    }
    ce[b] = std::min({C, nv[b], mv[b]});
    p.nact[b] = ce[b];
  }
  if (p.dropped) {
    at::Tensor keep = at::empty({B, 1, 1, 1}, at::TensorOptions().dtype(at::kBool));
    for (int64_t b = 0; b < B; ++b) keep.data_ptr<bool>()[b] = p.keep[b] != 0;
    p.keep4 = keep;
    const at::Tensor drop = keep.logical_not();
    auto made_valid = [&](at::Tensor m, int64_t L) {
      m = m.clone();
      for (int64_t b = 0; b < B; ++b)
        if (!p.keep[b]) std::fill(m.data_ptr<bool>() + b * L, m.data_ptr<bool>() + (b + 1) * L, false);
      return m;
    };
    if (qm.defined()) qm = made_valid(qm, p.N);
    if (km.defined()) km = made_valid(km, p.M);
    p.q = q.masked_fill(drop, 0);
    p.k = k.masked_fill(drop, 0);
    p.v = v.masked_fill(drop, 0);
  }
  if (qm.defined()) p.q_pad = qm;
  if (km.defined()) p.k_pad = km;
  return p;
}

// Offsets of the fields of the state tensor (-1: absent).
struct StateLayout {
  int64_t qt = -1, kt = -1, mu = -1, w = -1, Z = -1, bias = -1, rho = -1, logden = -1, kap = -1, lam = -1, bh = -1,
          amix = -1, zatt = -1, katt = -1, total = 0;
};

StateLayout state_layout(const Problem& p) {
  StateLayout s;
  const int64_t BH = p.B * p.H, cd = BH * p.C * p.D, c1 = BH * p.C;
  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t o = off;
    off += n;
    return o;
  };
  s.qt = take(cd);
  s.kt = take(cd);
  s.mu = take(cd);
  s.w = take(cd);
  s.Z = take(c1);
  s.bias = take(c1);
  s.rho = take(c1);
  s.logden = take(c1);
  s.kap = take(c1 * p.DV);
  if (p.optimal()) {
    s.lam = take(c1);
    s.bh = take(c1);
  }
  if (p.proposal == kMixed) s.amix = take(c1 * p.C);
  if (p.proposal == kAttend) {
    s.zatt = take(c1);
    s.katt = take(cd);
  }
  s.total = off;
  return s;
}

// A contiguous tensor over a field of the state (the state outlives it: these are the
// passes' inputs within one call). at::from_blob, not narrow + view: no dispatcher call.
at::Tensor field(const at::Tensor& state, int64_t off, at::IntArrayRef sizes) {
  const auto opts = at::TensorOptions().dtype(state.scalar_type()).device(at::kCPU);
  return at::from_blob(static_cast<char*>(state.data_ptr()) + off * state.element_size(), sizes, opts);
}

// (B, H, C, W) viewed as the rows of the key pass of each key/value head: (B, H_kv, G * C, W).
at::Tensor grouped(const Problem& p, const at::Tensor& t) {
  if (p.G == 1) return t;
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s[1] = p.Hkv;
  s[2] *= p.G;
  return t.view(s);
}

// Row-major c (m x n) = op(a) op(b) + beta c, as cpu::gemm; plain loops for the tiny
// products of the C-sized steps (a BLAS call costs more than the arithmetic there), BLAS
// beyond. The choice depends on the shapes only.
constexpr int64_t kLoopProduct = 1 << 15;

template <typename T>
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
        T* c, int64_t ldc) {
  if (m * n * k > kLoopProduct) return cpu::gemm(ta, tb, m, n, k, T(1), a, lda, b, ldb, beta, c, ldc);
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = beta == T(0) ? T(0) : beta * crow[j];
    for (int64_t q = 0; q < k; ++q) {
      const T av = ta ? a[q * lda + i] : a[i * lda + q];
      if (tb) {
        for (int64_t j = 0; j < n; ++j) crow[j] += av * b[j * ldb + q];
      } else {
        const T* brow = b + q * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
      }
    }
  }
}

// dst += src (same shape); a plain loop where both are contiguous float32/float64.
void add_into(at::Tensor& dst, const at::Tensor& src) {
  const auto st = dst.scalar_type();
  if (src.scalar_type() == st && dst.is_contiguous() && src.is_contiguous() && dst.sizes() == src.sizes() &&
      (st == at::kFloat || st == at::kDouble)) {
    const int64_t n = dst.numel();
    if (st == at::kFloat) {
      float* d = dst.data_ptr<float>();
      const float* s = src.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) d[i] += s[i];
    } else {
      double* d = dst.data_ptr<double>();
      const double* s = src.data_ptr<double>();
      for (int64_t i = 0; i < n; ++i) d[i] += s[i];
    }
    return;
  }
  dst.add_(src);
}

// Runs f(b, h) for every (b, h), in parallel where the C-sized work is worth it.
template <typename F>
void for_heads(const Problem& p, int64_t work_per_head, const F& f) {
  const int64_t BH = p.B * p.H;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_head));
  at::parallel_for(0, BH, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i / p.H, i % p.H);
  });
}

// g (C x C) = w mu^T - |mu_c'|^2 / 2 (row c, column c').
template <typename T>
void densities(int64_t C, int64_t D, const T* w, const T* mu, T* g) {
  mm<T>(false, true, C, C, D, w, D, mu, D, T(0), g, C);
  for (int64_t j = 0; j < C; ++j) {
    T s = T(0);
    for (int64_t d = 0; d < D; ++d) s += mu[j * D + d] * mu[j * D + d];
    s *= T(0.5);
    for (int64_t c = 0; c < C; ++c) g[c * C + j] -= s;
  }
}

// ---------------------------------------------------------------------------------
// Forward

template <typename T>
void copy_landmarks(const Problem& p, const at::Tensor& src, int64_t src_heads, bool given, T ss, T* dst) {
  // dst (B, H, C, D) = ss * src (B, src_heads, C', D) rows 0 .. C - 1 (head h reads head h / (H / src_heads));
  // given landmarks of dropped elements are 0 (drop_inputs)
  const int64_t H = p.H, C = p.C, D = p.D, per = H / src_heads;
  const T* s = src.data_ptr<T>();
  const int64_t sC = src.size(2);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      T* o = dst + (b * H + h) * C * D;
      if (given && !p.keep[b]) {
        std::fill(o, o + C * D, T(0));
        continue;
      }
      const T* r = s + ((b * src_heads + h / per) * sC) * D;
      for (int64_t i = 0; i < C * D; ++i) o[i] = ss * r[i];
    }
}

template <typename T>
void forward_small(const Problem& p, const StateLayout& L, T* st, const OptTensor& eps, double ss_d) {
  const int64_t H = p.H, C = p.C, D = p.D;
  const T ss = T(ss_d);
  at::Tensor e;
  const T* ep = nullptr;
  if (eps.has_value()) {
    e = eps->narrow(2, 0, C).to(p.ct).contiguous();
    ep = e.data_ptr<T>();
  }
  const bool mixed = p.proposal == kMixed;
  for_heads(p, C * C * D + C * D, [&](int64_t b, int64_t h) {
    const int64_t bh = b * H + h, o = bh * C * D;
    const T* qt = st + L.qt + o;
    const T* kt = st + L.kt + o;
    T* mu = st + L.mu + o;
    T* w = st + L.w + o;
    if (p.proposal == kSegment) {
      for (int64_t i = 0; i < C * D; ++i) mu[i] = qt[i] + kt[i];
    } else if (mixed) {
      const int64_t na = p.nact[b];
      T* a = st + L.amix + bh * C * C;
      mm<T>(false, true, C, C, D, kt, D, kt, D, T(0), a, C);
      for (int64_t c = 0; c < C; ++c) {
        T* row = a + c * C;
        T mx = cpu::kNegInf<T>;
        for (int64_t j = 0; j < na; ++j) mx = std::max(mx, row[j]);
        T s = T(0);
        for (int64_t j = 0; j < na; ++j) {
          row[j] = std::exp(row[j] - mx);
          s += row[j];
        }
        for (int64_t j = 0; j < na; ++j) row[j] /= s;
        for (int64_t j = na; j < C; ++j) row[j] = T(0);
      }
      std::copy(qt, qt + C * D, mu);
      mm<T>(false, false, C, D, C, a, C, kt, D, T(1), mu, D);
    } else {  // attend: mu = qt + ss mean_k (its key pass ran before)
      const T* mk = st + L.katt + o;
      for (int64_t i = 0; i < C * D; ++i) mu[i] = qt[i] + ss * mk[i];
    }
    if (ep != nullptr) {
      const T* eb = ep + o;
      for (int64_t i = 0; i < C * D; ++i) w[i] = mu[i] + eb[i];
    } else {
      std::copy(mu, mu + C * D, w);
    }
  });
}

// densities, rho, log_den, the weights and the query pass's bias (Z, lam, kap already in the state)
template <typename T>
void weights_small(const Problem& p, const StateLayout& L, T* st) {
  const int64_t H = p.H, C = p.C, D = p.D;
  const bool opt = p.optimal();
  for_heads(p, C * C * D, [&](int64_t b, int64_t h) {
    const int64_t bh = b * H + h, na = p.nact[b];
    std::vector<T> g(C * C);
    densities<T>(C, D, st + L.w + bh * C * D, st + L.mu + bh * C * D, g.data());
    const T* Z = st + L.Z + bh * C;
    T* rho = st + L.rho + bh * C;
    T* ld = st + L.logden + bh * C;
    T* bias = st + L.bias + bh * C;
    T* bhp = opt ? st + L.bh + bh * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const T* row = g.data() + c * C;
      T mx = cpu::kNegInf<T>;
      for (int64_t j = 0; j < na; ++j) mx = std::max(mx, row[j]);
      T s = T(0);
      for (int64_t j = 0; j < na; ++j) s += std::exp(row[j] - mx);
      ld[c] = mx + std::log(s);
      rho[c] = row[c];
      if (opt) {
        bhp[c] = std::exp(rho[c] - ld[c]);
        bias[c] = Z[c] - rho[c];
      } else {
        bias[c] = Z[c] - ld[c];
      }
    }
  });
}

template <typename T>
void copy_into(const at::Tensor& src, T* dst) {
  const T* s = src.data_ptr<T>();
  std::copy(s, s + src.numel(), dst);
}

template <typename T>
std::tuple<Tensor, Tensor> forward_impl(const Problem& p, const OptTensor& eps, const OptTensor& qlm,
                                        const OptTensor& klm, double beta, double ss) {
  const int64_t B = p.B, H = p.H, C = p.C, D = p.D, DV = p.DV;
  const StateLayout L = state_layout(p);
  const auto opts = at::TensorOptions().dtype(p.ct);
  at::Tensor state = new_output({L.total}, opts);
  T* st = state.data_ptr<T>();
  const at::Tensor qt = field(state, L.qt, {B, H, C, D});
  const at::Tensor w = field(state, L.w, {B, H, C, D});

  // 1. landmarks, scaled (key landmarks once per key/value head, repeated to the group)
  if (qlm.has_value()) {
    copy_landmarks<T>(p, qlm->to(p.ct).contiguous(), H, true, T(ss), st + L.qt);
  } else {
    copy_landmarks<T>(p, landmarks_cpu(p.q, p.q_pad, p.c_eff, C, p.cu_q, p.max_q), H, false, T(ss), st + L.qt);
  }
  if (klm.has_value()) {
    copy_landmarks<T>(p, klm->to(p.ct).contiguous(), H, true, T(ss), st + L.kt);
  } else {
    copy_landmarks<T>(p, landmarks_cpu(p.k, p.k_pad, p.c_eff, C, p.cu_k, p.max_k), p.Hkv, false, T(ss),
                      st + L.kt);
  }
  // 2. proposal means ("attend": a key pass with values k, no norm term), 3. samples
  if (p.proposal == kAttend) {
    auto [za, ka] = key_pass_fwd_cpu(grouped(p, qt), p.k, p.k, p.k_pad, ss, false, p.cu_k, p.max_k);
    copy_into<T>(za, st + L.zatt);
    copy_into<T>(ka, st + L.katt);
  }
  forward_small<T>(p, L, st, eps, ss);
  // 4. key statistics
  {
    auto [Z, kap] = key_pass_fwd_cpu(grouped(p, w), p.k, p.v, p.k_pad, ss, true, p.cu_k, p.max_k);
    copy_into<T>(Z, st + L.Z);
    copy_into<T>(kap, st + L.kap);
  }
  // 5. query normalizer
  if (p.optimal()) {
    auto lam = std::get<0>(key_pass_fwd_cpu(qt, p.q, c10::nullopt, p.q_pad, ss, false, p.cu_q, p.max_q));
    copy_into<T>(lam, st + L.lam);
  }
  // 6. densities and weights
  weights_small<T>(p, L, st);
  // 7. query pass
  const at::Tensor bias = field(state, L.bias, {B, H, C});
  const at::Tensor kap = field(state, L.kap, {B, H, C, DV});
  OptTensor mq, ml, mb;
  if (p.optimal()) {
    mq = qt;
    ml = field(state, L.lam, {B, H, C});
    mb = field(state, L.bh, {B, H, C});
  }
  at::Tensor y = query_pass_fwd_cpu(p.q, w, bias, kap, p.c_eff, p.q_pad, ss, mq, ml, mb, beta, p.cu_q, p.max_q);
  if (p.dropped) y.masked_fill_(p.keep4.logical_not(), 0);
  return {y, state};
}

// ---------------------------------------------------------------------------------
// Backward

// The C-sized backward per (b, h): writes gq = ss * dqt (without the attend key pass's
// part), gk = ss * dkt, and for attend dka = ss * dmu (the mean keys' incoming gradient).
template <typename T>
void backward_small(const Problem& p, const StateLayout& L, const T* st, double ss_d, const T* dbias, const T* dbh,
                    const T* dw1, const T* dw3, const T* dqt1, const T* dqt2, T* gq, T* gk, T* dka) {
  const int64_t H = p.H, C = p.C, D = p.D;
  const T ss = T(ss_d);
  const bool opt = p.optimal();
  for_heads(p, 4 * C * C * D, [&](int64_t b, int64_t h) {
    const int64_t bh = b * H + h, o = bh * C * D, na = p.nact[b];
    const T* w = st + L.w + o;
    const T* mu = st + L.mu + o;
    const T* kt = st + L.kt + o;
    const T* ld = st + L.logden + bh * C;
    std::vector<T> g(C * C), dmu(C * D), dw(C * D), colsum(C, T(0));
    densities<T>(C, D, w, mu, g.data());
    // dg (in g)
    for (int64_t c = 0; c < C; ++c) {
      const T db = dbias[bh * C + c];
      T drho, dld;
      if (opt) {
        const T t = dbh[bh * C + c] * st[L.bh + bh * C + c];
        drho = t - db;
        dld = -t;
      } else {
        drho = T(0);
        dld = -db;
      }
      T* row = g.data() + c * C;
      for (int64_t j = 0; j < C; ++j) row[j] = j < na ? dld * std::exp(row[j] - ld[c]) : T(0);
      row[c] += drho;
      for (int64_t j = 0; j < C; ++j) colsum[j] += row[j];
    }
    // dw = dw1 + dw3 + dg mu; dmu = dw + dg^T w - colsum mu
    for (int64_t i = 0; i < C * D; ++i) dw[i] = dw1[o + i] + dw3[o + i];
    mm<T>(false, false, C, D, C, g.data(), C, mu, D, T(1), dw.data(), D);
    for (int64_t j = 0; j < C; ++j)
      for (int64_t d = 0; d < D; ++d) dmu[j * D + d] = dw[j * D + d] - colsum[j] * mu[j * D + d];
    mm<T>(true, false, C, D, C, g.data(), C, w, D, T(1), dmu.data(), D);
    // proposal
    T* gqb = gq + o;
    T* gkb = gk + o;
    for (int64_t i = 0; i < C * D; ++i) {
      T s = dmu[i];
      if (opt) s += dqt1[o + i] + dqt2[o + i];
      gqb[i] = ss * s;
    }
    if (p.proposal == kSegment) {
      for (int64_t i = 0; i < C * D; ++i) gkb[i] = ss * dmu[i];
    } else if (p.proposal == kMixed) {
      const T* a = st + L.amix + bh * C * C;
      std::vector<T> dkt(C * D), da(C * C);
      mm<T>(true, false, C, D, C, a, C, dmu.data(), D, T(0), dkt.data(), D);   // a^T dmu
      mm<T>(false, true, C, C, D, dmu.data(), D, kt, D, T(0), da.data(), C);   // dmu kt^T
      for (int64_t c = 0; c < C; ++c) {
        const T* arow = a + c * C;
        T* drow = da.data() + c * C;
        T s = T(0);
        for (int64_t j = 0; j < C; ++j) s += arow[j] * drow[j];
        for (int64_t j = 0; j < C; ++j) drow[j] = arow[j] * (drow[j] - s);   // dA
      }
      mm<T>(false, false, C, D, C, da.data(), C, kt, D, T(1), dkt.data(), D);  // dA kt
      mm<T>(true, false, C, D, C, da.data(), C, kt, D, T(1), dkt.data(), D);   // dA^T kt
      for (int64_t i = 0; i < C * D; ++i) gkb[i] = ss * dkt[i];
    } else {
      std::fill(gkb, gkb + C * D, T(0));
      for (int64_t i = 0; i < C * D; ++i) dka[o + i] = ss * dmu[i];
    }
  });
}

template <typename T>
at::Tensor given_landmarks_grad(const Problem& p, const at::Tensor& g, const at::Tensor& lm) {
  at::Tensor out = at::zeros(lm.sizes(), lm.options());
  out.narrow(2, 0, p.C).copy_(g);
  if (p.dropped) out.masked_fill_(p.keep4.logical_not(), 0);
  return out;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(const Problem& p, const at::Tensor& dy_in,
                                                                  const at::Tensor& state, const OptTensor& qlm,
                                                                  const OptTensor& klm, double beta, double ss) {
  const char* op = "lara_kernels::lara_bwd";
  const int64_t B = p.B, H = p.H, C = p.C, D = p.D, DV = p.DV;
  const StateLayout L = state_layout(p);
  TORCH_CHECK(state.dim() == 1 && state.size(0) == L.total && state.scalar_type() == p.ct && state.is_contiguous(),
              op, ": state must be the contiguous ", p.ct, " (", L.total, ",) tensor lara_fwd returned for these "
              "arguments, got ", state.scalar_type(), " ", state.sizes());
  const T* st = state.data_ptr<T>();
  const at::Tensor qt = field(state, L.qt, {B, H, C, D});
  const at::Tensor w = field(state, L.w, {B, H, C, D});
  const at::Tensor Z = field(state, L.Z, {B, H, C});
  const at::Tensor bias = field(state, L.bias, {B, H, C});
  const at::Tensor kap = field(state, L.kap, {B, H, C, DV});
  OptTensor mq, ml, mb;
  if (p.optimal()) {
    mq = qt;
    ml = field(state, L.lam, {B, H, C});
    mb = field(state, L.bh, {B, H, C});
  }
  at::Tensor dy = dy_in;
  if (p.dropped) dy = dy.masked_fill(p.keep4.logical_not(), 0);

  // query pass, query normalizer, key pass
  auto [dq, dw1, dbias, dkap, dqt1, dlam, dbh] =
      query_pass_bwd_cpu(p.q, w, bias, kap, p.c_eff, p.q_pad, ss, mq, ml, mb, beta, dy, p.cu_q, p.max_q);
  at::Tensor dqt2;
  if (p.optimal()) {
    auto [dqt_n, dq_n, unused] = key_pass_bwd_cpu(qt, p.q, c10::nullopt, p.q_pad, ss, false, *ml, c10::nullopt, dlam,
                                                  c10::nullopt, p.cu_q, p.max_q);
    dqt2 = dqt_n;
    add_into(dq, dq_n);
  }
  auto [dw3, dk, dv] = key_pass_bwd_cpu(grouped(p, w), p.k, p.v, p.k_pad, ss, true, grouped(p, Z),
                                        grouped(p, kap), grouped(p, dbias), grouped(p, dkap), p.cu_k, p.max_k);

  // the C x D and C x C steps
  const auto opts = at::TensorOptions().dtype(p.ct);
  at::Tensor gq = at::empty({B, H, C, D}, opts), gk = at::empty({B, H, C, D}, opts);
  at::Tensor dka = p.proposal == kAttend ? at::empty({B, H, C, D}, opts) : at::Tensor();
  backward_small<T>(p, L, st, ss, dbias.data_ptr<T>(), p.optimal() ? dbh.data_ptr<T>() : nullptr,
                    dw1.data_ptr<T>(), dw3.data_ptr<T>(), p.optimal() ? dqt1.data_ptr<T>() : nullptr,
                    p.optimal() ? dqt2.data_ptr<T>() : nullptr, gq.data_ptr<T>(), gk.data_ptr<T>(),
                    dka.defined() ? dka.data_ptr<T>() : nullptr);
  if (p.proposal == kAttend) {
    const at::Tensor za = field(state, L.zatt, {B, H, C}), ka = field(state, L.katt, {B, H, C, D});
    auto [dqt3, dk_keys, dk_values] = key_pass_bwd_cpu(grouped(p, qt), p.k, p.k, p.k_pad, ss, false, grouped(p, za),
                                                       grouped(p, ka), at::zeros({B, p.Hkv, p.G * C}, opts),
                                                       grouped(p, dka), p.cu_k, p.max_k);
    gq.add_(dqt3.view({B, H, C, D}), ss);
    add_into(dk, dk_keys);
    add_into(dk, dk_values);
  }

  // landmarks
  at::Tensor dqlm, dklm;
  if (qlm.has_value()) {
    dqlm = given_landmarks_grad<T>(p, gq, *qlm);
  } else {
    add_into(dq, landmarks_backward_cpu(gq, p.q_pad, p.c_eff, p.Lq, p.q.scalar_type(), p.cu_q, p.max_q));
    dqlm = at::empty({0}, dq.options());
  }
  if (klm.has_value()) {
    dklm = given_landmarks_grad<T>(p, gk, *klm);
  } else {
    const at::Tensor gkv = p.G == 1 ? gk : gk.view({B, p.Hkv, p.G, C, D}).sum(2);
    add_into(dk, landmarks_backward_cpu(gkv, p.k_pad, p.c_eff, p.Lk, p.k.scalar_type(), p.cu_k, p.max_k));
    dklm = at::empty({0}, dq.options());
  }
  if (p.dropped) {
    const at::Tensor drop = p.keep4.logical_not();
    dq.masked_fill_(drop, 0);
    dk.masked_fill_(drop, 0);
    dv.masked_fill_(drop, 0);
  }
  return {dq, dk, dv, dqlm, dklm};
}

}  // namespace

std::tuple<Tensor, Tensor> lara_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
                                        const OptTensor& q_landmarks, const OptTensor& k_landmarks,
                                        const OptTensor& query_padding, const OptTensor& key_padding,
                                        int64_t num_samples, int64_t proposal, int64_t weighting, double beta,
                                        double ss, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const char* op = "lara_kernels::lara_fwd";
  const Problem p = setup(op, q, k, v, q_landmarks, k_landmarks, query_padding, key_padding, cu_seqlens_q,
                          cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_samples, proposal, weighting);
  TORCH_CHECK(!k_landmarks.has_value() || proposal != kAttend, op, ": proposal 'attend' takes no k_landmarks");
  if (eps.has_value())
    TORCH_CHECK(eps->dim() == 4 && eps->size(0) == p.B && eps->size(1) == p.H && eps->size(2) == num_samples &&
                    eps->size(3) == p.D && eps->device().is_cpu(),
                op, ": eps must be a CPU tensor of shape (", p.B, ", ", p.H, ", ", num_samples, ", ", p.D, "), got ",
                eps->sizes());
  if (p.ct == at::kDouble) return forward_impl<double>(p, eps, q_landmarks, k_landmarks, beta, ss);
  return forward_impl<float>(p, eps, q_landmarks, k_landmarks, beta, ss);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lara_bwd_cpu(
    const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& state,
    const OptTensor& q_landmarks, const OptTensor& k_landmarks, const OptTensor& query_padding,
    const OptTensor& key_padding, int64_t num_samples, int64_t proposal, int64_t weighting, double beta, double ss,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const char* op = "lara_kernels::lara_bwd";
  const Problem p = setup(op, q, k, v, q_landmarks, k_landmarks, query_padding, key_padding, cu_seqlens_q,
                          cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_samples, proposal, weighting);
  if (p.ct == at::kDouble) return backward_impl<double>(p, dy, state, q_landmarks, k_landmarks, beta, ss);
  return backward_impl<float>(p, dy, state, q_landmarks, k_landmarks, beta, ss);
}

}  // namespace lara
