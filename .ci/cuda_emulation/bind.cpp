// Python module of the emulated CUDA ops (see .ci/cuda_emulation.sh).
#include <torch/extension.h>
#include "lara_ops.h"
namespace emu {
extern int sms; extern int optin; extern int64_t launched_blocks; extern size_t max_smem;
extern int64_t max_grid_x; extern bool dry_run; extern int64_t launches, widest_grid;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_pass_fwd", &lara::key_pass_fwd_cuda);
  m.def("key_pass_bwd", &lara::key_pass_bwd_cuda);
  m.def("query_pass_fwd", &lara::query_pass_fwd_cuda);
  m.def("query_pass_bwd", &lara::query_pass_bwd_cuda);
  m.def("landmarks", &lara::landmarks_cuda);
  m.def("landmarks_backward", &lara::landmarks_backward_cuda);
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
