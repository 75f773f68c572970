"""Shared test setup.

Triton kernels run on CPU tensors under the Triton interpreter: without a CUDA GPU the
suite sets TRITON_INTERPRET=1 before anything imports triton (the flag is read when
kernels are decorated). On a machine with a GPU the kernels run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cpu")
