// Declarations of the lara_kernels ops implemented in csrc/cpu and csrc/cuda.
// csrc/lara_ops.cpp registers them with TORCH_LIBRARY.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "state_layout.h"

namespace lara {

// Two layouts of the long tensors (q, k, v, x, dy and their gradients), for every op:
// - padded: (B, H, L, D), any strides, with an optional padding (B, L) bool mask
//   (True = padding); cu_seqlens is none.
// - packed (variable-length sequences, flash-attention's varlen convention): (T, H, D),
//   any strides, with cu_seqlens (B + 1) int32 contiguous on the inputs' device: sequence b
//   is rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1 of the tensor (cu_seqlens[0] = 0,
//   non-decreasing, cu_seqlens[B] = T; the Python API validates the values, the ops trust
//   them), and padding is none. max_seqlen >= every sequence's length (sizes the CUDA
//   grids; 0 is allowed only with T = 0). An empty sequence is allowed anywhere.
//   The C-sized tensors stay (B, H, C, ...) with B = cu_seqlens.size(0) - 1.
// Every op below takes the trailing pair (cu_seqlens, max_seqlen); both default to the
// padded layout (none, 0) in the schema.

// Masked segment means (docs/math.md section 1), unscaled.
//   x (B, H, L, D) or packed (T, H, D); float64/float32/float16/bfloat16, any strides
//   padding (B, L) bool, True = padding, or none
//   c_eff (B,) int64, 0 <= c_eff[b] <= min(num_segments, valid length of b)
// returns (B, H, num_segments, D) contiguous, float64 for float64 input, else float32;
// rows c >= c_eff[b] are 0 (every row for c_eff[b] = 0). landmarks_backward returns the
// gradient of x: (B, H, length, D), or packed (length = T, H, D), in `dtype`.
at::Tensor landmarks_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                         const at::Tensor& c_eff, int64_t num_segments,
                         const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);
at::Tensor landmarks_backward_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                  const at::Tensor& c_eff, int64_t length, at::ScalarType dtype,
                                  const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);

#ifdef LARA_WITH_CUDA
at::Tensor landmarks_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                          const at::Tensor& c_eff, int64_t num_segments,
                          const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);
at::Tensor landmarks_backward_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                   const at::Tensor& c_eff, int64_t length, at::ScalarType dtype,
                                   const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);
#endif

// Shared argument checks (csrc/lara_ops.cpp); they name the bad argument and value.
void check_landmarks_args(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                          const at::Tensor& c_eff, int64_t num_segments,
                          const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);
void check_landmarks_backward_args(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                   const at::Tensor& c_eff, int64_t length, at::ScalarType dtype,
                                   const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);


// ---------------------------------------------------------------------------------
// The fused passes (formulas in docs/math.md sections 4, 5 and 7).
// "ct" below is the compute type: float64 for float64 inputs, float32 otherwise.
// The C-sized inputs (w, bias, kap, qt, lam, bh, Z, dZ, dkap) are contiguous ct;
// q, k, v, dy may have any strides and any of the four float dtypes (k and v alike);
// padding is (B, L) bool, True = padding; padded rows of q/k/v are never read into any
// sum (NaN there has no effect) and get gradient 0. ss = sqrt(scale).
//
// key_pass_fwd: w (B, H, C, D), k (B, H, M, D), v (B, H, M, Dv) or none.
//   l_cm = ss w_c . k_m - [subtract_norm] ss^2 |k_m|^2 / 2   (-inf for padded m)
//   Z_c = LSE_m l_cm  -> (B, H, C) ct;  kap_c = sum_m softmax_m(l_c)_m v_m -> (B, H, C, Dv) ct
//   (without v: kap is (B, H, C, 0)). Every (b) has at least one valid key (caller's duty).
// key_pass_bwd: gradients (dw (B, H, C, D) ct, dk like k's shape in k's dtype, dv in v's
//   dtype, (0)-sized without v) for incoming dZ (B, H, C) and dkap (B, H, C, Dv) (ignored
//   without v):  S_cm = exp(l_cm - Z_c), E_c = dZ_c - dkap_c . kap_c,
//   dl_cm = S_cm (dkap_c . v_m + E_c), dv_m = sum_c S_cm dkap_c,
//   dk_m = ss (sum_c dl_cm w_c - [subtract_norm] (sum_c dl_cm) ss k_m),  dw_c = sum_m dl_cm ss k_m.
// query_pass_fwd: q (B, H, N, D), w (B, H, C, D), bias (B, H, C), kap (B, H, C, Dv),
//   c_eff (B,) int64 in [0, C]; MIS term when qt (B, H, C, D), lam (B, H, C), bh (B, H, C)
//   are given (all three or none):
//   s_nc = ss q_n . w_c + bias_c;  r_nc = exp(ss q_n . qt_c - lam_c);
//   alpha_nc = bh_c + beta (r_nc - mean_{c' < c_eff} r_nc');  L_nc = s_nc + log(max(alpha_nc, 1e-8))
//   (L_nc = s_nc without MIS);  -inf for c >= c_eff[b];
//   y_n = sum_c softmax_c(L_n)_c kap_c -> (B, H, N, Dv) contiguous in q's dtype, 0 for padded n.
// query_pass_bwd: for incoming dy (B, H, N, Dv), returns (dq in q's dtype, dw, dbias,
//   dkap, dqt, dlam, dbh) in ct; the last three (0)-sized without MIS. With P = softmax_c(L),
//   delta_n = sum_c P_nc (dy_n . kap_c), dL_nc = P_nc (dy_n . kap_c - delta_n):
//   dkap_c = sum_n P_nc dy_n, dbias_c = sum_n dL_nc, dw_c = sum_n dL_nc qh_n, dqh_n = sum_c dL_nc w_c;
//   MIS: dalpha_nc = dL_nc / alpha_nc where alpha_nc > 1e-8 else 0, dbh_c = sum_n dalpha_nc,
//   dr_nc = beta (dalpha_nc - mean_{c' < c_eff} dalpha_nc'), dt_nc = dr_nc r_nc,
//   dlam_c = -sum_n dt_nc, dqt_c = sum_n dt_nc qh_n, dqh_n += sum_c dt_nc qt_c;
//   dq_n = ss dqh_n (0 for padded n).
// Packed layout (cu_seqlens given): q, k, v, dy, y, dq, dk, dv are (T, H, D) / (T, H, Dv)
// and sequence b's rows are its keys or queries. A sequence with no keys gives Z_c = -inf
// and kap_c = 0 (finite), and dw = 0; c_eff[b] = 0 (a sequence with no keys or no queries)
// gives y = 0 on its rows and zero gradients from them (no NaN). The key pass takes any C
// (the rows of w need not be samples of one head: grouped-query attention passes the
// C rows of the G query heads that share a key/value head as G * C rows).
using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

std::tuple<Tensor, Tensor> key_pass_fwd_cpu(const Tensor& w, const Tensor& k, const OptTensor& v,
                                            const OptTensor& padding, double ss, bool subtract_norm,
    const OptTensor& cu_seqlens, int64_t max_seqlen);
std::tuple<Tensor, Tensor, Tensor> key_pass_bwd_cpu(const Tensor& w, const Tensor& k, const OptTensor& v,
                                                    const OptTensor& padding, double ss, bool subtract_norm,
                                                    const Tensor& Z, const OptTensor& kap, const Tensor& dZ,
                                                    const OptTensor& dkap, const OptTensor& cu_seqlens, int64_t max_seqlen);
Tensor query_pass_fwd_cpu(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap,
                          const Tensor& c_eff, const OptTensor& padding, double ss, const OptTensor& qt,
                          const OptTensor& lam, const OptTensor& bh, double beta,
    const OptTensor& cu_seqlens, int64_t max_seqlen);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> query_pass_bwd_cpu(
    const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap, const Tensor& c_eff,
    const OptTensor& padding, double ss, const OptTensor& qt, const OptTensor& lam, const OptTensor& bh,
    double beta, const Tensor& dy, const OptTensor& cu_seqlens, int64_t max_seqlen);

#ifdef LARA_WITH_CUDA
std::tuple<Tensor, Tensor> key_pass_fwd_cuda(const Tensor& w, const Tensor& k, const OptTensor& v,
                                             const OptTensor& padding, double ss, bool subtract_norm,
    const OptTensor& cu_seqlens, int64_t max_seqlen);
std::tuple<Tensor, Tensor, Tensor> key_pass_bwd_cuda(const Tensor& w, const Tensor& k, const OptTensor& v,
                                                     const OptTensor& padding, double ss, bool subtract_norm,
                                                     const Tensor& Z, const OptTensor& kap, const Tensor& dZ,
                                                     const OptTensor& dkap, const OptTensor& cu_seqlens, int64_t max_seqlen);
Tensor query_pass_fwd_cuda(const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap,
                           const Tensor& c_eff, const OptTensor& padding, double ss, const OptTensor& qt,
                           const OptTensor& lam, const OptTensor& bh, double beta,
    const OptTensor& cu_seqlens, int64_t max_seqlen);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> query_pass_bwd_cuda(
    const Tensor& q, const Tensor& w, const Tensor& bias, const Tensor& kap, const Tensor& c_eff,
    const OptTensor& padding, double ss, const OptTensor& qt, const OptTensor& lam, const OptTensor& bh,
    double beta, const Tensor& dy, const OptTensor& cu_seqlens, int64_t max_seqlen);
#endif

// ---------------------------------------------------------------------------------
// The whole LARA computation in one op per direction (CPU: csrc/cpu/fused.cpp; CUDA below): what
// lara_kernels/_pipeline.py's lara_forward computes from q, k, v (either layout, masks,
// grouped-query k and v with H_kv dividing H), eps (B, H, num_samples, D) or none, given
// landmarks (B, H, num_samples, D) or none; proposal 0 segment, 1 mixed, 2 attend;
// weighting 0 optimal, 1 balance; ss = sqrt(scale). lara_fwd returns (y, state): y as the
// query pass returns it, and a flat contiguous compute-type tensor of the C-sized results
// the backward needs. lara_bwd takes the incoming dy (y's shape, q's dtype), the same
// arguments and that state, and returns (dq, dk, dv, d q_landmarks, d k_landmarks), the
// last two (0)-sized where the landmarks are not given.
std::tuple<Tensor, Tensor> lara_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
                                        const OptTensor& q_landmarks, const OptTensor& k_landmarks,
                                        const OptTensor& query_padding, const OptTensor& key_padding,
                                        int64_t num_samples, int64_t proposal, int64_t weighting, double beta,
                                        double ss, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lara_bwd_cpu(
    const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& state,
    const OptTensor& q_landmarks, const OptTensor& k_landmarks, const OptTensor& query_padding,
    const OptTensor& key_padding, int64_t num_samples, int64_t proposal, int64_t weighting, double beta, double ss,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k);

#ifdef LARA_WITH_CUDA
// The same two ops for CUDA tensors (csrc/cuda/fused_cuda.cpp): same schema, outputs and
// state layout, no host-device synchronization (every count that depends on the masks or
// offsets is found on the device), all work in the library's own kernels.
std::tuple<Tensor, Tensor> lara_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
                                         const OptTensor& q_landmarks, const OptTensor& k_landmarks,
                                         const OptTensor& query_padding, const OptTensor& key_padding,
                                         int64_t num_samples, int64_t proposal, int64_t weighting, double beta,
                                         double ss, const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                         int64_t max_seqlen_q, int64_t max_seqlen_k);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lara_bwd_cuda(
    const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& state,
    const OptTensor& q_landmarks, const OptTensor& k_landmarks, const OptTensor& query_padding,
    const OptTensor& key_padding, int64_t num_samples, int64_t proposal, int64_t weighting, double beta, double ss,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k);
#endif

// Shared argument checks of the passes (csrc/lara_ops.cpp): shapes, dtypes, devices, and
// D, Dv, C in [1, max_pass_dim(device of the inputs)]. Each names the op, the argument and
// the bad value.
void check_key_pass_args(const char* op, const Tensor& w, const Tensor& k, const OptTensor& v,
                         const OptTensor& padding, const OptTensor& cu_seqlens, int64_t max_seqlen);
void check_query_pass_args(const char* op, const Tensor& q, const Tensor& w, const Tensor& bias,
                           const Tensor& kap, const Tensor& c_eff, const OptTensor& padding,
                           const OptTensor& qt, const OptTensor& lam, const OptTensor& bh,
                           const OptTensor& cu_seqlens, int64_t max_seqlen);
// The compute type of an input dtype: float64 for float64, float32 otherwise.
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
// The largest D, Dv and C the CUDA passes take (their tiles live in shared memory and
// registers sized for it; csrc/cuda/passes_kernel.h).
constexpr int64_t kMaxDim = 256;
// The largest D, Dv and C the passes take on tensors of `device`: kMaxDim on CUDA; on the
// CPU no capacity limit, only BLAS's int sizes (the CPU passes size their buffers by the
// problem and shrink their row tiles as D, Dv or C grow; csrc/cpu/passes.cpp).
int64_t max_pass_dim(const c10::Device& device);
// D, C in [1, kMaxDim] and Dv in [0, kMaxDim] (0: no values) whatever the inputs' device:
// for the CUDA passes where they run on CPU tensors (the CPU emulation, .ci/cuda_emulation),
// which the checks above do not limit.
void check_cuda_pass_dims(const char* op, int64_t D, int64_t DV, int64_t C);

// The whole op's codes of proposal and weighting (the schema's ints).
constexpr int64_t kSegment = 0, kMixed = 1, kAttend = 2;
constexpr int64_t kOptimal = 0, kBalance = 1;

// The sizes and flags of a lara_fwd / lara_bwd call, as the pipeline derives them from the
// shapes (packed_sizes), shared by the CPU and CUDA implementations; the per-element counts
// (from the masks or offsets) are each implementation's own.
struct WholeArgs {
  bool packed = false;   // cu_seqlens_q, cu_seqlens_k given
  bool masked = false;   // padded layout with a query or key padding mask
  int64_t B = 0, H = 0, Hkv = 0, G = 1;   // G = H / Hkv query heads per key/value head
  int64_t N = 0, M = 0;                   // queries, keys per element (packed: max_seqlen_q, max_seqlen_k)
  int64_t Lq = 0, Lk = 0;                 // rows of q and of k, v per element (packed: T_q, T_k)
  int64_t C = 0, NS = 0, D = 0, DV = 0;   // C = min(num_samples, N, M), NS = num_samples
  int64_t proposal = kSegment;
  bool optimal = true;                    // weighting kOptimal (else kBalance)
  at::ScalarType ct = at::kFloat;         // the compute type
  StateLayout layout;                     // of the state tensor (csrc/state_layout.h)
};
// The device-neutral checks of the whole op's arguments (eps none for lara_bwd): shapes,
// dtypes, grouped-query heads, the layout pair, the masks, the landmarks and eps, every
// tensor on q's device. The implementations add their own (q's device; the CUDA limits).
WholeArgs check_whole_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& eps,
                           const OptTensor& q_landmarks, const OptTensor& k_landmarks,
                           const OptTensor& query_padding, const OptTensor& key_padding,
                           const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, int64_t num_samples, int64_t proposal, int64_t weighting);
// lara_bwd's state: the contiguous compute-type tensor lara_fwd returned for these arguments.
void check_whole_state(const char* op, const WholeArgs& a, const Tensor& state, const Tensor& q);
// lara_bwd's dy: q's shape with Dv as its last size, q's dtype or the compute type, on q's device.
void check_whole_dy(const char* op, const WholeArgs& a, const Tensor& dy, const Tensor& q);
// The 4 strides of a long tensor as the CUDA kernels take them: (B, H, L, W) as they are,
// a packed (T, H, W) one as {0, H, T, W} (the kernels add cu_seqlens[b] to the row index).
void long_strides(const Tensor& t, int64_t out[4]);

// Test mode (lara_kernels._C._set_poison_outputs): every output and scratch buffer of the
// ops starts as NaN instead of uninitialized, so an element a kernel forgets to write
// shows up in the tests. Off by default (outputs are then at::empty).
bool poison_outputs();
void set_poison_outputs(bool on);
// at::empty, or a NaN-filled tensor in test mode.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

}  // namespace lara
