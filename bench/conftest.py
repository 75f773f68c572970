"""Setup for the pytest-benchmark suite (``pytest bench/``).

As in ``tests/conftest.py``: without a CUDA GPU, TRITON_INTERPRET=1 is set before anything
imports triton, so that importing the package behaves the same in both suites. The
interpreter is never *timed*: ``lara_kernels.bench.runnable_backends`` leaves the
``triton`` backend out for CPU tensors.

    pytest bench/ --benchmark-autosave            # record a baseline (.benchmarks/)
    pytest bench/ --benchmark-compare             # compare with the last saved run
    pytest bench/ --benchmark-disable             # CI: run every case once, no timing
    LARA_BENCH_THREADS=1 pytest bench/ ...        # pin torch's CPU threads
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Threads for CPU runs: LARA_BENCH_THREADS=1 is steadier on a small machine shared with
# other work (OpenMP teams stall when their cores are busy); default: torch's own.
if os.environ.get("LARA_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["LARA_BENCH_THREADS"]))


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
