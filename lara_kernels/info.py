"""``python -m lara_kernels.info``: versions, what was built, and the backend table."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, dispatch
from ._ops import C_ERROR, built, built_with_cuda


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def backend_table(device: str = "cpu", dtype: torch.dtype = torch.float32, D: int = 64, C: int = 64):
    """Rows (name, description, reasons) for a (2, 4, 128, D) problem on ``device``.

    The problem is a meta tensor that reports ``device``: the table touches no GPU.
    """
    q = _OnDevice(torch.empty((2, 4, 128, D), dtype=dtype, device="meta"), device)
    return [
        (name, b.description, b.not_supported_reasons("lara", q, q, q, num_samples=C))
        for name, b in dispatch.backends().items()
    ]


class _OnDevice:
    """A meta tensor that reports another device."""

    def __init__(self, t, device):
        self._t = t
        self.device = torch.device(device)

    def __getattr__(self, item):
        return getattr(self._t, item)


def main() -> None:
    print(f"lara_kernels {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()})")
    print(f"triton       {_triton_version()}")
    print(f"_C           {'built' if built() else 'NOT built: ' + str(C_ERROR)}")
    if built():
        from . import _C

        print(f"_C CUDA part {'built' if built_with_cuda() else 'not built'}; OpenMP: {_C.with_openmp()}; "
              f"threads: {torch.get_num_threads()}")
    for device in ("cpu", "cuda"):
        print(f"\nbackends for {device} float32, D=64, C=64 (auto order: {dispatch.auto_order(device)}):")
        for name, desc, reasons in backend_table(device):
            status = "OK" if not reasons else "no: " + "; ".join(reasons)
            print(f"  {name:10s} {status}\n  {'':10s} ({desc})")


if __name__ == "__main__":
    main()
