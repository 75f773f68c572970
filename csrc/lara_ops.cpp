// The one binding file: op schemas (TORCH_LIBRARY), CPU and CUDA implementations
// (TORCH_LIBRARY_IMPL), and the argument checks every implementation shares.
#include "lara_ops.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace lara {

namespace {
std::atomic<bool> g_poison{false};
}  // namespace

bool poison_outputs() { return g_poison.load(std::memory_order_relaxed); }
void set_poison_outputs(bool on) { g_poison.store(on); }

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!poison_outputs()) return at::empty(sizes, opts);
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts);
}

namespace {

// The packed layout's offsets: (B + 1) int32, contiguous, on x's device, with no padding
// mask beside them and max_seqlen >= 0. Returns B.
int64_t check_cu_seqlens(const char* op, const at::Tensor& cu, const c10::optional<at::Tensor>& padding,
                         int64_t max_seqlen, const at::Tensor& x) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, op, ": cu_seqlens must be 1-D of size B + 1 >= 1, got shape ",
              cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK(cu.is_contiguous(), op, ": cu_seqlens must be contiguous");
  TORCH_CHECK(cu.device() == x.device(), op, ": cu_seqlens is on ", cu.device(), " but the inputs are on ",
              x.device());
  TORCH_CHECK(!padding.has_value(), op, ": padding must be none with cu_seqlens (the packed layout has no padding)");
  TORCH_CHECK(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  return cu.size(0) - 1;
}

}  // namespace

void check_landmarks_args(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                          const at::Tensor& c_eff, int64_t num_segments,
                          const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const bool packed = cu_seqlens.has_value();
  if (packed) {
    TORCH_CHECK(x.dim() == 3, "lara_kernels::landmarks: x must be 3-D (T, H, D) with cu_seqlens, got shape ",
                x.sizes());
  } else {
    TORCH_CHECK(x.dim() == 4, "lara_kernels::landmarks: x must be 4-D (B, H, L, D), got shape ", x.sizes());
  }
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "lara_kernels::landmarks: x must be float64, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(num_segments >= 1, "lara_kernels::landmarks: num_segments must be >= 1, got ", num_segments);
  const int64_t B = packed ? check_cu_seqlens("lara_kernels::landmarks", *cu_seqlens, padding, max_seqlen, x)
                           : x.size(0);
  const int64_t L = packed ? x.size(0) : x.size(2);
  TORCH_CHECK(c_eff.dim() == 1 && c_eff.size(0) == B && c_eff.scalar_type() == at::kLong,
              "lara_kernels::landmarks: c_eff must be int64 of shape (", B, ",), got ", c_eff.scalar_type(),
              " of shape ", c_eff.sizes());
  TORCH_CHECK(c_eff.device() == x.device(), "lara_kernels::landmarks: c_eff is on ", c_eff.device(),
              " but x is on ", x.device());
  if (padding.has_value()) {
    const auto& p = *padding;
    TORCH_CHECK(p.scalar_type() == at::kBool, "lara_kernels::landmarks: padding must be bool, got ", p.scalar_type());
    TORCH_CHECK(p.dim() == 2 && p.size(0) == B && p.size(1) == L,
                "lara_kernels::landmarks: padding must have shape (", B, ", ", L, "), got ", p.sizes());
    TORCH_CHECK(p.device() == x.device(), "lara_kernels::landmarks: padding is on ", p.device(),
                " but x is on ", x.device());
  }
}

void check_landmarks_backward_args(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                   const at::Tensor& c_eff, int64_t length, at::ScalarType dtype,
                                   const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  TORCH_CHECK(grad.dim() == 4, "lara_kernels::landmarks_backward: grad must be 4-D (B, H, C, D), got shape ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kDouble || grad.scalar_type() == at::kFloat,
              "lara_kernels::landmarks_backward: grad must be float64 or float32, got ", grad.scalar_type());
  TORCH_CHECK(length >= 0, "lara_kernels::landmarks_backward: length must be >= 0, got ", length);
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "lara_kernels::landmarks_backward: dtype must be floating, got ", dtype);
  const int64_t B = grad.size(0);
  if (cu_seqlens.has_value()) {
    const int64_t Bc = check_cu_seqlens("lara_kernels::landmarks_backward", *cu_seqlens, padding, max_seqlen, grad);
    TORCH_CHECK(Bc == B, "lara_kernels::landmarks_backward: cu_seqlens must have size B + 1 = ", B + 1, ", got ",
                Bc + 1);
  }
  TORCH_CHECK(c_eff.dim() == 1 && c_eff.size(0) == B && c_eff.scalar_type() == at::kLong,
              "lara_kernels::landmarks_backward: c_eff must be int64 of shape (", B, ",), got shape ", c_eff.sizes());
  if (padding.has_value()) {
    TORCH_CHECK(padding->scalar_type() == at::kBool && padding->dim() == 2 && padding->size(0) == B &&
                    padding->size(1) == length,
                "lara_kernels::landmarks_backward: padding must be bool of shape (", B, ", ", length, "), got ",
                padding->scalar_type(), " of shape ", padding->sizes());
  }
}


int64_t max_pass_dim(const c10::Device& device) {
  return device.is_cuda() ? kMaxDim : int64_t(std::numeric_limits<int>::max());
}

void check_cuda_pass_dims(const char* op, int64_t D, int64_t DV, int64_t C) {
  for (const auto& [what, d, lo] : {std::tuple<const char*, int64_t, int64_t>{"head dim D", D, 1},
                                    {"value head dim Dv", DV, 0}, {"number of samples C", C, 1}})
    TORCH_CHECK(d >= lo && d <= kMaxDim, op, ": ", what, " must be in [", lo, ", ", kMaxDim,
                "] for the CUDA passes, got ", d);
}

namespace {

bool is_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// t must have exactly `shape` (a -1 entry matches any size), dtype `dt` and x's device.
void check_small(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 at::ScalarType dt, const at::Tensor& x) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || t.size(i) == shape[i];
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ", x.device());
}

void check_padding(const char* op, const OptTensor& padding, int64_t B, int64_t L, const at::Tensor& x) {
  if (!padding.has_value()) return;
  const auto& p = *padding;
  TORCH_CHECK(p.scalar_type() == at::kBool, op, ": padding must be bool, got ", p.scalar_type());
  TORCH_CHECK(p.dim() == 2 && p.size(0) == B && p.size(1) == L, op, ": padding must have shape (", B, ", ", L,
              "), got ", p.sizes());
  TORCH_CHECK(p.device() == x.device(), op, ": padding is on ", p.device(), " but the inputs are on ", x.device());
}

// d in [1, max_pass_dim(device)]: the CUDA passes' capacity, BLAS's int sizes on the CPU.
void check_dim(const char* op, const char* what, int64_t d, const at::Tensor& x) {
  const int64_t hi = max_pass_dim(x.device());
  TORCH_CHECK(d >= 1 && d <= hi, op, ": ", what, " must be in [1, ", hi, "] on ", x.device().type(), ", got ", d);
}

}  // namespace

void check_key_pass_args(const char* op, const Tensor& w, const Tensor& k, const OptTensor& v,
                         const OptTensor& padding, const OptTensor& cu_seqlens, int64_t max_seqlen) {
  const bool packed = cu_seqlens.has_value();
  if (packed) {
    TORCH_CHECK(k.dim() == 3, op, ": k must be 3-D (T, H, D) with cu_seqlens, got shape ", k.sizes());
  } else {
    TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, H, M, D), got shape ", k.sizes());
  }
  TORCH_CHECK(is_float(k.scalar_type()), op, ": k must be float64, float32, float16 or bfloat16, got ",
              k.scalar_type());
  // packed: M is the total row count T, and B comes from cu_seqlens
  const int64_t B = packed ? check_cu_seqlens(op, *cu_seqlens, padding, max_seqlen, k) : k.size(0);
  const int64_t H = k.size(1), M = k.size(packed ? 0 : 2), D = k.size(packed ? 2 : 3);
  check_dim(op, "head dim D", D, k);
  check_small(op, "w", w, {B, H, -1, D}, compute_type(k.scalar_type()), k);
  // any number of rows C >= 1, on every device: grouped-query attention passes the C sample rows of
  // the G query heads of a key/value head as G * C rows (the query pass keeps its limit on C)
  TORCH_CHECK(w.size(2) >= 1 && w.size(2) <= std::numeric_limits<int>::max(), op,
              ": the number of rows C of w must be in [1, 2**31 - 1], got ", w.size(2));
  TORCH_CHECK(w.is_contiguous(), op, ": w must be contiguous");
  if (v.has_value()) {
    if (packed) {
      TORCH_CHECK(v->dim() == 3 && v->size(0) == M && v->size(1) == H, op, ": v must have shape (", M, ", ", H,
                  ", Dv), got ", v->sizes());
    } else {
      TORCH_CHECK(v->dim() == 4 && v->size(0) == B && v->size(1) == H && v->size(2) == M, op,
                  ": v must have shape (", B, ", ", H, ", ", M, ", Dv), got ", v->sizes());
    }
    TORCH_CHECK(v->scalar_type() == k.scalar_type(), op, ": v must have k's dtype ", k.scalar_type(), ", got ",
                v->scalar_type());
    TORCH_CHECK(v->device() == k.device(), op, ": v is on ", v->device(), " but k is on ", k.device());
    check_dim(op, "value head dim Dv", v->size(-1), k);
  }
  check_padding(op, padding, B, M, k);
}

void check_query_pass_args(const char* op, const Tensor& q, const Tensor& w, const Tensor& bias,
                           const Tensor& kap, const Tensor& c_eff, const OptTensor& padding,
                           const OptTensor& qt, const OptTensor& lam, const OptTensor& bh,
                           const OptTensor& cu_seqlens, int64_t max_seqlen) {
  const bool packed = cu_seqlens.has_value();
  if (packed) {
    TORCH_CHECK(q.dim() == 3, op, ": q must be 3-D (T, H, D) with cu_seqlens, got shape ", q.sizes());
  } else {
    TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, N, D), got shape ", q.sizes());
  }
  TORCH_CHECK(is_float(q.scalar_type()), op, ": q must be float64, float32, float16 or bfloat16, got ",
              q.scalar_type());
  // packed: N is the total row count T, and B comes from cu_seqlens
  const int64_t B = packed ? check_cu_seqlens(op, *cu_seqlens, padding, max_seqlen, q) : q.size(0);
  const int64_t H = q.size(1), N = q.size(packed ? 0 : 2), D = q.size(packed ? 2 : 3);
  const auto ct = compute_type(q.scalar_type());
  check_dim(op, "head dim D", D, q);
  check_small(op, "w", w, {B, H, -1, D}, ct, q);
  const int64_t C = w.size(2);
  check_dim(op, "number of samples C", C, q);
  check_small(op, "bias", bias, {B, H, C}, ct, q);
  check_small(op, "kap", kap, {B, H, C, -1}, ct, q);
  check_dim(op, "value head dim Dv", kap.size(3), q);
  check_small(op, "c_eff", c_eff, {B}, at::kLong, q);
  for (const auto* t : {&w, &bias, &kap, &c_eff})
    TORCH_CHECK(t->is_contiguous(), op, ": the C-sized inputs (w, bias, kap, c_eff) must be contiguous");
  check_padding(op, padding, B, N, q);
  const int given = int(qt.has_value()) + int(lam.has_value()) + int(bh.has_value());
  TORCH_CHECK(given == 0 || given == 3, op, ": qt, lam and bh are given together or not at all, got ", given,
              " of 3");
  if (given == 3) {
    check_small(op, "qt", *qt, {B, H, C, D}, ct, q);
    check_small(op, "lam", *lam, {B, H, C}, ct, q);
    check_small(op, "bh", *bh, {B, H, C}, ct, q);
    for (const auto* t : {&*qt, &*lam, &*bh})
      TORCH_CHECK(t->is_contiguous(), op, ": qt, lam and bh must be contiguous");
  }
}

namespace {

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

// A (B, L) bool padding mask on q's device, or none.
void check_mask(const char* op, const char* name, const OptTensor& m, int64_t B, int64_t L, const at::Tensor& q) {
  if (!m.has_value()) return;
  TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 2 && m->size(0) == B && m->size(1) == L, op, ": ", name,
              " must be bool of shape (", B, ", ", L, "), got ", m->scalar_type(), " ", m->sizes());
  check_same_device(op, name, *m, q);
}

// A (B, H, num_samples, D) tensor of a float dtype on q's device (given landmarks, eps), or none.
void check_small4(const char* op, const char* name, const OptTensor& t, const WholeArgs& a, const at::Tensor& q) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 4 && t->size(0) == a.B && t->size(1) == a.H && t->size(2) == a.NS && t->size(3) == a.D, op,
              ": ", name, " must be of shape (", a.B, ", ", a.H, ", ", a.NS, ", ", a.D, "), got ", t->sizes());
  TORCH_CHECK(is_float(t->scalar_type()), op, ": ", name, " must be float64, float32, float16 or bfloat16, got ",
              t->scalar_type());
  check_same_device(op, name, *t, q);
}

}  // namespace

WholeArgs check_whole_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
                           const OptTensor& qlm, const OptTensor& klm, const OptTensor& qpm, const OptTensor& kpm,
                           const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_q, int64_t max_k,
                           int64_t num_samples, int64_t proposal, int64_t weighting) {
  WholeArgs a;
  a.packed = cu_q.has_value();
  TORCH_CHECK(cu_k.has_value() == a.packed, op, ": cu_seqlens_q and cu_seqlens_k are given together or not at all");
  TORCH_CHECK(proposal >= kSegment && proposal <= kAttend, op,
              ": proposal must be 0 (segment), 1 (mixed) or 2 (attend), got ", proposal);
  TORCH_CHECK(weighting == kOptimal || weighting == kBalance, op,
              ": weighting must be 0 (optimal) or 1 (balance), got ", weighting);
  TORCH_CHECK(num_samples >= 1, op, ": num_samples must be >= 1, got ", num_samples);
  const int64_t dims = a.packed ? 3 : 4;
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == dims, op, ": q, k, v must be ", dims, "-D, got shape ", t->sizes());
  check_same_device(op, "k", k, q);
  check_same_device(op, "v", v, q);
  const auto st = q.scalar_type();
  TORCH_CHECK(is_float(st), op, ": q must be float64, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k, v must have one dtype, got ", st, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  a.proposal = proposal;
  a.optimal = weighting == kOptimal;
  a.NS = num_samples;
  a.ct = compute_type(st);
  a.H = q.size(1);
  a.Hkv = k.size(1);
  a.D = q.size(-1);
  a.DV = v.size(-1);
  TORCH_CHECK(a.Hkv >= 1 && a.H % a.Hkv == 0, op, ": the key/value heads ", a.Hkv, " must divide the query heads ",
              a.H);
  a.G = a.H / a.Hkv;
  TORCH_CHECK(k.size(-1) == a.D, op, ": k must have q's head dim ", a.D, ", got ", k.size(-1));
  TORCH_CHECK(v.size(1) == a.Hkv, op, ": v must have k's heads ", a.Hkv, ", got ", v.size(1));
  if (a.packed) {
    TORCH_CHECK(!qpm.has_value() && !kpm.has_value(), op, ": padding masks are not taken with cu_seqlens");
    TORCH_CHECK(cu_q->dim() == 1 && cu_k->dim() == 1 && cu_q->size(0) == cu_k->size(0) && cu_q->size(0) >= 1, op,
                ": cu_seqlens_q and cu_seqlens_k must be 1-D of one size B + 1, got ", cu_q->sizes(), " and ",
                cu_k->sizes());
    for (const auto& [name, cu] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &*cu_q},
                                   {"cu_seqlens_k", &*cu_k}}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu->scalar_type());
      TORCH_CHECK(cu->is_contiguous(), op, ": ", name, " must be contiguous");
      check_same_device(op, name, *cu, q);
    }
    TORCH_CHECK(v.size(0) == k.size(0), op, ": v must have k's rows ", k.size(0), ", got ", v.size(0));
    TORCH_CHECK(max_q >= 0 && max_k >= 0, op, ": max_seqlen must be >= 0, got ", max_q, ", ", max_k);
    a.B = cu_q->size(0) - 1;
    a.Lq = q.size(0);
    a.Lk = k.size(0);
    a.N = max_q;
    a.M = max_k;
  } else {
    a.B = q.size(0);
    TORCH_CHECK(k.size(0) == a.B && v.size(0) == a.B && v.size(2) == k.size(2), op,
                ": q, k, v must be (B, H, N, D), (B, H_kv, M, D), (B, H_kv, M, Dv), got ", q.sizes(), ", ",
                k.sizes(), ", ", v.sizes());
    a.Lq = a.N = q.size(2);
    a.Lk = a.M = k.size(2);
    check_mask(op, "query_padding", qpm, a.B, a.N, q);
    check_mask(op, "key_padding", kpm, a.B, a.M, q);
    a.masked = qpm.has_value() || kpm.has_value();
  }
  a.C = std::min({num_samples, a.N, a.M});
  TORCH_CHECK(a.C >= 1 && a.D >= 1 && a.DV >= 1, op, ": needs at least one query, key, sample and feature, got C = ",
              a.C, ", D = ", a.D, ", Dv = ", a.DV);
  check_small4(op, "q_landmarks", qlm, a, q);
  check_small4(op, "k_landmarks", klm, a, q);
  TORCH_CHECK(!klm.has_value() || proposal != kAttend, op, ": proposal 'attend' takes no k_landmarks");
  check_small4(op, "eps", eps, a, q);
  a.layout = state_layout(a.B, a.H, a.C, a.D, a.DV, a.optimal, proposal == kMixed, proposal == kAttend);
  return a;
}

void check_whole_state(const char* op, const WholeArgs& a, const Tensor& state, const Tensor& q) {
  TORCH_CHECK(state.dim() == 1 && state.size(0) == a.layout.total && state.scalar_type() == a.ct &&
                  state.is_contiguous(),
              op, ": state must be the contiguous ", a.ct, " (", a.layout.total, ",) tensor lara_fwd returned for "
              "these arguments, got ", state.scalar_type(), " ", state.sizes());
  check_same_device(op, "state", state, q);
}

void check_whole_dy(const char* op, const WholeArgs& a, const Tensor& dy, const Tensor& q) {
  std::vector<int64_t> ys(q.sizes().begin(), q.sizes().end());
  ys.back() = a.DV;
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(ys), op, ": dy must have shape ", at::IntArrayRef(ys), ", got ",
              dy.sizes());
  TORCH_CHECK(dy.scalar_type() == q.scalar_type() || dy.scalar_type() == a.ct, op, ": dy must be ", q.scalar_type(),
              " or ", a.ct, ", got ", dy.scalar_type());
  check_same_device(op, "dy", dy, q);
}

void long_strides(const Tensor& t, int64_t out[4]) {
  if (t.dim() == 3) {
    out[0] = 0;
    out[1] = t.stride(1);
    out[2] = t.stride(0);
    out[3] = t.stride(2);
    return;
  }
  for (int i = 0; i < 4; ++i) out[i] = t.stride(i);
}

}  // namespace lara

TORCH_LIBRARY(lara_kernels, m) {
  // Every op ends in the layout pair (cu_seqlens, max_seqlen): none and 0 for the padded
  // layout, the offsets of a packed batch of sequences otherwise (lara_ops.h).
  m.def("landmarks(Tensor x, Tensor? padding, Tensor c_eff, int num_segments, Tensor? cu_seqlens=None, "
        "int max_seqlen=0) -> Tensor");
  m.def("landmarks_backward(Tensor grad, Tensor? padding, Tensor c_eff, int length, ScalarType dtype, "
        "Tensor? cu_seqlens=None, int max_seqlen=0) -> Tensor");
  m.def("key_pass_fwd(Tensor w, Tensor k, Tensor? v, Tensor? padding, float ss, bool subtract_norm, "
        "Tensor? cu_seqlens=None, int max_seqlen=0) -> (Tensor, Tensor)");
  m.def("key_pass_bwd(Tensor w, Tensor k, Tensor? v, Tensor? padding, float ss, bool subtract_norm, Tensor Z, "
        "Tensor? kap, Tensor dZ, Tensor? dkap, Tensor? cu_seqlens=None, int max_seqlen=0) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("query_pass_fwd(Tensor q, Tensor w, Tensor bias, Tensor kap, Tensor c_eff, Tensor? padding, float ss, "
        "Tensor? qt, Tensor? lam, Tensor? bh, float beta, Tensor? cu_seqlens=None, int max_seqlen=0) -> Tensor");
  m.def("query_pass_bwd(Tensor q, Tensor w, Tensor bias, Tensor kap, Tensor c_eff, Tensor? padding, float ss, "
        "Tensor? qt, Tensor? lam, Tensor? bh, float beta, Tensor dy, Tensor? cu_seqlens=None, int max_seqlen=0) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The whole computation, one op per direction (CPU; lara_ops.h, csrc/cpu/fused.cpp).
  m.def("lara_fwd(Tensor q, Tensor k, Tensor v, Tensor? eps, Tensor? q_landmarks, Tensor? k_landmarks, "
        "Tensor? query_padding, Tensor? key_padding, int num_samples, int proposal, int weighting, float beta, "
        "float ss, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, int max_seqlen_k=0) "
        "-> (Tensor, Tensor)");
  m.def("lara_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor state, Tensor? q_landmarks, "
        "Tensor? k_landmarks, Tensor? query_padding, Tensor? key_padding, int num_samples, int proposal, "
        "int weighting, float beta, float ss, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lara_kernels, CPU, m) {
  m.impl("landmarks", &lara::landmarks_cpu);
  m.impl("landmarks_backward", &lara::landmarks_backward_cpu);
  m.impl("key_pass_fwd", &lara::key_pass_fwd_cpu);
  m.impl("key_pass_bwd", &lara::key_pass_bwd_cpu);
  m.impl("query_pass_fwd", &lara::query_pass_fwd_cpu);
  m.impl("query_pass_bwd", &lara::query_pass_bwd_cpu);
  m.impl("lara_fwd", &lara::lara_fwd_cpu);
  m.impl("lara_bwd", &lara::lara_bwd_cpu);
}

#ifdef LARA_WITH_CUDA
TORCH_LIBRARY_IMPL(lara_kernels, CUDA, m) {
  m.impl("landmarks", &lara::landmarks_cuda);
  m.impl("landmarks_backward", &lara::landmarks_backward_cuda);
  m.impl("key_pass_fwd", &lara::key_pass_fwd_cuda);
  m.impl("key_pass_bwd", &lara::key_pass_bwd_cuda);
  m.impl("query_pass_fwd", &lara::query_pass_fwd_cuda);
  m.impl("query_pass_bwd", &lara::query_pass_bwd_cuda);
  m.impl("lara_fwd", &lara::lara_fwd_cuda);
  m.impl("lara_bwd", &lara::lara_bwd_cuda);
}
#endif
