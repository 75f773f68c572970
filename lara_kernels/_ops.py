"""Loads the compiled ops (``lara_kernels._C``) and gives them autograd (to any order),
vmap rules and fake kernels.

A missing build is not an error here: ``C_ERROR`` says why, and the ``cpu`` backend
reports it as its reason ("not built: ..."). A module that exists but fails to import (a
broken build, e.g. built against another torch) also leaves ``C_ERROR`` set, and warns
with the reason, so that the fallback to other backends is never silent.
"""

from __future__ import annotations

import warnings

import torch

from ._varlen import no_packed_vmap


def _built_against():
    """The torch version ``setup.py`` compiled ``_C`` against (None if it left no record)."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


class _WrongTorch(ImportError):
    pass


def _never_built():
    """No ``_C`` extension file next to the package (importing it then reports a partially
    initialized package, not a missing module): "not built", quietly."""
    import glob
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    return not glob.glob(os.path.join(here, "_C.*"))


try:
    _against = _built_against()
    if _against is not None and _against != torch.__version__:
        # An extension built against another torch may load and then fail or crash inside a
        # call: refuse it before importing.
        raise _WrongTorch(f"built against torch {_against}, but this is torch {torch.__version__}")
    from . import _C  # noqa: F401  (importing registers torch.ops.lara_kernels.*)

    C_ERROR = None
except Exception as exc:  # noqa: BLE001  (not built, or a broken build: any error importing it)
    _C = None
    C_ERROR = f"{type(exc).__name__}: {exc}"
    if not (isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._C") and not _never_built():
        warnings.warn(
            f"lara_kernels._C is present but failed to import ({C_ERROR}); the compiled backends "
            "(cpu, cuda) are unavailable. Rebuild it against this torch "
            "(pip install --no-build-isolation -e .)",
            RuntimeWarning, stacklevel=2)


def built() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda())


def _fold(batch_size, t, d):
    """vmap rule helper: move t's vmapped dimension d to the front (or expand an unbatched
    t) and merge it with the batch dimension, which every tensor argument of the landmarks
    ops has first (x (B, H, L, D), padding (B, L), c_eff (B,), grad (B, H, C, D))."""
    if t is None:
        return None
    t = t.movedim(d, 0) if d is not None else t.expand(batch_size, *t.shape)
    return t.reshape((t.shape[0] * t.shape[1],) + tuple(t.shape[2:]))


def _unfold(batch_size, t):
    return t.reshape((batch_size, -1) + tuple(t.shape[1:])), 0


def _with_layout(inputs, n):
    """The inputs of a landmarks op with its layout pair (cu_seqlens, max_seqlen) filled in
    where a call left the defaults out."""
    inputs = tuple(inputs)
    return inputs + (None, 0)[len(inputs) - n:]


class _Landmarks(torch.autograd.Function):
    """``lara_kernels::landmarks`` under autograd, in the setup_context style that torch.func
    transforms (grad, vjp, jacrev, vmap) accept; its staticmethods are also the op's own
    autograd and vmap registrations, for direct calls of the op.

    landmarks is linear, x -> A x with A the masked segment-mean matrix; its backward is
    g -> A^T g (``landmarks_backward``), linear in g, whose backward is gg -> A gg, the
    landmarks op again: gradients of every order are exact.
    """

    @staticmethod
    def forward(x, padding, c_eff, num_segments, cu_seqlens=None, max_seqlen=0):
        return torch.ops.lara_kernels.landmarks(x, padding, c_eff, num_segments, cu_seqlens, max_seqlen)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, padding, c_eff, _, cu_seqlens, max_seqlen = _with_layout(inputs, 4)
        ctx.save_for_backward(padding, c_eff, cu_seqlens)
        ctx.length = x.shape[0] if cu_seqlens is not None else x.shape[2]   # packed: T rows
        ctx.x_dtype = x.dtype
        ctx.max_seqlen = max_seqlen

    @staticmethod
    def backward(ctx, grad):
        padding, c_eff, cu = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True: record the backward for the next order
            gx = _LandmarksBackward.apply(grad, padding, c_eff, ctx.length, ctx.x_dtype, cu, ctx.max_seqlen)
        else:
            gx = torch.ops.lara_kernels.landmarks_backward(grad.contiguous(), padding, c_eff, ctx.length,
                                                           ctx.x_dtype, cu, ctx.max_seqlen)
        return gx, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, padding, c_eff, num_segments, cu_seqlens=None, max_seqlen=0):
        no_packed_vmap(cu_seqlens)
        V = info.batch_size
        return _unfold(V, _Landmarks.apply(_fold(V, x, in_dims[0]), _fold(V, padding, in_dims[1]),
                                           _fold(V, c_eff, in_dims[2]), num_segments))


class _LandmarksBackward(torch.autograd.Function):
    """``lara_kernels::landmarks_backward`` (g -> A^T g) under autograd: its backward is the
    landmarks op (gg -> A gg)."""

    @staticmethod
    def forward(grad, padding, c_eff, length, dtype, cu_seqlens=None, max_seqlen=0):
        return torch.ops.lara_kernels.landmarks_backward(grad.contiguous(), padding, c_eff, length, dtype,
                                                         cu_seqlens, max_seqlen)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, padding, c_eff, _, _, cu_seqlens, max_seqlen = _with_layout(inputs, 5)
        ctx.save_for_backward(padding, c_eff, cu_seqlens)
        ctx.num_segments = grad.shape[2]
        ctx.grad_dtype = grad.dtype
        ctx.max_seqlen = max_seqlen

    @staticmethod
    def backward(ctx, ggx):
        padding, c_eff, cu = ctx.saved_tensors
        gg = _Landmarks.apply(ggx.contiguous(), padding, c_eff, ctx.num_segments, cu, ctx.max_seqlen)
        return gg.to(ctx.grad_dtype), None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, grad, padding, c_eff, length, dtype, cu_seqlens=None, max_seqlen=0):
        no_packed_vmap(cu_seqlens)
        V = info.batch_size
        return _unfold(V, _LandmarksBackward.apply(_fold(V, grad, in_dims[0]), _fold(V, padding, in_dims[1]),
                                                   _fold(V, c_eff, in_dims[2]), length, dtype))


if _C is not None:

    @torch.library.register_fake("lara_kernels::landmarks")
    def _landmarks_fake(x, padding, c_eff, num_segments, cu_seqlens=None, max_seqlen=0):
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if cu_seqlens is not None:   # packed x (T, H, D)
            return x.new_empty((cu_seqlens.shape[0] - 1, x.shape[1], num_segments, x.shape[2]), dtype=out_dtype)
        return x.new_empty((x.shape[0], x.shape[1], num_segments, x.shape[3]), dtype=out_dtype)

    @torch.library.register_fake("lara_kernels::landmarks_backward")
    def _landmarks_backward_fake(grad, padding, c_eff, length, dtype, cu_seqlens=None, max_seqlen=0):
        if cu_seqlens is not None:   # packed (T, H, D)
            return grad.new_empty((length, grad.shape[1], grad.shape[3]), dtype=dtype)
        return grad.new_empty((grad.shape[0], grad.shape[1], length, grad.shape[3]), dtype=dtype)

    # Shapes of the fused passes (contract in csrc/lara_ops.h), so that code calling them
    # traces under torch.compile.
    def _ct(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("lara_kernels::key_pass_fwd")
    def _key_pass_fwd_fake(w, k, v, padding, ss, subtract_norm, cu_seqlens=None, max_seqlen=0):
        B, H, C = w.shape[:3]
        dv = 0 if v is None else v.shape[-1]
        return k.new_empty((B, H, C), dtype=_ct(k)), k.new_empty((B, H, C, dv), dtype=_ct(k))

    @torch.library.register_fake("lara_kernels::key_pass_bwd")
    def _key_pass_bwd_fake(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, cu_seqlens=None, max_seqlen=0):
        dv = k.new_empty((0,)) if v is None else v.new_empty(v.shape)
        return w.new_empty(w.shape), k.new_empty(k.shape), dv

    @torch.library.register_fake("lara_kernels::query_pass_fwd")
    def _query_pass_fwd_fake(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, cu_seqlens=None,
                             max_seqlen=0):
        return q.new_empty(q.shape[:-1] + kap.shape[3:])

    @torch.library.register_fake("lara_kernels::query_pass_bwd")
    def _query_pass_bwd_fake(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, cu_seqlens=None,
                             max_seqlen=0):
        mis = qt is not None
        small = lambda t: w.new_empty(t.shape) if mis else w.new_empty((0,))  # noqa: E731
        return (q.new_empty(q.shape), w.new_empty(w.shape), bias.new_empty(bias.shape), kap.new_empty(kap.shape),
                small(w), small(bias), small(bias))

    torch.library.register_autograd(
        "lara_kernels::landmarks", _Landmarks.backward, setup_context=_Landmarks.setup_context)
    torch.library.register_autograd(
        "lara_kernels::landmarks_backward", _LandmarksBackward.backward,
        setup_context=_LandmarksBackward.setup_context)

    # The ops' own vmap rules call the ops (the Functions' rules call the Functions).
    def _landmarks_vmap(info, in_dims, x, padding, c_eff, num_segments, cu_seqlens=None, max_seqlen=0):
        no_packed_vmap(cu_seqlens)
        V = info.batch_size
        return _unfold(V, torch.ops.lara_kernels.landmarks(
            _fold(V, x, in_dims[0]), _fold(V, padding, in_dims[1]), _fold(V, c_eff, in_dims[2]), num_segments))

    def _landmarks_backward_vmap(info, in_dims, grad, padding, c_eff, length, dtype, cu_seqlens=None, max_seqlen=0):
        no_packed_vmap(cu_seqlens)
        V = info.batch_size
        return _unfold(V, torch.ops.lara_kernels.landmarks_backward(
            _fold(V, grad, in_dims[0]).contiguous(), _fold(V, padding, in_dims[1]), _fold(V, c_eff, in_dims[2]),
            length, dtype))

    torch.library.register_vmap("lara_kernels::landmarks", _landmarks_vmap)
    torch.library.register_vmap("lara_kernels::landmarks_backward", _landmarks_backward_vmap)


def landmarks(x, padding, c_eff, C):
    """Unscaled masked segment means (B, H, C, D) by the compiled op (differentiable to any
    order, under torch.func transforms too). ``padding``: a mask, None or a ``Packed`` layout."""
    from ._fused import _apply, _split   # apply without per-call argument binding

    mask, cu, max_seqlen = _split(padding)
    return _apply(_Landmarks, x, mask, c_eff, C, cu, max_seqlen)
