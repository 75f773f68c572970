"""The cpu and cuda backends' LARA as one compiled op per direction
(``lara_kernels::lara_fwd`` and ``lara_kernels::lara_bwd``: csrc/cpu/fused.cpp for CPU
tensors, csrc/cuda/fused_cuda.cpp and fused_kernel.cu for CUDA tensors, one schema, one
state layout) under one autograd Function.

It computes what ``_pipeline.lara_forward`` computes with the compiled passes (the same
passes, called from C++, and the C x D / C x C steps between them as loops there instead
of torch ops), for both layouts, masks, given landmarks, grouped-query attention, every
proposal and weighting. What it saves for the backward is the inputs and one flat tensor
of C-sized results. At small shapes a call costs one op dispatch per direction and one
Function application instead of the pipeline's ~25 torch ops, 5 op calls and 4-5 Function
applications.

``CpuBackend.lara`` and ``CudaBackend.lara`` take it when :func:`applies`: CPU tensors
with the compiled library built, or CUDA tensors with it built with CUDA, no forward-mode AD level open (the op has no forward derivative: the pipeline's
eager fallback handles it), no torch.func transform active (the pipeline's Functions have
the vmap rules and the differentiable backward those need) and not while torch.compile
traces (there the pipeline's Functions and passes are traced, as before; the opaque custom
ops of ``_custom_ops``, such as ``lara_attention_varlen`` under torch.compile, run their
eager implementation, which takes this path). The two ops have fake kernels (shapes
only, checked by opcheck), so a graph that calls them directly traces too.

A backward that runs with grad mode on (``create_graph=True``) recomputes the forward with
the pipeline (``_fused``'s Functions, whose backwards are differentiable again) and
returns its vector-Jacobian product, so gradients of every order are those of the
pipeline. ``ENABLED = False`` sends every call to the pipeline (for comparisons).
"""

from __future__ import annotations

import math

import torch

from . import _pipeline
from ._fused import _FUNCTION_APPLY, _differentiable_vjp, _forward_ad_active
from ._ops import built, built_with_cuda

ENABLED = True

PROPOSALS = {"segment": 0, "mixed": 1, "attend": 2}
WEIGHTINGS = {"optimal": 0, "balance": 1}


def applies(q) -> bool:
    """Whether the cpu or cuda backend's call takes the whole-op path (see the module doc)."""
    dev = q.device.type
    return (ENABLED and ((dev == "cpu" and built()) or (dev == "cuda" and built_with_cuda()))
            and not _forward_ad_active() and not torch._C._are_functorch_transforms_active()
            and not torch.compiler.is_compiling())


def _op_args(q, k, v, eps, num_samples, proposal, weighting, beta, scale, key_padding_mask, query_padding_mask,
             q_landmarks, k_landmarks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return (q, k, v, eps, q_landmarks, k_landmarks, query_padding_mask, key_padding_mask, int(num_samples),
            PROPOSALS[proposal], WEIGHTINGS[weighting], float(beta), math.sqrt(scale), cu_seqlens_q, cu_seqlens_k,
            0 if max_seqlen_q is None else int(max_seqlen_q), 0 if max_seqlen_k is None else int(max_seqlen_k))


def lara(q, k, v, eps, *, num_samples, proposal, weighting, beta, scale, key_padding_mask=None,
         query_padding_mask=None, q_landmarks=None, k_landmarks=None, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=None, max_seqlen_k=None):
    """``_pipeline.lara_forward(cpu passes, ...)`` by the whole-op path (same arguments)."""
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad
                                           or (q_landmarks is not None and q_landmarks.requires_grad)
                                           or (k_landmarks is not None and k_landmarks.requires_grad)):
        with torch._C._AutoDispatchBelowAutograd():
            return _FWD(q, k, v, eps, q_landmarks, k_landmarks, query_padding_mask, key_padding_mask,
                        int(num_samples), PROPOSALS[proposal], WEIGHTINGS[weighting], float(beta), math.sqrt(scale),
                        cu_seqlens_q, cu_seqlens_k, 0 if max_seqlen_q is None else int(max_seqlen_q),
                        0 if max_seqlen_k is None else int(max_seqlen_k))[0]
    # Function.apply minus what applies() has ruled out (torch.compile, torch.func transforms)
    # and its per-call signature binding (_fused._apply): the C++ apply, after unwrapping
    # dead functorch wrappers as Function.apply does (tensors that escaped a transform)
    u = _unwrap_if_dead
    return _WHOLE_APPLY(u(q), u(k), u(v), _opt(eps), _opt(q_landmarks), _opt(k_landmarks),
                        _opt(query_padding_mask), _opt(key_padding_mask), int(num_samples), PROPOSALS[proposal],
                        WEIGHTINGS[weighting], float(beta), math.sqrt(scale), _opt(cu_seqlens_q),
                        _opt(cu_seqlens_k), 0 if max_seqlen_q is None else int(max_seqlen_q),
                        0 if max_seqlen_k is None else int(max_seqlen_k))


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _opt(t):
    return None if t is None else _unwrap_if_dead(t)


def _pipeline_forward(q, k, v, eps, q_landmarks, k_landmarks, query_padding_mask, key_padding_mask, num_samples,
                      proposal, weighting, beta, ss, cu_q, cu_k, max_q, max_k):
    """The same call through the pipeline (op arguments in, the double-backward fallback)."""
    from .dispatch import _COMPILED_PASSES

    packed = {} if cu_q is None else dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                          max_seqlen_k=max_k)
    return _pipeline.lara_forward(
        _COMPILED_PASSES, q, k, v, eps, num_samples=num_samples, proposal=_NAMES_P[proposal],
        weighting=_NAMES_W[weighting], beta=beta, scale=ss * ss, key_padding_mask=key_padding_mask,
        query_padding_mask=query_padding_mask, q_landmarks=q_landmarks, k_landmarks=k_landmarks, **packed)


_NAMES_P = {v: k for k, v in PROPOSALS.items()}
_NAMES_W = {v: k for k, v in WEIGHTINGS.items()}


class _Whole(torch.autograd.Function):
    """y = lara_fwd(...)[0]; saves q, k, v, the masks, offsets, landmarks and the state."""

    @staticmethod
    def forward(ctx, q, k, v, eps, q_landmarks, k_landmarks, query_padding, key_padding, num_samples, proposal,
                weighting, beta, ss, cu_q, cu_k, max_q, max_k):
        y, state = _FWD(q, k, v, eps, q_landmarks, k_landmarks, query_padding, key_padding, num_samples, proposal,
                        weighting, beta, ss, cu_q, cu_k, max_q, max_k)
        ctx.save_for_backward(q, k, v, eps, q_landmarks, k_landmarks, query_padding, key_padding, cu_q, cu_k, state)
        ctx.config = (num_samples, proposal, weighting, beta, ss, max_q, max_k)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, eps, ql, kl, qpm, kpm, cu_q, cu_k, state = ctx.saved_tensors
        num_samples, proposal, weighting, beta, ss, max_q, max_k = ctx.config
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():   # create_graph=True: a differentiable backward, through the pipeline
            def run(q_, k_, v_, ql_, kl_):
                return _pipeline_forward(q_, k_, v_, eps, ql_, kl_, qpm, kpm, num_samples, proposal, weighting,
                                         beta, ss, cu_q, cu_k, max_q, max_k)

            dq, dk, dv, dql, dkl = _differentiable_vjp(run, (q, k, v, ql, kl),
                                                       (needs[0], needs[1], needs[2], needs[4], needs[5]), (dy,))
        else:
            if dy.dtype != q.dtype:
                dy = dy.to(q.dtype)
            dq, dk, dv, dql, dkl = _BWD(dy, q, k, v, state, ql, kl, qpm, kpm, num_samples, proposal, weighting,
                                        beta, ss, cu_q, cu_k, max_q, max_k)
            dql = dql if ql is not None else None
            dkl = dkl if kl is not None else None
        return (dq, dk, dv, None, dql, dkl) + (None,) * 11


_WHOLE_APPLY = _FUNCTION_APPLY.__get__(None, _Whole)

_FWD = _BWD = None
if built():
    _FWD = torch.ops.lara_kernels.lara_fwd.default
    _BWD = torch.ops.lara_kernels.lara_bwd.default

    def _sizes(q, k, num_samples, proposal, weighting, cu_q, max_q, max_k):
        if cu_q is not None:
            B, N, M = cu_q.shape[0] - 1, max_q, max_k
        else:
            B, N, M = q.shape[0], q.shape[2], k.shape[2]
        return B, q.shape[1], min(num_samples, N, M), q.shape[-1]

    def _state_numel(B, H, C, D, Dv, proposal, weighting):
        # elements of lara_fwd's state (csrc/state_layout.h: the fields, in order)
        n = B * H * C * (4 * D + 4 + Dv)
        if weighting == 0:
            n += 2 * B * H * C
        if proposal == 1:
            n += B * H * C * C
        if proposal == 2:
            n += B * H * C * (1 + D)
        return n

    @torch.library.register_fake("lara_kernels::lara_fwd")
    def _lara_fwd_fake(q, k, v, eps, q_landmarks, k_landmarks, query_padding, key_padding, num_samples, proposal,
                       weighting, beta, ss, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
        B, H, C, D = _sizes(q, k, num_samples, proposal, weighting, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        Dv = v.shape[-1]
        return (q.new_empty(q.shape[:-1] + (Dv,)),
                q.new_empty((_state_numel(B, H, C, D, Dv, proposal, weighting),), dtype=ct))

    @torch.library.register_fake("lara_kernels::lara_bwd")
    def _lara_bwd_fake(dy, q, k, v, state, q_landmarks, k_landmarks, query_padding, key_padding, num_samples,
                       proposal, weighting, beta, ss, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                       max_seqlen_k=0):
        gql = q_landmarks.new_empty(q_landmarks.shape) if q_landmarks is not None else q.new_empty(0)
        gkl = k_landmarks.new_empty(k_landmarks.shape) if k_landmarks is not None else q.new_empty(0)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gql, gkl


def bench_ops(q, k, v, dy, C, proposal, weighting, scale, timer):
    """(name, us) for bench/host_overhead.py at these inputs: the bare op calls, and
    ``lara`` (this module's entry, below api and dispatch) without and with autograd, so
    that the whole path's time splits into the op, this module's Python and autograd
    Function, and what runs above it."""
    args = _op_args(q, k, v, None, C, proposal, weighting, 1.0, scale, None, None, None, None, None, None, None,
                    None)
    y, state = _FWD(*args)
    rest = args[4:]
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    opts = dict(num_samples=C, proposal=proposal, weighting=weighting, beta=1.0, scale=scale)

    def fwd():
        with torch._C._AutoDispatchBelowAutograd():
            _FWD(*args)

    def bwd():
        with torch._C._AutoDispatchBelowAutograd():
            _BWD(dy, q, k, v, state, *rest)

    def entry():
        with torch.no_grad():
            lara(q, k, v, None, **opts)

    def entry_grad():
        lara(qg, kg, vg, None, **opts)

    def entry_grad_bwd():
        torch.autograd.backward(lara(qg, kg, vg, None, **opts), dy)

    return [("op lara_fwd", timer(fwd)), ("op lara_bwd", timer(bwd)), ("_whole.lara, no grad", timer(entry)),
            ("_whole.lara, grad (Function)", timer(entry_grad)),
            ("_whole.lara, fwd+bwd (Function)", timer(entry_grad_bwd))]
