// Python module of the emulated CUDA ops (see .ci/cuda_emulation.sh).
#include <torch/extension.h>
#include "lara_ops.h"
namespace emu { extern int sms; extern int optin; extern int64_t launched_blocks; extern size_t max_smem; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_pass_fwd", &lara::key_pass_fwd_cuda);
  m.def("key_pass_bwd", &lara::key_pass_bwd_cuda);
  m.def("query_pass_fwd", &lara::query_pass_fwd_cuda);
  m.def("query_pass_bwd", &lara::query_pass_bwd_cuda);
  m.def("set_device", [](int sms, int optin) { emu::sms = sms; emu::optin = optin; });
  m.def("stats", []() { auto r = std::make_pair(emu::launched_blocks, (int64_t)emu::max_smem); emu::launched_blocks = 0; emu::max_smem = 0; return r; });
}
