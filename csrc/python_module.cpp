// Python module lara_kernels._C: importing it registers the ops (csrc/lara_ops.cpp)
// and exposes how the library was built.
#include <torch/extension.h>

#include "lara_ops.h"
#include "cpu/cpu_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lara_kernels compiled ops (torch.ops.lara_kernels)";
  m.def("with_cuda", []() {
#ifdef LARA_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  m.def("with_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether this build was compiled with OpenMP.");
  m.def("_set_poison_outputs", &lara::set_poison_outputs,
        "Test mode: fill every op output and scratch buffer with NaN before the kernels run.");
  m.def("_poison_outputs", &lara::poison_outputs, "Whether the NaN test mode is on.");
  m.def("_new_output", [](int64_t n) { return lara::new_output({n}, at::TensorOptions().dtype(at::kFloat)); },
        "The allocation every op output goes through (NaN-filled in test mode).");
  m.def("_max_pass_dim", [](const std::string& device) { return lara::max_pass_dim(c10::Device(device)); },
        "The largest D, Dv and C the fused passes take on tensors of this device ('cpu', 'cuda'): 256 on "
        "CUDA, 2**31 - 1 (BLAS's int sizes, no capacity limit) on the CPU.");
  m.def("_have_blas", &lara::cpu::have_blas, "Whether the CPU passes found torch's BLAS (sgemm_/dgemm_).");
}
