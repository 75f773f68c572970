// CUDA launchers of the fused passes (design/kernels.md; contract in csrc/lara_ops.h).
// Raw pointers, sizes, strides (in elements) and a stream: no torch headers, so the
// kernels compile with nvcc alone. The torch binding is passes_cuda.cpp.
//
// "acc" below is the accumulation type: double for DType::kFloat64, float otherwise.
//
// Two layouts of the long tensors (csrc/lara_ops.h). Padded: (B, H, L, W) with strides
// s[0..3] and an optional (B, L) mask. Packed (cu != null): (T, H, W) rows of B sequences,
// sequence b being rows cu[b] .. cu[b + 1] - 1; the problem's strides are then
// {0, stride of H, stride of T, stride of W} (seq_rows adds cu[b] to the row index), and
// its L (M or N) is max_seqlen, which only sizes the grid: blocks over rows past their
// sequence's length end early (or write their neutral partial), and the offsets are read
// by the kernels alone, never on the host.
// The C-sized arrays (w, bias, kap, qt, lam, bh, Z, E, dkap) are contiguous acc, indexed
// by ((b * H + h) * C + c) * width. Results over the long axis are written as per-split
// partials (leading dimension `splits`, then (B * H, C[, width])) that the caller sums:
// every element is written by exactly one thread and no float atomics are used, so the
// results are bitwise deterministic for a given device.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "landmarks_kernel.h"  // DType

namespace lara {
namespace cuda {

// How a long axis is cut across blocks: `splits` groups of `tiles_per_split` tiles.
// Every group holds at least one tile when the axis is not empty.
struct SplitPlan {
  int64_t splits = 1;
  int64_t tiles_per_split = 1;
};

// C rows of w attending over M keys (k, v); also the query normalizer (w = qt, k = q,
// no values, no norm term).
struct KeyPassProblem {
  DType dtype = DType::kFloat32;  // of k and v
  const void* w = nullptr;        // (B, H, C, D) acc; any C (grouped-query attention: G x C rows)
  const void* k = nullptr;        // (B, H, M, D) or packed (T, H, D), strides sk
  const void* v = nullptr;        // (B, H, M, Dv) or packed (T, H, Dv), strides sv; null: no values (Dv = 0)
  const bool* pad = nullptr;      // (B, M), strides sp, true = padding; null: none
  const int32_t* cu = nullptr;    // packed layout: (B + 1) offsets; M is then max_seqlen. null: padded
  int64_t sk[4] = {0, 0, 0, 0};
  int64_t sv[4] = {0, 0, 0, 0};
  int64_t sp[2] = {0, 0};
  int64_t B = 0, H = 0, C = 0, M = 0, D = 0, Dv = 0;
  double ss = 1.0;
  bool subtract_norm = false;
  // (B,) or null: an element b with live[b] == 0 is treated as having no valid key (its
  // rows get the neutral partial (-inf, 0, 0), dk = dv = 0 and dw = 0, nothing is read);
  // the whole-op path (fused_cuda.cpp) passes it for elements dropped by their masks.
  const int64_t* live = nullptr;
};

// Splits of the long axis for the forward (backward = false) or the dw kernel of the
// backward; the partial buffers have `splits` as leading dimension.
SplitPlan key_pass_split_plan(const KeyPassProblem& p, bool backward);

// m_part, l_part (splits, B*H, C) and acc_part (splits, B*H, C, Dv) acc: per split the
// running max of l_cm, sum_m exp(l_cm - max) and sum_m exp(l_cm - max) v_m.
cudaError_t key_pass_forward(const KeyPassProblem& p, SplitPlan plan, void* m_part, void* l_part,
                             void* acc_part, cudaStream_t stream);

// A sequence without keys (packed layout) leaves the neutral partials (-inf, 0, 0) in
// every split, which the caller combines into Z = -inf and kap = 0.
//
// Z (B, H, C), E = dZ - dkap . kap (B, H, C), dkap (B, H, C, Dv) acc (dkap unused without
// values). Writes dk (k's dtype, strides sdk), dv (v's dtype, strides sdv; unused without
// values) and dw_part (splits, B*H, C, D) acc: every row of dk and dv (those of padded keys
// as zeros), dw_part rows of splits with no key as zeros.
cudaError_t key_pass_backward(const KeyPassProblem& p, SplitPlan plan, const void* Z, const void* E,
                              const void* dkap, void* dk, const int64_t sdk[4], void* dv, const int64_t sdv[4],
                              void* dw_part, cudaStream_t stream);

// The passes hold a row of D, Dv or C values as 8 registers per lane of a warp: the
// launchers refuse larger sizes (cudaErrorInvalidValue); the binding checks them first.
// The key pass's C is not limited (its kernels walk the rows of w in groups and chunks).
constexpr int64_t kMaxWidth = 256;

// What the current device offers (the binding's device guard makes the inputs' device
// current). Attribute queries only: no synchronization, allowed during graph capture.
struct DeviceInfo {
  int sms = 108;
  int smem_optin = 48 * 1024;       // the most dynamic shared memory one block may opt in to
  int64_t max_grid_x = 0x7fffffff;  // gridDim.x limit (y and z, 65535, are never used)
};
inline DeviceInfo device_info() {
  DeviceInfo info;
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return info;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0) info.sms = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess && v > 0)
    info.smem_optin = v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxGridDimX, dev) == cudaSuccess && v > 0) info.max_grid_x = v;
  return info;
}

// Launch geometry of every kernel of the library: a 1-D grid. B x H, splits, tiles and
// segments are folded into one int64 block index that rides on x only, and a count of
// blocks beyond the device's x limit (2^31 - 1) goes as several launches on the same
// stream, each told the index of its first block (kernels use first + blockIdx.x).
// launch(first, count) enqueues one launch; returns the first launch error.
template <typename Launch>
inline cudaError_t launch_1d(int64_t blocks, const DeviceInfo& info, Launch&& launch) {
  const int64_t cap = info.max_grid_x > 0 ? info.max_grid_x : 1;
  for (int64_t first = 0; first < blocks; first += cap) {
    const int64_t n = blocks - first < cap ? blocks - first : cap;
    launch(first, static_cast<unsigned>(n));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// N query rows attending over C samples.
struct QueryPassProblem {
  DType dtype = DType::kFloat32;  // of q
  const void* q = nullptr;        // (B, H, N, D) or packed (T, H, D), strides sq
  const void* w = nullptr;        // (B, H, C, D) acc
  const void* bias = nullptr;     // (B, H, C) acc
  const void* kap = nullptr;      // (B, H, C, Dv) acc
  const int64_t* c_eff = nullptr; // (B,), clamped to [0, C] by the kernels; 0: the rows of b give
                                  // y = 0, dq = 0 and add nothing to the sums (no key to attend).
                                  // null: C in the padded layout, min(C, queries, keys of b) in
                                  // the packed one (from cu and cu_k; active_samples)
  const void* qt = nullptr;       // (B, H, C, D) acc; null: no MIS term (lam, bh unused)
  const void* lam = nullptr;      // (B, H, C) acc
  const void* bh = nullptr;       // (B, H, C) acc
  const bool* pad = nullptr;      // (B, N), strides sp, true = padding; null: none
  const int32_t* cu = nullptr;    // packed layout: (B + 1) offsets; N is then max_seqlen. null: padded
  const int32_t* cu_k = nullptr;  // packed layout without c_eff: the keys' offsets (B + 1)
  int64_t sq[4] = {0, 0, 0, 0};
  int64_t sp[2] = {0, 0};
  int64_t B = 0, H = 0, N = 0, C = 0, D = 0, Dv = 0;
  double ss = 1.0, beta = 0.0;
};

// y (B, H, N, Dv) or packed (T, H, Dv) in q's dtype, strides sy (4 entries, as sq).
cudaError_t query_pass_forward(const QueryPassProblem& p, void* y, const int64_t sy[4], cudaStream_t stream);

SplitPlan query_pass_split_plan(const QueryPassProblem& p);

// dy (B, H, N, Dv) strides sdy, of q's dtype or of acc (dy_dtype). Writes dq (q's dtype,
// strides sdq) and the partials, all acc: dw_part, dqt_part (splits, B*H, C, D),
// dkap_part (splits, B*H, C, Dv), dbias_part, dlam_part, dbh_part (splits, B*H, C); the
// MIS ones (dqt, dlam, dbh) are not touched without the MIS term.
cudaError_t query_pass_backward(const QueryPassProblem& p, SplitPlan plan, DType dy_dtype, const void* dy,
                                const int64_t sdy[4], void* dq, const int64_t sdq[4], void* dw_part,
                                void* dbias_part, void* dkap_part, void* dqt_part, void* dlam_part,
                                void* dbh_part, cudaStream_t stream);

}  // namespace cuda
}  // namespace lara

// ---------------------------------------------------------------------------------
// Device helpers shared by key_pass_kernel.cu and query_pass_kernel.cu.
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace lara {
namespace cuda {
namespace detail {

// Every kernel runs 8 warps; rows of a tile are dealt to warps round-robin (row r of
// warp w is w + 8 r), so per-row reductions are warp shuffles.
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFull = 0xffffffffu;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A to_acc(T x) { return static_cast<A>(x); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T, typename A> __device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16(x);
}

// setup.py compiles with --use_fast_math, which turns expf/logf into the __expf/__logf
// intrinsics (a few ulp for the arguments met here: exp of l - max <= 0, log of alpha);
// the float32 tolerances of tests/test_cuda_ops.py allow for that. float64 is unaffected.
__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }
template <typename A> __device__ __forceinline__ A amax(A a, A b) { return a > b ? a : b; }

template <typename A> __device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
}
template <typename A> __device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = amax(x, __shfl_xor_sync(kFull, x, off));
  return x;
}

__host__ __device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Shared-memory row strides. Rows read "one row per lane" use an odd stride (consecutive
// lanes hit distinct banks); rows read "one column per lane" are padded to a multiple of
// 32 (zero-filled), so column loops over lane + 32 i need no bounds test.
__host__ __device__ __forceinline__ int pad32(int64_t n) { return static_cast<int>(cdiv(n, 32) * 32); }
__host__ __device__ __forceinline__ int pad32_odd(int64_t n) { return pad32(n) + 1; }

__device__ __forceinline__ bool padded(const bool* pad, int64_t sb, int64_t sl, int64_t b, int64_t l) {
  return pad != nullptr && pad[b * sb + l * sl];
}

// The rows of batch element b on a long axis: padded layout, rows 0 .. L - 1 of element b
// (first 0, len L); packed layout (cu given), rows cu[b] .. cu[b + 1] - 1 of the packed
// tensor (first cu[b]; L, the grid's extent, is not read). A row m < len of b is at
// b * s[0] + h * s[1] + (first + m) * s[2], all int64.
struct SeqRows {
  int64_t first, len;
};
__device__ __forceinline__ SeqRows seq_rows(const int32_t* cu, int64_t b, int64_t L) {
  if (cu == nullptr) return {0, L};
  const int64_t first = cu[b];
  return {first, static_cast<int64_t>(cu[b + 1]) - first};
}

// The active samples of batch element b in the query pass: c_eff[b] clamped to [0, C];
// without c_eff, C in the padded layout and min(C, queries, keys of b) in the packed one.
__device__ __forceinline__ int64_t active_samples(const QueryPassProblem& p, int64_t b) {
  int64_t ce = p.C;
  if (p.c_eff != nullptr) {
    ce = p.c_eff[b];
  } else if (p.cu != nullptr && p.cu_k != nullptr) {
    const int64_t n = static_cast<int64_t>(p.cu[b + 1]) - p.cu[b], m = static_cast<int64_t>(p.cu_k[b + 1]) - p.cu_k[b];
    ce = n < m ? n : m;
    ce = ce < p.C ? ce : p.C;
  }
  return ce < 0 ? 0 : (ce > p.C ? p.C : ce);
}

// The block's dynamic shared memory (one declaration for every kernel of a file).
template <typename A> __device__ __forceinline__ A* smem_base() {
  extern __shared__ __align__(16) unsigned char lara_dyn_smem[];
  return reinterpret_cast<A*>(lara_dyn_smem);
}

// Strides of a 4-D tensor, passed to kernels by value.
struct Strides4 {
  int64_t s[4];
};

// Copies rows r0 .. r0 + rows of a long-axis tensor x (row stride sr, column stride sc,
// L rows) into dst (row stride ds) as scale * x. Rows out of range or padded are written
// as zeros without being read, and so are the columns width .. ds.
template <typename T, typename A>
__device__ __forceinline__ void stage_long(const T* __restrict__ x, int64_t sr, int64_t sc, int64_t r0, int64_t L,
                                           int rows, int width, int ds, A scale, const bool* pad, int64_t spb,
                                           int64_t spl, int64_t b, A* dst) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < rows; r += kWarps) {
    const int64_t m = r0 + r;
    const bool ok = m < L && !padded(pad, spb, spl, b, m);
    const T* row = x + (ok ? m : 0) * sr;
    for (int d = lane; d < ds; d += 32) dst[r * ds + d] = (ok && d < width) ? scale * to_acc<A>(row[d * sc]) : A(0);
  }
}

// Copies rows c0 .. c0 + rows of a contiguous (C, width) matrix into dst (row stride ds),
// zeros for rows c >= C and columns width .. ds.
template <typename A>
__device__ __forceinline__ void stage_small(const A* __restrict__ src, int64_t c0, int64_t C, int rows, int width,
                                            int ds, A* dst) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < rows; r += kWarps) {
    const bool ok = c0 + r < C;
    const A* row = src + (ok ? c0 + r : 0) * width;
    for (int d = lane; d < ds; d += 32) dst[r * ds + d] = (ok && d < width) ? row[d] : A(0);
  }
}


// Tiles beyond this much shared memory are cut smaller where they can be, so that two
// blocks fit on an H100 SM (228 KB). The largest tile of any kernel (float64 with
// D = Dv = 256) still fits the 163 KB an A100 block may opt in to.
constexpr size_t kSmemSoftBudget = 100 * 1024;

// The long axis is split until the grid has about 4 blocks per SM (two to four waves at
// one or two resident blocks per SM), never into more splits than tiles.
inline SplitPlan split_plan(int64_t n_tiles, int64_t other_blocks, const DeviceInfo& info) {
  SplitPlan plan;
  const int64_t target = 4 * static_cast<int64_t>(info.sms);
  int64_t s = cdiv(target, other_blocks > 0 ? other_blocks : 1);
  if (s > n_tiles) s = n_tiles;
  if (s > 65535) s = 65535;
  if (s < 1) s = 1;
  plan.tiles_per_split = n_tiles > 0 ? cdiv(n_tiles, s) : 1;
  plan.splits = n_tiles > 0 ? cdiv(n_tiles, plan.tiles_per_split) : 1;
  return plan;
}

// Opt in to more than the default 48 KB of dynamic shared memory.
template <typename Kernel> inline cudaError_t prepare_launch(Kernel kernel, size_t smem, const DeviceInfo& info) {
  if (smem > static_cast<size_t>(info.smem_optin)) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024)
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  return cudaSuccess;
}

}  // namespace detail
}  // namespace cuda
}  // namespace lara
#endif  // __CUDACC__
