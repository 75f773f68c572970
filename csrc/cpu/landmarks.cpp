// Masked segment means on the CPU (docs/math.md section 1), forward and backward.
//
// Valid position p of a sequence (padded positions skipped) belongs to segment
// floor(p * c_eff / L_valid). The segment of each position is computed once per batch
// element; the (batch, head) pairs then run in parallel (at::parallel_for, OpenMP),
// each reading its rows of x once and accumulating in float32 (float64 for float64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../lara_ops.h"

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

}  // namespace

at::Tensor landmarks_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& padding, const at::Tensor& c_eff,
                         int64_t num_segments, const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_landmarks_args(x, padding, c_eff, num_segments, cu_seqlens, max_seqlen);
  TORCH_CHECK(!cu_seqlens.has_value(), "lara_kernels::landmarks (CPU): cu_seqlens (the packed layout) is not implemented yet");
  TORCH_CHECK(x.device().is_cpu(), "lara_kernels::landmarks (CPU): x must be a CPU tensor, got ", x.device());
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
  TORCH_CHECK(!cu_seqlens.has_value(), "lara_kernels::landmarks_backward (CPU): cu_seqlens (the packed layout) is not implemented yet");
  TORCH_CHECK(grad.device().is_cpu(), "lara_kernels::landmarks_backward (CPU): grad must be a CPU tensor, got ",
              grad.device());
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
