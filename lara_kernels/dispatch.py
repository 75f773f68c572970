"""Backends that say why not (after xformers' fmha dispatch; docs/design.md, Backends).

Each backend declares what it supports and answers ``not_supported_reasons(op, q, k, v,
**options) -> list[str]``. ``backend="auto"`` takes the first backend, in the order for
the tensors' device, with no reasons; when none fits, or an explicitly requested backend
does not fit, the error lists every backend's reasons.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List

import torch

from . import _pipeline, _whole
from ._fused import CompiledKernels, FusedPasses
from ._ops import C_ERROR, built, built_with_cuda

OPS = ("lara", "rfa")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class Backend:
    """Base class: a name, what it supports, and the two entry points."""

    name: str = "?"
    description: str = ""
    devices: tuple = ()
    dtypes: tuple = FLOAT_DTYPES
    max_head_dim: int | None = None
    max_samples: int | None = None

    def availability_reasons(self) -> List[str]:
        """Reasons that hold whatever the inputs (not built, no library)."""
        return []

    def not_supported_reasons(self, op: str, q, k, v, num_samples: int = 1, **options) -> List[str]:
        reasons = list(self.availability_reasons())
        if op not in OPS:
            reasons.append(f"op {op!r} is not one of {OPS}")
        if q.device.type not in self.devices:
            reasons.append(f"device {q.device.type!r} not in {self.devices}")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} not in {[str(d) for d in self.dtypes]}")
        return reasons + self.capacity_reasons(op, q, k, v, num_samples, **_layout_options(options))

    def capacity_reasons(self, op: str, q, k, v, num_samples: int = 1, max_seqlen_q=None,
                         max_seqlen_k=None) -> List[str]:
        """Reasons of size only (head dims, samples): what auto warns about when it passes over
        this backend for a slower one. LARA is judged on the samples that can be active,
        ``min(C, N, M)`` (C_eff never exceeds it; the pipeline runs only those rows)."""
        reasons = []
        for what, dim in (("head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
            if self.max_head_dim is not None and dim > self.max_head_dim:
                reasons.append(f"{what} {dim} > {self.max_head_dim}")
        samples = active_samples(op, num_samples, q, k, max_seqlen_q, max_seqlen_k)
        if self.max_samples is not None and samples > self.max_samples:
            what = "active samples min(num_samples, N, M)" if op == "lara" else "num_samples"
            reasons.append(f"{what} {samples} > {self.max_samples}")
        return reasons

    def lara(self, q, k, v, eps, **options):
        raise NotImplementedError

    def rfa(self, q, k, v, w, **options):
        raise NotImplementedError

    @property
    def passes(self):
        """The long passes this backend runs (the signatures of ``_passes_torch``), for code
        that sequences them itself, such as ``lara_kernels.distributed``."""
        return self._passes


class ReferenceBackend(Backend):
    name = "reference"
    description = "eager PyTorch of docs/math.md, the oracle (materializes N x C and M x C)"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")

    @property
    def passes(self):
        from . import _passes_torch   # the eager passes: the same formulas, differentiable

        return _passes_torch

    def lara(self, q, k, v, eps, **options):
        from .reference import lara_reference

        return lara_reference(q, k, v, eps, **options)

    def rfa(self, q, k, v, w, **options):
        from .reference import rfa_reference

        return rfa_reference(q, k, v, w, **options)


def active_samples(op: str, num_samples: int, q, k, max_seqlen_q=None, max_seqlen_k=None) -> int:
    """Samples a call can have active: LARA's C_eff <= min(C, N, M) (packed batches: the
    longest lengths); RFA uses all S features."""
    if op != "lara":
        return num_samples
    N = q.shape[2] if max_seqlen_q is None else max_seqlen_q
    M = k.shape[2] if max_seqlen_k is None else max_seqlen_k
    return min(num_samples, N, M)


def _layout_options(options) -> dict:
    """The options that size a call's samples in the packed layout (the longest lengths)."""
    return {key: options[key] for key in ("max_seqlen_q", "max_seqlen_k") if options.get(key) is not None}


MAX_COMPILED_DIM = 256  # head dims and sample counts of the CUDA passes (csrc/lara_ops.h kMaxDim; _C._max_pass_dim("cuda"))


class CpuBackend(Backend):
    name = "cpu"
    description = "fused C++ passes (OpenMP, BLAS tiles); CPU tensors, any D, Dv and C"
    devices = ("cpu",)
    max_head_dim = None   # the CPU passes walk any D, Dv and C (csrc/lara_ops.h max_pass_dim)
    max_samples = None

    def availability_reasons(self):
        return [] if built() else [f"lara_kernels._C not built ({C_ERROR})"]

    def lara(self, q, k, v, eps, **options):
        # one compiled op per direction where it applies (lara_kernels/_whole.py, CPU and
        # CUDA tensors; the cuda backend inherits this); the pipeline of passes elsewhere
        if _whole.applies(q):
            return _whole.lara(q, k, v, eps, **options)
        return _pipeline.lara_forward(_COMPILED_PASSES, q, k, v, eps, **options)

    def rfa(self, q, k, v, w, **options):
        return _pipeline.rfa_forward(_COMPILED_PASSES, q, k, v, w, **options)


class CudaBackend(CpuBackend):
    name = "cuda"
    description = "fused CUDA C++ passes; CUDA tensors (the fallback where Triton is absent)"
    devices = ("cuda",)
    max_head_dim = MAX_COMPILED_DIM
    max_samples = MAX_COMPILED_DIM

    def availability_reasons(self):
        if not built():
            return [f"lara_kernels._C not built ({C_ERROR})"]
        if not built_with_cuda():
            return ["lara_kernels._C was built without CUDA (torch without CUDA, nvcc not found, "
                    "or LARA_SKIP_CUDA_BUILD=1)"]
        return []


_REGISTRY: Dict[str, Backend] = {}
# auto's preference per device type: fastest first. Backends not listed for a device
# are never picked by auto for it (the Triton interpreter on CPU is for tests only).
_AUTO_ORDER: Dict[str, List[str]] = {"cuda": ["triton", "cuda", "reference"], "cpu": ["cpu", "reference"]}


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def backends() -> Dict[str, Backend]:
    """All registered backends by name (usable or not)."""
    return dict(_REGISTRY)


def auto_order(device_type: str) -> List[str]:
    order = _AUTO_ORDER.get(device_type, ["reference"])
    return [n for n in order if n in _REGISTRY]


def select(op: str, name: str, q, k, v, **options) -> Backend:
    """The backend to run: ``name`` if it fits, else (for "auto") the first that fits."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    candidates = auto_order(q.device.type) if name == "auto" else [name]
    skipped = []                       # faster backends auto passed over for their size limits only
    for cand in candidates:
        backend = _REGISTRY[cand]
        reasons = backend.not_supported_reasons(op, q, k, v, **options)
        if not reasons:
            if skipped:
                _warn_capacity(op, backend, skipped, q, k, v, options.get("num_samples", 1), options)
            return backend
        capacity = backend.capacity_reasons(op, q, k, v, options.get("num_samples", 1), **_layout_options(options))
        if capacity and len(capacity) == len(reasons):
            skipped.append((cand, capacity))
    lines = []
    for bname, backend in _REGISTRY.items():
        reasons = backend.not_supported_reasons(op, q, k, v, **options)
        if name == "auto" and bname not in candidates and not reasons:
            reasons = [f"not picked by auto for {q.device.type!r} tensors (ask for it by name)"]
        lines.append(f"  {bname}: " + ("; ".join(reasons) if reasons else "fits"))
    what = "no backend can run" if name == "auto" else f"backend={name!r} cannot run"
    raise RuntimeError(
        f"{what} {op}_attention on {q.device.type} {q.dtype} inputs "
        f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}:\n" + "\n".join(lines)
    )


_WARNED = set()


def _warn_capacity(op, chosen, skipped, q, k, v, num_samples, options):
    """One warning per (op, skipped backend, chosen backend, reasons) and process: auto fell
    back from a fused backend because of a size limit, to a slower one that may hold more."""
    key = (op, chosen.name, tuple((n, tuple(r)) for n, r in skipped))
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    why = "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped)
    extra = ""
    if chosen.name == "reference":
        layout = _layout_options(options)
        if layout:   # packed: the padded copies of the eager passes hold B x max_seqlen rows
            B, H = options["cu_seqlens_q"].shape[0] - 1, q.shape[1]
            N, M = layout["max_seqlen_q"], layout["max_seqlen_k"]
        else:
            B, H, N = q.shape[:3]
            M = k.shape[2]
        C = active_samples(op, num_samples, q, k, **layout)
        size = 8 if q.dtype == torch.float64 else 4
        mib = lambda L: B * H * L * C * size / 2**20  # noqa: E731
        extra = (f"; it materializes (B, H, N, C) and (B, H, M, C) matrices, {mib(N):.1f} MiB and {mib(M):.1f} MiB "
                 f"each here, several of them held for the backward, where the fused passes hold none")
    warnings.warn(f"{op}_attention(backend='auto') passed over {why}, and runs backend {chosen.name!r}{extra}. "
                  f"This warning is shown once.", UserWarning, stacklevel=4)


register_backend(ReferenceBackend())
register_backend(CpuBackend())
register_backend(CudaBackend())

_COMPILED_PASSES = FusedPasses(CompiledKernels)
CpuBackend._passes = _COMPILED_PASSES


def _register_optional():
    """Backends whose modules need optional packages (Triton) register themselves here."""
    try:
        from . import _triton_backend  # noqa: F401
    except ImportError as exc:  # module absent in this build: nothing to register
        if "_triton_backend" not in str(exc):
            raise
    else:
        _REGISTRY["triton"]._passes = _triton_backend.TritonPasses


_register_optional()
