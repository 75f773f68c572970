"""Loads the compiled ops (``lara_kernels._C``) and gives them autograd and fake kernels.

A missing or broken build is not an error here: ``C_ERROR`` says why, and the ``cpu``
backend reports it as its reason ("not built: ...").
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.lara_kernels.*)

    C_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    C_ERROR = f"{type(exc).__name__}: {exc}"


def built() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda())


if _C is not None:

    @torch.library.register_fake("lara_kernels::landmarks")
    def _landmarks_fake(x, padding, c_eff, num_segments):
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((x.shape[0], x.shape[1], num_segments, x.shape[3]), dtype=out_dtype)

    @torch.library.register_fake("lara_kernels::landmarks_backward")
    def _landmarks_backward_fake(grad, padding, c_eff, length, dtype):
        return grad.new_empty((grad.shape[0], grad.shape[1], length, grad.shape[3]), dtype=dtype)

    # Shapes of the fused passes (contract in csrc/lara_ops.h), so that code calling them
    # traces under torch.compile.
    def _ct(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("lara_kernels::key_pass_fwd")
    def _key_pass_fwd_fake(w, k, v, padding, ss, subtract_norm):
        B, H, C = w.shape[:3]
        dv = 0 if v is None else v.shape[3]
        return k.new_empty((B, H, C), dtype=_ct(k)), k.new_empty((B, H, C, dv), dtype=_ct(k))

    @torch.library.register_fake("lara_kernels::key_pass_bwd")
    def _key_pass_bwd_fake(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap):
        dv = k.new_empty((0,)) if v is None else v.new_empty(v.shape)
        return w.new_empty(w.shape), k.new_empty(k.shape), dv

    @torch.library.register_fake("lara_kernels::query_pass_fwd")
    def _query_pass_fwd_fake(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta):
        return q.new_empty(q.shape[:3] + kap.shape[3:])

    @torch.library.register_fake("lara_kernels::query_pass_bwd")
    def _query_pass_bwd_fake(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy):
        mis = qt is not None
        small = lambda t: w.new_empty(t.shape) if mis else w.new_empty((0,))  # noqa: E731
        return (q.new_empty(q.shape), w.new_empty(w.shape), bias.new_empty(bias.shape), kap.new_empty(kap.shape),
                small(w), small(bias), small(bias))

    def _landmarks_setup_context(ctx, inputs, output):
        x, padding, c_eff, _ = inputs
        ctx.save_for_backward(padding if padding is not None else None, c_eff)
        ctx.length = x.shape[2]
        ctx.x_dtype = x.dtype

    def _landmarks_backward(ctx, grad):
        padding, c_eff = ctx.saved_tensors
        gx = torch.ops.lara_kernels.landmarks_backward(grad.contiguous(), padding, c_eff, ctx.length, ctx.x_dtype)
        return gx, None, None, None

    torch.library.register_autograd(
        "lara_kernels::landmarks", _landmarks_backward, setup_context=_landmarks_setup_context
    )


def landmarks(x, padding, c_eff, C):
    """Unscaled masked segment means (B, H, C, D) by the compiled op."""
    return torch.ops.lara_kernels.landmarks(x, padding, c_eff, C)
