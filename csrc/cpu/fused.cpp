// The whole LARA computation on the CPU as one op per direction (lara_fwd, lara_bwd): the
// sequence of lara_kernels/_pipeline.py's lara_forward (landmarks, proposal means, samples,
// key pass, query normalizer, densities and weights, query pass; docs/math.md sections 1-7)
// with its C x D and C x C steps as loops here instead of torch ops, and their backward
// written out (docs/design.md has the passes' backward; the small steps' is below).
//
// The long passes are the bodies of the CPU passes (passes.h: landmarks.cpp, passes.cpp),
// called directly, not through the dispatcher and without the ops' argument checks (setup
// checks the call once); they write straight into the state (forward) and into one scratch
// of the C-sized gradients (backward). Besides y (or dq, dk, dv), the state and that
// scratch, a call allocates the passes' own scratch (two buffers per pass: partials, tiles)
// and, in the backward, the normalizer's dq (and the attend proposal's dk) before they are
// added in. Both layouts (padded with masks, packed with
// offsets), grouped-query attention, given landmarks, training noise, every proposal and
// weighting. The forward returns y and one flat compute-type "state" tensor (layout:
// csrc/state_layout.h, shared with the CUDA implementation) holding the
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

#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "../lara_ops.h"
#include "../state_layout.h"
#include "cpu_math.h"
#include "passes.h"
#include "seqs.h"

namespace lara {
namespace {

// The call's shape and layout (the shared checks' WholeArgs) and what the pipeline derives
// from the masks or offsets (prepare_masks, drop_inputs), shared by forward and backward.
struct Problem : WholeArgs {
  bool dropped = false;                  // some element has no valid query or key (padded layout)
  c10::SmallVector<int64_t, 8> c_eff;    // C_eff per element
  c10::SmallVector<int64_t, 8> nact;     // samples active in the C x C steps, per element
  c10::SmallVector<uint8_t, 8> keep;     // padded layout: 0 for the dropped elements
  at::Tensor keep4;                      // (B, 1, 1, 1) bool, only when dropped
  at::Tensor q_pad, k_pad;               // the passes' masks (dropped elements made all-valid), or undefined
  at::Tensor q, k, v;                    // dropped elements zeroed
  cpu::Seqs sq, sk;                      // the rows of q (H heads) and of k, v (H_kv heads)
};

int64_t valid_count(const bool* row, int64_t L) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) n += !row[l];
  return n;
}

Problem setup(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
              const OptTensor& qlm, const OptTensor& klm, const OptTensor& qpm, const OptTensor& kpm,
              const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_q, int64_t max_k, int64_t num_samples,
              int64_t proposal, int64_t weighting) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q, k, v must be CPU tensors, got ", q.device());
  Problem p;
  static_cast<WholeArgs&>(p) = check_whole_args(op, q, k, v, eps, qlm, klm, qpm, kpm, cu_q, cu_k, max_q, max_k,
                                                num_samples, proposal, weighting);
  p.q = q;
  p.k = k;
  p.v = v;

  const int64_t B = p.B, C = p.C;
  p.c_eff.assign(B, C);
  int64_t* ce = p.c_eff.data();
  p.nact.assign(B, C);
  p.keep.assign(B, 1);
  p.sq.B = p.sk.B = B;
  p.sq.H = p.H;
  p.sk.H = p.Hkv;
  p.sq.L = p.Lq;
  p.sk.L = p.Lk;
  if (p.packed) {
    const int32_t* oq = cpu::packed_offsets(op, cu_q, p.Lq);
    const int32_t* ok = cpu::packed_offsets(op, cu_k, p.Lk);
    p.sq.cu = oq;
    p.sk.cu = ok;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = int64_t(oq[b + 1]) - oq[b], m = int64_t(ok[b + 1]) - ok[b];
      TORCH_CHECK(n <= max_q && m <= max_k, op, ": sequence ", b, " (", n, " queries, ", m,
                  " keys) is longer than max_seqlen (", max_q, ", ", max_k, ")");
      ce[b] = std::min({C, n, m});
      p.nact[b] = std::max<int64_t>(ce[b], 1);   // the C x C steps treat sample 0 as active (_pipeline)
    }
    return p;
  }
  if (!p.masked) return p;
  // prepare_masks: an element with no valid query or key is dropped (masks made valid,
  // inputs zeroed, output zeroed); C_eff = min(C, valid queries, valid keys)
  at::Tensor qm = qpm.has_value() ? qpm->contiguous() : at::Tensor();
  at::Tensor km = kpm.has_value() ? kpm->contiguous() : at::Tensor();
  c10::SmallVector<int64_t, 8> nv(B, p.N), mv(B, p.M);
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
  p.q_pad = qm;
  p.k_pad = km;
  if (qm.defined()) p.sq.pad = qm.data_ptr<bool>();
  if (km.defined()) p.sk.pad = km.data_ptr<bool>();
  return p;
}

// Scratch of n elements of T for the C-sized steps of one call: uninitialized (every
// element is written before it is read), NaN in test mode (lara_ops.h).
template <typename T>
at::Tensor small_scratch(int64_t n) {
  return new_output({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Row-major c (m x n) = op(a) op(b) + beta c, as cpu::gemm; plain loops for the tiny
// products of the C-sized steps, BLAS beyond. The choice depends on the shapes only.
// Measured (MKL, one thread, float): a call costs about 0.2 us up to m n k ~ 4096, where
// the loops take 0.2 us at m n k = 1024 and 0.5 us at 4096, and fall far behind above.
constexpr int64_t kLoopProduct = 1 << 11;

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
  // eps (B, H, num_samples, D): rows 0 .. C - 1 of each (b, h), read in place where it is
  // contiguous in the compute type
  at::Tensor e;
  const T* ep = nullptr;
  int64_t es = C * D;
  if (eps.has_value()) {
    if (eps->scalar_type() == p.ct && eps->is_contiguous()) {
      ep = eps->data_ptr<T>();
      es = p.NS * D;
    } else {
      e = eps->narrow(2, 0, C).to(p.ct).contiguous();
      ep = e.data_ptr<T>();
    }
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
      const T* eb = ep + bh * es;
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
  const bool opt = p.optimal;
  const std::unique_ptr<T[]> gs(new T[p.B * H * C * C]);
  for_heads(p, C * C * D, [&](int64_t b, int64_t h) {
    const int64_t bh = b * H + h, na = p.nact[b];
    T* g = gs.get() + bh * C * C;
    densities<T>(C, D, st + L.w + bh * C * D, st + L.mu + bh * C * D, g);
    const T* Z = st + L.Z + bh * C;
    T* rho = st + L.rho + bh * C;
    T* ld = st + L.logden + bh * C;
    T* bias = st + L.bias + bh * C;
    T* bhp = opt ? st + L.bh + bh * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const T* row = g + c * C;
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

// The query pass's inputs from the state (the MIS fields with the optimal weighting), for
// the forward and the backward alike.
template <typename T>
cpu::QueryArgs<T> query_args(const Problem& p, const StateLayout& L, const T* st) {
  const bool mis = p.optimal;
  return {p.q,         st + L.w, st + L.bias, st + L.kap, p.c_eff.data(), mis ? st + L.qt : nullptr,
          mis ? st + L.lam : nullptr, mis ? st + L.bh : nullptr, p.C, p.D, p.DV, mis};
}

// A new contiguous tensor in x's dtype with the layout of the rows of sq (padded (B, H, L,
// W) or packed (T, H, W)) and W columns.
at::Tensor long_output(const cpu::Seqs& sq, int64_t W, const at::Tensor& x) {
  if (sq.packed()) return new_output({sq.L, sq.H, W}, x.options());
  return new_output({sq.B, sq.H, sq.L, W}, x.options());
}

template <typename T>
std::tuple<Tensor, Tensor> forward_impl(const Problem& p, const OptTensor& eps, const OptTensor& qlm,
                                        const OptTensor& klm, double beta, double ss_d) {
  const int64_t H = p.H, C = p.C, G = p.G;
  const T ss = T(ss_d);
  const StateLayout& L = p.layout;
  at::Tensor state = new_output({L.total}, at::TensorOptions().dtype(p.ct));
  T* st = state.data_ptr<T>();
  const int64_t* ce = p.c_eff.data();

  // 1. landmarks, scaled (key landmarks once per key/value head, repeated to the group)
  if (qlm.has_value()) {
    copy_landmarks<T>(p, qlm->to(p.ct).contiguous(), H, true, ss, st + L.qt);
  } else {
    cpu::landmarks_body<T>(p.q, p.sq, ce, C, ss, 1, st + L.qt);
  }
  if (klm.has_value()) {
    copy_landmarks<T>(p, klm->to(p.ct).contiguous(), H, true, ss, st + L.kt);
  } else {
    cpu::landmarks_body<T>(p.k, p.sk, ce, C, ss, G, st + L.kt);
  }
  // 2. proposal means ("attend": a key pass with values k, no norm term, the G * C rows of
  // a key/value head's query heads together), 3. samples
  if (p.proposal == kAttend)
    cpu::key_pass_fwd_body<T>(st + L.qt, G * C, p.k, p.k, p.sk, ss, false, st + L.zatt, st + L.katt);
  forward_small<T>(p, L, st, eps, ss_d);
  // 4. key statistics
  cpu::key_pass_fwd_body<T>(st + L.w, G * C, p.k, p.v, p.sk, ss, true, st + L.Z, st + L.kap);
  // 5. query normalizer
  if (p.optimal) cpu::key_pass_fwd_body<T>(st + L.qt, C, p.q, at::Tensor(), p.sq, ss, false, st + L.lam, nullptr);
  // 6. densities and weights
  weights_small<T>(p, L, st);
  // 7. query pass
  at::Tensor y = long_output(p.sq, p.DV, p.q);
  cpu::query_pass_fwd_body<T>(query_args<T>(p, L, st), p.sq, ss, T(beta), y);
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
  const bool opt = p.optimal;
  const int64_t per = 2 * C * C + 3 * C * D + C;   // g, dmu, dw, colsum, and for mixed dkt, da
  const std::unique_ptr<T[]> buf(new T[p.B * H * per]);
  for_heads(p, 4 * C * C * D, [&](int64_t b, int64_t h) {
    const int64_t bh = b * H + h, o = bh * C * D, na = p.nact[b];
    const T* w = st + L.w + o;
    const T* mu = st + L.mu + o;
    const T* kt = st + L.kt + o;
    const T* ld = st + L.logden + bh * C;
    T* g = buf.get() + bh * per;
    T *dmu = g + C * C, *dw = dmu + C * D, *colsum = dw + C * D, *dkt = colsum + C, *da = dkt + C * D;
    std::fill(colsum, colsum + C, T(0));
    densities<T>(C, D, w, mu, g);
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
      T* row = g + c * C;
      for (int64_t j = 0; j < C; ++j) row[j] = j < na ? dld * std::exp(row[j] - ld[c]) : T(0);
      row[c] += drho;
      for (int64_t j = 0; j < C; ++j) colsum[j] += row[j];
    }
    // dw = dw1 + dw3 + dg mu; dmu = dw + dg^T w - colsum mu
    for (int64_t i = 0; i < C * D; ++i) dw[i] = dw1[o + i] + dw3[o + i];
    mm<T>(false, false, C, D, C, g, C, mu, D, T(1), dw, D);
    for (int64_t j = 0; j < C; ++j)
      for (int64_t d = 0; d < D; ++d) dmu[j * D + d] = dw[j * D + d] - colsum[j] * mu[j * D + d];
    mm<T>(true, false, C, D, C, g, C, w, D, T(1), dmu, D);
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
      mm<T>(true, false, C, D, C, a, C, dmu, D, T(0), dkt, D);   // a^T dmu
      mm<T>(false, true, C, C, D, dmu, D, kt, D, T(0), da, C);   // dmu kt^T
      for (int64_t c = 0; c < C; ++c) {
        const T* arow = a + c * C;
        T* drow = da + c * C;
        T s = T(0);
        for (int64_t j = 0; j < C; ++j) s += arow[j] * drow[j];
        for (int64_t j = 0; j < C; ++j) drow[j] = arow[j] * (drow[j] - s);   // dA
      }
      mm<T>(false, false, C, D, C, da, C, kt, D, T(1), dkt, D);  // dA kt
      mm<T>(true, false, C, D, C, da, C, kt, D, T(1), dkt, D);   // dA^T kt
      for (int64_t i = 0; i < C * D; ++i) gkb[i] = ss * dkt[i];
    } else {
      std::fill(gkb, gkb + C * D, T(0));
      for (int64_t i = 0; i < C * D; ++i) dka[o + i] = ss * dmu[i];
    }
  });
}

// The gradient of given landmarks lm (B, H, num_samples, D): g (B, H, C, D) in rows 0 .. C - 1, 0 beyond.
template <typename T>
at::Tensor given_landmarks_grad(const Problem& p, const T* g, const at::Tensor& lm) {
  at::Tensor out = at::zeros(lm.sizes(), lm.options());
  out.narrow(2, 0, p.C).copy_(at::from_blob(const_cast<T*>(g), {p.B, p.H, p.C, p.D},
                                            at::TensorOptions().dtype(p.ct).device(at::kCPU)));
  if (p.dropped) out.masked_fill_(p.keep4.logical_not(), 0);
  return out;
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(const Problem& p, const at::Tensor& dy_in,
                                                                  const at::Tensor& state, const OptTensor& qlm,
                                                                  const OptTensor& klm, double beta, double ss_d) {
  const int64_t B = p.B, H = p.H, C = p.C, D = p.D, DV = p.DV, G = p.G;
  const T ss = T(ss_d);
  const bool opt = p.optimal, attend = p.proposal == kAttend;
  const StateLayout& L = p.layout;
  const T* st = state.data_ptr<T>();
  const int64_t* ce = p.c_eff.data();
  at::Tensor dy = dy_in;
  if (p.dropped) dy = dy.masked_fill(p.keep4.logical_not(), 0);

  // the C-sized gradients, one scratch: (B, H, C, D) dw1, dw3, dqt1, dqt2, gq, gk, dka, dqt3;
  // (B, H, C) dbias, dlam, dbh, dzero; (B, H, C, Dv) dkap
  const int64_t cd = B * H * C * D, c1 = B * H * C;
  at::Tensor scratch = small_scratch<T>(8 * cd + 4 * c1 + c1 * DV);
  T* sp = scratch.data_ptr<T>();
  T *dw1 = sp, *dw3 = dw1 + cd, *dqt1 = dw3 + cd, *dqt2 = dqt1 + cd, *gq = dqt2 + cd, *gk = gq + cd, *dka = gk + cd,
    *dqt3 = dka + cd, *dbias = dqt3 + cd, *dlam = dbias + c1, *dbh = dlam + c1, *dzero = dbh + c1, *dkap = dzero + c1;

  // query pass, query normalizer, key pass
  at::Tensor dq = long_output(p.sq, D, p.q);
  cpu::query_pass_bwd_body<T>(query_args<T>(p, L, st), p.sq, ss, T(beta), dy, dq, dw1, dbias, dkap,
                              opt ? dqt1 : nullptr, opt ? dlam : nullptr, opt ? dbh : nullptr);
  at::Tensor none;
  if (opt) {
    at::Tensor dq_n = long_output(p.sq, D, p.q);
    cpu::key_pass_bwd_body<T>(st + L.qt, C, p.q, at::Tensor(), p.sq, ss, false, st + L.lam, nullptr, dlam, nullptr,
                              dqt2, dq_n, none);
    add_into(dq, dq_n);
  }
  at::Tensor dk = long_output(p.sk, D, p.k), dv = long_output(p.sk, DV, p.v);
  cpu::key_pass_bwd_body<T>(st + L.w, G * C, p.k, p.v, p.sk, ss, true, st + L.Z, st + L.kap, dbias, dkap, dw3, dk,
                            dv);

  // the C x D and C x C steps
  backward_small<T>(p, L, st, ss_d, dbias, opt ? dbh : nullptr, dw1, dw3, opt ? dqt1 : nullptr,
                    opt ? dqt2 : nullptr, gq, gk, attend ? dka : nullptr);
  if (attend) {
    std::fill(dzero, dzero + c1, T(0));
    at::Tensor dk_keys = long_output(p.sk, D, p.k), dk_values = long_output(p.sk, D, p.k);
    cpu::key_pass_bwd_body<T>(st + L.qt, G * C, p.k, p.k, p.sk, ss, false, st + L.zatt, st + L.katt, dzero, dka,
                              dqt3, dk_keys, dk_values);
    for (int64_t i = 0; i < cd; ++i) gq[i] += ss * dqt3[i];
    add_into(dk, dk_keys);
    add_into(dk, dk_values);
  }

  // landmarks
  at::Tensor dqlm, dklm;
  if (qlm.has_value()) {
    dqlm = given_landmarks_grad<T>(p, gq, *qlm);
  } else {
    cpu::landmarks_backward_add<T>(gq, p.sq, ce, C, 1, dq);
    dqlm = at::empty({0}, dq.options());
  }
  if (klm.has_value()) {
    dklm = given_landmarks_grad<T>(p, gk, *klm);
  } else {
    cpu::landmarks_backward_add<T>(gk, p.sk, ce, C, G, dk);
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
  const Problem p = setup("lara_kernels::lara_fwd", q, k, v, eps, q_landmarks, k_landmarks, query_padding,
                          key_padding, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_samples, proposal,
                          weighting);
  if (p.ct == at::kDouble) return forward_impl<double>(p, eps, q_landmarks, k_landmarks, beta, ss);
  return forward_impl<float>(p, eps, q_landmarks, k_landmarks, beta, ss);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lara_bwd_cpu(
    const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& state,
    const OptTensor& q_landmarks, const OptTensor& k_landmarks, const OptTensor& query_padding,
    const OptTensor& key_padding, int64_t num_samples, int64_t proposal, int64_t weighting, double beta, double ss,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const char* op = "lara_kernels::lara_bwd";
  const Problem p = setup(op, q, k, v, c10::nullopt, q_landmarks, k_landmarks, query_padding, key_padding,
                          cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_samples, proposal, weighting);
  check_whole_state(op, p, state, q);
  check_whole_dy(op, p, dy, q);
  // the passes read dy in q's dtype
  const Tensor dyq = dy.scalar_type() == q.scalar_type() ? dy : dy.to(q.scalar_type());
  if (p.ct == at::kDouble) return backward_impl<double>(p, dyq, state, q_landmarks, k_landmarks, beta, ss);
  return backward_impl<float>(p, dyq, state, q_landmarks, k_landmarks, beta, ss);
}

}  // namespace lara
