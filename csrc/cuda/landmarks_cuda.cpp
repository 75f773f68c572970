// Torch binding of the CUDA segment-means kernels (csrc/cuda/landmarks_kernel.cu).
// Builds the segment tables with a few torch ops on the device, then launches on the
// current stream of the inputs' device (under a device guard).
//
// No host-device synchronization anywhere (no .item(), no data-dependent shapes), so a
// call can be captured in a CUDA graph. In consequence c_eff is not checked against the
// valid lengths as the CPU op does (that check needs the values on the host): each
// element's c_eff is clamped on the device to [0, min(num_segments, valid length)], i.e.
// an out-of-range count gives the landmarks of the nearest valid count instead of an error.
//
// Packed layout (cu_seqlens): the valid length of sequence b is cu[b + 1] - cu[b], taken
// on the device (a torch op on the offsets, no sync); the kernels read x and write grad_x
// at the sequences' offsets (no order or segment table, no padded copy), and the
// backward's grid runs over max_seqlen positions per sequence.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../lara_ops.h"
#include "landmarks_kernel.h"

namespace lara {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "lara_kernels: unsupported dtype ", t);
  }
}

// order (B, L), start (B, C + 1), seg (B, L), and the clamped c_eff (B,); see
// landmarks_kernel.h. Packed layout: start and c_eff only (order and seg undefined).
struct Tables {
  at::Tensor order, start, seg, c_eff;
};

Tables segment_tables(const c10::optional<at::Tensor>& padding, const at::Tensor& c_eff_in, int64_t B, int64_t L,
                      int64_t C, const at::TensorOptions& opts, const c10::optional<at::Tensor>& cu_seqlens) {
  const auto lopts = opts.dtype(at::kLong);
  const bool packed = cu_seqlens.has_value();
  at::Tensor valid;
  at::Tensor n_valid;                                                       // (B,)
  if (packed) {
    n_valid = (cu_seqlens->slice(0, 1) - cu_seqlens->slice(0, 0, B)).to(at::kLong);
  } else {
    valid = padding.has_value() ? padding->logical_not() : at::ones({B, L}, opts.dtype(at::kBool));
    n_valid = valid.sum(-1);
  }
  // sync-free: clamped to [0, min(C, valid length)] instead of checked (see the top)
  const at::Tensor c_eff = at::minimum(c_eff_in.clamp(0, C), n_valid).contiguous();
  at::Tensor c = at::arange(C + 1, lopts).unsqueeze(0);                  // (1, C+1)
  at::Tensor ce = c_eff.unsqueeze(1).clamp_min(1);
  at::Tensor st = at::div(c * n_valid.unsqueeze(1) + ce - 1, ce, "floor");
  st = at::where(c <= c_eff.unsqueeze(1), st, n_valid.unsqueeze(1));
  st = at::where(c_eff.unsqueeze(1) > 0, st, at::zeros_like(st)).contiguous();  // no segments at all
  if (packed) return {at::Tensor(), st, at::Tensor(), c_eff};
  at::Tensor pos = valid.to(at::kLong).cumsum(-1) - 1;
  at::Tensor denom = n_valid.clamp_min(1).unsqueeze(1);
  at::Tensor seg = at::where(valid & (c_eff.unsqueeze(1) > 0), at::div(pos * c_eff.unsqueeze(1), denom, "floor"),
                             at::full({B, L}, -1, lopts));
  at::Tensor order = std::get<1>(at::sort(padding.has_value() ? padding->to(at::kByte) : at::zeros({B, L}, lopts),
                                          /*stable=*/true, /*dim=*/-1, /*descending=*/false))
                         .contiguous();
  return {order, st, seg.contiguous(), c_eff};
}

}  // namespace

at::Tensor landmarks_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& padding, const at::Tensor& c_eff,
                          int64_t num_segments, const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_landmarks_args(x, padding, c_eff, num_segments, cu_seqlens, max_seqlen);
  TORCH_CHECK(x.is_cuda(), "lara_kernels::landmarks (CUDA): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool packed = cu_seqlens.has_value();
  // packed: x (T, H, D), strides as (unused, H, T, D); L = max_seqlen (not used by the forward)
  const int64_t B = packed ? cu_seqlens->size(0) - 1 : x.size(0), H = x.size(1);
  const int64_t L = packed ? max_seqlen : x.size(2), D = x.size(-1), C = num_segments;
  const int64_t sb = packed ? 0 : x.stride(0), sh = x.stride(1), sl = packed ? x.stride(0) : x.stride(2);
  const int64_t sd = x.stride(-1);
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = new_output({B, H, C, D}, x.options().dtype(out_type));
  const Tables t = segment_tables(padding, c_eff, B, L, C, x.options(), cu_seqlens);
  const cudaError_t err = cuda::landmarks_forward(
      to_dtype(x.scalar_type()), x.data_ptr(), sb, sh, sl, sd, packed ? nullptr : t.order.data_ptr<int64_t>(),
      packed ? cu_seqlens->data_ptr<int32_t>() : nullptr, t.start.data_ptr<int64_t>(), out.data_ptr(), B, H, L, D,
      C, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "lara_kernels::landmarks (CUDA) launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor landmarks_backward_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                   const at::Tensor& c_eff, int64_t length, at::ScalarType dtype,
                                   const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_landmarks_backward_args(grad, padding, c_eff, length, dtype, cu_seqlens, max_seqlen);
  TORCH_CHECK(grad.is_cuda(), "lara_kernels::landmarks_backward (CUDA): grad must be a CUDA tensor, got ",
              grad.device());
  TORCH_CHECK(c_eff.device() == grad.device(), "lara_kernels::landmarks_backward (CUDA): c_eff is on ", c_eff.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(!padding.has_value() || padding->device() == grad.device(),
              "lara_kernels::landmarks_backward (CUDA): padding is on ", padding->device(), " but grad is on ",
              grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  const bool packed = cu_seqlens.has_value();
  const int64_t B = grad.size(0), H = grad.size(1), C = grad.size(2), D = grad.size(3);
  const int64_t L = packed ? max_seqlen : length;  // packed: positions per sequence of the grid
  const bool g64 = grad.scalar_type() == at::kDouble;
  TORCH_CHECK(g64 == (dtype == at::kDouble), "lara_kernels::landmarks_backward (CUDA): grad of type ",
              grad.scalar_type(), " does not go with dtype ", dtype);
  const at::Tensor g = grad.contiguous();
  // packed: (T = length, H, D); every row belongs to a sequence and is written
  at::Tensor gx = packed ? new_output({length, H, D}, grad.options().dtype(dtype))
                         : new_output({B, H, L, D}, grad.options().dtype(dtype));
  const Tables t = segment_tables(padding, c_eff, B, L, C, grad.options(), cu_seqlens);
  const cudaError_t err = cuda::landmarks_backward(
      to_dtype(dtype), g64, g.data_ptr(), packed ? nullptr : t.seg.data_ptr<int64_t>(),
      packed ? cu_seqlens->data_ptr<int32_t>() : nullptr, t.c_eff.data_ptr<int64_t>(), t.start.data_ptr<int64_t>(),
      gx.data_ptr(), B, H, L, D, C, c10::cuda::getCurrentCUDAStream(grad.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, "lara_kernels::landmarks_backward (CUDA) launch failed: ", cudaGetErrorString(err));
  return gx;
}

}  // namespace lara
