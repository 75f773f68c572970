"""``lara_attention`` as a ``torch.library`` custom op, so ``torch.compile`` sees one op.

    torch.ops.lara_kernels.lara_attention(q, k, v, eps, key_padding_mask, query_padding_mask,
        q_landmarks, k_landmarks, num_samples, proposal, weighting, beta, scale, backend) -> y

Three registrations, after flash-attention's ``hopper/flash_attn_interface.py``: the op
itself (runs the backend that ``dispatch`` selects, exactly what :func:`lara_attention`
runs), a fake implementation (output shape and dtype only, for tracing), and an autograd
formula. The backward is a second opaque op, ``lara_attention_backward``, that recomputes
the forward with the selected backend's own autograd and takes its vector-Jacobian
product, so the gradients are those of eager ``lara_attention``; only the inputs are
saved (the price: the forward runs twice per training step). Double backward is not
supported.

eps is an input of the op, drawn by :func:`lara_attention_op` before the call exactly as
``api.lara_attention`` draws it (float32 ``randn((B, H, C, D), generator=generator)``), so
the compiled and eager paths compute the same function of the same randomness.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import api

__all__ = ["lara_attention_op"]


def _run(q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
         num_samples, proposal, weighting, beta, scale, backend):
    if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[2] == 0:
        return q.new_zeros(q.shape[:3] + (v.shape[3],))
    return api.run_lara(q, k, v, eps, backend, num_samples=num_samples, proposal=proposal, weighting=weighting,
                        beta=beta, scale=scale, key_padding_mask=key_padding_mask,
                        query_padding_mask=query_padding_mask, q_landmarks=q_landmarks,
                        k_landmarks=k_landmarks)


@torch.library.custom_op("lara_kernels::lara_attention", mutates_args=())
def _lara_op(q: Tensor, k: Tensor, v: Tensor, eps: Optional[Tensor],
             key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor],
             q_landmarks: Optional[Tensor], k_landmarks: Optional[Tensor], num_samples: int,
             proposal: str, weighting: str, beta: float, scale: float, backend: str) -> Tensor:
    y = _run(q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
             num_samples, proposal, weighting, beta, scale, backend)
    return y.contiguous()


@_lara_op.register_fake
def _lara_op_fake(q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
                  num_samples, proposal, weighting, beta, scale, backend):
    return q.new_empty(q.shape[:3] + (v.shape[3],))


def _autograd_inside_op():
    """Re-enable autograd dispatch inside an op's implementation.

    The dispatcher runs a custom op's implementation with the autograd keys excluded,
    so no graph would be recorded there. The backward op records the backends' own
    autograd graph (their autograd.Functions and the compiled landmarks op, which
    torch.func transforms do not support), so it lifts that exclusion for its body.
    Autocast stays excluded: the recomputation runs in the inputs' dtypes.
    Uses torch._C's dispatch-key guard (private API; tested in tests/test_nn.py).
    """
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradOther, K.AutogradCPU, K.AutogradCUDA, K.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("lara_kernels::lara_attention_backward", mutates_args=())
def _lara_bwd_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, eps: Optional[Tensor],
                 key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor],
                 q_landmarks: Optional[Tensor], k_landmarks: Optional[Tensor], num_samples: int,
                 proposal: str, weighting: str, beta: float, scale: float,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = [q, k, v, q_landmarks, k_landmarks]
    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    with _autograd_inside_op(), torch.enable_grad():
        y = _run(leaves[0], leaves[1], leaves[2], eps, key_padding_mask, query_padding_mask, leaves[3],
                 leaves[4], num_samples, proposal, weighting, beta, scale, backend)
        wrt = [t for t in leaves if t is not None]
        grads = list(torch.autograd.grad(y, wrt, grad.to(y.dtype), allow_unused=True))
    out = []
    for t in leaves:
        if t is None:
            out.append(q.new_empty(0))
        else:
            g = grads.pop(0)
            out.append(torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g.contiguous().clone())
    gq, gk, gv, gql, gkl = out
    return gq, gk, gv, gql, gkl


@_lara_bwd_op.register_fake
def _lara_bwd_fake(grad, q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
                   num_samples, proposal, weighting, beta, scale, backend):
    # contiguous, as the implementation returns them
    gql = q_landmarks.new_empty(q_landmarks.shape) if q_landmarks is not None else q.new_empty(0)
    gkl = k_landmarks.new_empty(k_landmarks.shape) if k_landmarks is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gql, gkl


_NONTENSOR = ("num_samples", "proposal", "weighting", "beta", "scale", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v, eps, kpm, qpm, ql, kl = inputs[:8]
    ctx.save_for_backward(q, k, v, eps, kpm, qpm, ql, kl)
    ctx.static = inputs[8:]


def _backward(ctx, grad):
    q, k, v, eps, kpm, qpm, ql, kl = ctx.saved_tensors
    gq, gk, gv, gql, gkl = torch.ops.lara_kernels.lara_attention_backward(
        grad, q, k, v, eps, kpm, qpm, ql, kl, *ctx.static)
    return (gq, gk, gv, None, None, None,
            gql if ql is not None else None, gkl if kl is not None else None) + (None,) * len(_NONTENSOR)


_lara_op.register_autograd(_backward, setup_context=_setup_context)


def lara_attention_op(q: Tensor, k: Tensor, v: Tensor, *, num_samples: int = 64, proposal: str = "segment",
                      weighting: str = "optimal", beta: float = 1.0, scale: Optional[float] = None,
                      training: bool = False, generator: Optional[torch.Generator] = None,
                      key_padding_mask: Optional[Tensor] = None, query_padding_mask: Optional[Tensor] = None,
                      q_landmarks: Optional[Tensor] = None, k_landmarks: Optional[Tensor] = None,
                      backend: str = "auto", check_finite: bool = False) -> Tensor:
    """:func:`lara_kernels.lara_attention` through the custom op (same arguments, checks,
    eps draw and result); use it in code that ``torch.compile(fullgraph=True)`` traces.
    ``check_finite`` as in :func:`lara_kernels.lara_attention`."""
    api._check_qkv(q, k, v)
    B, H, N, D = q.shape
    M = k.shape[2]
    C = api._check_int("num_samples", num_samples, 1)
    proposal = api._check_choice("proposal", proposal, api.PROPOSALS)
    weighting = api._check_choice("weighting", weighting, api.WEIGHTINGS)
    beta = api._check_real("beta", beta)
    scale = api._check_scale(scale, D)
    training = api._check_bool("training", training)
    generator = api._check_generator(generator, q.device)
    key_padding_mask = api._check_mask("key_padding_mask", key_padding_mask, B, M, "M", q.device)
    query_padding_mask = api._check_mask("query_padding_mask", query_padding_mask, B, N, "N", q.device)
    q_landmarks = api._check_landmarks("q_landmarks", q_landmarks, q, C)
    k_landmarks = api._check_landmarks("k_landmarks", k_landmarks, q, C)
    backend = api._check_backend(backend)
    api._check_finite(check_finite, q, k, v, q_landmarks=q_landmarks, k_landmarks=k_landmarks,
                      key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask)
    eps = None
    if training and B * H * N > 0 and M > 0:
        eps = torch.randn((B, H, C, D), generator=generator, device=q.device, dtype=torch.float32)
    return torch.ops.lara_kernels.lara_attention(
        q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
        C, proposal, weighting, beta, scale, backend)
