// Masked segment means on the GPU, forward and backward (docs/math.md section 1).
// Both run a 1-D grid of 256-thread blocks (passes_kernel.h, launch_1d): the block index
// is an int64 over every (batch, head, segment) or element, never B x H on grid y/z.
// Forward: one warp per (batch, head, segment), lanes over D, a deterministic sequential
// sum over the segment's positions (no atomics). Reads each valid row of x once (and the
// segment's order[] entries once per 32 columns), writes out once: the floor.
// Backward: one thread per element of grad_x; reads grad once per position of a segment
// (L2-resident, C x D per (batch, head)), writes grad_x once: the floor for its output.
// Packed layout (cu_seqlens): the forward reads the rows of sequence b from its offset
// (positions in order, no order table); the backward's threads run over (sequence,
// position < max_seqlen, head, column), so that consecutive threads write consecutive
// elements of the (T, H, D) gradient, and threads past a sequence's length end at once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "landmarks_kernel.h"
#include "passes_kernel.h"

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

constexpr int kThreads = detail::kThreads;  // 8 warps
constexpr int kWarps = detail::kWarps;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    landmarks_fwd_kernel(const T* __restrict__ x, int64_t sb, int64_t sh, int64_t sl, int64_t sd,
                         const int64_t* __restrict__ order, const int32_t* __restrict__ cu,
                         const int64_t* __restrict__ start, typename Acc<T>::type* __restrict__ out, int64_t H,
                         int64_t L, int64_t D, int64_t C, int64_t segments, int64_t block0) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t sg = (block0 + blockIdx.x) * kWarps + warp;  // (b * H + h) * C + c
  if (sg >= segments) return;                                // no barrier in this kernel
  const int64_t c = sg % C, bh = sg / C;
  const int64_t b = bh / H, h = bh % H;
  const int64_t p0 = start[b * (C + 1) + c], p1 = start[b * (C + 1) + c + 1];
  const acc_t inv = p1 > p0 ? acc_t(1) / static_cast<acc_t>(p1 - p0) : acc_t(0);
  if (cu != nullptr) {  // packed: positions p0 .. p1 - 1 of sequence b are rows cu[b] + p
    const T* xbh = x + (static_cast<int64_t>(cu[b]) + p0) * sl + h * sh;
    for (int64_t d = lane; d < D; d += 32) {
      acc_t s = 0;
      const T* xd = xbh + d * sd;
      for (int64_t p = 0; p < p1 - p0; ++p) s += load<T>(xd + p * sl);
      out[sg * D + d] = s * inv;
    }
    return;
  }
  const T* xbh = x + b * sb + h * sh;
  const int64_t* ord = order + b * L;
  for (int64_t d = lane; d < D; d += 32) {
    acc_t s = 0;
    const T* xd = xbh + d * sd;
    for (int64_t p = p0; p < p1; ++p) s += load<T>(xd + ord[p] * sl);
    out[sg * D + d] = s * inv;
  }
}

template <typename O, typename G>
__global__ void __launch_bounds__(kThreads)
    landmarks_bwd_kernel(const G* __restrict__ grad, const int64_t* __restrict__ seg,
                         const int64_t* __restrict__ start, O* __restrict__ gx, int64_t H, int64_t L, int64_t D,
                         int64_t C, int64_t total, int64_t block0) {
  const int64_t i = (block0 + blockIdx.x) * kThreads + threadIdx.x;
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

// Packed layout: thread i is element (b, p, h, d) of a (B, max_seqlen, H, D) index space,
// d fastest; it writes grad_x[(cu[b] + p), h, d] of the contiguous (T, H, D) gradient when
// p < the length of b, and ends at once otherwise.
template <typename O, typename G>
__global__ void __launch_bounds__(kThreads)
    landmarks_bwd_packed_kernel(const G* __restrict__ grad, const int32_t* __restrict__ cu,
                                const int64_t* __restrict__ c_eff, const int64_t* __restrict__ start,
                                O* __restrict__ gx, int64_t H, int64_t L, int64_t D, int64_t C, int64_t total,
                                int64_t block0) {
  const int64_t i = (block0 + blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t d = i % D;
  const int64_t h = (i / D) % H;
  const int64_t p = (i / (D * H)) % L;
  const int64_t b = i / (D * H * L);
  const int64_t first = cu[b], n = static_cast<int64_t>(cu[b + 1]) - first;
  if (p >= n) return;  // past the sequence's end
  const int64_t ce = c_eff[b];
  G v = 0;
  if (ce > 0) {
    const int64_t s = p * ce / n;
    const int64_t* st = start + b * (C + 1);
    v = grad[((b * H + h) * C + s) * D + d] / static_cast<G>(st[s + 1] - st[s]);
  }
  gx[((first + p) * H + h) * D + d] = store<O, G>(v);
}

template <typename Launch> cudaError_t detail_launch(int64_t blocks, Launch&& launch) {
  return launch_1d(blocks, device_info(), launch);
}

template <typename T>
cudaError_t fwd(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t sd, const int64_t* order,
                const int32_t* cu, const int64_t* start, void* out, int64_t B, int64_t H, int64_t L, int64_t D,
                int64_t C, cudaStream_t stream) {
  const int64_t segments = B * H * C;
  if (segments == 0 || D == 0) return cudaSuccess;
  const T* xp = static_cast<const T*>(x);
  auto* op = static_cast<typename Acc<T>::type*>(out);
  auto kernel = landmarks_fwd_kernel<T>;
  return detail_launch(detail::cdiv(segments, kWarps), [&](int64_t first, unsigned n) {
    kernel<<<n, kThreads, 0, stream>>>(xp, sb, sh, sl, sd, order, cu, start, op, H, L, D, C, segments, first);
  });
}

template <typename O, typename G>
cudaError_t bwd(const void* grad, const int64_t* seg, const int32_t* cu, const int64_t* c_eff, const int64_t* start,
                void* gx, int64_t B, int64_t H, int64_t L, int64_t D, int64_t C, cudaStream_t stream) {
  const int64_t total = B * H * L * D;
  if (total == 0) return cudaSuccess;
  const G* gp = static_cast<const G*>(grad);
  O* out = static_cast<O*>(gx);
  if (cu != nullptr) {
    auto kernel = landmarks_bwd_packed_kernel<O, G>;
    return detail_launch(detail::cdiv(total, kThreads), [&](int64_t first, unsigned n) {
      kernel<<<n, kThreads, 0, stream>>>(gp, cu, c_eff, start, out, H, L, D, C, total, first);
    });
  }
  auto kernel = landmarks_bwd_kernel<O, G>;
  return detail_launch(detail::cdiv(total, kThreads), [&](int64_t first, unsigned n) {
    kernel<<<n, kThreads, 0, stream>>>(gp, seg, start, out, H, L, D, C, total, first);
  });
}

}  // namespace

cudaError_t landmarks_forward(DType dtype, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t sd,
                              const int64_t* order, const int32_t* cu, const int64_t* start, void* out, int64_t B,
                              int64_t H, int64_t L, int64_t D, int64_t C, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat64: return fwd<double>(x, sb, sh, sl, sd, order, cu, start, out, B, H, L, D, C, stream);
    case DType::kFloat32: return fwd<float>(x, sb, sh, sl, sd, order, cu, start, out, B, H, L, D, C, stream);
    case DType::kFloat16: return fwd<__half>(x, sb, sh, sl, sd, order, cu, start, out, B, H, L, D, C, stream);
    case DType::kBFloat16:
      return fwd<__nv_bfloat16>(x, sb, sh, sl, sd, order, cu, start, out, B, H, L, D, C, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t landmarks_backward(DType out_dtype, bool grad_is_f64, const void* grad, const int64_t* seg,
                               const int32_t* cu, const int64_t* c_eff, const int64_t* start, void* grad_x,
                               int64_t B, int64_t H, int64_t L, int64_t D, int64_t C, cudaStream_t stream) {
  if (grad_is_f64) {
    if (out_dtype != DType::kFloat64) return cudaErrorInvalidValue;
    return bwd<double, double>(grad, seg, cu, c_eff, start, grad_x, B, H, L, D, C, stream);
  }
  switch (out_dtype) {
    case DType::kFloat32: return bwd<float, float>(grad, seg, cu, c_eff, start, grad_x, B, H, L, D, C, stream);
    case DType::kFloat16: return bwd<__half, float>(grad, seg, cu, c_eff, start, grad_x, B, H, L, D, C, stream);
    case DType::kBFloat16:
      return bwd<__nv_bfloat16, float>(grad, seg, cu, c_eff, start, grad_x, B, H, L, D, C, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lara
