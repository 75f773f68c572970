// Masked segment means on the GPU, forward and backward (design/lara-math.md section 1).
// Forward: one block per (batch, head, segment), threads over D, a deterministic
// sequential sum over the segment's positions (no atomics). Backward: one thread per
// element of grad_x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "landmarks_kernel.h"

namespace lara {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) {
  return static_cast<typename Acc<T>::type>(*p);
}
template <> __device__ __forceinline__ float load<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

// Store an accumulator value (double or float) as T; half types round from float.
template <typename T, typename A> __device__ __forceinline__ T store(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store<__half, float>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}

template <typename T>
__global__ void landmarks_fwd_kernel(const T* __restrict__ x, int64_t sb, int64_t sh, int64_t sl, int64_t sd,
                                     const int64_t* __restrict__ order, const int64_t* __restrict__ start,
                                     typename Acc<T>::type* __restrict__ out, int64_t H, int64_t L, int64_t D,
                                     int64_t C) {
  using acc_t = typename Acc<T>::type;
  const int64_t c = blockIdx.x;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / H, h = bh % H;
  const int64_t p0 = start[b * (C + 1) + c], p1 = start[b * (C + 1) + c + 1];
  const T* xbh = x + b * sb + h * sh;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t s = 0;
    for (int64_t p = p0; p < p1; ++p) s += load<T>(xbh + order[b * L + p] * sl + d * sd);
    out[(bh * C + c) * D + d] = p1 > p0 ? s / static_cast<acc_t>(p1 - p0) : acc_t(0);
  }
}

template <typename O, typename G>
__global__ void landmarks_bwd_kernel(const G* __restrict__ grad, const int64_t* __restrict__ seg,
                                     const int64_t* __restrict__ start, O* __restrict__ gx, int64_t H, int64_t L,
                                     int64_t D, int64_t C, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t d = i % D;
  const int64_t l = (i / D) % L;
  const int64_t bh = i / (D * L);
  const int64_t b = bh / H;
  const int64_t s = seg[b * L + l];
  G v = 0;
  if (s >= 0) {
    const int64_t n = start[b * (C + 1) + s + 1] - start[b * (C + 1) + s];
    v = grad[(bh * C + s) * D + d] / static_cast<G>(n);
  }
  gx[i] = store<O, G>(v);
}

template <typename T>
cudaError_t fwd(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t sd, const int64_t* order,
                const int64_t* start, void* out, int64_t B, int64_t H, int64_t L, int64_t D, int64_t C,
                cudaStream_t stream) {
  if (B * H * C == 0 || D == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(B * H));
  const int threads = D >= 128 ? 128 : (D >= 64 ? 64 : 32);
  landmarks_fwd_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(x), sb, sh, sl, sd, order, start,
                                                        static_cast<typename Acc<T>::type*>(out), H, L, D, C);
  return cudaGetLastError();
}

template <typename O, typename G>
cudaError_t bwd(const void* grad, const int64_t* seg, const int64_t* start, void* gx, int64_t B, int64_t H,
                int64_t L, int64_t D, int64_t C, cudaStream_t stream) {
  const int64_t total = B * H * L * D;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  landmarks_bwd_kernel<O, G><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const G*>(grad), seg, start, static_cast<O*>(gx), H, L, D, C, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t landmarks_forward(DType dtype, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t sd,
                              const int64_t* order, const int64_t* start, void* out, int64_t B, int64_t H,
                              int64_t L, int64_t D, int64_t C, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat64: return fwd<double>(x, sb, sh, sl, sd, order, start, out, B, H, L, D, C, stream);
    case DType::kFloat32: return fwd<float>(x, sb, sh, sl, sd, order, start, out, B, H, L, D, C, stream);
    case DType::kFloat16: return fwd<__half>(x, sb, sh, sl, sd, order, start, out, B, H, L, D, C, stream);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(x, sb, sh, sl, sd, order, start, out, B, H, L, D, C, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t landmarks_backward(DType out_dtype, bool grad_is_f64, const void* grad, const int64_t* seg,
                               const int64_t* start, void* grad_x, int64_t B, int64_t H, int64_t L, int64_t D,
                               int64_t C, cudaStream_t stream) {
  if (grad_is_f64) {
    if (out_dtype != DType::kFloat64) return cudaErrorInvalidValue;
    return bwd<double, double>(grad, seg, start, grad_x, B, H, L, D, C, stream);
  }
  switch (out_dtype) {
    case DType::kFloat32: return bwd<float, float>(grad, seg, start, grad_x, B, H, L, D, C, stream);
    case DType::kFloat16: return bwd<__half, float>(grad, seg, start, grad_x, B, H, L, D, C, stream);
    case DType::kBFloat16: return bwd<__nv_bfloat16, float>(grad, seg, start, grad_x, B, H, L, D, C, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lara
