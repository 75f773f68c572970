// Torch binding of the CUDA passes (csrc/cuda/key_pass_kernel.cu, query_pass_kernel.cu):
// checks, device guard, allocation of the outputs and of the per-split partials, the
// launch, and the small C-sized steps (combining and summing partials) as torch ops.
//
// Every entry point guards the inputs' device (CUDAGuard) and launches on that device's
// current stream; nothing synchronizes with the host (no .item(), no shapes that depend
// on values, only device-attribute queries), so a call can be captured in a CUDA graph.
// c_eff is read by the query kernels and clamped there to [0, C] per element, never
// checked on the host, which would need a sync.
//
// Packed layout (cu_seqlens given): q, k, v, dy are (T, H, W) with any strides; the
// problems get the strides {0, stride(1), stride(0), stride(2)} and the offsets, and
// max_seqlen in place of the long axis's length: it sizes the grids and the per-split
// partials, so nothing here reads the offsets (no sync). dq, dk, dv, y are (T, H, W)
// contiguous. Outputs and scratch come from new_output (NaN-filled in test mode).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../lara_ops.h"
#include "binding.h"
#include "passes_kernel.h"

namespace lara {
namespace {

using binding::check_cuda;
using binding::check_launch;
using binding::kernel_dtype;
using binding::stream_of;

static_assert(kMaxDim <= cuda::kMaxWidth, "the shared checks let through sizes the CUDA passes do not take");

// The layout of a call: B, and the long axis's extent for the grids (L of the padded
// layout, max_seqlen of the packed one); cu is null in the padded layout.
struct Layout {
  int64_t B = 0, L = 0;
  const int32_t* cu = nullptr;
};
Layout layout_of(const at::Tensor& x, const OptTensor& cu_seqlens, int64_t max_seqlen) {
  Layout l;
  if (cu_seqlens.has_value()) {
    l.B = cu_seqlens->size(0) - 1;
    l.L = max_seqlen;
    l.cu = cu_seqlens->data_ptr<int32_t>();
  } else {
    l.B = x.size(0);
    l.L = x.size(2);
  }
  return l;
}

// The key pass takes any number of rows C in w (grouped-query attention sends G x C rows),
// D in [1, kMaxDim] and Dv in [0, kMaxDim] (0: no values), whatever the inputs' device
// (the emulation runs it on CPU tensors, which the shared checks do not limit).
void check_cuda_key_dims(const char* op, int64_t D, int64_t DV, int64_t C) {
  check_cuda_pass_dims(op, D, DV, 1);
  TORCH_CHECK(C >= 1, op, ": number of rows C of w must be >= 1, got ", C);
}

// A C-sized input as a contiguous tensor of the compute type, shape-checked.
at::Tensor small_input(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                       at::ScalarType ct, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ",
              like.device());
  return t.to(ct).contiguous();
}

// The padding pointer and strides of a problem (key or query pass); left null without one.
template <typename Problem>
void set_padding(const OptTensor& padding, Problem& p) {
  if (!padding.has_value()) return;
  p.pad = padding->data_ptr<bool>();
  p.sp[0] = padding->stride(0);
  p.sp[1] = padding->stride(1);
}

cuda::KeyPassProblem key_problem(const Tensor& w, const Tensor& k, const OptTensor& v, const OptTensor& padding,
                                 double ss, bool subtract_norm, const Layout& lay) {
  cuda::KeyPassProblem p;
  p.dtype = kernel_dtype(k.scalar_type());
  p.w = w.data_ptr();
  p.k = k.data_ptr();
  long_strides(k, p.sk);
  if (v.has_value()) {
    p.v = v->data_ptr();
    long_strides(*v, p.sv);
  }
  set_padding(padding, p);
  p.cu = lay.cu;
  p.B = lay.B;
  p.H = k.size(1);
  p.M = lay.L;
  p.D = k.size(-1);
  p.C = w.size(2);
  p.Dv = v.has_value() ? v->size(-1) : 0;
  p.ss = ss;
  p.subtract_norm = subtract_norm;
  return p;
}

cuda::QueryPassProblem query_problem(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap,
                                     const Tensor& c_eff, const OptTensor& padding, double ss, const OptTensor& qt,
                                     const OptTensor& lam, const OptTensor& bh, double beta, const Layout& lay) {
  cuda::QueryPassProblem p;
  p.dtype = kernel_dtype(q.scalar_type());
  p.q = q.data_ptr();
  long_strides(q, p.sq);
  p.w = w.data_ptr();
  p.bias = bias.data_ptr();
  p.kap = kap.data_ptr();
  p.c_eff = c_eff.data_ptr<int64_t>();
  if (qt.has_value()) {
    p.qt = qt->data_ptr();
    p.lam = lam->data_ptr();
    p.bh = bh->data_ptr();
  }
  set_padding(padding, p);
  p.cu = lay.cu;
  p.B = lay.B;
  p.H = q.size(1);
  p.N = lay.L;
  p.D = q.size(-1);
  p.C = w.size(2);
  p.Dv = kap.size(3);
  p.ss = ss;
  p.beta = beta;
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor> key_pass_fwd_cuda(const Tensor& w, const Tensor& k, const OptTensor& v,
                                             const OptTensor& padding, double ss, bool subtract_norm,
                                             const OptTensor& cu_seqlens, int64_t max_seqlen) {
  constexpr const char* op = "lara_kernels::key_pass_fwd";
  check_key_pass_args(op, w, k, v, padding, cu_seqlens, max_seqlen);
  check_cuda_key_dims(op, k.size(-1), v.has_value() ? v->size(-1) : 0, w.size(2));
  check_cuda(op, "k", k);
  const c10::cuda::CUDAGuard guard(k.device());
  const Layout lay = layout_of(k, cu_seqlens, max_seqlen);
  const int64_t B = lay.B, H = k.size(1), C = w.size(2);
  const int64_t Dv = v.has_value() ? v->size(-1) : 0;
  const auto opts = k.options().dtype(compute_type(k.scalar_type()));

  const cuda::KeyPassProblem p = key_problem(w, k, v, padding, ss, subtract_norm, lay);
  const cuda::SplitPlan plan = cuda::key_pass_split_plan(p, /*backward=*/false);
  const int64_t S = plan.splits;
  at::Tensor m_part = new_output({S, B, H, C}, opts);
  at::Tensor l_part = new_output({S, B, H, C}, opts);
  at::Tensor acc_part = new_output({v.has_value() ? S : 0, B, H, C, Dv}, opts);
  check_launch(op, cuda::key_pass_forward(p, plan, m_part.data_ptr(), l_part.data_ptr(), acc_part.data_ptr(),
                                          stream_of(k)));

  // Z = mx + log(sum_s exp(m_s - mx) l_s), kap = sum_s exp(m_s - mx) acc_s / that sum.
  // A row without any valid key (a sequence without keys in the packed layout; every
  // split's partial is then (-inf, 0, 0)) gets Z = -inf and kap = 0.
  at::Tensor mx = m_part.amax(0);
  mx = at::where(at::isinf(mx), at::zeros_like(mx), mx);
  const at::Tensor scale = at::exp(m_part - mx);
  const at::Tensor total = (scale * l_part).sum(0);
  at::Tensor Z = (mx + at::log(total)).contiguous();
  if (!v.has_value()) return {Z, at::empty({B, H, C, 0}, opts)};
  at::Tensor kap = (scale.unsqueeze(-1) * acc_part).sum(0);
  const at::Tensor denom = total.unsqueeze(-1);
  kap = at::where(denom > 0, kap / at::where(denom > 0, denom, at::ones_like(denom)), at::zeros_like(kap));
  return {Z, kap.contiguous()};
}

std::tuple<Tensor, Tensor, Tensor> key_pass_bwd_cuda(const Tensor& w, const Tensor& k, const OptTensor& v,
                                                     const OptTensor& padding, double ss, bool subtract_norm,
                                                     const Tensor& Z, const OptTensor& kap, const Tensor& dZ,
                                                     const OptTensor& dkap, const OptTensor& cu_seqlens,
                                                     int64_t max_seqlen) {
  constexpr const char* op = "lara_kernels::key_pass_bwd";
  check_key_pass_args(op, w, k, v, padding, cu_seqlens, max_seqlen);
  check_cuda_key_dims(op, k.size(-1), v.has_value() ? v->size(-1) : 0, w.size(2));
  check_cuda(op, "k", k);
  const c10::cuda::CUDAGuard guard(k.device());
  const Layout lay = layout_of(k, cu_seqlens, max_seqlen);
  const int64_t B = lay.B, H = k.size(1), C = w.size(2), D = k.size(-1);
  const int64_t Dv = v.has_value() ? v->size(-1) : 0;
  const auto ct = compute_type(k.scalar_type());
  const auto opts = k.options().dtype(ct);

  const at::Tensor z = small_input(op, "Z", Z, {B, H, C}, ct, k);
  at::Tensor E = small_input(op, "dZ", dZ, {B, H, C}, ct, k);
  at::Tensor g = at::empty({0}, opts);
  if (v.has_value()) {
    if (dkap.has_value()) {
      TORCH_CHECK(kap.has_value(), op, ": kap is needed with dkap");
      g = small_input(op, "dkap", *dkap, {B, H, C, Dv}, ct, k);
      const at::Tensor kp = small_input(op, "kap", *kap, {B, H, C, Dv}, ct, k);
      E = (E - (g * kp).sum(-1)).contiguous();  // E_c = dZ_c - dkap_c . kap_c
    } else {
      g = at::zeros({B, H, C, Dv}, opts);
    }
  }

  const cuda::KeyPassProblem p = key_problem(w, k, v, padding, ss, subtract_norm, lay);
  const cuda::SplitPlan plan = cuda::key_pass_split_plan(p, /*backward=*/true);
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = v.has_value() ? new_output(v->sizes(), v->options()) : at::empty({0}, k.options());
  at::Tensor dw_part = new_output({plan.splits, B, H, C, D}, opts);
  int64_t sdk[4], sdv[4] = {0, 0, 0, 0};
  long_strides(dk, sdk);
  if (v.has_value()) long_strides(dv, sdv);
  check_launch(op, cuda::key_pass_backward(p, plan, z.data_ptr(), E.data_ptr(), g.data_ptr(), dk.data_ptr(), sdk,
                                           dv.data_ptr(), sdv, dw_part.data_ptr(),
                                           stream_of(k)));
  return {dw_part.sum(0), dk, dv};
}

Tensor query_pass_fwd_cuda(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap,
                           const Tensor& c_eff, const OptTensor& padding, double ss, const OptTensor& qt,
                           const OptTensor& lam, const OptTensor& bh, double beta,
                           const OptTensor& cu_seqlens, int64_t max_seqlen) {
  constexpr const char* op = "lara_kernels::query_pass_fwd";
  check_query_pass_args(op, q, w, bias, kap, c_eff, padding, qt, lam, bh, cu_seqlens, max_seqlen);
  check_cuda_pass_dims(op, q.size(-1), kap.size(3), w.size(2));
  check_cuda(op, "q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const Layout lay = layout_of(q, cu_seqlens, max_seqlen);
  const int64_t Dv = kap.size(3);
  at::Tensor y = cu_seqlens.has_value() ? new_output({q.size(0), q.size(1), Dv}, q.options())
                                        : new_output({q.size(0), q.size(1), q.size(2), Dv}, q.options());
  int64_t sy[4];
  long_strides(y, sy);
  const cuda::QueryPassProblem p = query_problem(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, lay);
  check_launch(op, cuda::query_pass_forward(p, y.data_ptr(), sy, stream_of(q)));
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> query_pass_bwd_cuda(
    const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap, const Tensor& c_eff,
    const OptTensor& padding, double ss, const OptTensor& qt, const OptTensor& lam, const OptTensor& bh,
    double beta, const Tensor& dy, const OptTensor& cu_seqlens, int64_t max_seqlen) {
  constexpr const char* op = "lara_kernels::query_pass_bwd";
  check_query_pass_args(op, q, w, bias, kap, c_eff, padding, qt, lam, bh, cu_seqlens, max_seqlen);
  check_cuda_pass_dims(op, q.size(-1), kap.size(3), w.size(2));
  check_cuda(op, "q", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const Layout lay = layout_of(q, cu_seqlens, max_seqlen);
  const int64_t B = lay.B, H = q.size(1), D = q.size(-1), C = w.size(2), Dv = kap.size(3);
  std::vector<int64_t> dy_shape(q.sizes().begin(), q.sizes().end());
  dy_shape.back() = Dv;  // q's shape with Dv: (B, H, N, Dv) or packed (T, H, Dv)
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(dy_shape), op, ": dy must have shape ", at::IntArrayRef(dy_shape),
              ", got ", dy.sizes());
  TORCH_CHECK(dy.device() == q.device(), op, ": dy is on ", dy.device(), " but q is on ", q.device());
  const auto st = dy.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": dy must be float64, float32, float16 or bfloat16, got ", st);
  const auto ct = compute_type(q.scalar_type());
  const auto opts = q.options().dtype(ct);
  // The kernels read dy in q's dtype or in the compute type; any other dtype is converted
  // to the compute type (exact for the half types, what the accumulation uses anyway).
  const at::Tensor g = (st == q.scalar_type() || st == ct) ? dy : dy.to(ct);
  int64_t sdy[4];
  long_strides(g, sdy);

  const bool mis = qt.has_value();
  const cuda::QueryPassProblem p = query_problem(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, lay);
  const cuda::SplitPlan plan = cuda::query_pass_split_plan(p);
  const int64_t S = plan.splits;
  at::Tensor dq = new_output(q.sizes(), q.options());
  int64_t sdq[4];
  long_strides(dq, sdq);
  at::Tensor dw_part = new_output({S, B, H, C, D}, opts);
  at::Tensor db_part = new_output({S, B, H, C}, opts);
  at::Tensor dkap_part = new_output({S, B, H, C, Dv}, opts);
  at::Tensor dqt_part = new_output({mis ? S : 0, B, H, C, D}, opts);
  at::Tensor dlam_part = new_output({mis ? S : 0, B, H, C}, opts);
  at::Tensor dbh_part = new_output({mis ? S : 0, B, H, C}, opts);
  check_launch(op, cuda::query_pass_backward(p, plan, kernel_dtype(g.scalar_type()), g.data_ptr(), sdy, dq.data_ptr(),
                                             sdq, dw_part.data_ptr(), db_part.data_ptr(), dkap_part.data_ptr(),
                                             dqt_part.data_ptr(), dlam_part.data_ptr(), dbh_part.data_ptr(),
                                             stream_of(q)));
  if (!mis) {
    const at::Tensor none = at::empty({0}, opts);
    return {dq, dw_part.sum(0), db_part.sum(0), dkap_part.sum(0), none, none.clone(), none.clone()};
  }
  return {dq, dw_part.sum(0), db_part.sum(0), dkap_part.sum(0), dqt_part.sum(0), dlam_part.sum(0), dbh_part.sum(0)};
}

}  // namespace lara
