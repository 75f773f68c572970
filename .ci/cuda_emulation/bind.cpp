// Python module of the emulated CUDA ops (see .ci/cuda_emulation.sh).
#include <torch/extension.h>
#include "lara_ops.h"
namespace emu {
extern int sms; extern int optin; extern int64_t launched_blocks; extern size_t max_smem;
extern int64_t max_grid_x; extern bool dry_run; extern int64_t launches, widest_grid;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // the ops' schemas: positional arguments, the trailing layout pair (cu_seqlens, max_seqlen)
  // defaulting to the padded layout
  const auto cu = py::arg("cu_seqlens") = py::none();
  const auto ml = py::arg("max_seqlen") = 0;
  m.def("key_pass_fwd", &lara::key_pass_fwd_cuda, py::arg("w"), py::arg("k"), py::arg("v"), py::arg("padding"),
        py::arg("ss"), py::arg("subtract_norm"), cu, ml);
  m.def("key_pass_bwd", &lara::key_pass_bwd_cuda, py::arg("w"), py::arg("k"), py::arg("v"), py::arg("padding"),
        py::arg("ss"), py::arg("subtract_norm"), py::arg("Z"), py::arg("kap"), py::arg("dZ"), py::arg("dkap"), cu, ml);
  m.def("query_pass_fwd", &lara::query_pass_fwd_cuda, py::arg("q"), py::arg("w"), py::arg("bias"), py::arg("kap"),
        py::arg("c_eff"), py::arg("padding"), py::arg("ss"), py::arg("qt"), py::arg("lam"), py::arg("bh"),
        py::arg("beta"), cu, ml);
  m.def("query_pass_bwd", &lara::query_pass_bwd_cuda, py::arg("q"), py::arg("w"), py::arg("bias"), py::arg("kap"),
        py::arg("c_eff"), py::arg("padding"), py::arg("ss"), py::arg("qt"), py::arg("lam"), py::arg("bh"),
        py::arg("beta"), py::arg("dy"), cu, ml);
  m.def("landmarks", &lara::landmarks_cuda, py::arg("x"), py::arg("padding"), py::arg("c_eff"),
        py::arg("num_segments"), cu, ml);
  m.def("landmarks_backward", &lara::landmarks_backward_cuda, py::arg("grad"), py::arg("padding"), py::arg("c_eff"),
        py::arg("length"), py::arg("dtype"), cu, ml);
  // the whole-op path (csrc/cuda/fused_cuda.cpp), positional like the schema
  m.def("lara_fwd", &lara::lara_fwd_cuda);
  m.def("lara_bwd", &lara::lara_bwd_cuda);
  // test mode of the emulated ops (lara_ops.h, new_output): outputs and scratch start as NaN
  m.def("set_poison_outputs", &lara::set_poison_outputs);
  m.def("set_device", [](int sms, int optin) { emu::sms = sms; emu::optin = optin; });
  // the grid x limit the emulated device reports (real devices: 2^31 - 1)
  m.def("set_max_grid_x", [](int64_t x) { emu::max_grid_x = x; });
  // dry run: the launches are checked against the device's limits and counted, no block runs
  m.def("set_dry_run", [](bool on) { emu::dry_run = on; });
  // (blocks run, the most shared memory of a launch, launches, the widest grid x) since the last call
  m.def("stats", []() {
    auto r = std::make_tuple(emu::launched_blocks, (int64_t)emu::max_smem, emu::launches, emu::widest_grid);
    emu::launched_blocks = 0; emu::max_smem = 0; emu::launches = 0; emu::widest_grid = 0;
    return r;
  });
}
