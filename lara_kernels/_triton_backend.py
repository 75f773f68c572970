"""The ``triton`` backend: LARA by the lean path of ``_whole_triton`` where it applies (one
sequence of Triton launches per direction under one Function: "segment" and "mixed"
proposals without given landmarks, outside forward AD, torch.func and torch.compile), and
otherwise by the Triton kernel set (triton_kernels/) under the shared autograd of
``_fused`` (one Function per long pass, N x C tiles recomputed in backward); RFA always
by the latter.

The module imports without Triton installed; the backend then reports
"triton not installed" as its reason.
"""

from __future__ import annotations

import os
from typing import List

import torch

from . import _pipeline, _whole_triton, dispatch
from ._fused import FusedPasses

try:
    import triton  # noqa: F401

    TRITON_ERROR = None
except ImportError as exc:  # optional dependency
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

MAX_HEAD_DIM = 256
MAX_SAMPLES = 256
CPU_REASON = "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, for tests)"


class _TritonKernels:
    """The kernel set (see ``_fused``) of triton_kernels/, imported on first use."""

    def __getattr__(self, name):
        from .triton_kernels import key_pass, query_pass

        for module in (key_pass, query_pass):
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)


TritonPasses = FusedPasses(_TritonKernels())


class TritonBackend(dispatch.Backend):
    name = "triton"
    description = "fused Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1, for tests)"
    devices = ("cuda", "cpu")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    max_head_dim = MAX_HEAD_DIM
    max_samples = MAX_SAMPLES

    def availability_reasons(self) -> List[str]:
        return [] if TRITON_ERROR is None else [f"triton not installed ({TRITON_ERROR})"]

    def not_supported_reasons(self, op, q, k, v, num_samples: int = 1, **options) -> List[str]:
        reasons = super().not_supported_reasons(op, q, k, v, num_samples=num_samples, **options)
        if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append(CPU_REASON)
        return reasons

    def lara(self, q, k, v, eps, **options):
        if _whole_triton.applies(q, options):
            return _whole_triton.lara(q, k, v, eps, **options)
        return _pipeline.lara_forward(TritonPasses, q, k, v, eps, **options)

    def rfa(self, q, k, v, w, **options):
        return _pipeline.rfa_forward(TritonPasses, q, k, v, w, **options)


dispatch.register_backend(TritonBackend())
