// Python module lara_kernels._C: importing it registers the ops (csrc/lara_ops.cpp)
// and exposes how the library was built.
#include <torch/extension.h>

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
}
