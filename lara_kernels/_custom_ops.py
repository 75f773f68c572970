"""``lara_attention`` and RFA as ``torch.library`` custom ops, so ``torch.compile`` sees
one op per attention call and never breaks the graph.

    torch.ops.lara_kernels.lara_attention(q, k, v, eps, key_padding_mask, query_padding_mask,
        q_landmarks, k_landmarks, num_samples, proposal, weighting, beta, scale, backend) -> y
    torch.ops.lara_kernels.rfa_attention(q, k, v, w, key_padding_mask, query_padding_mask,
        scale, backend) -> y
        (scale: a 0-d float64 CPU tensor, so that a changing scale does not recompile)
    torch.ops.lara_kernels.randn(generator_key, shape, device) -> float32 N(0, I) draw
    torch.ops.lara_kernels.check_padding_mask(mask, name) -> ()       (raises at run time)
    torch.ops.lara_kernels.check_finite_layer(x, padding, name) -> ()  (raises at run time)

Each attention op has three registrations, after flash-attention's
``hopper/flash_attn_interface.py``: the op itself (runs the backend that ``dispatch``
selects, exactly what :func:`lara_attention` / :func:`rfa_attention` run), a fake
implementation (output shape and dtype only, for tracing), and an autograd formula.
The backward is a second opaque op (``..._backward``) that recomputes the forward with
the selected backend's own autograd and takes its vector-Jacobian product, so the
gradients are those of eager ``lara_attention``; only the inputs are saved (the price:
the forward runs twice per training step).

Double backward (``create_graph=True``): outside ``torch.compile`` the op's backward
recomputes the forward with the backends' autograd and keeps the graph, so second
derivatives are those of eager ``lara_attention``. A compiled graph's backward is
opaque: its backward op raises a RuntimeError that says so when it is differentiated
(use eager ``lara_attention`` / the layers outside ``torch.compile`` for that).

Randomness. ``torch.compile`` cannot take a ``torch.Generator`` into a graph, so the
draws go through the op ``lara_kernels::randn``: it calls ``torch.randn(shape,
generator=g, dtype=float32)`` with the generator registered under ``generator_key``
(0 = torch's global generator). It is registered as a side effect, so compiled graphs
keep every draw, in program order, never merged: with the same generator state the
compiled and eager paths draw the same numbers, with any backend (``aot_eager``,
``inductor``). A graph holds that key, which means something only in the process that
made it: a ``torch.export`` program of a layer in training with its own generator is not
portable (one with ``generator=None``, key 0, or in ``eval()`` is). eps is drawn by :func:`lara_attention_op` before the attention op exactly
as ``api.lara_attention`` draws it (float32 ``randn((B, H, C, D), generator=generator)``),
so the compiled and eager paths compute the same function of the same randomness.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import api, dispatch

__all__ = ["lara_attention_op", "rfa_features", "draw_normal", "generator_key"]


def _no_autocast(device):
    """Autocast off for the backend run, as in ``api.lara_attention``."""
    return api._no_autocast(device)


def _keep(op):
    """Register an op as a side effect (kept, ordered, never merged in compiled graphs)."""
    return api._keep_in_compiled_graphs(op)


# ---------------------------------------------------------------- random draws

_GENERATORS: "weakref.WeakValueDictionary[int, torch.Generator]" = weakref.WeakValueDictionary()


@torch._dynamo.assume_constant_result
def generator_key(generator: Optional[torch.Generator]) -> int:
    """A key for ``generator`` that a compiled graph can hold as a constant (0 = None).

    Dynamo guards on the generator object the caller reads (a layer's ``generator``
    attribute, a global), so a new generator gives a new key and a recompile.
    """
    if generator is None:
        return 0
    key = id(generator)
    _GENERATORS[key] = generator
    return key


@torch.library.custom_op("lara_kernels::randn", mutates_args=())
def _randn_op(generator_key: int, shape: Sequence[int], device: torch.device) -> Tensor:
    generator = None
    if generator_key != 0:
        generator = _GENERATORS.get(generator_key)
        if generator is None:
            raise RuntimeError("lara_kernels::randn: the generator of this compiled graph no longer exists")
    return torch.randn(list(shape), generator=generator, device=device, dtype=torch.float32)


@_randn_op.register_fake
def _randn_fake(generator_key, shape, device):
    return torch.empty(list(shape), device=device, dtype=torch.float32)


_RANDN_KEPT = _keep(torch.ops.lara_kernels.randn.default)


def draw_normal(shape, generator: Optional[torch.Generator], device) -> Tensor:
    """float32 ``torch.randn(shape, generator=generator)`` on ``device``; under
    ``torch.compile`` through ``lara_kernels::randn`` (same numbers, no graph break)."""
    if not torch.compiler.is_compiling():
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if not _RANDN_KEPT:
        raise NotImplementedError(
            f"random draws under torch.compile need a torch that can mark an op as a side effect "
            f"(torch {torch.__version__} cannot); run the layer in eval() or outside torch.compile")
    return torch.ops.lara_kernels.randn(generator_key(generator), list(shape), device)


# ---------------------------------------------------------------- run-time checks for the layers

def _first_index(bad: Tensor) -> Tuple[int, ...]:
    flat = int(bad.reshape(-1).to(torch.uint8).argmax())          # argmax: the first maximum
    index = []
    for size in reversed(bad.shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def check_padding_mask_values(mask: Tensor, name: str) -> None:
    """ValueError unless the float mask ``mask`` holds only 0 (keep) and -inf (pad)."""
    bad = ~((mask == 0) | torch.isneginf(mask))
    if bool(bad.any()):
        index = _first_index(bad)
        raise ValueError(
            f"{name} is a float mask with values other than 0 and -inf (first {float(mask[index])} at index "
            f"{index} of shape {tuple(mask.shape)}); LARA supports padding only (0 = keep, -inf = pad), "
            "not additive biases. Pass a bool mask, True = padding")


def check_finite_values(x: Tensor, padding: Optional[Tensor], name: str) -> None:
    """ValueError if ``x`` holds NaN or +-inf where ``padding`` (broadcastable to x, True
    = padding) is False; the index is in x's own shape."""
    bad = ~torch.isfinite(x.detach())
    if padding is not None:
        bad = bad & ~padding
    n = int(bad.sum())
    if n:
        index = _first_index(bad)
        raise ValueError(
            f"check_finite: {name} has {n} non-finite value{'s' if n != 1 else ''} (first "
            f"{float(x.detach()[index])} at index {index} of shape {tuple(x.shape)})")


@torch.library.custom_op("lara_kernels::check_padding_mask", mutates_args=())
def _check_padding_mask_op(mask: Tensor, name: str) -> None:
    check_padding_mask_values(mask, name)


@_check_padding_mask_op.register_fake
def _check_padding_mask_fake(mask, name):
    return None


@torch.library.custom_op("lara_kernels::check_finite_layer", mutates_args=())
def _check_finite_layer_op(x: Tensor, padding: Optional[Tensor], name: str) -> None:
    check_finite_values(x, padding, name)


@_check_finite_layer_op.register_fake
def _check_finite_layer_fake(x, padding, name):
    return None


_CHECKS_KEPT = (_keep(torch.ops.lara_kernels.check_padding_mask.default)
                and _keep(torch.ops.lara_kernels.check_finite_layer.default))


def _run_check(eager, op, *args):
    if not torch.compiler.is_compiling():
        eager(*args)
    elif _CHECKS_KEPT:
        op(*args)
    else:
        raise NotImplementedError(
            f"this check under torch.compile needs a torch that can mark an op as a side effect "
            f"(torch {torch.__version__} cannot)")


def check_padding_mask(mask: Tensor, name: str) -> None:
    """:func:`check_padding_mask_values`, now (eager) or when the compiled graph runs."""
    _run_check(check_padding_mask_values, torch.ops.lara_kernels.check_padding_mask, mask, name)


def check_finite_layer(x: Tensor, padding: Optional[Tensor], name: str) -> None:
    """:func:`check_finite_values`, now (eager) or when the compiled graph runs."""
    _run_check(check_finite_values, torch.ops.lara_kernels.check_finite_layer, x, padding, name)


# ---------------------------------------------------------------- shared autograd plumbing

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


def _vjp(run, grad, inputs):
    """Gradients of ``run(*inputs)`` with ``grad`` for every floating input (zeros where
    unused; an empty tensor for a None input), recorded with the backends' autograd."""
    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    with _autograd_inside_op(), torch.enable_grad():
        y = run(*leaves)
        wrt = [t for t in leaves if t is not None]
        grads = list(torch.autograd.grad(y, wrt, grad.to(y.dtype), allow_unused=True))
    out = []
    for t in leaves:
        if t is None:
            out.append(inputs[0].new_empty(0))
        else:
            g = grads.pop(0)
            out.append(torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g.contiguous().clone())
    return out


def _differentiable_vjp(run, grad, inputs):
    """``create_graph=True`` outside torch.compile: the backends' autograd graph of the
    recomputed forward, differentiated with the graph kept (double backward)."""
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    with _no_autocast(grad.device):
        y = run(*inputs)
    grads = iter(torch.autograd.grad(y, wrt, grad.to(y.dtype), create_graph=True, allow_unused=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def _double_backward_error(name):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"double backward (create_graph=True, torch.func.hessian, ...) through the compiled path of "
            f"lara_kernels ({name}) is not supported: a torch.compile graph's backward is one opaque op. "
            "Eager lara_attention, rfa_attention and the lara_kernels.nn layers outside torch.compile "
            "support it; so does torch.ops.lara_kernels.lara_attention called eagerly")

    def setup_context(ctx, inputs, output):
        pass

    return backward, setup_context


# ---------------------------------------------------------------- LARA

def _scale_tensor(scale, D):
    """The op's ``scale`` argument: a 0-d float64 CPU tensor. A Python float argument of
    a custom op is a constant of the compiled graph (one recompile per value, then a hard
    failure with ``fullgraph=True``); as a tensor (made with a multiplication, which
    dynamo keeps symbolic) a scale that changes between calls reuses one graph."""
    if scale is None:
        scale = D ** -0.5
    elif not torch.compiler.is_compiling():
        scale = api._check_real("scale", scale, positive=True)
    elif isinstance(scale, (bool, str, torch.Tensor)):
        api._check_real("scale", scale, positive=True)            # raises api's TypeError
    return torch.ones((), dtype=torch.float64) * scale


def _scale_value(scale: Tensor) -> float:
    """The scale the op was given; checked here too, because under torch.compile its value
    is known only when the graph runs."""
    return api._check_real("scale", float(scale), positive=True)


def _check_float(name, x, positive=False):
    """``api._check_real``; under torch.compile without ``math.isfinite``, which dynamo
    cannot trace on the symbolic float it may make of a float argument (a module's
    ``beta``, a ``scale`` argument): the comparisons below become guards instead."""
    if not torch.compiler.is_compiling() or isinstance(x, (bool, str)) or x is None:
        return api._check_real(name, x, positive)
    if not (x - x == 0) or (positive and not x > 0):          # NaN or +-inf, or not positive
        return api._check_real(name, float(x), positive)       # raises api's ValueError
    return x


def _packed_options(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The run options of a packed (varlen) batch; none for the padded layout."""
    if cu_seqlens_q is None:
        return {}
    return dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k)


def _run_lara(q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
              num_samples, proposal, weighting, beta, scale, backend, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=0, max_seqlen_k=0):
    scale = _scale_value(scale)
    if api._degenerate(q, k, v):
        return api._empty_result(q, k, v, q_landmarks, k_landmarks)
    with _no_autocast(q.device):
        return api.run_lara(q, k, v, eps, backend, num_samples=num_samples, proposal=proposal,
                            weighting=weighting, beta=beta, scale=scale, key_padding_mask=key_padding_mask,
                            query_padding_mask=query_padding_mask, q_landmarks=q_landmarks,
                            k_landmarks=k_landmarks,
                            **_packed_options(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


@torch.library.custom_op("lara_kernels::lara_attention", mutates_args=())
def _lara_op(q: Tensor, k: Tensor, v: Tensor, eps: Optional[Tensor],
             key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor],
             q_landmarks: Optional[Tensor], k_landmarks: Optional[Tensor], num_samples: int,
             proposal: str, weighting: str, beta: float, scale: Tensor, backend: str,
             cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
             max_seqlen_k: int = 0) -> Tensor:
    y = _run_lara(q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
                  num_samples, proposal, weighting, beta, scale, backend, cu_seqlens_q, cu_seqlens_k,
                  max_seqlen_q, max_seqlen_k)
    return y.detach().contiguous()


@_lara_op.register_fake
def _lara_op_fake(q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
                  num_samples, proposal, weighting, beta, scale, backend, cu_seqlens_q=None, cu_seqlens_k=None,
                  max_seqlen_q=0, max_seqlen_k=0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))      # (B, H, N, Dv), or packed (T, H, Dv)


@torch.library.custom_op("lara_kernels::lara_attention_backward", mutates_args=())
def _lara_bwd_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, eps: Optional[Tensor],
                 key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor],
                 q_landmarks: Optional[Tensor], k_landmarks: Optional[Tensor], num_samples: int,
                 proposal: str, weighting: str, beta: float, scale: Tensor,
                 backend: str, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                 max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    def run(q_, k_, v_, ql_, kl_):
        return _run_lara(q_, k_, v_, eps, key_padding_mask, query_padding_mask, ql_, kl_,
                         num_samples, proposal, weighting, beta, scale, backend, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k)

    gq, gk, gv, gql, gkl = _vjp(run, grad, [q, k, v, q_landmarks, k_landmarks])
    return gq, gk, gv, gql, gkl


@_lara_bwd_op.register_fake
def _lara_bwd_fake(grad, q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
                   num_samples, proposal, weighting, beta, scale, backend, cu_seqlens_q=None, cu_seqlens_k=None,
                   max_seqlen_q=0, max_seqlen_k=0):
    # contiguous, as the implementation returns them
    gql = q_landmarks.new_empty(q_landmarks.shape) if q_landmarks is not None else q.new_empty(0)
    gkl = k_landmarks.new_empty(k_landmarks.shape) if k_landmarks is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gql, gkl


_bwd, _ctx = _double_backward_error("lara_kernels::lara_attention")
_lara_bwd_op.register_autograd(_bwd, setup_context=_ctx)

_LARA_STATIC = ("num_samples", "proposal", "weighting", "beta", "scale", "backend", "cu_seqlens_q",
                "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _lara_setup_context(ctx, inputs, output):
    (q, k, v, eps, kpm, qpm, ql, kl, num_samples, proposal, weighting, beta, scale, backend,
     cu_q, cu_k, max_q, max_k) = tuple(inputs) + (None, None, 0, 0)[len(inputs) - 14:]
    ctx.save_for_backward(q, k, v, eps, kpm, qpm, ql, kl, scale, cu_q, cu_k)
    ctx.options = (num_samples, proposal, weighting, beta)
    ctx.backend = backend
    ctx.max_seqlens = (max_q, max_k)


def _lara_backward(ctx, grad):
    q, k, v, eps, kpm, qpm, ql, kl, scale, cu_q, cu_k = ctx.saved_tensors
    static = ctx.options + (scale, ctx.backend, cu_q, cu_k) + ctx.max_seqlens
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True on an eager call of the op: a differentiable backward
        def run(q_, k_, v_, ql_, kl_):
            return _run_lara(q_, k_, v_, eps, kpm, qpm, ql_, kl_, *static)

        gq, gk, gv, gql, gkl = _differentiable_vjp(run, grad, [q, k, v, ql, kl])
    else:
        gq, gk, gv, gql, gkl = torch.ops.lara_kernels.lara_attention_backward(
            grad, q, k, v, eps, kpm, qpm, ql, kl, *static)
    return (gq, gk, gv, None, None, None,
            gql if ql is not None else None, gkl if kl is not None else None) + (None,) * len(_LARA_STATIC)


_lara_op.register_autograd(_lara_backward, setup_context=_lara_setup_context)


def lara_attention_op(q: Tensor, k: Tensor, v: Tensor, *, num_samples: int = 64, proposal: str = "segment",
                      weighting: str = "optimal", beta: float = 1.0, scale: Optional[float] = None,
                      training: bool = False, generator: Optional[torch.Generator] = None,
                      key_padding_mask: Optional[Tensor] = None, query_padding_mask: Optional[Tensor] = None,
                      padding_mask: Optional[Tensor] = None, q_landmarks: Optional[Tensor] = None,
                      k_landmarks: Optional[Tensor] = None, backend: str = "auto",
                      check_finite: bool = False, enable_gqa: bool = False) -> Tensor:
    """:func:`lara_kernels.lara_attention` through the custom op (same arguments, checks,
    autocast casts, eps draw and result); use it in code that ``torch.compile(fullgraph=True)``
    traces. ``generator`` works under ``torch.compile`` (see the module doc: the draw is the
    op ``lara_kernels::randn``, identical to eager's). ``check_finite`` as in
    :func:`lara_kernels.lara_attention`.

    ``scale`` reaches the op as a 0-d float64 tensor, so under ``torch.compile`` a scale
    that changes between calls reuses the compiled graph (after dynamo's one recompile
    that makes a changing float symbolic) instead of recompiling for every value; its
    value is checked when the op runs."""
    q, k, v, q_landmarks, k_landmarks = api._autocast_inputs(q, k, v, q_landmarks, k_landmarks)
    api._check_qkv(q, k, v, enable_gqa)
    B, H, N, D = q.shape
    M = k.shape[2]
    C = api._check_int("num_samples", num_samples, 1)
    proposal = api._check_choice("proposal", proposal, api.PROPOSALS)
    weighting = api._check_choice("weighting", weighting, api.WEIGHTINGS)
    beta = _check_float("beta", beta)
    scale_t = _scale_tensor(scale, D)
    training = api._check_bool("training", training)
    generator = api._check_generator(generator, q.device)
    key_padding_mask, query_padding_mask = api._resolve_padding(
        padding_mask, key_padding_mask, query_padding_mask, B, N, M, q.device, "lara")
    q_landmarks = api._check_landmarks("q_landmarks", q_landmarks, q, C)
    k_landmarks = api._check_landmarks("k_landmarks", k_landmarks, q, C)
    api._check_landmarks_used(proposal, k_landmarks)
    backend = api._check_backend(backend)
    api._check_finite(check_finite, q, k, v, q_landmarks=q_landmarks, k_landmarks=k_landmarks,
                      key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, scale=scale)
    eps = None
    if training and not api._degenerate(q, k, v):
        eps = draw_normal((B, H, C, D), generator, q.device)
    return torch.ops.lara_kernels.lara_attention(
        q, k, v, eps, key_padding_mask, query_padding_mask, q_landmarks, k_landmarks,
        C, proposal, weighting, beta, scale_t, backend)


def lara_attention_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                             max_seqlen_q: int, max_seqlen_k: int, eps: Optional[Tensor], *, num_samples: int,
                             proposal: str, weighting: str, beta: float, scale: float,
                             q_landmarks: Optional[Tensor], k_landmarks: Optional[Tensor], backend: str) -> Tensor:
    """The op ``lara_kernels::lara_attention`` on a checked packed batch: what
    :func:`lara_kernels.lara_attention_varlen` runs under ``torch.compile`` (one opaque op,
    no graph break; the offsets' values are checked by ``lara_kernels::check_offsets``)."""
    return torch.ops.lara_kernels.lara_attention(
        q, k, v, eps, None, None, q_landmarks, k_landmarks, num_samples, proposal, weighting, beta,
        _scale_tensor(scale, q.shape[-1]), backend, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


# ---------------------------------------------------------------- RFA with given features

def _run_rfa(q, k, v, w, key_padding_mask, query_padding_mask, scale, backend, cu_seqlens_q=None,
             cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    scale = _scale_value(scale)
    if api._degenerate(q, k, v):
        return api._empty_result(q, k, v)
    options = dict(scale=scale, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
                   **_packed_options(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    with _no_autocast(q.device):
        impl = dispatch.select("rfa", backend, q, k, v, num_samples=w.shape[2], **options)
        return impl.rfa(q, k, v, w, **options)


@torch.library.custom_op("lara_kernels::rfa_attention", mutates_args=())
def _rfa_op(q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor],
            query_padding_mask: Optional[Tensor], scale: Tensor, backend: str,
            cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: int = 0,
            max_seqlen_k: int = 0) -> Tensor:
    return _run_rfa(q, k, v, w, key_padding_mask, query_padding_mask, scale, backend, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k).detach().contiguous()


@_rfa_op.register_fake
def _rfa_op_fake(q, k, v, w, key_padding_mask, query_padding_mask, scale, backend, cu_seqlens_q=None,
                 cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))      # (B, H, N, Dv), or packed (T, H, Dv)


@torch.library.custom_op("lara_kernels::rfa_attention_backward", mutates_args=())
def _rfa_bwd_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Optional[Tensor],
                query_padding_mask: Optional[Tensor], scale: Tensor,
                backend: str, cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    def run(q_, k_, v_):
        return _run_rfa(q_, k_, v_, w, key_padding_mask, query_padding_mask, scale, backend, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    gq, gk, gv = _vjp(run, grad, [q, k, v])
    return gq, gk, gv


@_rfa_bwd_op.register_fake
def _rfa_bwd_fake(grad, q, k, v, w, key_padding_mask, query_padding_mask, scale, backend, cu_seqlens_q=None,
                  cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_bwd, _ctx = _double_backward_error("lara_kernels::rfa_attention")
_rfa_bwd_op.register_autograd(_bwd, setup_context=_ctx)


def _rfa_setup_context(ctx, inputs, output):
    q, k, v, w, kpm, qpm, scale, backend, cu_q, cu_k, max_q, max_k = tuple(inputs) + (None, None, 0, 0)[len(inputs) - 8:]
    ctx.save_for_backward(q, k, v, w, kpm, qpm, scale, cu_q, cu_k)
    ctx.backend = backend
    ctx.max_seqlens = (max_q, max_k)


def _rfa_backward(ctx, grad):
    q, k, v, w, kpm, qpm, scale, cu_q, cu_k = ctx.saved_tensors
    packed = (cu_q, cu_k) + ctx.max_seqlens
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        def run(q_, k_, v_):
            return _run_rfa(q_, k_, v_, w, kpm, qpm, scale, ctx.backend, *packed)

        gq, gk, gv = _differentiable_vjp(run, grad, [q, k, v])
    else:
        gq, gk, gv = torch.ops.lara_kernels.rfa_attention_backward(grad, q, k, v, w, kpm, qpm, scale, ctx.backend,
                                                                   *packed)
    return (gq, gk, gv) + (None,) * 9


_rfa_op.register_autograd(_rfa_backward, setup_context=_rfa_setup_context)


def rfa_attention_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, w: Tensor, *, scale: float, backend: str) -> Tensor:
    """The op ``lara_kernels::rfa_attention`` on a checked packed batch with features ``w``
    (B, H, S, D): what :func:`lara_kernels.rfa_attention_varlen` runs under ``torch.compile``."""
    return torch.ops.lara_kernels.rfa_attention(q, k, v, w, None, None, _scale_tensor(scale, q.shape[-1]), backend,
                                                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def rfa_features(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, scale: Optional[float] = None,
                 key_padding_mask: Optional[Tensor] = None, query_padding_mask: Optional[Tensor] = None,
                 backend: str = "auto", enable_gqa: bool = False) -> Tensor:
    """RFA / Performer attention with the given features ``w`` (B, H, S, D), float32.

    :func:`lara_kernels.rfa_attention` draws ``w`` itself; this takes it, for a layer that
    keeps one fixed set of features in evaluation. Eager: the selected backend with its
    own autograd; under ``torch.compile``: the op ``lara_kernels::rfa_attention``. Same
    checks and autocast casts as the function (``enable_gqa`` included).
    """
    q, k, v = api._autocast_inputs(q, k, v)
    api._check_qkv(q, k, v, enable_gqa)
    B, H, N, D = q.shape
    M = k.shape[2]
    if not isinstance(w, Tensor) or tuple(w.shape[:2]) != (B, H) or w.dim() != 4 or w.shape[3] != D:
        raise ValueError(f"w must be a tensor of shape (B, H, S, D) = ({B}, {H}, S, {D}), got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    scale = _scale_tensor(scale, D)
    key_padding_mask = api._check_mask("key_padding_mask", key_padding_mask, B, M, "M", q.device)
    query_padding_mask = api._check_mask("query_padding_mask", query_padding_mask, B, N, "N", q.device)
    backend = api._check_backend(backend)
    if not torch.compiler.is_compiling():
        return _run_rfa(q, k, v, w, key_padding_mask, query_padding_mask, scale, backend)
    return torch.ops.lara_kernels.rfa_attention(q, k, v, w, key_padding_mask, query_padding_mask, scale, backend)
