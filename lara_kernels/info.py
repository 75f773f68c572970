"""``python -m lara_kernels.info``: versions, what was built, and what can run here.

For each device type (cpu, cuda) it first says whether this machine has one, then lists
every backend with what it needs: "runs here" only when the device is present and the
backend takes a (2, 4, 128, 64) float32 problem on it with C=64, else "no:" and every
reason, device first. What was built (the compiled module, its CUDA part, Triton) is
shown whatever the device: a backend that is built but lacks its device says so. Every
backend computes the function of docs/math.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Tuple

import torch

from . import __version__, dispatch
from ._ops import C_ERROR, built, built_with_cuda

NO_CUDA = "no CUDA device available (torch.cuda.is_available() is False)"


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def backend_table(device: str = "cpu", dtype: torch.dtype = torch.float32, D: int = 64, C: int = 64):
    """Rows (name, description, reasons) for a (2, 4, 128, D) problem on ``device``:
    what each backend says of such inputs, whether or not this machine has the device.

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


def device_presence(device: str) -> Tuple[bool, str]:
    """(whether this machine has ``device``, a line saying what it has)."""
    if device == "cpu":
        return True, f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}"
    if device == "cuda":
        if not torch.cuda.is_available():
            return False, NO_CUDA
        names = []
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            names.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
        return True, "; ".join(names)
    return False, f"lara_kernels.info checks cpu and cuda only, not {device!r}"


def runnable_here(device: str, **problem) -> List[Tuple[str, str, List[str]]]:
    """Rows (name, description, reasons) where reasons is empty only for a backend that
    can really run the problem on this machine: an absent device is the first reason
    of every backend."""
    present, why = device_presence(device)
    rows = []
    for name, desc, reasons in backend_table(device, **problem):
        rows.append((name, desc, ([] if present else [why]) + list(reasons)))
    return rows


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="python -m lara_kernels.info", description=__doc__.split("\n\n")[0]
                            ).parse_args(argv)
    print(f"lara_kernels {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (built with CUDA {torch.version.cuda}, "
          f"torch.cuda.is_available(): {torch.cuda.is_available()})")
    print(f"triton       {_triton_version()}")
    print(f"_C           {'built' if built() else 'NOT built: ' + str(C_ERROR)}")
    if built():
        from . import _C

        print(f"_C CUDA part {'built' if built_with_cuda() else 'not built'}; OpenMP: {_C.with_openmp()}; "
              f"threads: {torch.get_num_threads()}")
    for device in ("cpu", "cuda"):
        present, what = device_presence(device)
        rows = runnable_here(device)
        runs = [name for name, _, reasons in rows if not reasons]
        auto = next((n for n in dispatch.auto_order(device) if n in runs), None)
        print(f"\n{device}: {what}")
        print(f"backends for {device} float32, D=64, C=64 (auto order: {dispatch.auto_order(device)}; "
              f"auto picks here: {auto or 'none'}):")
        for name, desc, reasons in rows:
            if not reasons:
                status = "runs here"
            else:
                status = "no: " + "; ".join(reasons)
                if not present and len(reasons) == 1:
                    status += f" (otherwise ready: it would run on a {device} device)"
            print(f"  {name:10s} {status}\n  {'':10s} ({desc})")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        # The reader closed the pipe (`... | head`): no traceback. Point stdout at devnull so
        # that the interpreter's final flush does not raise again, and exit as a truncated
        # writer does (nonzero: the output is incomplete).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
