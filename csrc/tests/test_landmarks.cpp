// ctest for the CPU landmarks op, through the dispatcher (as Python calls it): segment
// means with padding and C not dividing the length, and the backward's gradient; the
// packed layout (cu_seqlens) with an empty sequence and c_eff < C.
#include <torch/torch.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <cstdio>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, const char* what) {
  if (!at::allclose(a, b, 1e-12, 1e-12)) {
    std::printf("FAIL %s\nfound:\n", what);
    std::cout << a << "\nexpected:\n" << b << std::endl;
    ++failures;
  } else {
    std::printf("ok   %s\n", what);
  }
}

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lara_kernels::landmarks", "")
                .typed<at::Tensor(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, int64_t,
                                  const c10::optional<at::Tensor>&, int64_t)>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("lara_kernels::landmarks_backward", "")
                 .typed<at::Tensor(const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, int64_t,
                                   at::ScalarType, const c10::optional<at::Tensor>&, int64_t)>();
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  // One element, one head, L = 6 positions of which position 1 is padding; D = 1, C = 2.
  // Valid positions p = 0..4 (values 0, 2, 3, 4, 5); segment floor(p * 2 / 5): 0, 0, 0, 1, 1.
  at::Tensor x = at::arange(6, f64).reshape({1, 1, 6, 1});
  at::Tensor pad = at::zeros({1, 6}, at::kBool);
  pad.index_put_({0, 1}, true);
  at::Tensor ceff = at::full({1}, 2, at::kLong);
  at::Tensor out = op.call(x, pad, ceff, 2, c10::nullopt, 0);
  expect_close(out, at::tensor({(0.0 + 2 + 3) / 3, (4.0 + 5) / 2}, f64).reshape({1, 1, 2, 1}), "forward, padded");

  at::Tensor g = at::tensor({3.0, 4.0}, f64).reshape({1, 1, 2, 1});
  at::Tensor gx = bwd.call(g, pad, ceff, 6, at::kDouble, c10::nullopt, 0);
  expect_close(gx, at::tensor({1.0, 0.0, 1.0, 1.0, 2.0, 2.0}, f64).reshape({1, 1, 6, 1}), "backward, padded");

  // c_eff = 1 with C = 3: one segment holding everything, rows 1 and 2 zero.
  at::Tensor out1 = op.call(x, c10::nullopt, at::full({1}, 1, at::kLong), 3, c10::nullopt, 0);
  expect_close(out1, at::tensor({2.5, 0.0, 0.0}, f64).reshape({1, 1, 3, 1}), "forward, c_eff < C");

  // Packed: sequences of 0, 5 and 2 rows (values 0..6), D = 1, C = 2, c_eff = (0, 2, 1).
  // Sequence 1: segments floor(p * 2 / 5) = 0, 0, 0, 1, 1 -> means 1 and 3.5; sequence 2:
  // one segment -> 5.5, row 1 zero; sequence 0: no row, both rows zero.
  at::Tensor xp = at::arange(7, f64).reshape({7, 1, 1});
  at::Tensor cu = at::tensor({0, 0, 5, 7}, at::kInt);
  at::Tensor cp = at::tensor({0, 2, 1}, at::kLong);
  at::Tensor outp = op.call(xp, c10::nullopt, cp, 2, cu, 5);
  expect_close(outp, at::tensor({0.0, 0.0, 1.0, 3.5, 5.5, 0.0}, f64).reshape({3, 1, 2, 1}), "forward, packed");
  at::Tensor gp = at::tensor({7.0, 8.0, 3.0, 4.0, 2.0, 9.0}, f64).reshape({3, 1, 2, 1});
  at::Tensor gxp = bwd.call(gp, c10::nullopt, cp, 7, at::kDouble, cu, 5);
  expect_close(gxp, at::tensor({1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0}, f64).reshape({7, 1, 1}), "backward, packed");
  return failures == 0 ? 0 : 1;
}
