"""Rewrites the CUDA sources of csrc/ into host C++ for the emulation (see .ci/cuda_emulation.sh).

The kernels are kept verbatim; only the launch syntax ``k<<<g, t, smem, stream>>>(args)`` becomes
``emu_launch(k, g, t, smem, stream, args)``, the device-only branch of passes_kernel.h is enabled,
and the bindings' is_cuda() checks (binding.h, landmarks_cuda.cpp) are disabled (the emulated
tensors live on the CPU).
"""

import pathlib
import re


def generate(repo: pathlib.Path, out: pathlib.Path) -> None:
    src = repo / "csrc"
    (out / "cuda").mkdir(parents=True, exist_ok=True)

    def write(rel, text):
        p = out / rel
        if not p.exists() or p.read_text() != text:  # keep mtimes: no rebuild when nothing changed
            p.write_text(text)

    h = (src / "cuda/passes_kernel.h").read_text()
    assert "#if defined(__CUDACC__)" in h, "passes_kernel.h: device branch marker not found"
    write("cuda/passes_kernel.h", '#include "emu.h"\n' + h.replace("#if defined(__CUDACC__)", "#if 1"))
    write("cuda/landmarks_kernel.h", (src / "cuda/landmarks_kernel.h").read_text())
    write("cuda/fused_kernel.h", (src / "cuda/fused_kernel.h").read_text())
    for f in ["key_pass_kernel.cu", "query_pass_kernel.cu", "landmarks_kernel.cu", "fused_kernel.cu"]:
        s = (src / "cuda" / f).read_text()
        s, n = re.subn(r"(\w+)<<<", r"emu_launch(\1, ", s)
        assert n > 0, f"{f}: no kernel launch found"
        s = s.replace(">>>(", ", ")
        write(f"cuda/{f[:-3]}_emu.cpp", '#include "emu.h"\n' + s)
    b = (src / "cuda/binding.h").read_text()
    assert "TORCH_CHECK(t.is_cuda()" in b, "binding.h: is_cuda() check not found"
    write("cuda/binding.h", b.replace("TORCH_CHECK(t.is_cuda()", "TORCH_CHECK(true || t.is_cuda()"))
    write("cuda/passes_cuda.cpp", (src / "cuda/passes_cuda.cpp").read_text())
    b = (src / "cuda/landmarks_cuda.cpp").read_text()
    for t in ("x", "grad"):
        assert f"TORCH_CHECK({t}.is_cuda()" in b, f"landmarks_cuda.cpp: {t}.is_cuda() check not found"
        b = b.replace(f"TORCH_CHECK({t}.is_cuda()", f"TORCH_CHECK(true || {t}.is_cuda()")
    write("cuda/landmarks_cuda.cpp", b)
    write("cuda/fused_cuda.cpp", (src / "cuda/fused_cuda.cpp").read_text())
    ops = (src / "lara_ops.cpp").read_text()
    write("lara_ops_checks.cpp", ops[: ops.index("TORCH_LIBRARY(lara_kernels")])
    write("lara_ops.h", (src / "lara_ops.h").read_text())
    write("state_layout.h", (src / "state_layout.h").read_text())
