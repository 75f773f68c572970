// Masked segment means on the CPU (docs/math.md section 1), forward and backward.
//
// Padded layout: valid position p of a sequence (padded positions skipped) belongs to
// segment floor(p * c_eff / L_valid). The segment of each position is computed once per
// batch element; the (batch, head) pairs then run in parallel (at::parallel_for, OpenMP),
// each reading its rows of x once and accumulating in float32 (float64 for float64).
// Packed layout (cu_seqlens, seqs.h): row p of sequence b (no padding) is in segment
// floor(p * c_eff[b] / L_b), so segment c is the contiguous rows ceil(c L_b / c_eff[b]) ..
// ceil((c + 1) L_b / c_eff[b]) - 1, read in place through the offsets; tasks are (sequence,
// head, run of segments or of rows), and each segment sums its rows in order, the same
// arithmetic as the padded layout on that sequence alone.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../lara_ops.h"
#include "passes.h"
#include "seqs.h"

namespace lara {
namespace {

// seg[b * L + l]: segment of position l of element b, -1 where padded.
// count[b * C + c]: number of positions in segment c of element b.
void segment_table(const c10::optional<at::Tensor>& padding, const at::Tensor& c_eff, int64_t B, int64_t L,
                   int64_t C, std::vector<int64_t>& seg, std::vector<int64_t>& count) {
  seg.assign(B * L, -1);
  count.assign(B * C, 0);
  at::Tensor pad;
  if (padding.has_value()) pad = padding->to(at::kCPU).contiguous();
  const bool* pad_ptr = padding.has_value() ? pad.data_ptr<bool>() : nullptr;
  const at::Tensor ce = c_eff.to(at::kCPU).contiguous();
  const int64_t* ce_ptr = ce.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t valid = L;
    if (pad_ptr) {
      valid = 0;
      for (int64_t l = 0; l < L; ++l) valid += !pad_ptr[b * L + l];
    }
    const int64_t ceff = ce_ptr[b];
    TORCH_CHECK(ceff >= 0 && ceff <= C && ceff <= valid, "lara_kernels::landmarks: c_eff[", b, "] = ", ceff,
                " must lie in [0, min(num_segments=", C, ", valid length=", valid, ")]");
    if (ceff == 0) continue;
    int64_t p = 0;
    for (int64_t l = 0; l < L; ++l) {
      if (pad_ptr && pad_ptr[b * L + l]) continue;
      const int64_t s = (p * ceff) / valid;
      seg[b * L + l] = s;
      count[b * C + s] += 1;
      ++p;
    }
  }
}


// ---------------------------------------------------------------------------------
// Packed layout

constexpr int64_t kRowsPerTask = 512;  // rows per task, about (a shape-only choice)

// First row of segment c of a sequence of L rows cut into ce segments: ceil(c L / ce).
inline int64_t segment_start(int64_t c, int64_t L, int64_t ce) { return (c * L + ce - 1) / ce; }

// c_eff (B,) int64 contiguous on the CPU, each in [0, min(C, L_b)]; returns its data.
const int64_t* packed_c_eff(const char* op, const at::Tensor& c_eff, const cpu::Seqs& sq, int64_t C,
                            at::Tensor& keep) {
  keep = c_eff.to(at::kCPU).contiguous();
  const int64_t* ce = keep.data_ptr<int64_t>();
  for (int64_t b = 0; b < sq.B; ++b)
    TORCH_CHECK(ce[b] >= 0 && ce[b] <= C && ce[b] <= sq.len(b), op, ": c_eff[", b, "] = ", ce[b],
                " must lie in [0, min(num_segments=", C, ", length of sequence ", b, "=", sq.len(b), ")]");
  return ce;
}

cpu::Seqs packed_seqs(const char* op, int64_t H, int64_t T, const c10::optional<at::Tensor>& cu_seqlens) {
  cpu::Seqs sq;
  sq.B = cu_seqlens->size(0) - 1;
  sq.H = H;
  sq.L = T;
  sq.cu = cpu::packed_offsets(op, cu_seqlens, T);
  return sq;
}

// Forward: tasks (b, h, run of sb_b consecutive segments, about kRowsPerTask rows); each
// writes its own rows of the output, which starts at 0 (rows c >= c_eff[b] stay 0).
at::Tensor landmarks_packed(const at::Tensor& x, const at::Tensor& c_eff, int64_t C,
                            const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "lara_kernels::landmarks";
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  const cpu::Seqs sq = packed_seqs(op, H, T, cu_seqlens);
  at::Tensor ce_keep;
  const int64_t* ce = packed_c_eff(op, c_eff, sq, C, ce_keep);
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({sq.B, H, C, D}, x.options().dtype(out_type));
  // segments per task of element b (ce[b] >= 1 where it has tasks)
  auto per_task = [&](int64_t b) { return std::max<int64_t>(1, kRowsPerTask * ce[b] / std::max<int64_t>(1, sq.len(b))); };
  const cpu::Chunks ch =
      cpu::make_chunks(sq.B, [&](int64_t b) { return (ce[b] + per_task(b) - 1) / per_task(b); });

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lara_landmarks_packed_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* op_ = out.data_ptr<acc_t>();
    at::parallel_for(0, ch.total() * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / H, h = task % H, b = ch.owner[g], L = sq.len(b), n = ce[b], sb = per_task(b);
        const int64_t c0 = (g - ch.first[b]) * sb, c1 = std::min(n, c0 + sb);
        const auto xr = sq.in<scalar_t>(x, b, h);
        for (int64_t c = c0; c < c1; ++c) {
          acc_t* orow = op_ + ((b * H + h) * C + c) * D;
          const int64_t p0 = segment_start(c, L, n), p1 = segment_start(c + 1, L, n);
          for (int64_t p = p0; p < p1; ++p) {
            const scalar_t* r = xr.p + p * xr.s_row;
            if (xr.s_col == 1) {
              for (int64_t d = 0; d < D; ++d) orow[d] += static_cast<acc_t>(r[d]);
            } else {
              for (int64_t d = 0; d < D; ++d) orow[d] += static_cast<acc_t>(r[d * xr.s_col]);
            }
          }
          const acc_t inv = acc_t(1) / static_cast<acc_t>(p1 - p0);
          for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
        }
      }
    });
  });
  return out;
}

// Backward: tasks (b, h, chunk of kRowsPerTask rows); row p of b gets grad[b, h, seg(p)] /
// |seg(p)|, or 0 where c_eff[b] = 0. Every row of the (T, H, D) result is written.
at::Tensor landmarks_backward_packed(const at::Tensor& grad, const at::Tensor& c_eff, int64_t length,
                                     at::ScalarType dtype, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "lara_kernels::landmarks_backward";
  const int64_t H = grad.size(1), C = grad.size(2), D = grad.size(3), T = length;
  const cpu::Seqs sq = packed_seqs(op, H, T, cu_seqlens);
  at::Tensor ce_keep;
  const int64_t* ce = packed_c_eff(op, c_eff, sq, C, ce_keep);
  const at::Tensor g = grad.contiguous();
  at::Tensor gx = new_output({T, H, D}, grad.options().dtype(dtype));
  const cpu::Chunks ch =
      cpu::make_chunks(sq.B, [&](int64_t b) { return (sq.len(b) + kRowsPerTask - 1) / kRowsPerTask; });

  auto run = [&](auto out_tag, auto grad_tag) {
    using out_t = decltype(out_tag);
    using grad_t = decltype(grad_tag);
    const grad_t* gp = g.data_ptr<grad_t>();
    out_t* xp = gx.data_ptr<out_t>();
    at::parallel_for(0, ch.total() * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t gi = task / H, h = task % H, b = ch.owner[gi], L = sq.len(b), n = ce[b];
        const int64_t p0 = (gi - ch.first[b]) * kRowsPerTask, p1 = std::min(L, p0 + kRowsPerTask);
        int64_t ld = 0;
        out_t* xbh = sq.out(xp, D, b, h, ld);
        const grad_t* gbh = gp + (b * H + h) * C * D;
        for (int64_t p = p0; p < p1; ++p) {
          out_t* xr = xbh + p * ld;
          if (n == 0) {
            for (int64_t d = 0; d < D; ++d) xr[d] = out_t(0);
            continue;
          }
          const int64_t s = (p * n) / L;
          const int64_t count = segment_start(s + 1, L, n) - segment_start(s, L, n);
          const grad_t inv = grad_t(1) / static_cast<grad_t>(count);
          const grad_t* gr = gbh + s * D;
          for (int64_t d = 0; d < D; ++d) xr[d] = static_cast<out_t>(gr[d] * inv);
        }
      }
    });
  };
  const bool g64 = g.scalar_type() == at::kDouble;
  switch (dtype) {
    case at::kDouble: g64 ? run(double{}, double{}) : run(double{}, float{}); break;
    case at::kFloat: g64 ? run(float{}, double{}) : run(float{}, float{}); break;
    case at::kHalf: g64 ? run(at::Half{}, double{}) : run(at::Half{}, float{}); break;
    case at::kBFloat16: g64 ? run(at::BFloat16{}, double{}) : run(at::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, "lara_kernels::landmarks_backward: unsupported dtype ", dtype);
  }
  return gx;
}

}  // namespace

// ---------------------------------------------------------------------------------
// Bodies for the whole-op path (passes.h)

namespace cpu {

template <typename T>
void landmarks_body(const at::Tensor& x, const Seqs& sq, const int64_t* ce, int64_t C, T ss, int64_t G, T* out) {
  const int64_t B = sq.B, Hx = sq.H, D = x.size(-1);
  auto run = [&](auto tag) {
    using S = decltype(tag);
    at::parallel_for(0, B * Hx, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, sq.L * D)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t bhx = begin; bhx < end; ++bhx) {
        const int64_t b = bhx / Hx, hx = bhx % Hx, L = sq.len(b), n = ce[b];
        T* o = out + (b * Hx * G + hx * G) * C * D;
        std::fill(o, o + C * D, T(0));
        if (n > 0) {
          const bool* pad = sq.pad_rows(b);
          int64_t valid = L;
          if (pad != nullptr)
            for (int64_t l = 0; l < L; ++l) valid -= pad[l];
          const auto xr = sq.in<S>(x, b, hx);
          int64_t pos = 0;   // the position among the valid rows
          for (int64_t l = 0; l < L; ++l) {
            if (pad != nullptr && pad[l]) continue;
            T* orow = o + ((pos * n) / valid) * D;
            const S* r = xr.p + l * xr.s_row;
            if (xr.s_col == 1) {
              for (int64_t d = 0; d < D; ++d) orow[d] += static_cast<T>(r[d]);
            } else {
              for (int64_t d = 0; d < D; ++d) orow[d] += static_cast<T>(r[d * xr.s_col]);
            }
            ++pos;
          }
          for (int64_t c = 0; c < n; ++c) {
            const T inv = T(1) / static_cast<T>(segment_start(c + 1, valid, n) - segment_start(c, valid, n));
            for (int64_t d = 0; d < D; ++d) o[c * D + d] = ss * (o[c * D + d] * inv);
          }
        }
        for (int64_t j = 1; j < G; ++j) std::copy(o, o + C * D, o + j * C * D);
      }
    });
  };
  switch (x.scalar_type()) {
    case at::kDouble: if constexpr (std::is_same_v<T, double>) run(double{}); break;
    case at::kFloat: if constexpr (std::is_same_v<T, float>) run(float{}); break;
    case at::kHalf: if constexpr (std::is_same_v<T, float>) run(at::Half{}); break;
    case at::kBFloat16: if constexpr (std::is_same_v<T, float>) run(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "lara_kernels (landmarks): unsupported dtype ", x.scalar_type());
  }
}

template <typename T>
void landmarks_backward_add(const T* grad, const Seqs& sq, const int64_t* ce, int64_t C, int64_t G, at::Tensor& dx) {
  const int64_t B = sq.B, Hx = sq.H, D = dx.size(-1);
  auto run = [&](auto tag) {
    using S = decltype(tag);
    S* xp = dx.data_ptr<S>();
    at::parallel_for(0, B * Hx, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, sq.L * D)),
                     [&](int64_t begin, int64_t end) {
      std::vector<T> gsum(G > 1 ? C * D : 0);
      for (int64_t bhx = begin; bhx < end; ++bhx) {
        const int64_t b = bhx / Hx, hx = bhx % Hx, L = sq.len(b), n = ce[b];
        if (n == 0) continue;
        const T* g = grad + (b * Hx * G + hx * G) * C * D;
        if (G > 1) {   // the gradient of a key/value head's landmarks: the sum over its G query heads
          std::copy(g, g + C * D, gsum.begin());
          for (int64_t j = 1; j < G; ++j)
            for (int64_t i = 0; i < C * D; ++i) gsum[i] += g[j * C * D + i];
          g = gsum.data();
        }
        const bool* pad = sq.pad_rows(b);
        int64_t valid = L;
        if (pad != nullptr)
          for (int64_t l = 0; l < L; ++l) valid -= pad[l];
        int64_t ld = 0;
        S* xbh = sq.out(xp, D, b, hx, ld);
        int64_t pos = 0;
        for (int64_t l = 0; l < L; ++l) {
          if (pad != nullptr && pad[l]) continue;
          const int64_t s = (pos * n) / valid;
          const T inv = T(1) / static_cast<T>(segment_start(s + 1, valid, n) - segment_start(s, valid, n));
          const T* gr = g + s * D;
          S* xr = xbh + l * ld;
          // as landmarks_backward then an add in S: the term rounds to S first
          for (int64_t d = 0; d < D; ++d)
            xr[d] = static_cast<S>(static_cast<T>(xr[d]) + static_cast<T>(static_cast<S>(gr[d] * inv)));
          ++pos;
        }
      }
    });
  };
  switch (dx.scalar_type()) {
    case at::kDouble: if constexpr (std::is_same_v<T, double>) run(double{}); break;
    case at::kFloat: if constexpr (std::is_same_v<T, float>) run(float{}); break;
    case at::kHalf: if constexpr (std::is_same_v<T, float>) run(at::Half{}); break;
    case at::kBFloat16: if constexpr (std::is_same_v<T, float>) run(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "lara_kernels (landmarks_backward): unsupported dtype ", dx.scalar_type());
  }
}

template void landmarks_body<float>(const at::Tensor&, const Seqs&, const int64_t*, int64_t, float, int64_t, float*);
template void landmarks_body<double>(const at::Tensor&, const Seqs&, const int64_t*, int64_t, double, int64_t,
                                     double*);
template void landmarks_backward_add<float>(const float*, const Seqs&, const int64_t*, int64_t, int64_t,
                                            at::Tensor&);
template void landmarks_backward_add<double>(const double*, const Seqs&, const int64_t*, int64_t, int64_t,
                                             at::Tensor&);

}  // namespace cpu

at::Tensor landmarks_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& padding, const at::Tensor& c_eff,
                         int64_t num_segments, const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_landmarks_args(x, padding, c_eff, num_segments, cu_seqlens, max_seqlen);
  TORCH_CHECK(x.device().is_cpu(), "lara_kernels::landmarks (CPU): x must be a CPU tensor, got ", x.device());
  if (cu_seqlens.has_value()) return landmarks_packed(x, c_eff, num_segments, cu_seqlens);
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), C = num_segments;
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({B, H, C, D}, x.options().dtype(out_type));
  std::vector<int64_t> seg, count;
  segment_table(padding, c_eff, B, L, C, seg, count);
  const int64_t sb = x.stride(0), sh = x.stride(1), sl = x.stride(2), sd = x.stride(3);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lara_landmarks_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        acc_t* o = op + bh * C * D;
        const scalar_t* xbh = xp + b * sb + h * sh;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t s = seg[b * L + l];
          if (s < 0) continue;
          acc_t* orow = o + s * D;
          const scalar_t* xr = xbh + l * sl;
          if (sd == 1) {
            for (int64_t d = 0; d < D; ++d) orow[d] += static_cast<acc_t>(xr[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) orow[d] += static_cast<acc_t>(xr[d * sd]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const int64_t n = count[b * C + c];
          if (n == 0) continue;
          const acc_t inv = acc_t(1) / static_cast<acc_t>(n);
          for (int64_t d = 0; d < D; ++d) o[c * D + d] *= inv;
        }
      }
    });
  });
  return out;
}

at::Tensor landmarks_backward_cpu(const at::Tensor& grad, const c10::optional<at::Tensor>& padding,
                                  const at::Tensor& c_eff, int64_t length, at::ScalarType dtype,
                                  const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_landmarks_backward_args(grad, padding, c_eff, length, dtype, cu_seqlens, max_seqlen);
  TORCH_CHECK(grad.device().is_cpu(), "lara_kernels::landmarks_backward (CPU): grad must be a CPU tensor, got ",
              grad.device());
  if (cu_seqlens.has_value()) return landmarks_backward_packed(grad, c_eff, length, dtype, cu_seqlens);
  const int64_t B = grad.size(0), H = grad.size(1), C = grad.size(2), D = grad.size(3), L = length;
  std::vector<int64_t> seg, count;
  segment_table(padding, c_eff, B, L, C, seg, count);
  const at::Tensor g = grad.contiguous();
  at::Tensor gx = new_output({B, H, L, D}, grad.options().dtype(dtype));

  // Two explicit levels: output type (out_t) and gradient type (grad_t).
  auto run = [&](auto out_tag, auto grad_tag) {
    using out_t = decltype(out_tag);
    using grad_t = decltype(grad_tag);
    const grad_t* gp = g.data_ptr<grad_t>();
    out_t* xp = gx.data_ptr<out_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H;
        const grad_t* gbh = gp + bh * C * D;
        out_t* xbh = xp + bh * L * D;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t s = seg[b * L + l];
          out_t* xr = xbh + l * D;
          if (s < 0) {
            for (int64_t d = 0; d < D; ++d) xr[d] = out_t(0);
            continue;
          }
          const grad_t inv = grad_t(1) / static_cast<grad_t>(count[b * C + s]);
          const grad_t* gr = gbh + s * D;
          for (int64_t d = 0; d < D; ++d) xr[d] = static_cast<out_t>(gr[d] * inv);
        }
      }
    });
  };
  const bool g64 = g.scalar_type() == at::kDouble;
  switch (dtype) {
    case at::kDouble: g64 ? run(double{}, double{}) : run(double{}, float{}); break;
    case at::kFloat: g64 ? run(float{}, double{}) : run(float{}, float{}); break;
    case at::kHalf: g64 ? run(at::Half{}, double{}) : run(at::Half{}, float{}); break;
    case at::kBFloat16: g64 ? run(at::BFloat16{}, double{}) : run(at::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, "lara_kernels::landmarks_backward: unsupported dtype ", dtype);
  }
  return gx;
}

}  // namespace lara
