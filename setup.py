"""Build lara_kernels and its compiled ops lara_kernels._C.

C++ (csrc/*.cpp, csrc/cpu/*.cpp) is always built. The CUDA part (csrc/cuda/*) is added
when torch was built with CUDA and nvcc is found, unless LARA_SKIP_CUDA_BUILD=1.
Knobs: LARA_CUDA_ARCHS (default "80;90"), MAX_JOBS (default: what cores and free memory
allow). Sources are globbed, so a new kernel file needs no edit here.

Install: pip install --no-build-isolation -e .   (torch must be importable first)
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _default_max_jobs():
    """One compile job per core, at most one per 2 GiB of available memory."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        by_memory = max(1, info.get("MemAvailable", 0) // (2 * 1024 * 1024))
    except (OSError, ValueError, IndexError):
        by_memory = cores
    return str(max(1, min(cores, by_memory)))


def _want_cuda():
    if os.environ.get("LARA_SKIP_CUDA_BUILD", "0") == "1":
        return False, "LARA_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, "torch has no CUDA"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found"
    return True, "torch has CUDA and nvcc is found"


os.environ.setdefault("MAX_JOBS", _default_max_jobs())

cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
with_cuda, why = _want_cuda()
print(f"lara_kernels: CUDA kernels {'will' if with_cuda else 'will not'} be built ({why})")

if with_cuda:
    archs = os.environ.get("LARA_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
    for arch in filter(None, (a.strip() for a in archs)):
        nvcc_flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    ext = CUDAExtension(
        name="lara_kernels._C",
        sources=sources + _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu"),
        define_macros=[("LARA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + ["-DLARA_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        name="lara_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    packages=["lara_kernels", "lara_kernels.triton_kernels"],
    package_dir={"lara_kernels": "lara_kernels", "lara_kernels.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
