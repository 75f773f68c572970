"""Compiles the generated sources and the emulation runtime into a torch extension module."""

import os
import pathlib

from gen import generate

HERE = pathlib.Path(__file__).resolve().parent


def cuda_include() -> str:
    """A directory with cuda_runtime.h, cuda_fp16.h, cuda_bf16.h (headers only; nothing links to CUDA)."""
    from torch.utils.cpp_extension import CUDA_HOME
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "include/cuda_runtime.h").exists():
            return str(pathlib.Path(home) / "include")
    raise SystemExit("cuda_emulation: cuda_runtime.h not found; install the CUDA toolkit headers "
                     "or set CUDA_HOME")


def build(repo: pathlib.Path, build_dir: pathlib.Path):
    gen = build_dir / "gen"
    generate(repo, gen)
    ext = build_dir / "ext"
    ext.mkdir(parents=True, exist_ok=True)
    from torch.utils.cpp_extension import load
    return load(
        name="lara_cuda_emu",
        sources=[str(gen / "cuda/key_pass_kernel_emu.cpp"), str(gen / "cuda/query_pass_kernel_emu.cpp"),
                 str(gen / "cuda/landmarks_kernel_emu.cpp"), str(gen / "cuda/fused_kernel_emu.cpp"),
                 str(gen / "cuda/passes_cuda.cpp"), str(gen / "cuda/fused_cuda.cpp"),
                 str(gen / "cuda/landmarks_cuda.cpp"), str(gen / "lara_ops_checks.cpp"),
                 str(HERE / "emu_runtime.cpp"), str(HERE / "bind.cpp")],
        extra_include_paths=[str(HERE / "stubs"), str(HERE), str(gen), cuda_include()],
        extra_cflags=["-std=c++20", "-O1", "-g", "-Wno-attributes", "-DLARA_WITH_CUDA", "-fno-omit-frame-pointer"],
        build_directory=str(ext), verbose=False)
