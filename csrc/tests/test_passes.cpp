// ctest for the fused CPU passes, through the dispatcher: each op against the same
// formulas written with ATen ops (float64, padding, several chunks and tiles), and the
// backward ops against autograd of those formulas; the packed layout (cu_seqlens) against
// the padded layout on each sequence alone, with empty sequences and c_eff = 0. Small
// enough to run under valgrind (.ci/valgrind_check.sh), which is its other purpose.
#include <torch/torch.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <tuple>
#include <vector>

#include "lara_ops.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, const char* what) {
  const double err = (a - b).abs().max().item<double>() / std::max(1e-300, b.abs().max().item<double>());
  if (!(err < 1e-12)) {
    std::printf("FAIL %s: relative max error %g\n", what, err);
    ++failures;
  } else {
    std::printf("ok   %s (%.1e)\n", what, err);
  }
}

using Opt = c10::optional<at::Tensor>;

template <typename KF, typename KB, typename QF, typename QB>
void run_case(KF& key_fwd, KB& key_bwd, QF& query_fwd, QB& query_bwd, int64_t B, int64_t H, int64_t L, int64_t D,
              int64_t DV, int64_t C) {
  std::printf("-- B=%lld H=%lld L=%lld D=%lld Dv=%lld C=%lld\n", (long long)B, (long long)H, (long long)L,
              (long long)D, (long long)DV, (long long)C);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const double ss = std::pow(double(D), -0.25), beta = 1.5;
  at::Tensor pad = at::zeros({B, L}, at::kBool);
  pad.index_put_({B - 1, at::indexing::Slice(L * 3 / 7, L * 13 / 14)}, true);   // at 700: over 512
  const at::Tensor valid = pad.logical_not().unsqueeze(1).unsqueeze(-1).to(at::kDouble);   // (B, 1, L, 1)
  at::Tensor x = at::randn({B, H, L, D}, f64).requires_grad_();
  at::Tensor v = at::randn({B, H, L, DV}, f64).requires_grad_();
  at::Tensor w = at::randn({B, H, C, D}, f64).requires_grad_();

  // key pass: l = ss w.k - ss^2 |k|^2 / 2, -inf where padded; Z = LSE; kap = softmax @ v
  at::Tensor kh = ss * x * valid;
  at::Tensor l = at::matmul(w, kh.transpose(-1, -2)) - 0.5 * kh.pow(2).sum(-1).unsqueeze(-2);
  l = l.masked_fill(pad.unsqueeze(1).unsqueeze(1), -std::numeric_limits<double>::infinity());
  at::Tensor Z = l.logsumexp(-1);
  at::Tensor kap = at::matmul(at::softmax(l, -1), v * valid);
  auto [Zo, kapo] = key_fwd.call(w.detach(), x.detach(), v.detach(), pad, ss, true, c10::nullopt, 0);
  expect_close(Zo, Z.detach(), "key_pass_fwd Z");
  expect_close(kapo, kap.detach(), "key_pass_fwd kap");
  at::Tensor dZ = at::randn({B, H, C}, f64), dkap = at::randn({B, H, C, DV}, f64);
  auto g = torch::autograd::grad({Z, kap}, {w, x, v}, {dZ, dkap});
  auto [dw, dk, dv] = key_bwd.call(w.detach(), x.detach(), v.detach(), pad, ss, true, Zo, kapo, dZ, dkap, c10::nullopt, 0);
  expect_close(dw, g[0], "key_pass_bwd dw");
  expect_close(dk, g[1], "key_pass_bwd dk");
  expect_close(dv, g[2], "key_pass_bwd dv");

  // query pass with the MIS term: alpha = bh + beta (r - mean r), L = s + log(max(alpha, 1e-8))
  at::Tensor qt = (0.3 * at::randn({B, H, C, D}, f64)).requires_grad_();
  at::Tensor bias = at::randn({B, H, C}, f64).requires_grad_();
  at::Tensor bh = at::rand({B, H, C}, f64).requires_grad_();
  at::Tensor kp = at::randn({B, H, C, DV}, f64).requires_grad_();
  at::Tensor qh = ss * x * valid;
  at::Tensor t = at::matmul(qh, qt.transpose(-1, -2));
  at::Tensor lam = t.masked_fill(pad.unsqueeze(1).unsqueeze(-1), -std::numeric_limits<double>::infinity())
                       .logsumexp(-2);   // (B, H, C)
  at::Tensor lam_in = lam.detach().requires_grad_();
  at::Tensor r = at::exp(t - lam_in.unsqueeze(-2));
  at::Tensor alpha = bh.unsqueeze(-2) + beta * (r - r.mean(-1, true));
  at::Tensor logits = at::matmul(qh, w.transpose(-1, -2)) + bias.unsqueeze(-2) + at::log(at::clamp_min(alpha, 1e-8));
  at::Tensor y = at::matmul(at::softmax(logits, -1), kp) * valid;
  const at::Tensor c_eff = at::full({B}, C, at::kLong);
  at::Tensor yo = query_fwd.call(x.detach(), w.detach(), bias.detach(), kp.detach(), c_eff, pad, ss, qt.detach(),
                                 lam.detach(), bh.detach(), beta, c10::nullopt, 0);
  expect_close(yo, y.detach(), "query_pass_fwd y");
  at::Tensor dy = at::randn({B, H, L, DV}, f64);
  auto gq = torch::autograd::grad({y}, {x, w, bias, kp, qt, lam_in, bh}, {dy});
  auto out = query_bwd.call(x.detach(), w.detach(), bias.detach(), kp.detach(), c_eff, pad, ss, qt.detach(),
                            lam.detach(), bh.detach(), beta, dy, c10::nullopt, 0);
  expect_close(std::get<0>(out), gq[0], "query_pass_bwd dq");
  expect_close(std::get<1>(out), gq[1], "query_pass_bwd dw");
  expect_close(std::get<2>(out), gq[2], "query_pass_bwd dbias");
  expect_close(std::get<3>(out), gq[3], "query_pass_bwd dkap");
  expect_close(std::get<4>(out), gq[4], "query_pass_bwd dqt");
  expect_close(std::get<5>(out), gq[5], "query_pass_bwd dlam");
  expect_close(std::get<6>(out), gq[6], "query_pass_bwd dbh");
}

void expect_zero(const at::Tensor& a, const char* what) {
  if (a.numel() > 0 && !at::equal(a, at::zeros_like(a))) {
    std::printf("FAIL %s: not zero\n", what);
    ++failures;
  }
}

// The packed layout: sequences of `lengths` rows back to back in (T, H, D) tensors (k and
// v as views with strides), each op against the same op in the padded layout on each
// sequence alone. Empty sequences: Z = -inf, kap = 0, dw = 0; c_eff = 0 (sequence 1):
// y = 0, dq = 0 and zero C-sized gradients.
template <typename KF, typename KB, typename QF, typename QB>
void run_packed_case(KF& key_fwd, KB& key_bwd, QF& query_fwd, QB& query_bwd, std::vector<int64_t> lengths,
                     int64_t H, int64_t D, int64_t DV, int64_t C) {
  const int64_t B = int64_t(lengths.size());
  std::printf("-- packed: B=%lld H=%lld D=%lld Dv=%lld C=%lld\n", (long long)B, (long long)H, (long long)D,
              (long long)DV, (long long)C);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor cu = at::zeros({B + 1}, at::kInt);
  for (int64_t b = 0; b < B; ++b) cu[b + 1] = cu[b].item<int32_t>() + int32_t(lengths[b]);
  const int64_t T = cu[B].item<int64_t>(), maxlen = *std::max_element(lengths.begin(), lengths.end());
  const double ss = std::pow(double(D), -0.25), beta = 0.7;
  at::Tensor x = at::randn({T, H, D}, f64);
  at::Tensor k = at::randn({H, T, D}, f64).transpose(0, 1);          // strided rows
  at::Tensor v = at::randn({T, H, 2 * DV}, f64).slice(2, 0, 2 * DV, 2);
  at::Tensor w = at::randn({B, H, C, D}, f64), dZ = at::randn({B, H, C}, f64), dkap = at::randn({B, H, C, DV}, f64);
  at::Tensor qt = 0.3 * at::randn({B, H, C, D}, f64), lam = at::randn({B, H, C}, f64).abs() + 2.0;
  at::Tensor bias = at::randn({B, H, C}, f64), bh = at::rand({B, H, C}, f64), kp = at::randn({B, H, C, DV}, f64);
  at::Tensor c_eff = at::zeros({B}, at::kLong);
  for (int64_t b = 0; b < B; ++b) c_eff[b] = std::min(C, lengths[b]);
  c_eff[1] = 0;
  at::Tensor dy = at::randn({T, H, DV}, f64);
  at::Tensor Z, kap, dw, dk, dv;   // (not auto: the results are used in non-template calls below)
  std::tie(Z, kap) = key_fwd.call(w, k, v, c10::nullopt, ss, true, cu, maxlen);
  std::tie(dw, dk, dv) = key_bwd.call(w, k, v, c10::nullopt, ss, true, Z, kap, dZ, dkap, cu, maxlen);
  at::Tensor y = query_fwd.call(x, w, bias, kp, c_eff, c10::nullopt, ss, qt, lam, bh, beta, cu, maxlen);
  const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qg =
      query_bwd.call(x, w, bias, kp, c_eff, c10::nullopt, ss, qt, lam, bh, beta, dy, cu, maxlen);
  const at::Tensor qgrads[] = {std::get<1>(qg), std::get<2>(qg), std::get<3>(qg), std::get<4>(qg), std::get<5>(qg),
                               std::get<6>(qg)};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r0 = cu[b].item<int64_t>(), r1 = cu[b + 1].item<int64_t>();
    auto one = [&](const at::Tensor& t) { return t.slice(0, r0, r1).transpose(0, 1).unsqueeze(0); };   // (1, H, L, .)
    auto at_b = [&](const at::Tensor& t) { return t.slice(0, b, b + 1); };
    if (r1 == r0) {
      if (!(Z[b] == -std::numeric_limits<double>::infinity()).all().item<bool>()) {
        std::printf("FAIL packed key_pass_fwd: Z of the empty sequence %lld is not -inf\n", (long long)b);
        ++failures;
      }
      expect_zero(kap[b], "packed key_pass_fwd kap of an empty sequence");
      expect_zero(dw[b], "packed key_pass_bwd dw of an empty sequence");
    } else {
      auto [Zs, kaps] = key_fwd.call(at_b(w), one(k), one(v), c10::nullopt, ss, true, c10::nullopt, 0);
      auto [dws, dks, dvs] = key_bwd.call(at_b(w), one(k), one(v), c10::nullopt, ss, true, Zs, kaps, at_b(dZ),
                                          at_b(dkap), c10::nullopt, 0);
      expect_close(at_b(Z), Zs, "packed key_pass_fwd Z");
      expect_close(at_b(kap), kaps, "packed key_pass_fwd kap");
      expect_close(at_b(dw), dws, "packed key_pass_bwd dw");
      expect_close(one(dk), dks, "packed key_pass_bwd dk");
      expect_close(one(dv), dvs, "packed key_pass_bwd dv");
    }
    if (c_eff[b].item<int64_t>() == 0) {
      expect_zero(one(y), "packed query_pass_fwd y where c_eff = 0");
      expect_zero(one(std::get<0>(qg)), "packed query_pass_bwd dq where c_eff = 0");
      for (const auto& t : qgrads) expect_zero(t[b], "packed query_pass_bwd C-sized gradient where c_eff = 0");
      continue;
    }
    at::Tensor ys = query_fwd.call(one(x), at_b(w), at_b(bias), at_b(kp), at_b(c_eff), c10::nullopt, ss, at_b(qt),
                                   at_b(lam), at_b(bh), beta, c10::nullopt, 0);
    auto qs = query_bwd.call(one(x), at_b(w), at_b(bias), at_b(kp), at_b(c_eff), c10::nullopt, ss, at_b(qt),
                             at_b(lam), at_b(bh), beta, one(dy), c10::nullopt, 0);
    expect_close(one(y), ys, "packed query_pass_fwd y");
    expect_close(one(std::get<0>(qg)), std::get<0>(qs), "packed query_pass_bwd dq");
    const at::Tensor single[] = {std::get<1>(qs), std::get<2>(qs), std::get<3>(qs), std::get<4>(qs),
                                 std::get<5>(qs), std::get<6>(qs)};
    for (int i = 0; i < 6; ++i) expect_close(at_b(qgrads[i]), single[i], "packed query_pass_bwd C-sized gradient");
  }
}

}  // namespace

int main() {
  auto& d = c10::Dispatcher::singleton();
  auto key_fwd = d.findSchemaOrThrow("lara_kernels::key_pass_fwd", "")
                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const Opt&,
                                                               const Opt&, double, bool, const Opt&, int64_t)>();
  auto key_bwd = d.findSchemaOrThrow("lara_kernels::key_pass_bwd", "")
                     .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                         const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, double, bool, const at::Tensor&,
                         const Opt&, const at::Tensor&, const Opt&, const Opt&, int64_t)>();
  auto query_fwd = d.findSchemaOrThrow("lara_kernels::query_pass_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const Opt&, double, const Opt&, const Opt&, const Opt&,
                                         double, const Opt&, int64_t)>();
  auto query_bwd =
      d.findSchemaOrThrow("lara_kernels::query_pass_bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const Opt&, double, const Opt&, const Opt&, const Opt&, double, const at::Tensor&, const Opt&,
              int64_t)>();

  // the CUDA passes keep their 256 limit; the CPU passes take any size BLAS takes
  if (lara::max_pass_dim(c10::Device(c10::kCUDA)) != 256 ||
      lara::max_pass_dim(c10::Device(c10::kCPU)) != std::numeric_limits<int>::max()) {
    std::printf("FAIL max_pass_dim: cuda %lld, cpu %lld\n", (long long)lara::max_pass_dim(c10::Device(c10::kCUDA)),
                (long long)lara::max_pass_dim(c10::Device(c10::kCPU)));
    ++failures;
  }
  // ... also where the CUDA passes run on CPU tensors (their emulation)
  const auto rejects = [](int64_t D, int64_t DV, int64_t C) {
    try {
      lara::check_cuda_pass_dims("op", D, DV, C);
    } catch (const c10::Error&) {
      return true;
    }
    return false;
  };
  if (!rejects(257, 8, 8) || !rejects(8, 257, 8) || !rejects(8, 8, 257) || !rejects(0, 8, 8) || rejects(256, 0, 256)) {
    std::printf("FAIL check_cuda_pass_dims\n");
    ++failures;
  }
  torch::manual_seed(0);
  // (B, H, L, D, Dv, C): small sizes, over a chunk boundary (512 rows); and D, Dv, C above
  // 256 (the CUDA limit), whose tiles are 64 rows (over two tile boundaries)
  run_case(key_fwd, key_bwd, query_fwd, query_bwd, 2, 1, 700, 12, 5, 6);
  run_case(key_fwd, key_bwd, query_fwd, query_bwd, 1, 1, 150, 270, 300, 257);
  // packed: empty sequences first, in the middle and last, one over a chunk boundary, one
  // shorter than C (c_eff < C), one with c_eff = 0
  run_packed_case(key_fwd, key_bwd, query_fwd, query_bwd, {0, 40, 0, 600, 3, 0}, 2, 12, 5, 6);

  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
