// CUDA launchers for masked segment means. Raw pointers, sizes, strides and a stream:
// no torch headers, so the kernels compile with nvcc alone (CMakeLists.txt does that).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lara {
namespace cuda {

enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

// out (B, H, C, D) contiguous, accumulation type (double for kFloat64, float otherwise).
// Padded layout (cu null): x (B, H, L, D) with strides sb, sh, sl, sd; order (B, L): the
// positions of the valid tokens of each element first, in sequence order.
// Packed layout: x (T, H, D) with strides sh (H), sl (T), sd (D) (sb unused), cu (B + 1)
// int32 offsets of the sequences; order null: position p of sequence b is row cu[b] + p.
// start (B, C + 1): segment c of element b covers positions start[b, c] .. start[b, c + 1] - 1
// (of order[b] in the padded layout).
cudaError_t landmarks_forward(DType dtype, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t sd,
                              const int64_t* order, const int32_t* cu, const int64_t* start, void* out, int64_t B,
                              int64_t H, int64_t L, int64_t D, int64_t C, cudaStream_t stream);

// grad (B, H, C, D) contiguous of accumulation type (double when grad_is_f64); start as
// above (segment sizes). Padded layout (cu null): grad_x (B, H, L, D) contiguous, of type
// out_dtype; seg (B, L): segment of each position, -1 where padded.
// Packed layout: grad_x (T, H, D) contiguous, cu (B + 1) offsets, L = max_seqlen (sizes
// the grid only), c_eff (B,) the segment counts, clamped to [0, min(C, length)] (seg null:
// position p of sequence b of length n is in segment p * c_eff[b] / n).
cudaError_t landmarks_backward(DType out_dtype, bool grad_is_f64, const void* grad, const int64_t* seg,
                               const int32_t* cu, const int64_t* c_eff, const int64_t* start, void* grad_x,
                               int64_t B, int64_t H, int64_t L, int64_t D, int64_t C, cudaStream_t stream);

}  // namespace cuda
}  // namespace lara
