// Declarations of the lara_kernels ops implemented in csrc/cpu and csrc/cuda.
// csrc/lara_ops.cpp registers them with TORCH_LIBRARY.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace lara {

// Masked segment means (design/lara-math.md section 1), unscaled.
//   x (B, H, L, D) float64/float32/float16/bfloat16, any strides
//   padding (B, L) bool, True = padding, or none
//   c_eff (B,) int64, 0 <= c_eff[b] <= min(num_segments, valid length of b)
// returns (B, H, num_segments, D) contiguous, float64 for float64 input, else float32;
// rows c >= c_eff[b] are 0.
at::Tensor landmarks_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                         const at::Tensor& c_eff, int64_t num_segments);
at::Tensor landmarks_backward_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                  const at::Tensor& c_eff, int64_t length, at::ScalarType dtype);

#ifdef LARA_WITH_CUDA
at::Tensor landmarks_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                          const at::Tensor& c_eff, int64_t num_segments);
at::Tensor landmarks_backward_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                   const at::Tensor& c_eff, int64_t length, at::ScalarType dtype);
#endif

// Shared argument checks (csrc/lara_ops.cpp); they name the bad argument and value.
void check_landmarks_args(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                          const at::Tensor& c_eff, int64_t num_segments);
void check_landmarks_backward_args(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                   const at::Tensor& c_eff, int64_t length, at::ScalarType dtype);

}  // namespace lara
