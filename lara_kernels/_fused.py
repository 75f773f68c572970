"""Autograd for the fused passes, shared by every fused backend (design/kernels.md).

A backend supplies a *kernel set*: four functions with the signatures of
``triton_kernels.key_pass`` / ``triton_kernels.query_pass``:

- ``key_pass_fwd(w, k, v, padding, ss, subtract_norm) -> (Z, kap or None)``
- ``key_pass_bwd(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap) -> (dw, dk, dv or None)``
- ``query_pass_fwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta) -> y``
- ``query_pass_bwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy)
  -> (dq, dw, dbias, dkap, dqt, dlam, dbh)`` (the last three None without the MIS term)

``FusedPasses(kernels)`` turns it into the passes object that ``_pipeline`` runs, with
one ``torch.autograd.Function`` per long pass. Each saves only its inputs and the
C-sized results: the N x C and M x C matrices are recomputed tile by tile in the
backward kernels and never held in memory. The query normalizer is the key pass
without values.
"""

from __future__ import annotations

import torch

from . import _passes_torch
from ._ops import built


def _cast(g, like):
    return None if g is None else g.to(like.dtype)


class _KeyPass(torch.autograd.Function):
    """Z, kap = key_pass(w, k, v, padding, ss, subtract_norm); saves w, k, v, Z, kap."""

    @staticmethod
    def forward(ctx, kernels, w, k, v, padding, ss, subtract_norm):
        Z, kap = kernels.key_pass_fwd(w, k, v, padding, ss, subtract_norm)
        ctx.save_for_backward(w, k, v, padding, Z, kap)
        ctx.kernels, ctx.ss, ctx.subtract_norm = kernels, ss, subtract_norm
        return Z, kap

    @staticmethod
    def backward(ctx, dZ, dkap):
        w, k, v, padding, Z, kap = ctx.saved_tensors
        dw, dk, dv = ctx.kernels.key_pass_bwd(w, k, v, padding, ctx.ss, ctx.subtract_norm, Z, kap, dZ, dkap)
        return None, _cast(dw, w), dk, dv, None, None, None


class _QueryNormalizer(torch.autograd.Function):
    """Lam_c = LSE over valid n of qt_c . qh_n: the key pass without values."""

    @staticmethod
    def forward(ctx, kernels, qt, q, padding, ss):
        lam, _ = kernels.key_pass_fwd(qt, q, None, padding, ss, False)
        ctx.save_for_backward(qt, q, padding, lam)
        ctx.kernels, ctx.ss = kernels, ss
        return lam

    @staticmethod
    def backward(ctx, dlam):
        qt, q, padding, lam = ctx.saved_tensors
        dqt, dq, _ = ctx.kernels.key_pass_bwd(qt, q, None, padding, ctx.ss, False, lam, None, dlam, None)
        return None, _cast(dqt, qt), dq, None, None


class _QueryPass(torch.autograd.Function):
    """y = query_pass(q, w, bias, kap, c_eff, padding, ss, (qt, Lam, bh, beta) or None).

    Saves the inputs only (q and C-sized tensors); delta_n = dy_n . y_n is recomputed in
    the backward kernel as sum_c P_nc (dy_n . kap_c), so y is not saved either.
    """

    @staticmethod
    def forward(ctx, kernels, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta):
        y = kernels.query_pass_fwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta)
        ctx.save_for_backward(q, w, bias, kap, c_eff, padding, qt, lam, bh)
        ctx.kernels, ctx.ss, ctx.beta = kernels, ss, beta
        return y

    @staticmethod
    def backward(ctx, dy):
        q, w, bias, kap, c_eff, padding, qt, lam, bh = ctx.saved_tensors
        dq, dw, dbias, dkap, dqt, dlam, dbh = ctx.kernels.query_pass_bwd(
            q, w, bias, kap, c_eff, padding, ctx.ss, qt, lam, bh, ctx.beta, dy)
        return (None, dq, _cast(dw, w), _cast(dbias, bias), _cast(dkap, kap), None, None, None,
                _cast(dqt, qt), _cast(dlam, lam), _cast(dbh, bh), None)


class FusedPasses:
    """The passes object ``_pipeline`` calls (signatures of ``_passes_torch``), running a
    backend's kernel set under autograd. Landmarks come from the compiled op when ``_C``
    is built (else the eager pass)."""

    def __init__(self, kernels):
        self.kernels = kernels

    @staticmethod
    def landmarks(x, padding, c_eff, C):
        if built():
            from ._ops import landmarks

            return landmarks(x, padding, c_eff, C)
        return _passes_torch.landmarks(x, padding, c_eff, C)

    def key_pass(self, w, k, v, padding, ss, subtract_norm):
        return _KeyPass.apply(self.kernels, w, k, v, padding, float(ss), bool(subtract_norm))

    def query_normalizer(self, qt, q, padding, ss):
        return _QueryNormalizer.apply(self.kernels, qt, q, padding, float(ss))

    def query_pass(self, q, w, bias, kap, c_eff, padding, ss, mis):
        if mis is None:
            return _QueryPass.apply(self.kernels, q, w, bias, kap, c_eff, padding, float(ss), None, None, None, 0.0)
        qt, lam, bh, beta = mis
        return _QueryPass.apply(self.kernels, q, w, bias, kap, c_eff, padding, float(ss), qt, lam, bh, float(beta))


class CompiledKernels:
    """The kernel set of the compiled ops (``torch.ops.lara_kernels.*``, csrc/): the C++
    CPU passes and the CUDA passes share one schema and dispatch on the device.

    Adapts the None conventions of the kernel-set signatures to the op schemas: the
    C-sized inputs go in as contiguous tensors of the compute type, zeros stand in for
    an absent incoming gradient, and (0)-sized outputs come back as None.
    """

    @staticmethod
    def _ct(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    @classmethod
    def _small(cls, t, x):
        return None if t is None else t.to(cls._ct(x)).contiguous()

    @classmethod
    def key_pass_fwd(cls, w, k, v, padding, ss, subtract_norm):
        Z, kap = torch.ops.lara_kernels.key_pass_fwd(cls._small(w, k), k, v, padding, float(ss), bool(subtract_norm))
        return Z, (kap if v is not None else None)

    @classmethod
    def key_pass_bwd(cls, w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap):
        Z = cls._small(Z, k)
        dZ = torch.zeros_like(Z) if dZ is None else cls._small(dZ, k)
        if v is not None:
            kap = cls._small(kap, k)
            dkap = torch.zeros_like(kap) if dkap is None else cls._small(dkap, k)
        else:
            kap = dkap = None
        dw, dk, dv = torch.ops.lara_kernels.key_pass_bwd(
            cls._small(w, k), k, v, padding, float(ss), bool(subtract_norm), Z, kap, dZ, dkap)
        return dw, dk, (dv if v is not None else None)

    @classmethod
    def _query_inputs(cls, q, w, bias, kap, c_eff, qt, lam, bh):
        s = lambda t: cls._small(t, q)  # noqa: E731
        return s(w), s(bias), s(kap), c_eff.to(device=q.device, dtype=torch.int64).contiguous(), s(qt), s(lam), s(bh)

    @classmethod
    def query_pass_fwd(cls, q, w, bias, kap, c_eff, padding, ss, qt=None, lam=None, bh=None, beta=0.0):
        w, bias, kap, c_eff, qt, lam, bh = cls._query_inputs(q, w, bias, kap, c_eff, qt, lam, bh)
        return torch.ops.lara_kernels.query_pass_fwd(q, w, bias, kap, c_eff, padding, float(ss), qt, lam, bh,
                                                     float(beta))

    @classmethod
    def query_pass_bwd(cls, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy):
        mis = qt is not None
        w, bias, kap, c_eff, qt, lam, bh = cls._query_inputs(q, w, bias, kap, c_eff, qt, lam, bh)
        out = torch.ops.lara_kernels.query_pass_bwd(q, w, bias, kap, c_eff, padding, float(ss), qt, lam, bh,
                                                    float(beta), dy.to(q.dtype))
        return tuple(out[:4]) + (tuple(out[4:]) if mis else (None, None, None))
