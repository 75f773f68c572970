// The bodies of the CPU passes (passes.cpp) for callers that have checked their arguments:
// the op entry points (after lara_ops.cpp's shared checks) and the whole-op path
// (fused.cpp, after its own). A body checks nothing and allocates no output: it reads the
// long tensors (either layout, any strides, through a Seqs) and the C-sized inputs as
// contiguous compute-type arrays, and writes into what the caller gives it (the whole-op
// path passes fields of its state). T is the compute type: double for float64 inputs,
// float for float32, float16 and bfloat16.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "seqs.h"

namespace lara {
namespace cpu {

// Key pass (docs/math.md section 4; also the query normalizer, v undefined and no norm
// term, and the "attend" proposal, values k): w (B, H, C, D) against the rows of k (sq,
// heads H). Writes Z (B, H, C) and, with v, kap (B, H, C, Dv), every element.
template <typename T>
void key_pass_fwd_body(const T* w, int64_t C, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                       bool sub_norm, T* Z, T* kap);

// Its backward (docs/design.md): reads w, Z, kap, dZ, dkap (kap and dkap nullptr without
// v); writes dw (B, H, C, D) and every row of dk and, with v, of dv (k's and v's layout,
// contiguous, allocated by the caller in their dtypes; padded rows 0).
template <typename T>
void key_pass_bwd_body(const T* w, int64_t C, const at::Tensor& k, const at::Tensor& v, const Seqs& sq, T ss,
                       bool sub_norm, const T* Z, const T* kap, const T* dZ, const T* dkap, T* dw, at::Tensor& dk,
                       at::Tensor& dv);

// The query pass's inputs: q (B, H, N, D) or packed, any strides, and the C-sized ones,
// contiguous (B, H, C, ...); c_eff (B,) in [0, C]; the MIS term's qt, lam, bh (optimal
// weighting) or nullptr with mis = false.
template <typename T>
struct QueryArgs {
  at::Tensor q;
  const T *w, *bias, *kap;
  const int64_t* c_eff;
  const T *qt, *lam, *bh;
  int64_t C, D, DV;
  bool mis;
};

// Query pass (docs/math.md sections 6, 7): writes every row of y (q's layout with Dv
// columns, contiguous, q's dtype; padded rows 0).
template <typename T>
void query_pass_fwd_body(const QueryArgs<T>& a, const Seqs& sq, T ss, T beta, at::Tensor& y);

// Its backward: writes every row of dq (q's layout, contiguous, q's dtype) and dw, dbias,
// dkap and, with the MIS term, dqt, dlam, dbh (nullptr without it), all (B, H, C, ...).
template <typename T>
void query_pass_bwd_body(const QueryArgs<T>& a, const Seqs& sq, T ss, T beta, const at::Tensor& dy,
                         at::Tensor& dq, T* dw, T* dbias, T* dkap, T* dqt, T* dlam, T* dbh);

// Landmarks (docs/math.md section 1; landmarks.cpp), scaled: for each (b, hx) of x's heads
// (sq.H of them), out (B, sq.H * G, C, D) at head hx * G and its G - 1 successors = ss times
// the segment means of b's valid rows of x (c_eff ce[b] segments), rows c >= ce[b] 0.
template <typename T>
void landmarks_body(const at::Tensor& x, const Seqs& sq, const int64_t* ce, int64_t C, T ss, int64_t G, T* out);

// Its backward, added into dx (x's layout, contiguous, x's dtype): the gradient of the
// unscaled means from grad (B, sq.H * G, C, D), summed over each group of G heads, at each
// valid row of an element with ce[b] >= 1 (other rows unchanged).
template <typename T>
void landmarks_backward_add(const T* grad, const Seqs& sq, const int64_t* ce, int64_t C, int64_t G, at::Tensor& dx);

}  // namespace cpu
}  // namespace lara
