// The whole LARA computation on CUDA tensors as one op per direction: lara_kernels::lara_fwd
// and lara_bwd for the CUDA dispatch key, with the schema, outputs and state layout of the
// CPU ops (csrc/cpu/fused.cpp, whose header has the layout and the backward of the small
// steps), so one autograd Function and one set of fake kernels (lara_kernels/_whole.py)
// serve both. Both layouts, masks, grouped-query attention, given landmarks, training noise,
// every proposal and weighting, float64/float32/float16/bfloat16.
//
// Launches (fused_kernel.cu for the small kernels, the passes of key_pass_kernel.cu and
// query_pass_kernel.cu called through their launchers, not the dispatcher), in order:
//   forward:  [prep] landmarks(q, k) [attend key pass] [proposal] key-pass [normalizer]
//             weights query-pass
//   backward: [prep] query-pass-bwd sums key-pass-bwd (2) [normalizer-bwd (2)] small-bwd
//             [attend key-pass-bwd (2), attend-sum] final
// ([prep]: padded layout with a mask; [normalizer]: optimal weighting; [attend ...]: the
// attend proposal; [proposal]: not for "segment" with H_kv = H or given k landmarks, whose
// mu and w the landmarks launch writes). The default call (segment, optimal, padded, no
// mask) is 5 launches forward and 8 backward.
//
// No host-device synchronization anywhere: nothing reads a tensor's values on the host.
// Everything that depends on data (c_eff, the valid counts, the elements a mask drops) is
// found by the kernels from the masks or offsets; the launch geometry depends on shapes
// and max_seqlen only. No ATen compute op runs on the inputs' device either: the only
// calls are allocations (new_output: at::empty, NaN-filled in test mode), so the launches
// above are all the work, and a call can be captured in a CUDA graph.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "../lara_ops.h"
#include "binding.h"
#include "fused_kernel.h"
#include "passes_kernel.h"

namespace lara {
namespace {

using binding::check_cuda;
using binding::check_launch;
using binding::kernel_dtype;
using binding::stream_of;
using cuda::DType;

// The call's sizes (the shared checks' WholeArgs) and the kernels' view of it.
struct Setup : WholeArgs {
  cuda::FusedProblem fp;
};

Setup setup(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
            const OptTensor& qlm, const OptTensor& klm, const OptTensor& qpm, const OptTensor& kpm,
            const OptTensor& cu_q, const OptTensor& cu_k, int64_t max_q, int64_t max_k, int64_t num_samples,
            int64_t proposal, int64_t weighting, double ss) {
  for (const auto* t : {&q, &k, &v}) check_cuda(op, "q, k, v", *t);
  Setup s;
  static_cast<WholeArgs&>(s) = check_whole_args(op, q, k, v, eps, qlm, klm, qpm, kpm, cu_q, cu_k, max_q, max_k,
                                                num_samples, proposal, weighting);
  check_cuda_pass_dims(op, s.D, s.DV, s.C);

  cuda::FusedProblem& f = s.fp;
  f.dtype = kernel_dtype(q.scalar_type());
  f.e.B = s.B;
  f.e.N = s.N;
  f.e.M = s.M;
  f.e.C = s.C;
  if (s.packed) {
    f.e.cu_q = cu_q->data_ptr<int32_t>();
    f.e.cu_k = cu_k->data_ptr<int32_t>();
  }
  f.H = s.H;
  f.Hkv = s.Hkv;
  f.G = s.G;
  f.D = s.D;
  f.Dv = s.DV;
  f.NS = s.NS;
  f.proposal = static_cast<int>(proposal);
  f.optimal = s.optimal;
  f.ss = ss;
  f.so = s.layout;
  return s;
}

cuda::Long long_of(const at::Tensor& t) {
  cuda::Long l;
  l.p = t.data_ptr();
  long_strides(t, l.s);
  return l;
}

cuda::Small4 small4_of(const OptTensor& t) {
  cuda::Small4 s;
  if (!t.has_value()) return s;
  s.p = t->data_ptr();
  s.dtype = kernel_dtype(t->scalar_type());
  for (int i = 0; i < 4; ++i) s.s[i] = t->stride(i);
  return s;
}

cuda::Mask mask_of(const OptTensor& m) {
  cuda::Mask r;
  if (!m.has_value()) return r;
  r.p = m->data_ptr<bool>();
  r.sb = m->stride(0);
  r.sl = m->stride(1);
  return r;
}

// Scratch of the masked layout: counts (4, B) int64 and the masked sides' rank / order tables.
struct MaskScratch {
  at::Tensor counts, tables;
};

// The prep kernel (masked padded layout): fills fp.e's counts and tables.
MaskScratch prepare_masks(const char* op, Setup& s, const OptTensor& qpm, const OptTensor& kpm, const at::Tensor& q,
                          cudaStream_t stream) {
  MaskScratch ms;
  if (!s.masked) return ms;
  const int64_t B = s.B, nq = qpm.has_value() ? B * s.N : 0, nk = kpm.has_value() ? B * s.M : 0;
  // integer scratch: at::empty (the test mode's NaN fill is for floating outputs); every
  // entry the kernels read is written by the prep kernel
  ms.counts = at::empty({4 * B}, q.options().dtype(at::kLong));
  ms.tables = at::empty({2 * (nq + nk)}, q.options().dtype(at::kInt));
  int32_t* t = ms.tables.data_ptr<int32_t>();
  cuda::Elements& e = s.fp.e;
  e.counts = ms.counts.data_ptr<int64_t>();
  if (nq > 0) {
    e.rank_q = t;
    e.order_q = t + nq;
  }
  if (nk > 0) {
    e.rank_k = t + 2 * nq;
    e.order_k = t + 2 * nq + nk;
  }
  check_launch(op, cuda::fused_prep(s.fp, mask_of(qpm), mask_of(kpm), ms.counts.data_ptr<int64_t>(),
                                    const_cast<int32_t*>(e.rank_q), const_cast<int32_t*>(e.order_q),
                                    const_cast<int32_t*>(e.rank_k), const_cast<int32_t*>(e.order_k), stream));
  return ms;
}

// Pointer to field `off` of the state.
void* field(const at::Tensor& state, int64_t off) {
  return static_cast<char*>(state.data_ptr()) + off * state.element_size();
}

// A key pass (or the normalizer) on the rows `w` (H heads of C rows, taken as the H_kv
// heads of G * C rows when k has H_kv heads).
cuda::KeyPassProblem key_problem(const Setup& s, const void* w, int64_t w_heads, const at::Tensor& k,
                                 const at::Tensor* v, const OptTensor& pad, bool subtract_norm, bool keys) {
  cuda::KeyPassProblem p;
  p.dtype = kernel_dtype(k.scalar_type());
  p.w = w;
  p.k = k.data_ptr();
  long_strides(k, p.sk);
  if (v != nullptr) {
    p.v = v->data_ptr();
    long_strides(*v, p.sv);
  }
  if (pad.has_value()) {
    p.pad = pad->data_ptr<bool>();
    p.sp[0] = pad->stride(0);
    p.sp[1] = pad->stride(1);
  }
  p.cu = keys ? s.fp.e.cu_k : s.fp.e.cu_q;
  p.B = s.B;
  p.H = k.size(1);
  p.C = w_heads * s.C / p.H;
  p.M = keys ? s.M : s.N;
  p.D = s.D;
  p.Dv = v != nullptr ? v->size(-1) : 0;
  p.ss = s.fp.ss;
  p.subtract_norm = subtract_norm;
  // dropped elements (masked layout): no key, so no work and no gradient
  p.live = s.masked ? s.fp.e.counts + 2 * s.B : nullptr;
  return p;
}

cuda::QueryPassProblem query_problem(const Setup& s, const at::Tensor& q, const at::Tensor& state,
                                     const OptTensor& qpm, double beta) {
  cuda::QueryPassProblem p;
  const cuda::StateOffsets& o = s.fp.so;
  p.dtype = kernel_dtype(q.scalar_type());
  p.q = q.data_ptr();
  long_strides(q, p.sq);
  p.w = field(state, o.w);
  p.bias = field(state, o.bias);
  p.kap = field(state, o.kap);
  p.c_eff = s.masked ? s.fp.e.counts + 2 * s.B : nullptr;  // else C, or min(C, n, m) from the offsets
  if (s.optimal) {
    p.qt = field(state, o.qt);
    p.lam = field(state, o.lam);
    p.bh = field(state, o.bh);
  }
  if (qpm.has_value()) {
    p.pad = qpm->data_ptr<bool>();
    p.sp[0] = qpm->stride(0);
    p.sp[1] = qpm->stride(1);
  }
  p.cu = s.fp.e.cu_q;
  p.cu_k = s.fp.e.cu_k;
  p.B = s.B;
  p.H = s.H;
  p.N = s.N;
  p.C = s.C;
  p.D = s.D;
  p.Dv = s.DV;
  p.ss = s.fp.ss;
  p.beta = beta;
  return p;
}

// Split partials of a key pass forward: m, l (S, rows) and acc (S, rows, Dv).
struct KeyParts {
  at::Tensor m, l, acc;
  int64_t S = 0;
};
KeyParts key_forward(const char* op, const cuda::KeyPassProblem& p, const at::TensorOptions& opts,
                     cudaStream_t stream) {
  KeyParts r;
  const cuda::SplitPlan plan = cuda::key_pass_split_plan(p, /*backward=*/false);
  r.S = plan.splits;
  const int64_t rows = p.B * p.H * p.C;
  r.m = new_output({r.S * rows}, opts);
  r.l = new_output({r.S * rows}, opts);
  r.acc = new_output({r.S * rows * p.Dv}, opts);
  check_launch(op, cuda::key_pass_forward(p, plan, r.m.data_ptr(), r.l.data_ptr(), r.acc.data_ptr(), stream));
  return r;
}

cuda::Parts parts(const at::Tensor& t, int64_t S) {
  cuda::Parts p;
  p.p = t.defined() ? t.data_ptr() : nullptr;
  p.splits = S;
  return p;
}

// A key pass backward: writes dk (and dv) of k's (v's) shape, contiguous, and returns the
// dw partials (S, rows, D).
struct KeyGrads {
  at::Tensor dk, dv, dw;
  int64_t S = 0;
};
KeyGrads key_backward(const char* op, const cuda::KeyPassProblem& p, const at::Tensor& k, const at::Tensor* v,
                      const void* Z, const void* E, const void* dkap, const at::TensorOptions& opts,
                      cudaStream_t stream) {
  KeyGrads r;
  const cuda::SplitPlan plan = cuda::key_pass_split_plan(p, /*backward=*/true);
  r.S = plan.splits;
  r.dk = new_output(k.sizes(), k.options());
  int64_t sdk[4], sdv[4] = {0, 0, 0, 0};
  long_strides(r.dk, sdk);
  if (v != nullptr) {
    r.dv = new_output(v->sizes(), v->options());
    long_strides(r.dv, sdv);
  }
  r.dw = new_output({r.S * p.B * p.H * p.C * p.D}, opts);
  check_launch(op, cuda::key_pass_backward(p, plan, Z, E, dkap, r.dk.data_ptr(), sdk,
                                           v != nullptr ? r.dv.data_ptr() : nullptr, sdv, r.dw.data_ptr(), stream));
  return r;
}

}  // namespace

std::tuple<Tensor, Tensor> lara_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
                                         const OptTensor& q_landmarks, const OptTensor& k_landmarks,
                                         const OptTensor& query_padding, const OptTensor& key_padding,
                                         int64_t num_samples, int64_t proposal, int64_t weighting, double beta,
                                         double ss, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                         int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const char* op = "lara_kernels::lara_fwd (CUDA)";
  Setup s = setup(op, q, k, v, eps, q_landmarks, k_landmarks, query_padding, key_padding, cu_seqlens_q,
                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_samples, proposal, weighting, ss);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = stream_of(q);
  const auto opts = q.options().dtype(s.ct);
  const cuda::FusedProblem& f = s.fp;
  const MaskScratch ms = prepare_masks(op, s, query_padding, key_padding, q, stream);
  at::Tensor state = new_output({f.so.total}, opts);

  // 1. landmarks of q and k (scaled), or the given ones
  // (segment with H_kv = H or given k landmarks: mu and w too, in the same launch)
  check_launch(op, cuda::fused_landmarks(f, long_of(q), long_of(k), small4_of(q_landmarks), small4_of(k_landmarks),
                                         small4_of(eps), state.data_ptr(), stream));
  // 2. proposal means ("attend": after its key pass, values k, no norm term), 3. samples
  KeyParts att;
  if (proposal == kAttend)
    att = key_forward(op, key_problem(s, field(state, f.so.qt), s.H, k, &k, key_padding, false, true), opts, stream);
  if (!cuda::landmarks_fuse_proposal(f, k_landmarks.has_value()))
    check_launch(op, cuda::fused_proposal(f, small4_of(eps), parts(att.m, att.S), parts(att.l, att.S),
                                          parts(att.acc, att.S), state.data_ptr(), stream));
  // 4. key statistics, 5. query normalizer (split partials, combined by the weights kernel)
  const KeyParts kp =
      key_forward(op, key_problem(s, field(state, f.so.w), s.H, k, &v, key_padding, true, true), opts, stream);
  KeyParts np;
  if (s.optimal)
    np = key_forward(op, key_problem(s, field(state, f.so.qt), s.H, q, nullptr, query_padding, false, false), opts,
                     stream);
  // 6. densities and weights
  check_launch(op, cuda::fused_weights(f, parts(kp.m, kp.S), parts(kp.l, kp.S), parts(kp.acc, kp.S),
                                       parts(np.m, np.S), parts(np.l, np.S), state.data_ptr(), stream));
  // 7. query pass (y = 0 at padded rows and for elements with c_eff = 0)
  std::vector<int64_t> ys(q.sizes().begin(), q.sizes().end());
  ys.back() = s.DV;
  at::Tensor y = new_output(ys, q.options());
  int64_t sy[4];
  long_strides(y, sy);
  check_launch(op, cuda::query_pass_forward(query_problem(s, q, state, query_padding, beta), y.data_ptr(), sy,
                                            stream));
  return {y, state};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lara_bwd_cuda(
    const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& state,
    const OptTensor& q_landmarks, const OptTensor& k_landmarks, const OptTensor& query_padding,
    const OptTensor& key_padding, int64_t num_samples, int64_t proposal, int64_t weighting, double beta, double ss,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const char* op = "lara_kernels::lara_bwd (CUDA)";
  Setup s = setup(op, q, k, v, c10::nullopt, q_landmarks, k_landmarks, query_padding, key_padding, cu_seqlens_q,
                  cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_samples, proposal, weighting, ss);
  check_whole_state(op, s, state, q);
  const cuda::StateOffsets& o = s.fp.so;
  check_whole_dy(op, s, dy, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = stream_of(q);
  const auto opts = q.options().dtype(s.ct);
  const MaskScratch ms = prepare_masks(op, s, query_padding, key_padding, q, stream);
  const cuda::FusedProblem& f = s.fp;
  const int64_t B = s.B, H = s.H, C = s.C, D = s.D, DV = s.DV, rows = B * H * C;

  // query pass (dq of its own; partials dw, dbias, dkap, dqt, dlam, dbh)
  const cuda::QueryPassProblem qp = query_problem(s, q, state, query_padding, beta);
  const cuda::SplitPlan qplan = cuda::query_pass_split_plan(qp);
  const int64_t S = qplan.splits, Sm = s.optimal ? S : 0;
  at::Tensor dq = new_output(q.sizes(), q.options());
  int64_t sdq[4], sdy[4];
  long_strides(dq, sdq);
  long_strides(dy, sdy);
  at::Tensor qdw = new_output({S * rows * D}, opts), qdb = new_output({S * rows}, opts);
  at::Tensor qdkap = new_output({S * rows * DV}, opts), qdqt = new_output({Sm * rows * D}, opts);
  at::Tensor qdlam = new_output({Sm * rows}, opts), qdbh = new_output({Sm * rows}, opts);
  check_launch(op, cuda::query_pass_backward(qp, qplan, kernel_dtype(dy.scalar_type()), dy.data_ptr(), sdy,
                                             dq.data_ptr(), sdq, qdw.data_ptr(), qdb.data_ptr(), qdkap.data_ptr(),
                                             qdqt.data_ptr(), qdlam.data_ptr(), qdbh.data_ptr(), stream));
  // their sums: dbias, dlam, dbh, E of the key pass, dkap
  at::Tensor sums = new_output({rows * (4 + DV)}, opts);
  check_launch(op, cuda::fused_bwd_sums(f, state.data_ptr(), parts(qdb, S), parts(qdkap, S), parts(qdlam, Sm),
                                        parts(qdbh, Sm), sums.data_ptr(), stream));
  const auto at_sums = [&](int64_t off) { return static_cast<const void*>(static_cast<const char*>(sums.data_ptr()) + off * sums.element_size()); };
  // key pass (dZ = dbias, dkap) and normalizer (dZ = dlam)
  const KeyGrads kg = key_backward(op, key_problem(s, field(state, o.w), H, k, &v, key_padding, true, true), k, &v,
                                   field(state, o.Z), at_sums(3 * rows), at_sums(4 * rows), opts, stream);
  KeyGrads ng;
  if (s.optimal)
    ng = key_backward(op, key_problem(s, field(state, o.qt), H, q, nullptr, query_padding, false, false), q, nullptr,
                      field(state, o.lam), at_sums(rows), nullptr, opts, stream);
  // the C x D and C x C steps
  at::Tensor gq = new_output({rows * D}, opts), gk = new_output({proposal == kAttend ? 0 : rows * D}, opts);
  at::Tensor attv = new_output({proposal == kAttend ? rows * (D + 1) : 0}, opts);
  at::Tensor dmu = new_output({proposal == kMixed ? rows * D : 0}, opts);
  at::Tensor dA = new_output({proposal == kMixed ? rows * C : 0}, opts);
  check_launch(op, cuda::fused_bwd_small(f, state.data_ptr(), sums.data_ptr(), parts(qdw, S), parts(qdqt, Sm),
                                         parts(kg.dw, kg.S), parts(ng.dw, ng.S), gq.data_ptr(), gk.data_ptr(),
                                         attv.data_ptr(), dmu.data_ptr(), dA.data_ptr(), stream));
  KeyGrads ag;
  if (proposal == kAttend) {  // the attend key pass: dkap = dka, dZ = 0; its dw is dqt
    ag = key_backward(op, key_problem(s, field(state, o.qt), H, k, &k, key_padding, false, true), k, &k,
                      field(state, o.zatt), attv.data_ptr(),
                      static_cast<const char*>(attv.data_ptr()) + rows * attv.element_size(), opts, stream);
    check_launch(op, cuda::fused_bwd_attend(f, parts(ag.dw, ag.S), gq.data_ptr(), stream));
  }
  // landmarks and the sums of the passes' dq, dk
  cuda::FinalGrads fg;
  fg.dq = dq.data_ptr();
  fg.dq2 = s.optimal ? ng.dk.data_ptr() : nullptr;
  fg.dk = kg.dk.data_ptr();
  if (proposal == kAttend) {
    fg.dk2 = ag.dk.data_ptr();
    fg.dk3 = ag.dv.data_ptr();
  }
  fg.gq = gq.data_ptr();
  fg.gk = gk.data_ptr();
  fg.q_landmarks = !q_landmarks.has_value();
  fg.k_landmarks = !k_landmarks.has_value() && proposal != kAttend;  // attend: mu does not use kt (gk = 0)
  at::Tensor dqlm = at::empty({0}, q.options()), dklm = at::empty({0}, q.options());
  if (q_landmarks.has_value()) {
    dqlm = new_output(q_landmarks->sizes(), q_landmarks->options());
    fg.dqlm = dqlm.data_ptr();
    fg.qlm_dtype = kernel_dtype(q_landmarks->scalar_type());
  }
  if (k_landmarks.has_value()) {
    dklm = new_output(k_landmarks->sizes(), k_landmarks->options());
    fg.dklm = dklm.data_ptr();
    fg.klm_dtype = kernel_dtype(k_landmarks->scalar_type());
  }
  check_launch(op, cuda::fused_final(f, fg, stream));
  return {dq, kg.dk, kg.dv, dqlm, dklm};
}

}  // namespace lara
