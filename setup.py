"""Build lara_kernels and its compiled ops lara_kernels._C.

C++ (csrc/*.cpp, csrc/cpu/*.cpp) is always built. The CUDA part (csrc/cuda/*) is added
when torch was built with CUDA and nvcc is found, unless LARA_SKIP_CUDA_BUILD=1.
Knobs: LARA_CUDA_ARCHS (default "80;90"), MAX_JOBS (default: what cores and free memory
allow). Sources are globbed, so a new kernel file needs no edit here.

Install: pip install --no-build-isolation -e .   (torch must be importable first)

The extension is compiled against the torch that this Python imports, and must be: an
extension built against one torch does not load into another. pyproject.toml therefore
does not list torch as a build requirement (an isolated build would fetch some other
torch and build against it); an isolated build stops here with the command to use. The
torch version built against is written to lara_kernels/_build_info.py and checked when
the extension is loaded.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
except ImportError:
    sys.exit(
        "lara-kernels compiles its extension against the torch that will import it, so it is built without "
        "build isolation: install torch first (for example: pip install torch==2.13.0), then run\n"
        "    pip install --no-build-isolation -e .\n"
        "(an isolated 'pip install .' would build against a different torch fetched only for the build)"
    )
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


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


def _write_build_info(with_cuda):
    """lara_kernels/_build_info.py: the torch the extension is compiled against (checked at load)."""
    text = (
        '"""Written by setup.py at build time: what lara_kernels._C was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {bool(with_cuda)!r}\n"
    )
    with open(os.path.join(ROOT, "lara_kernels", "_build_info.py"), "w") as f:
        f.write(text)


def _cxx_std():
    """The C++ standard of torch's headers: C++20 from torch 2.14 on, C++17 before."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


CXX_STD = _cxx_std()
cxx_flags = ["-O3", f"-std={CXX_STD}", "-fopenmp"]
sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
with_cuda, why = _want_cuda()
print(f"lara_kernels: CUDA kernels {'will' if with_cuda else 'will not'} be built ({why}); "
      f"compiling against torch {torch.__version__}")
_write_build_info(with_cuda)

if with_cuda:
    archs = os.environ.get("LARA_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    nvcc_flags = ["-O3", f"-std={CXX_STD}", "--use_fast_math", "-lineinfo"]
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
    packages=["lara_kernels", "lara_kernels.triton_kernels", "lara_kernels.integrations"],
    package_dir={"lara_kernels": "lara_kernels", "lara_kernels.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
