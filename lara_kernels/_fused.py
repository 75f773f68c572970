"""Autograd for the fused passes, shared by every fused backend (docs/math.md, sections
4, 5 and 7, and the backward formulas of the kernels).

A backend supplies a *kernel set*: four functions with the signatures of
``triton_kernels.key_pass`` / ``triton_kernels.query_pass``:

- ``key_pass_fwd(w, k, v, padding, ss, subtract_norm, cu_seqlens, max_seqlen) -> (Z, kap or None)``
- ``key_pass_bwd(w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, cu_seqlens, max_seqlen)
  -> (dw, dk, dv or None)``
- ``query_pass_fwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, cu_seqlens, max_seqlen) -> y``
- ``query_pass_bwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, cu_seqlens, max_seqlen)
  -> (dq, dw, dbias, dkap, dqt, dlam, dbh)`` (the last three None without the MIS term)

``cu_seqlens`` (None) and ``max_seqlen`` (0) give the padded layout; with offsets, the long
tensors are packed (T, H, D) rows of B sequences (``_varlen``; contract in csrc/lara_ops.h).
The passes object takes the layout as one ``padding`` argument (a mask, None, or a
``_varlen.Packed``) and splits it for the kernels.

``FusedPasses(kernels)`` turns it into the passes object that ``_pipeline`` runs, with
one ``torch.autograd.Function`` per long pass. Each saves only its inputs and the
C-sized results: the N x C and M x C matrices are recomputed tile by tile in the
backward kernels and never held in memory. The query normalizer is the key pass
without values.

Inference: a pass whose inputs need no gradient (grad mode off, or none requiring one),
outside torch.compile and torch.func transforms, calls its kernel directly, without a
Function: the same result, without the Function's per-call host cost.

Beyond first-order reverse mode (the fast path, unchanged by what follows):

- Higher-order gradients. A backward that runs with grad mode on (``create_graph=True``,
  and always under ``torch.func.grad``/``vjp``/``jacrev``, which build the graph of the
  backward) recomputes the pass with the differentiable eager passes of
  ``_passes_torch`` and returns their vector-Jacobian product, itself differentiable in
  the inputs and the incoming gradient. The fused backward kernels are not
  differentiable; the eager passes are the same formulas (the tests check each against
  the reference), materializing the N x C and M x C matrices for that backward only.
- ``torch.vmap``: each Function has a ``vmap`` rule that folds the vmapped dimension into
  the batch dimension (the passes take any B) and runs the fused kernels once.
- Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``): while a
  forward-AD level is open, the passes object runs the eager passes, which are plain
  torch and carry tangents; the fused kernels have no forward derivative, and a custom
  ``jvp`` on the Functions would make ``torch.compile`` break the graph of every call.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad as _forward_ad_module

from . import _passes_torch
from ._ops import built
from ._varlen import Packed, no_packed_vmap


_FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]   # the C++ apply every Function ends in


def _apply(fn, *args):
    """``fn.apply(*args)`` without its per-call argument binding.

    ``Function.apply`` binds the arguments to ``forward``'s signature with
    ``inspect.signature`` whenever ``setup_context`` is defined, about 50 us per call: most
    of a small call's host time. Every argument here is positional and none has a default,
    so that binding changes nothing; outside torch.func transforms and torch.compile (which
    take the documented path) the call goes straight to the C++ apply.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return _FUNCTION_APPLY.__get__(None, fn)(*_unwrap_dead(args))


def _unwrap_dead(args):
    return _UNWRAP_DEAD(args)


from torch._functorch.utils import unwrap_dead_wrappers as _UNWRAP_DEAD   # noqa: E402 (what Function.apply does first)


def _cast(g, like):
    return None if g is None else g.to(like.dtype)


def _forward_ad_active() -> bool:
    """True while a forward-AD level is open (``forward_ad.dual_level``; ``torch.func.jvp``
    opens one too). A module global of torch (private): one read per pass."""
    return _forward_ad_module._current_level >= 0


def _differentiable_vjp(fn, args, needs, grads):
    """The vector-Jacobian product of the eager pass ``fn(*args)`` with ``grads``, for the
    ``args`` whose ``needs`` is True (None for the others), computed with the graph kept
    (``create_graph=True``) so that it can be differentiated again, in the inputs and in
    ``grads``. Each needed argument enters through its own view, so a tensor passed twice
    (k as keys and as values) gets one partial gradient per position, as the fused
    backward returns them (autograd adds them up)."""
    args = [a.view_as(a) if need else a for a, need in zip(args, needs)]
    wrt = [a for a, need in zip(args, needs) if need]
    with torch.enable_grad():
        outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads)
             if o is not None and g is not None and o.requires_grad]
    if not wrt or not pairs:
        return (None,) * len(args)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                   create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in needs)


def _fold(info, in_dims, args):
    """vmap rule helper: move each tensor argument's vmapped dimension to the front (or
    expand an unbatched one) and merge it with the batch dimension, which every tensor
    argument of the passes has first: (V, B, ...) -> (V * B, ...)."""
    out = []
    for a, d in zip(args, in_dims):
        if isinstance(a, torch.Tensor):
            a = a.movedim(d, 0) if d is not None else a.expand(info.batch_size, *a.shape)
            a = a.reshape((a.shape[0] * a.shape[1],) + tuple(a.shape[2:]))
        out.append(a)
    return out


def _unfold(info, outputs):
    """(V * B, ...) -> (V, B, ...) for each output, with the out_dims vmap expects."""
    def one(t):
        return (None, None) if t is None else (t.reshape((info.batch_size, -1) + tuple(t.shape[1:])), 0)

    if isinstance(outputs, tuple):
        pairs = [one(t) for t in outputs]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return one(outputs)


def _split(padding):
    """The ``padding`` argument of a pass -> (mask or None, cu_seqlens or None, max_seqlen)."""
    if isinstance(padding, Packed):
        return None, padding.cu_seqlens, int(padding.max_seqlen)
    return padding, None, 0


def _layout(padding, cu, max_seqlen):
    """The inverse of ``_split``, for the eager passes."""
    return padding if cu is None else Packed(cu, max_seqlen)


class _KeyPass(torch.autograd.Function):
    """Z, kap = key_pass(w, k, v, padding, ss, subtract_norm, cu_seqlens, max_seqlen);
    saves w, k, v, Z, kap."""

    @staticmethod
    def forward(kernels, w, k, v, padding, ss, subtract_norm, cu, max_seqlen):
        return kernels.key_pass_fwd(w, k, v, padding, ss, subtract_norm, cu, max_seqlen)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kernels, w, k, v, padding, ss, subtract_norm, cu, max_seqlen = inputs
        Z, kap = output
        ctx.save_for_backward(w, k, v, padding, Z, kap, cu)
        ctx.kernels, ctx.ss, ctx.subtract_norm, ctx.max_seqlen = kernels, ss, subtract_norm, max_seqlen

    @staticmethod
    def backward(ctx, dZ, dkap):
        w, k, v, padding, Z, kap, cu = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True: a backward that is differentiable
            ss, sn, layout = ctx.ss, ctx.subtract_norm, _layout(padding, cu, ctx.max_seqlen)
            dw, dk, dv = _differentiable_vjp(
                lambda w_, k_, v_: _passes_torch.key_pass(w_, k_, v_, layout, ss, sn),
                (w, k, v), ctx.needs_input_grad[1:4], (dZ, dkap))
            return None, dw, dk, dv, None, None, None, None, None
        dw, dk, dv = ctx.kernels.key_pass_bwd(w, k, v, padding, ctx.ss, ctx.subtract_norm, Z, kap, dZ, dkap,
                                              cu, ctx.max_seqlen)
        return None, _cast(dw, w), dk, dv, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, kernels, w, k, v, padding, ss, subtract_norm, cu, max_seqlen):
        no_packed_vmap(cu)
        args = _fold(info, in_dims, (kernels, w, k, v, padding, ss, subtract_norm))
        return _unfold(info, _KeyPass.apply(*args, None, 0))


class _QueryNormalizer(torch.autograd.Function):
    """Lam_c = LSE over valid n of qt_c . qh_n: the key pass without values."""

    @staticmethod
    def forward(kernels, qt, q, padding, ss, cu, max_seqlen):
        lam, _ = kernels.key_pass_fwd(qt, q, None, padding, ss, False, cu, max_seqlen)
        return lam

    @staticmethod
    def setup_context(ctx, inputs, output):
        kernels, qt, q, padding, ss, cu, max_seqlen = inputs
        ctx.save_for_backward(qt, q, padding, output, cu)
        ctx.kernels, ctx.ss, ctx.max_seqlen = kernels, ss, max_seqlen

    @staticmethod
    def backward(ctx, dlam):
        qt, q, padding, lam, cu = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True
            ss, layout = ctx.ss, _layout(padding, cu, ctx.max_seqlen)
            dqt, dq = _differentiable_vjp(
                lambda qt_, q_: _passes_torch.query_normalizer(qt_, q_, layout, ss),
                (qt, q), ctx.needs_input_grad[1:3], (dlam,))
            return None, dqt, dq, None, None, None, None
        dqt, dq, _ = ctx.kernels.key_pass_bwd(qt, q, None, padding, ctx.ss, False, lam, None, dlam, None,
                                              cu, ctx.max_seqlen)
        return None, _cast(dqt, qt), dq, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, kernels, qt, q, padding, ss, cu, max_seqlen):
        no_packed_vmap(cu)
        return _unfold(info, _QueryNormalizer.apply(*_fold(info, in_dims, (kernels, qt, q, padding, ss)), None, 0))


class _QueryPass(torch.autograd.Function):
    """y = query_pass(q, w, bias, kap, c_eff, padding, ss, (qt, Lam, bh, beta) or None).

    Saves the inputs only (q and C-sized tensors); delta_n = dy_n . y_n is recomputed in
    the backward kernel as sum_c P_nc (dy_n . kap_c), so y is not saved either.
    """

    @staticmethod
    def forward(kernels, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, cu, max_seqlen):
        return kernels.query_pass_fwd(q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, cu, max_seqlen)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kernels, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, cu, max_seqlen = inputs
        ctx.save_for_backward(q, w, bias, kap, c_eff, padding, qt, lam, bh, cu)
        ctx.kernels, ctx.ss, ctx.beta, ctx.max_seqlen = kernels, ss, beta, max_seqlen

    @staticmethod
    def backward(ctx, dy):
        q, w, bias, kap, c_eff, padding, qt, lam, bh, cu = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph=True
            ss, beta, layout = ctx.ss, ctx.beta, _layout(padding, cu, ctx.max_seqlen)

            def eager(q_, w_, bias_, kap_, qt_, lam_, bh_):
                mis = None if qt_ is None else (qt_, lam_, bh_, beta)
                return _passes_torch.query_pass(q_, w_, bias_, kap_, c_eff, layout, ss, mis)

            needs = ctx.needs_input_grad
            dq, dw, dbias, dkap, dqt, dlam, dbh = _differentiable_vjp(
                eager, (q, w, bias, kap, qt, lam, bh), needs[1:5] + needs[8:11], (dy,))
            return None, dq, dw, dbias, dkap, None, None, None, dqt, dlam, dbh, None, None, None
        dq, dw, dbias, dkap, dqt, dlam, dbh = ctx.kernels.query_pass_bwd(
            q, w, bias, kap, c_eff, padding, ctx.ss, qt, lam, bh, ctx.beta, dy, cu, ctx.max_seqlen)
        return (None, dq, _cast(dw, w), _cast(dbias, bias), _cast(dkap, kap), None, None, None,
                _cast(dqt, qt), _cast(dlam, lam), _cast(dbh, bh), None, None, None)

    @staticmethod
    def vmap(info, in_dims, kernels, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, cu, max_seqlen):
        no_packed_vmap(cu)
        args = _fold(info, in_dims, (kernels, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta))
        return _unfold(info, _QueryPass.apply(*args, None, 0))


class FusedPasses:
    """The passes object ``_pipeline`` calls (signatures of ``_passes_torch``), running a
    backend's kernel set under autograd. Landmarks come from the compiled op when ``_C``
    is built (else the eager pass). While a forward-AD level is open every pass is the
    eager one (see the module docstring)."""

    def __init__(self, kernels):
        self.kernels = kernels

    @staticmethod
    def landmarks(x, padding, c_eff, C):
        if built() and not _forward_ad_active():
            if _plain(x):
                mask, cu, max_seqlen = _split(padding)
                with _below_autograd():
                    return torch.ops.lara_kernels.landmarks(x, mask, c_eff, C, cu, max_seqlen)
            from ._ops import landmarks

            return landmarks(x, padding, c_eff, C)
        return _passes_torch.landmarks(x, padding, c_eff, C)

    def key_pass(self, w, k, v, padding, ss, subtract_norm):
        if _forward_ad_active():
            return _passes_torch.key_pass(w, k, v, padding, float(ss), bool(subtract_norm))
        mask, cu, max_seqlen = _split(padding)
        if _plain(w, k, v):
            return self.kernels.key_pass_fwd(w, k, v, mask, float(ss), bool(subtract_norm), cu, max_seqlen)
        return _apply(_KeyPass, self.kernels, w, k, v, mask, float(ss), bool(subtract_norm), cu, max_seqlen)

    def query_normalizer(self, qt, q, padding, ss):
        if _forward_ad_active():
            return _passes_torch.query_normalizer(qt, q, padding, float(ss))
        mask, cu, max_seqlen = _split(padding)
        if _plain(qt, q):
            return self.kernels.key_pass_fwd(qt, q, None, mask, float(ss), False, cu, max_seqlen)[0]
        return _apply(_QueryNormalizer, self.kernels, qt, q, mask, float(ss), cu, max_seqlen)

    def query_pass(self, q, w, bias, kap, c_eff, padding, ss, mis):
        if _forward_ad_active():
            return _passes_torch.query_pass(q, w, bias, kap, c_eff, padding, float(ss), mis)
        mask, cu, max_seqlen = _split(padding)
        qt, lam, bh, beta = (None, None, None, 0.0) if mis is None else mis
        if _plain(q, w, bias, kap, qt, lam, bh):
            return self.kernels.query_pass_fwd(q, w, bias, kap, c_eff, mask, float(ss), qt, lam, bh, float(beta), cu,
                                               max_seqlen)
        return _apply(_QueryPass, self.kernels, q, w, bias, kap, c_eff, mask, float(ss), qt, lam, bh, float(beta),
                      cu, max_seqlen)


def _plain(*tensors) -> bool:
    """True when a pass needs no autograd record: grad mode off or no input requiring a
    gradient, outside torch.compile and torch.func transforms (which take the Functions).
    The pass then calls its kernel directly: the result is the Function's forward, without
    the Function's per-call cost (most of a small call's host time)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def _below_autograd():
    """Dispatch below the autograd key: a compiled op whose inputs need no gradient skips
    its Python autograd registration."""
    return torch._C._AutoDispatchBelowAutograd()


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
    def key_pass_fwd(cls, w, k, v, padding, ss, subtract_norm, cu_seqlens=None, max_seqlen=0):
        Z, kap = torch.ops.lara_kernels.key_pass_fwd(cls._small(w, k), k, v, padding, float(ss), bool(subtract_norm),
                                                     cu_seqlens, int(max_seqlen))
        return Z, (kap if v is not None else None)

    @classmethod
    def key_pass_bwd(cls, w, k, v, padding, ss, subtract_norm, Z, kap, dZ, dkap, cu_seqlens=None, max_seqlen=0):
        Z = cls._small(Z, k)
        dZ = torch.zeros_like(Z) if dZ is None else cls._small(dZ, k)
        if v is not None:
            kap = cls._small(kap, k)
            dkap = torch.zeros_like(kap) if dkap is None else cls._small(dkap, k)
        else:
            kap = dkap = None
        dw, dk, dv = torch.ops.lara_kernels.key_pass_bwd(
            cls._small(w, k), k, v, padding, float(ss), bool(subtract_norm), Z, kap, dZ, dkap, cu_seqlens,
            int(max_seqlen))
        return dw, dk, (dv if v is not None else None)

    @classmethod
    def _query_inputs(cls, q, w, bias, kap, c_eff, qt, lam, bh):
        s = lambda t: cls._small(t, q)  # noqa: E731
        return s(w), s(bias), s(kap), c_eff.to(device=q.device, dtype=torch.int64).contiguous(), s(qt), s(lam), s(bh)

    @classmethod
    def query_pass_fwd(cls, q, w, bias, kap, c_eff, padding, ss, qt=None, lam=None, bh=None, beta=0.0,
                       cu_seqlens=None, max_seqlen=0):
        w, bias, kap, c_eff, qt, lam, bh = cls._query_inputs(q, w, bias, kap, c_eff, qt, lam, bh)
        return torch.ops.lara_kernels.query_pass_fwd(q, w, bias, kap, c_eff, padding, float(ss), qt, lam, bh,
                                                     float(beta), cu_seqlens, int(max_seqlen))

    @classmethod
    def query_pass_bwd(cls, q, w, bias, kap, c_eff, padding, ss, qt, lam, bh, beta, dy, cu_seqlens=None,
                       max_seqlen=0):
        mis = qt is not None
        w, bias, kap, c_eff, qt, lam, bh = cls._query_inputs(q, w, bias, kap, c_eff, qt, lam, bh)
        out = torch.ops.lara_kernels.query_pass_bwd(q, w, bias, kap, c_eff, padding, float(ss), qt, lam, bh,
                                                    float(beta), dy.to(q.dtype), cu_seqlens, int(max_seqlen))
        return tuple(out[:4]) + (tuple(out[4:]) if mis else (None, None, None))
