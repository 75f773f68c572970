// The saved state of lara_kernels::lara_fwd, one definition for its CPU implementation
// (csrc/cpu/fused.cpp) and its CUDA one (csrc/cuda/fused_cuda.cpp, whose kernels take these
// offsets): one flat compute-type tensor of the C-sized results the backward needs, fields
// in this order, each contiguous:
//
//   qt, kt, mu, w (B, H, C, D) | Z, bias, rho, log_den (B, H, C) | kap (B, H, C, Dv)
//   | optimal weighting: lam, bh (B, H, C) | mixed proposal: a (B, H, C, C)
//   | attend proposal: Z_att (B, H, C), mean_k (B, H, C, D)
//
// lara_kernels/_whole.py sizes the same tensor for the ops' fake kernels (_state_numel).
// Plain C++ (no ATen, no CUDA headers): included by host and device code alike.
#pragma once

#include <cstdint>

namespace lara {

// Offsets of the fields in elements (-1: absent for this proposal or weighting), and the total.
struct StateLayout {
  int64_t qt = -1, kt = -1, mu = -1, w = -1, Z = -1, bias = -1, rho = -1, logden = -1, kap = -1, lam = -1, bh = -1,
          amix = -1, zatt = -1, katt = -1, total = 0;
};

inline StateLayout state_layout(int64_t B, int64_t H, int64_t C, int64_t D, int64_t DV, bool optimal, bool mixed,
                                bool attend) {
  StateLayout s;
  const int64_t BH = B * H, cd = BH * C * D, c1 = BH * C;
  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t o = off;
    off += n;
    return o;
  };
  s.qt = take(cd);
  s.kt = take(cd);
  s.mu = take(cd);
  s.w = take(cd);
  s.Z = take(c1);
  s.bias = take(c1);
  s.rho = take(c1);
  s.logden = take(c1);
  s.kap = take(c1 * DV);
  if (optimal) {
    s.lam = take(c1);
    s.bh = take(c1);
  }
  if (mixed) s.amix = take(c1 * C);
  if (attend) {
    s.zatt = take(c1);
    s.katt = take(cd);
  }
  s.total = off;
  return s;
}

}  // namespace lara
