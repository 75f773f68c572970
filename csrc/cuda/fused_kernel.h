// CUDA launchers of the whole-op path's own kernels (csrc/cuda/fused_kernel.cu): the
// landmarks of q and k in one launch, the C x D and C x C steps between the passes
// (proposal means, samples, the combination of the passes' split partials, densities and
// weights, and their backward), and the final assembly of the gradients. The passes
// themselves are passes_kernel.h's. Raw pointers, sizes, strides and a stream: no torch
// headers. The torch binding is fused_cuda.cpp, whose header has the sequence of launches.
//
// "A" is the compute type: double for DType::kFloat64 inputs, float otherwise. The state is
// the flat compute-type tensor of lara_fwd (csrc/state_layout.h has its layout; StateOffsets
// are its offsets in elements, -1 for an absent field). Every C-sized array is
// contiguous, indexed by ((b * H + h) * C + c) * width, and the G = H / H_kv query heads of a
// key/value head are consecutive, so the same index serves the key pass's (B, H_kv, G * C)
// view of its rows.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../state_layout.h"
#include "passes_kernel.h"

namespace lara {
namespace cuda {

constexpr int kSegment = 0, kMixed = 1, kAttend = 2;

using StateOffsets = lara::StateLayout;   // the state's layout (csrc/state_layout.h)

// How the per-element counts are found on the device, never on the host.
//  - padded without masks: every element has N queries, M keys, C active samples;
//  - padded with masks: `counts` (4, B) int64 written by fused_prep: valid queries, valid
//    keys, c_eff (0 for an element dropped for having no valid query or key) and the samples
//    active in the C x C steps (C for a dropped element, as the pipeline runs it); and per
//    masked side the rank of each position among the valid ones (-1 if padded) and its
//    inverse (position of each rank), (B, N) / (B, M) int32;
//  - packed: lengths from cu_q, cu_k; c_eff = min(C, n, m); C x C steps on max(c_eff, 1).
struct Elements {
  int64_t B = 0, N = 0, M = 0, C = 0;  // N, M: padded lengths or max_seqlen; C = min(num_samples, N, M)
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  const int64_t* counts = nullptr;
  const int32_t* rank_q = nullptr;
  const int32_t* order_q = nullptr;
  const int32_t* rank_k = nullptr;
  const int32_t* order_k = nullptr;
};

// A (B, L) bool mask with strides, or none.
struct Mask {
  const bool* p = nullptr;
  int64_t sb = 0, sl = 0;
};

// A long input (q or k): padded (B, H, L, D) strides s, or packed (T, H, D) as {0, H, T, D}.
struct Long {
  const void* p = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

// A (B, H, num_samples, D) tensor of any of the four float dtypes with strides (eps, given
// landmarks), or none.
struct Small4 {
  const void* p = nullptr;
  DType dtype = DType::kFloat32;
  int64_t s[4] = {0, 0, 0, 0};
};

// Split partials of a pass (leading dimension `splits`, then B * H * C rows of `width`).
struct Parts {
  const void* p = nullptr;
  int64_t splits = 0;
};

struct FusedProblem {
  DType dtype = DType::kFloat32;  // of q, k, v
  Elements e;
  int64_t H = 0, Hkv = 0, G = 1, D = 0, Dv = 0, NS = 0;  // NS = num_samples
  int proposal = kSegment;
  bool optimal = true;
  double ss = 1.0;
  StateOffsets so;
};

// Masked padded layout: one block per batch element counts the valid queries and keys,
// writes e.counts and the rank / order tables of the masked sides.
cudaError_t fused_prep(const FusedProblem& p, Mask qm, Mask km, int64_t* counts, int32_t* rank_q, int32_t* order_q,
                       int32_t* rank_k, int32_t* order_k, cudaStream_t stream);

// qt and kt of the state (scaled by ss): segment means of q (H heads) and of k (H_kv heads,
// written to the G query heads of each), or the given landmarks' first C rows; 0 for a
// dropped element. One launch, one warp per output row. When landmarks_fuse_proposal, the
// same launch writes mu = qt + kt and w = mu + eps (eps: (B, H, NS, D) or none) and
// fused_proposal is not called.
inline bool landmarks_fuse_proposal(const FusedProblem& p, bool k_landmarks_given) {
  return p.proposal == kSegment && (p.G == 1 || k_landmarks_given);
}
cudaError_t fused_landmarks(const FusedProblem& p, Long q, Long k, Small4 qlm, Small4 klm, Small4 eps, void* state,
                            cudaStream_t stream);

// mu and w of the state (and a for "mixed"; Z_att, mean_k for "attend", combined from the
// attend key pass's partials m, l, acc); eps (B, H, NS, D) or none. One warp per sample row.
cudaError_t fused_proposal(const FusedProblem& p, Small4 eps, Parts am, Parts al, Parts aacc, void* state,
                           cudaStream_t stream);

// Z, kap (from the key pass's partials), lam (from the normalizer's, optimal only), rho,
// log_den, bh and the query pass's bias. One warp per sample row.
cudaError_t fused_weights(const FusedProblem& p, Parts km, Parts kl, Parts kacc, Parts nm, Parts nl, void* state,
                          cudaStream_t stream);

// Backward, after the query pass: sums of its partials (dbias, dkap, dlam, dbh) into
// `sums` (B*H*C x (4 + Dv): dbias, dlam, dbh, E = dbias - dkap . kap, then dkap).
cudaError_t fused_bwd_sums(const FusedProblem& p, const void* state, Parts db, Parts dkap, Parts dlam, Parts dbh,
                           void* sums, cudaStream_t stream);

// Backward of the C x D and C x C steps, one block per (b, h, 8 rows) (per (b, h) for
// "mixed"): writes gq = ss dqt (without
// the attend key pass's part) and gk = ss dkt (B, H, C, D), for "attend" dka = ss dmu and
// E_att = -dka . mean_k (att: B*H*C x (D + 1)), for "mixed" the scratch dmu (B, H, C, D) and
// dA (B, H, C, C). qdw, qdqt: the query pass's dw, dqt partials; kdw: the key pass's dw;
// ndw: the normalizer's dw (= its dqt).
cudaError_t fused_bwd_small(const FusedProblem& p, const void* state, const void* sums, Parts qdw, Parts qdqt,
                            Parts kdw, Parts ndw, void* gq, void* gk, void* att, void* dmu, void* dA,
                            cudaStream_t stream);

// "attend": gq += ss * (sum of the attend key pass's dw partials).
cudaError_t fused_bwd_attend(const FusedProblem& p, Parts adw, void* gq, cudaStream_t stream);

// The final gradients, one launch: dq (contiguous, q's layout, holding the query pass's dq)
// += the normalizer's dq (dq2, or null) + the landmarks' backward of gq (when not given);
// dk (contiguous, holding the key pass's dk) += dk2, dk3 (attend, or null) + the landmarks'
// backward of gk summed over each group (when not given and the proposal uses kt); the given
// landmarks' gradients dqlm, dklm (B, H, NS, D contiguous, their dtypes): gq, gk in rows
// c < C, 0 beyond and for dropped elements.
struct FinalGrads {
  void* dq = nullptr;
  const void* dq2 = nullptr;
  void* dk = nullptr;
  const void* dk2 = nullptr;
  const void* dk3 = nullptr;
  const void* gq = nullptr;
  const void* gk = nullptr;
  bool q_landmarks = false, k_landmarks = false;  // computed landmarks to differentiate
  void* dqlm = nullptr;
  DType qlm_dtype = DType::kFloat32;
  void* dklm = nullptr;
  DType klm_dtype = DType::kFloat32;
  int64_t Tq = 0, Tk = 0;  // packed rows
};
cudaError_t fused_final(const FusedProblem& p, const FinalGrads& f, cudaStream_t stream);

}  // namespace cuda
}  // namespace lara
