// Helpers shared by the CUDA bindings (passes_cuda.cpp, fused_cuda.cpp): the kernels'
// dtype tag of a tensor, the device check, the launch-error check and the stream a call
// launches on (the current stream of the inputs' device; callers hold a CUDAGuard).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "passes_kernel.h"

namespace lara {
namespace binding {

inline cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "lara_kernels (CUDA): unsupported dtype ", t);
  }
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA) launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

}  // namespace binding
}  // namespace lara
