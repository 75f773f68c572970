"""The ``triton`` backend: fused Triton passes under autograd (design/kernels.md).

One ``torch.autograd.Function`` per long pass (key pass, query normalizer, query pass),
with the signatures of ``_passes_torch``. Each saves only its inputs and the C-sized
results (the sample matrix w, Z, kap, Lam, ...): the N x C and M x C matrices are
recomputed tile by tile in the backward kernels and never held in memory. The C x D and
C x C steps between the passes are plain torch ops in ``_pipeline`` under autograd.

The module imports without Triton installed; the backend then reports
"triton not installed" as its reason.
"""

from __future__ import annotations

import os
from typing import List

import torch

from . import _passes_torch, _pipeline, dispatch
from ._ops import built

try:
    import triton  # noqa: F401

    TRITON_ERROR = None
except ImportError as exc:  # optional dependency
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

MAX_HEAD_DIM = 256
MAX_SAMPLES = 256
CPU_REASON = "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, for tests)"


def _kernels():
    from .triton_kernels import key_pass, query_pass

    return key_pass, query_pass


class _KeyPass(torch.autograd.Function):
    """Z, kap = key_pass(w, k, v, padding, ss, subtract_norm); saves w, k, v, Z, kap."""

    @staticmethod
    def forward(ctx, w, k, v, padding, ss, subtract_norm):
        kp, _ = _kernels()
        Z, kap = kp.key_pass_fwd(w, k, v, padding, ss, subtract_norm)
        ctx.save_for_backward(w, k, v, padding, Z, kap)
        ctx.ss, ctx.subtract_norm = ss, subtract_norm
        return Z, kap

    @staticmethod
    def backward(ctx, dZ, dkap):
        kp, _ = _kernels()
        w, k, v, padding, Z, kap = ctx.saved_tensors
        dw, dk, dv = kp.key_pass_bwd(w, k, v, padding, ctx.ss, ctx.subtract_norm, Z, kap, dZ, dkap)
        return dw.to(w.dtype), dk, dv, None, None, None


class _QueryNormalizer(torch.autograd.Function):
    """Lam_c = LSE over valid n of qt_c . qh_n; the key-pass kernel without values."""

    @staticmethod
    def forward(ctx, qt, q, padding, ss):
        kp, _ = _kernels()
        lam, _ = kp.key_pass_fwd(qt, q, None, padding, ss, False)
        ctx.save_for_backward(qt, q, padding, lam)
        ctx.ss = ss
        return lam

    @staticmethod
    def backward(ctx, dlam):
        kp, _ = _kernels()
        qt, q, padding, lam = ctx.saved_tensors
        dqt, dq, _ = kp.key_pass_bwd(qt, q, None, padding, ctx.ss, False, lam, None, dlam, None)
        return dqt.to(qt.dtype), dq, None, None


class _QueryPass(torch.autograd.Function):
    """y = query_pass(q, w, bias, kap, c_eff, padding, ss, (qt, Lam, bh, beta) or None).

    Saves the inputs only (q and C-sized tensors); delta_n = dy_n . y_n is recomputed in
    the backward kernel as sum_c P_nc (dy_n . kap_c), so y is not saved either.
    """

    @staticmethod
    def forward(ctx, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta):
        _, qp = _kernels()
        y = qp.query_pass_fwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta)
        ctx.save_for_backward(q, w, bias, kap, c_eff, padding, qt, lam, bh)
        ctx.ss, ctx.beta = ss, beta
        return y

    @staticmethod
    def backward(ctx, dy):
        _, qp = _kernels()
        q, w, bias, kap, c_eff, padding, qt, lam, bh = ctx.saved_tensors
        dq, dw, dbias, dkap, dqt, dlam, dbh = qp.query_pass_bwd(
            q, w, bias, kap, c_eff, padding, ctx.ss, qt, lam, bh, ctx.beta, dy)
        cast = lambda g, x: None if g is None else g.to(x.dtype)  # noqa: E731
        return (dq, cast(dw, w), cast(dbias, bias), cast(dkap, kap), None, None, None,
                cast(dqt, qt), cast(dlam, lam), cast(dbh, bh), None)


class TritonPasses:
    """The passes object ``_pipeline`` calls (signatures of ``_passes_torch``)."""

    @staticmethod
    def landmarks(x, padding, c_eff, C):
        if built():
            from ._ops import landmarks

            return landmarks(x, padding, c_eff, C)
        return _passes_torch.landmarks(x, padding, c_eff, C)

    @staticmethod
    def key_pass(w, k, v, padding, ss, subtract_norm):
        return _KeyPass.apply(w, k, v, padding, float(ss), bool(subtract_norm))

    @staticmethod
    def query_normalizer(qt, q, padding, ss):
        return _QueryNormalizer.apply(qt, q, padding, float(ss))

    @staticmethod
    def query_pass(q, w, bias, kap, c_eff, padding, ss, mis):
        if mis is None:
            return _QueryPass.apply(q, w, bias, kap, c_eff, padding, float(ss), None, None, None, 0.0)
        qt, lam, bh, beta = mis
        return _QueryPass.apply(q, w, bias, kap, c_eff, padding, float(ss), qt, lam, bh, float(beta))


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
        return _pipeline.lara_forward(TritonPasses, q, k, v, eps, **options)

    def rfa(self, q, k, v, w, **options):
        return _pipeline.rfa_forward(TritonPasses, q, k, v, w, **options)


dispatch.register_backend(TritonBackend())
