// The one binding file: op schemas (TORCH_LIBRARY), CPU and CUDA implementations
// (TORCH_LIBRARY_IMPL), and the argument checks every implementation shares.
#include "lara_ops.h"

#include <torch/library.h>

namespace lara {

void check_landmarks_args(const at::Tensor& x, const c10::optional<at::Tensor>& padding,
                          const at::Tensor& c_eff, int64_t num_segments) {
  TORCH_CHECK(x.dim() == 4, "lara_kernels::landmarks: x must be 4-D (B, H, L, D), got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kDouble || st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "lara_kernels::landmarks: x must be float64, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(num_segments >= 1, "lara_kernels::landmarks: num_segments must be >= 1, got ", num_segments);
  const int64_t B = x.size(0), L = x.size(2);
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
                                   const at::Tensor& c_eff, int64_t length, at::ScalarType dtype) {
  TORCH_CHECK(grad.dim() == 4, "lara_kernels::landmarks_backward: grad must be 4-D (B, H, C, D), got shape ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kDouble || grad.scalar_type() == at::kFloat,
              "lara_kernels::landmarks_backward: grad must be float64 or float32, got ", grad.scalar_type());
  TORCH_CHECK(length >= 0, "lara_kernels::landmarks_backward: length must be >= 0, got ", length);
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "lara_kernels::landmarks_backward: dtype must be floating, got ", dtype);
  const int64_t B = grad.size(0);
  TORCH_CHECK(c_eff.dim() == 1 && c_eff.size(0) == B && c_eff.scalar_type() == at::kLong,
              "lara_kernels::landmarks_backward: c_eff must be int64 of shape (", B, ",), got shape ", c_eff.sizes());
  if (padding.has_value()) {
    TORCH_CHECK(padding->scalar_type() == at::kBool && padding->dim() == 2 && padding->size(0) == B &&
                    padding->size(1) == length,
                "lara_kernels::landmarks_backward: padding must be bool of shape (", B, ", ", length, "), got ",
                padding->scalar_type(), " of shape ", padding->sizes());
  }
}

}  // namespace lara

TORCH_LIBRARY(lara_kernels, m) {
  m.def("landmarks(Tensor x, Tensor? padding, Tensor c_eff, int num_segments) -> Tensor");
  m.def("landmarks_backward(Tensor grad, Tensor? padding, Tensor c_eff, int length, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(lara_kernels, CPU, m) {
  m.impl("landmarks", &lara::landmarks_cpu);
  m.impl("landmarks_backward", &lara::landmarks_backward_cpu);
}

#ifdef LARA_WITH_CUDA
TORCH_LIBRARY_IMPL(lara_kernels, CUDA, m) {
  m.impl("landmarks", &lara::landmarks_cuda);
  m.impl("landmarks_backward", &lara::landmarks_backward_cuda);
}
#endif
