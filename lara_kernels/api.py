"""Public functions: check inputs, fill defaults, draw the randomness, dispatch.

Layout (B, H, N, D) as in ``torch.nn.functional.scaled_dot_product_attention``.
The randomness (LARA's eps, RFA's features) is drawn here, once, in float32 with the
caller's generator, and handed to whichever backend runs, so every backend computes the
same function of the same inputs (docs/math.md section 3).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import NamedTuple, Optional

import torch

from . import dispatch

PROPOSALS = ("segment", "mixed", "attend")
WEIGHTINGS = ("optimal", "balance")
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _shape(t):
    return tuple(t.shape)


def _autocast_inputs(*tensors):
    """Cast as ``scaled_dot_product_attention`` is cast under ``torch.autocast``.

    SDPA is on autocast's lower-precision list: while autocast is enabled for the first
    tensor's device type, every floating tensor that is not float64 is cast to the
    autocast dtype (so float32 and mixed float32/half inputs run, and return, in that
    dtype); float64 tensors and ``None`` pass through unchanged. Outside autocast the
    tensors are returned as they are. The backends then run with autocast disabled, so
    their internal float32 (or float64) accumulation is not cast down.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors
    dev = first.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except RuntimeError:          # a device type autocast does not know (meta, ...)
        return tensors
    if not enabled:
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


_NULL_CONTEXT = contextlib.nullcontext()


def _no_autocast(device):
    """Autocast off for the backend run. Where autocast is already off for the device type
    (or unknown to it, like meta) nothing needs turning off: a shared no-op context, which
    spares a small call the ~4 us of entering and leaving ``torch.autocast``."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return _NULL_CONTEXT
    return torch.autocast(device.type, enabled=False) if enabled else _NULL_CONTEXT


def _check_qkv(q, k, v, enable_gqa=False, packed=False):
    """Shapes, dtypes and devices of q, k, v: (B, H, L, D) as in SDPA, or packed (T, H, D)
    rows of a varlen batch; with ``enable_gqa``, k and v may have H_kv heads, H_kv dividing H."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if packed and t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total rows T, H, D) like flash_attn_varlen_func, got shape "
                             f"{_shape(t)}")
        if not packed and t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D) like scaled_dot_product_attention, got shape {_shape(t)}")
        if t.dtype not in _FLOATS:
            raise TypeError(
                f"{name} must be float64, float32, float16 or bfloat16, got {t.dtype}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; q, k and v must share one device")
        if not packed and t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} (shape {_shape(t)}) but q has {q.shape[0]} (shape {_shape(q)})")
    _check_heads(q.shape[1], k, v, enable_gqa)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k has head dim {k.shape[-1]} (shape {_shape(k)}) but q has {q.shape[-1]} (shape {_shape(q)})")
    lk, lv = (k.shape[0], v.shape[0]) if packed else (k.shape[2], v.shape[2])
    if lv != lk:
        raise ValueError(f"k has {lk} keys (shape {_shape(k)}) but v has {lv} (shape {_shape(v)}); their lengths must agree")
    if q.shape[-1] == 0:
        raise ValueError(f"head dim must be >= 1, got q of shape {_shape(q)}")


def _check_heads(H, k, v, enable_gqa):
    """Head counts: k and v equal to q's H, or with ``enable_gqa`` one count H_kv dividing H
    (grouped-query attention, as SDPA's ``enable_gqa``)."""
    _check_bool("enable_gqa", enable_gqa)
    if not enable_gqa:
        for name, t in (("k", k), ("v", v)):
            if t.shape[1] != H:
                raise ValueError(f"{name} has {t.shape[1]} heads (shape {_shape(t)}) but q has {H}; for grouped-query "
                                 "attention (k and v with fewer heads than q) pass enable_gqa=True")
        return
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v has {v.shape[1]} heads (shape {_shape(v)}) but k has {k.shape[1]} (shape {_shape(k)}); "
                         "k and v must have the same number of heads")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"enable_gqa=True needs the key/value head count to divide the query head count, got "
                         f"{Hkv} key/value heads (shape {_shape(k)}) and {H} query heads")


def _check_mask(name, mask, B, L, what, device):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape (B, {what}) or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = padding, as in nn.MultiheadAttention), got dtype {mask.dtype}")
    if _shape(mask) != (B, L):
        raise ValueError(f"{name} must have shape (B, {what}) = ({B}, {L}), got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but q is on {device}")
    return mask


def _check_unsupported(is_causal, attn_mask, dropout_p):
    if is_causal is not False:
        raise NotImplementedError(
            f"is_causal={is_causal!r} is not supported: LARA's landmarks and proposals summarize the whole "
            "sequence, so the method is non-causal (use scaled_dot_product_attention for causal attention)"
        )
    if attn_mask is not None:
        raise NotImplementedError(
            "attn_mask is not supported: pass key_padding_mask (B, M) and/or query_padding_mask (B, N), "
            f"bool with True = padding (got attn_mask of type {type(attn_mask).__name__})"
        )
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p!r} is not supported; apply dropout to the output instead")


def _check_int(name, value, minimum):
    if type(value) is int:     # the common case, without the slower abstract-class checks below
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_real(name, value, positive=False):
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return value


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _check_generator(generator, device):
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but q is on {device}")
    return generator


def _check_landmarks(name, lm, q, C, B=None):
    """Landmarks (B, H, num_samples, D) like q; ``B`` given for a packed q (T, H, D)."""
    if lm is None:
        return None
    if B is None:
        B, H, _, D = q.shape
    else:
        _, H, D = q.shape
    if not isinstance(lm, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B, H, num_samples, D) or None, got {type(lm).__name__}")
    if _shape(lm) != (B, H, C, D):
        raise ValueError(f"{name} must have shape (B, H, num_samples, D) = ({B}, {H}, {C}, {D}), got {_shape(lm)}")
    if lm.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {lm.dtype} but q has {q.dtype}")
    if lm.device != q.device:
        raise ValueError(f"{name} is on {lm.device} but q is on {q.device}")
    return lm


def _check_scale(scale, D):
    if scale is None:
        return D ** -0.5
    return _check_real("scale", scale, positive=True)


def _check_backend(backend):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in dispatch._REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(dispatch.backends())}, got {backend!r}")
    return backend


class _ZeroOutput(torch.autograd.Function):
    """Zeros of the output's shape (B, H, N, Dv), for degenerate shapes (N, M or Dv = 0).

    Connected to the inputs for autograd with gradients that are exactly 0: never
    ``0 * x``, which is NaN where x holds inf. Works under double backward, torch.func
    and torch.compile (a pure function of the shapes).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, q_landmarks, k_landmarks):
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.like = [None if t is None else (t.shape, t.dtype, t.device) for t in inputs]

    @staticmethod
    def backward(ctx, grad):
        return tuple(None if m is None else torch.zeros(m[0], dtype=m[1], device=m[2]) for m in ctx.like)

    @staticmethod
    def jvp(ctx, *tangents):
        shape, dtype, device = ctx.like[0]
        return torch.zeros(shape[:-1] + (ctx.like[2][0][-1],), dtype=dtype, device=device)


def _degenerate(q, k, v):
    """No query, no key, or no value feature: the output is all zeros (docs/math.md,
    Degenerate shapes). Either layout: (B, H, L, D) or packed (T, H, D)."""
    return math.prod(q.shape[:-1]) == 0 or math.prod(k.shape[:-1]) == 0 or v.shape[-1] == 0


def _empty_result(q, k, v, q_landmarks=None, k_landmarks=None):
    """Zeros of the output's shape, connected to the inputs for autograd (zero gradients)."""
    return _ZeroOutput.apply(q, k, v, q_landmarks, k_landmarks)


_WARNED = set()


def _warn_once(key, message):
    """A warning shown once per process for each ``key`` (``_WARNED.clear()`` re-arms them)."""
    if key in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def _resolve_padding(padding_mask, key_padding_mask, query_padding_mask, B, N, M, device, op):
    """``padding_mask`` (self-attention) -> (key_padding_mask, query_padding_mask), checked."""
    if padding_mask is not None:
        if key_padding_mask is not None or query_padding_mask is not None:
            given = [n for n, m in (("key_padding_mask", key_padding_mask),
                                    ("query_padding_mask", query_padding_mask)) if m is not None]
            raise ValueError(f"padding_mask sets both key_padding_mask and query_padding_mask; do not also pass "
                             f"{' and '.join(given)}")
        if N != M:
            raise ValueError(f"padding_mask is for self-attention (as many queries as keys), got N={N} queries and "
                             f"M={M} keys; pass key_padding_mask (B, M) and query_padding_mask (B, N) instead")
        padding_mask = _check_mask("padding_mask", padding_mask, B, N, "N", device)
        return padding_mask, padding_mask
    key_padding_mask = _check_mask("key_padding_mask", key_padding_mask, B, M, "M", device)
    query_padding_mask = _check_mask("query_padding_mask", query_padding_mask, B, N, "N", device)
    if op == "lara" and key_padding_mask is not None and query_padding_mask is None and N == M:
        _warn_once("key-mask-only", (
            "lara_attention got key_padding_mask but no query_padding_mask with N == M: padded query rows "
            "still enter the query landmarks, so the valid outputs depend on the amount of padding. For "
            "self-attention pass padding_mask=mask (it sets both masks; the lara_kernels.nn layers do this "
            "when called with query is key); otherwise pass query_padding_mask explicitly, all False if the "
            "queries have no padding (this warning is shown once)"))
    return key_padding_mask, query_padding_mask


# Range within which every backend's result is finite (docs/math.md, Numeric range): every
# logit the passes form (w . kh, |kh|^2 / 2, g, Z - rho, t, L, and their differences) is
# at most 21 R^2 in size, R^2 the largest scale * |x|^2 over the valid rows x of q, k
# and given landmarks (|mu|, |w| <= 2R up to eps). RANGE_DIVISOR = 64 keeps a margin of 3x.
RANGE_DIVISOR = 64.0


def range_bound(dtype: torch.dtype) -> float:
    """Largest ``scale * |x|^2`` (x a valid row of q, k or given landmarks) with finite results:
    ``finfo(compute dtype).max / 64``, float32 for float32/float16/bfloat16 inputs."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.finfo(ct).max / RANGE_DIVISOR


def grad_range_bound(dtype: torch.dtype) -> float:
    """Largest ``scale * |x|^2`` with finite first-order gradients when the values and the
    incoming gradient are of order 1: ``finfo(compute dtype).max ** (2/3) / 64``. The
    backward forms products up to the cube of the row norms times |v| |dy| (the "attend"
    proposal's mean keys are themselves values), so its range is the output range's 2/3
    power. Not checked by ``check_finite``, which guards the outputs."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.finfo(ct).max ** (2.0 / 3.0) / RANGE_DIVISOR


def _first_index(bad, shape):
    flat = int(bad.reshape(-1).to(torch.uint8).argmax())          # argmax: the first maximum
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _check_finite_values(q, k, v, q_landmarks, k_landmarks, key_padding_mask, query_padding_mask, scale=None):
    """Raise ValueError if q, k, v or the landmarks hold NaN or +-inf at a valid position,
    or a valid row x of q, k or the landmarks has ``scale * |x|^2`` above :func:`range_bound`.

    Positions marked True (padding) in query_padding_mask (rows of q) or key_padding_mask
    (rows of k and v) are not looked at. A screen first: the sum of each row is finite
    unless the row holds a non-finite value (or the sum overflows), one device
    synchronization for all tensors; only a tensor that fails it is counted element by
    element. "first" is the first bad element in row-major order of the argument's shape.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    bound = range_bound(q.dtype)
    items = (("q", q, query_padding_mask, True), ("k", k, key_padding_mask, True), ("v", v, key_padding_mask, False),
             ("q_landmarks", q_landmarks, None, True), ("k_landmarks", k_landmarks, None, True))
    screened = []
    for name, t, pad, ranged in items:
        if t is None or t.numel() == 0 or t.device.type == "meta":   # meta: no values to check
            continue
        ct = torch.float64 if t.dtype == torch.float64 else torch.float32
        x = t.detach()
        rows = x.sum(-1, dtype=ct)                                    # (B, H, L)
        if pad is not None:
            rows = rows.masked_fill(pad[:, None, :], 0)
        ok = torch.isfinite(rows).all()
        big = None
        if ranged:
            sq = x.to(ct).pow(2).sum(-1) * scale                      # (B, H, L), inf if it overflows
            if pad is not None:
                sq = sq.masked_fill(pad[:, None, :], 0)
            big = sq > bound
            ok = ok & ~big.any()
        screened.append((name, t, pad, ok, big, sq if ranged else None))
    if not screened:
        return
    passed = torch.stack([item[3] for item in screened]).tolist()
    for (name, t, pad, _, big, sq), ok in zip(screened, passed):
        if ok:
            continue
        bad = ~torch.isfinite(t.detach())
        if pad is not None:
            bad.masked_fill_(pad[:, None, :, None], False)
        n = int(bad.sum())
        if n > 0:
            index = _first_index(bad, t.shape)
            value = float(t[index].item())
            raise ValueError(
                f"check_finite: {name} has {n} non-finite value{'s' if n != 1 else ''} (first {value} at index {index})"
            )
        if big is not None and bool(big.any()):
            rows = int(big.sum())
            index = _first_index(big, big.shape)
            ct = "float64" if t.dtype == torch.float64 else "float32"
            raise ValueError(
                f"check_finite: {name} has {rows} row{'s' if rows != 1 else ''} outside the range where results are "
                f"finite: scale * |{name}[{', '.join(map(str, index))}]|^2 = {float(sq[index]):.3g} > "
                f"{bound:.3g} (finfo({ct}).max / {RANGE_DIVISOR:g}, docs/math.md 'Numeric range'); rescale the "
                f"inputs or compute in float64"
            )


@torch.library.custom_op("lara_kernels::check_finite", mutates_args=())
def _check_finite_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_landmarks: Optional[torch.Tensor],
                     k_landmarks: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                     query_padding_mask: Optional[torch.Tensor], scale: float) -> None:
    _check_finite_values(q, k, v, q_landmarks, k_landmarks, key_padding_mask, query_padding_mask, scale)


@_check_finite_op.register_fake
def _check_finite_fake(q, k, v, q_landmarks, k_landmarks, key_padding_mask, query_padding_mask, scale):
    return None


def _keep_in_compiled_graphs(op):
    """Mark an op that returns nothing as a side effect, or torch.compile drops it as dead code."""
    try:                                       # torch's way for ops (private API, recent torch)
        from torch._library.effects import EffectType

        torch.library._register_effectful_op(op, EffectType.ORDERED)
        return True
    except (ImportError, AttributeError):
        pass
    has_side_effect = getattr(torch.fx.node, "has_side_effect", None)
    if has_side_effect is not None:
        has_side_effect(op)
        return True
    return False


_CHECK_KEPT_WHEN_COMPILED = _keep_in_compiled_graphs(torch.ops.lara_kernels.check_finite.default)


def _check_finite(check_finite, q, k, v, *, q_landmarks=None, k_landmarks=None, key_padding_mask=None,
                  query_padding_mask=None, scale=None):
    """The opt-in ``check_finite`` of the public functions, on checked arguments."""
    if not _check_bool("check_finite", check_finite):
        return
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, q_landmarks, k_landmarks, key_padding_mask, query_padding_mask, scale)
    if not torch.compiler.is_compiling():
        _check_finite_values(*args)
    elif _CHECK_KEPT_WHEN_COMPILED:
        # The values exist only when the compiled graph runs: an op registered as a side
        # effect, so the graph keeps it, raising the same ValueError then.
        torch.ops.lara_kernels.check_finite(*args)
    else:
        raise NotImplementedError(
            f"check_finite=True under torch.compile needs a torch that can mark an op as a side effect "
            f"(torch.library._register_effectful_op or torch.fx.node.has_side_effect; torch {torch.__version__} "
            "has neither); check the inputs outside the compiled region or pass check_finite=False"
        )


def lara_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_samples: int = 64,
    proposal: str = "segment",
    weighting: str = "optimal",
    beta: float = 1.0,
    scale: Optional[float] = None,
    training: bool = False,
    generator: Optional[torch.Generator] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    q_landmarks: Optional[torch.Tensor] = None,
    k_landmarks: Optional[torch.Tensor] = None,
    backend: str = "auto",
    is_causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    check_finite: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Linear randomized attention (LARA), as defined in docs/math.md.

    Args:
        q: (B, H, N, D) queries; k: (B, H, M, D) keys; v: (B, H, M, Dv) values. One
            floating dtype and one device for all three; any strides. Under
            ``torch.autocast`` they are cast as ``scaled_dot_product_attention``'s are:
            float32 (and mixed float32/half) inputs run and return in the autocast
            dtype, float64 is left alone. N, M or Dv = 0 give zeros of shape
            (B, H, N, Dv) with zero gradients.
        num_samples: C, the number of proposals/samples (and landmarks).
        proposal: ``"segment"`` (mu = qt + kt), ``"mixed"`` or ``"attend"``.
        weighting: ``"optimal"`` (query-specific MIS weights, Eq. 38) or ``"balance"``.
        beta: coefficient of the query term of the optimal weights.
        scale: logit scale s; default ``D ** -0.5`` as in SDPA.
        training: draw eps ~ N(0, I) (float32, shape (B, H, C, D)) from ``generator``
            and sample ``w = mu + eps``; if False, ``w = mu`` and the result is
            deterministic.
        key_padding_mask: (B, M) bool, True = padding. query_padding_mask: (B, N) bool.
            Padded query rows are 0; an element whose keys (or queries) are all padding
            gives 0 for all its rows. Queries enter the landmarks, so in self-attention
            pass ``padding_mask`` (B, N), which sets both; a key mask alone with N == M
            warns once, because padded queries would then shift the valid outputs.
        padding_mask: (B, N) bool for self-attention (N == M): the key and the query
            padding mask at once. Not together with the other two masks.
        q_landmarks, k_landmarks: optional (B, H, C, D) landmarks in q's units, replacing
            the segment means (gradients flow to them). ``proposal="attend"`` does not use
            key landmarks and rejects ``k_landmarks``.
        backend: ``"auto"`` or a registered name (see ``python -m lara_kernels.info``).
        is_causal, attn_mask, dropout_p: accepted for SDPA compatibility; anything but
            the defaults raises NotImplementedError.
        check_finite: if True, raise ValueError when q, k, v, q_landmarks or k_landmarks
            hold NaN or +-inf at a valid position (padded positions may hold anything),
            e.g. ``check_finite: k has 3 non-finite values (first nan at index (0, 1, 5,
            2))``. It reads every element and synchronizes with the device once. Under
            ``torch.compile`` it is the op ``lara_kernels::check_finite``, kept in the graph
            as a side effect, raising the same error when the compiled code runs. If False
            (default), nothing is checked, at no cost, and what non-finite values at valid
            positions give is not specified (NaN or inf in output rows, or an error from
            deeper down, such as the sampler of :func:`ra_attention`). It also rejects a
            valid row x of q, k or the landmarks with ``scale * |x|^2`` above
            :func:`range_bound` (``finfo.max / 64`` of the compute dtype: 5.3e36 for
            float32, float16 and bfloat16 inputs), the range within which every backend's
            result is guaranteed finite.
        enable_gqa: grouped-query attention, as in SDPA: k and v may have H_kv heads,
            H_kv dividing H; query head h uses key/value head ``h // (H // H_kv)``. k and
            v are read as they are (no repeated copy); their gradients sum over each
            group. The key landmarks are computed once per key/value head and shared by
            its group; samples, weights and the key statistics of each query head are its
            own (samples depend on the query landmarks).

    Returns:
        (B, H, N, Dv) in q's dtype.
    """
    a = checked_lara_args(q, k, v, num_samples=num_samples, proposal=proposal, weighting=weighting, beta=beta,
                          scale=scale, training=training, generator=generator, key_padding_mask=key_padding_mask,
                          query_padding_mask=query_padding_mask, padding_mask=padding_mask,
                          q_landmarks=q_landmarks, k_landmarks=k_landmarks, backend=backend, is_causal=is_causal,
                          attn_mask=attn_mask, dropout_p=dropout_p, check_finite=check_finite,
                          enable_gqa=enable_gqa)
    q, k, v = a.q, a.k, a.v
    if _degenerate(q, k, v):
        return _empty_result(q, k, v, a.q_landmarks, a.k_landmarks)
    B, H, _, D = q.shape
    eps = None
    if a.training:
        eps = torch.randn((B, H, a.num_samples, D), generator=a.generator, device=q.device, dtype=torch.float32)
    options = dict(num_samples=a.num_samples, proposal=a.proposal, weighting=a.weighting, beta=a.beta,
                   scale=a.scale, key_padding_mask=a.key_padding_mask, query_padding_mask=a.query_padding_mask,
                   q_landmarks=a.q_landmarks, k_landmarks=a.k_landmarks)
    with _no_autocast(q.device):   # (shapes checked non-degenerate above: run_lara's check is not repeated)
        return dispatch.select("lara", a.backend, q, k, v, **options).lara(q, k, v, eps, **options)


class LaraArgs(NamedTuple):
    """The arguments of :func:`lara_attention` after :func:`checked_lara_args`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_samples: int
    proposal: str
    weighting: str
    beta: float
    scale: float
    training: bool
    generator: Optional[torch.Generator]
    key_padding_mask: Optional[torch.Tensor]
    query_padding_mask: Optional[torch.Tensor]
    q_landmarks: Optional[torch.Tensor]
    k_landmarks: Optional[torch.Tensor]
    backend: str


def checked_lara_args(q, k, v, *, num_samples, proposal, weighting, beta, scale, training, generator,
                      key_padding_mask, query_padding_mask, padding_mask, q_landmarks, k_landmarks, backend,
                      is_causal, attn_mask, dropout_p, check_finite, enable_gqa=False) -> LaraArgs:
    """Every check and default of :func:`lara_attention`, in its order (autocast cast
    first, ``check_finite`` last), for the entry points that take its arguments (the
    function itself and ``lara_kernels.distributed``): one place for the sequence."""
    q, k, v, q_landmarks, k_landmarks = _autocast_inputs(q, k, v, q_landmarks, k_landmarks)
    _check_qkv(q, k, v, enable_gqa)
    _check_unsupported(is_causal, attn_mask, dropout_p)
    B, H, N, D = q.shape
    M = k.shape[2]
    C = _check_int("num_samples", num_samples, 1)
    proposal = _check_choice("proposal", proposal, PROPOSALS)
    weighting = _check_choice("weighting", weighting, WEIGHTINGS)
    beta = _check_real("beta", beta)
    scale = _check_scale(scale, D)
    training = _check_bool("training", training)
    generator = _check_generator(generator, q.device)
    key_padding_mask, query_padding_mask = _resolve_padding(
        padding_mask, key_padding_mask, query_padding_mask, B, N, M, q.device, "lara")
    q_landmarks = _check_landmarks("q_landmarks", q_landmarks, q, C)
    k_landmarks = _check_landmarks("k_landmarks", k_landmarks, q, C)
    _check_landmarks_used(proposal, k_landmarks)
    backend = _check_backend(backend)
    _check_finite(check_finite, q, k, v, q_landmarks=q_landmarks, k_landmarks=k_landmarks,
                  key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask, scale=scale)
    return LaraArgs(q, k, v, C, proposal, weighting, beta, scale, training, generator, key_padding_mask,
                    query_padding_mask, q_landmarks, k_landmarks, backend)


def _check_landmarks_used(proposal, k_landmarks):
    if proposal == "attend" and k_landmarks is not None:
        raise ValueError(
            "k_landmarks is not used by proposal='attend' (mu_c = qt_c + the attention of qt_c over the keys; "
            "docs/math.md section 2); pass k_landmarks=None, or use proposal='segment' or 'mixed'")


def run_lara(q, k, v, eps, backend, **options):
    """Select the backend for checked inputs and run it (shared with the custom op).

    Degenerate shapes (N, M or Dv = 0) give zeros without running a backend."""
    if _degenerate(q, k, v):
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    impl = dispatch.select("lara", backend, q, k, v, **options)
    return impl.lara(q, k, v, eps, **options)


def rfa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_samples: int = 64,
    scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    is_causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    check_finite: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """RFA / Performer attention with positive random features (docs/math.md, Relatives).

    Every call draws S = ``num_samples`` features ``w ~ N(0, I)`` as float32
    ``randn((B, H, S, D), generator=generator)``; for one fixed set, pass a generator in
    the same state. Same arguments and conventions as :func:`lara_attention` (autocast,
    masks, ``padding_mask``, degenerate shapes), including ``check_finite`` (on q, k and
    v) and ``enable_gqa``. RFA has no landmarks, so a key mask alone is enough in
    self-attention.
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_qkv(q, k, v, enable_gqa)
    _check_unsupported(is_causal, attn_mask, dropout_p)
    B, H, N, D = q.shape
    M = k.shape[2]
    S = _check_int("num_samples", num_samples, 1)
    scale = _check_scale(scale, D)
    generator = _check_generator(generator, q.device)
    key_padding_mask, query_padding_mask = _resolve_padding(
        padding_mask, key_padding_mask, query_padding_mask, B, N, M, q.device, "rfa")
    backend = _check_backend(backend)
    _check_finite(check_finite, q, k, v, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
                  scale=scale)
    if _degenerate(q, k, v):
        return _empty_result(q, k, v)
    w = torch.randn((B, H, S, D), generator=generator, device=q.device, dtype=torch.float32)
    with _no_autocast(q.device):
        return run_rfa(q, k, v, w, backend, scale=scale, key_padding_mask=key_padding_mask,
                       query_padding_mask=query_padding_mask)


def run_rfa(q, k, v, w, backend, **options):
    """Select the backend for checked inputs and run RFA (shared with the custom op)."""
    if _degenerate(q, k, v):
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    impl = dispatch.select("rfa", backend, q, k, v, num_samples=w.shape[2], **options)
    return impl.rfa(q, k, v, w, **options)


# ----------------------------------------------------------------------------- packed (varlen) batches


def _check_offsets(name, cu, rows, device):
    """``cu_seqlens_*``: a (B + 1,) int32 (or int64) tensor on q's device -> int32 contiguous."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a (B + 1,) int32 tensor of offsets, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (as in flash_attn_varlen_func) or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D of size B + 1 >= 1 (offsets, first 0, last the row count {rows}), "
                         f"got shape {_shape(cu)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if rows >= 2**31:
        raise ValueError(f"{name}: packed tensors of {rows} rows exceed the int32 offsets (at most 2**31 - 1 rows)")
    return cu.to(torch.int32).contiguous()


def check_offset_values(cu_q, cu_k, rows_q, rows_k, max_q, max_k):
    """The values of the offsets (one read of both to the host): first 0, non-decreasing,
    last the row count, and ``max_seqlen_*`` at least the longest length. Returns the
    (max_seqlen_q, max_seqlen_k) to use: the given ones, or the longest lengths."""
    both = torch.cat([cu_q, cu_k]).to("cpu", torch.int64)
    B1 = cu_q.shape[0]
    out = []
    for name, cu, rows, given, tensor in (("cu_seqlens_q", both[:B1], rows_q, max_q, "q"),
                                          ("cu_seqlens_k", both[B1:], rows_k, max_k, "k and v")):
        if int(cu[0]) != 0:
            raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
        lengths = cu[1:] - cu[:-1]
        if lengths.numel() and bool((lengths < 0).any()):
            i = int((lengths < 0).nonzero()[0])
            raise ValueError(f"{name} must be non-decreasing, got {name}[{i}] = {int(cu[i])} > "
                             f"{name}[{i + 1}] = {int(cu[i + 1])}")
        if int(cu[-1]) != rows:
            raise ValueError(f"{name}[-1] = {int(cu[-1])} must equal the number of rows of {tensor}, {rows}")
        longest = int(lengths.max()) if lengths.numel() else 0
        what = "max_seqlen_q" if tensor == "q" else "max_seqlen_k"
        if given is None:
            given = longest
        elif given < longest:
            i = int(lengths.argmax())
            raise ValueError(f"{what}={given} is less than the longest sequence of {name}, {longest} (sequence {i})")
        out.append(given)
    return tuple(out)


def assert_offsets_async(cu_q, cu_k, rows_q, rows_k, max_q, max_k):
    """The checks of :func:`check_offset_values` as device-side assertions (no host
    synchronization): first 0, non-decreasing, last the row count, lengths at most
    ``max_seqlen_*``."""
    for name, cu, rows, longest in (("cu_seqlens_q", cu_q, rows_q, max_q), ("cu_seqlens_k", cu_k, rows_k, max_k)):
        lengths = cu[1:] - cu[:-1]
        ok = (cu[0] == 0) & (cu[-1] == rows) & (lengths >= 0).all() & (lengths <= longest).all()
        what = "max_seqlen_q" if name == "cu_seqlens_q" else "max_seqlen_k"
        torch._assert_async(ok, f"{name} must start at 0, be non-decreasing and end at the row count {rows}, "
                                f"with lengths at most {what}={longest}")


@torch.library.custom_op("lara_kernels::check_offsets", mutates_args=())
def _check_offsets_op(cu_q: torch.Tensor, cu_k: torch.Tensor, rows_q: int, rows_k: int, max_q: int,
                      max_k: int) -> None:
    check_offset_values(cu_q, cu_k, rows_q, rows_k, max_q, max_k)


@_check_offsets_op.register_fake
def _check_offsets_fake(cu_q, cu_k, rows_q, rows_k, max_q, max_k):
    return None


_OFFSETS_KEPT_WHEN_COMPILED = _keep_in_compiled_graphs(torch.ops.lara_kernels.check_offsets.default)


def check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Checked (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a packed batch.

    Eager: the offsets' values are read once (one host synchronization, none for offsets
    on the CPU) and checked, and a missing ``max_seqlen_*`` is the longest length. With
    both ``max_seqlen_*`` given and the offsets on a GPU, they are checked on the device
    instead (``torch._assert_async``: no synchronization, capturable in a CUDA graph; a bad
    value stops the program with a device-side assertion). Under ``torch.compile`` both
    ``max_seqlen_*`` must be given (they size the kernels' grids, as in flash-attention),
    and the values are checked when the graph runs by the op ``lara_kernels::check_offsets``,
    kept in the graph as a side effect."""
    cu_q = _check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    cu_k = _check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"cu_seqlens_q has {cu_q.shape[0] - 1} sequences (shape {_shape(cu_q)}) but cu_seqlens_k has "
                         f"{cu_k.shape[0] - 1} (shape {_shape(cu_k)}); each sequence has its queries and its keys")
    max_q = None if max_seqlen_q is None else _check_int("max_seqlen_q", max_seqlen_q, 0)
    max_k = None if max_seqlen_k is None else _check_int("max_seqlen_k", max_seqlen_k, 0)
    if not torch.compiler.is_compiling():
        if cu_q.device.type != "cpu" and max_q is not None and max_k is not None:
            assert_offsets_async(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
        else:
            max_q, max_k = check_offset_values(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    else:
        if max_q is None or max_k is None:
            raise ValueError("under torch.compile pass max_seqlen_q and max_seqlen_k (ints, as in flash-attention): "
                             "reading them from the offsets would synchronize with the device and break the graph")
        if _OFFSETS_KEPT_WHEN_COMPILED:
            torch.ops.lara_kernels.check_offsets(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)
    return cu_q, cu_k, max_q, max_k


def lara_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    num_samples: int = 64,
    proposal: str = "segment",
    weighting: str = "optimal",
    beta: float = 1.0,
    scale: Optional[float] = None,
    training: bool = False,
    generator: Optional[torch.Generator] = None,
    q_landmarks: Optional[torch.Tensor] = None,
    k_landmarks: Optional[torch.Tensor] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """LARA on a packed batch of variable-length sequences (flash-attention's varlen layout).

    Args:
        q: (total_q, H, D) rows of B sequences back to back; k: (total_k, H_kv, D);
            v: (total_k, H_kv, Dv). H_kv = H, or with ``enable_gqa`` a divisor of H.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets: sequence b is rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``
            of k and v. First entry 0, non-decreasing, last the row count. A sequence may be
            empty; one with queries and no keys gives zeros, as a padded element with every
            key padded.
        max_seqlen_q, max_seqlen_k: ints at least the longest lengths (they size the GPU
            grids). None: read from the offsets. Required under ``torch.compile``.
        The other arguments as in :func:`lara_attention` (landmarks (B, H, num_samples, D),
        eps drawn as float32 ``randn((B, H, num_samples, D), generator=generator)``).

    Each sequence has its own landmarks, C_eff = min(num_samples, its query count, its key
    count) and key statistics: the rows of sequence b equal ``lara_attention`` on that
    sequence alone (with the b-th slice of eps and landmarks). The fused backends index the
    sequences by their offsets: no padded copy, no work on rows that do not exist.

    Eager calls read the offsets once to check them (one host synchronization); under
    ``torch.compile`` (give ``max_seqlen_*``) the check runs inside the graph.

    Returns:
        (total_q, H, Dv) in q's dtype.
    """
    q, k, v, q_landmarks, k_landmarks = _autocast_inputs(q, k, v, q_landmarks, k_landmarks)
    _check_qkv(q, k, v, enable_gqa, packed=True)
    T, H, D = q.shape
    C = _check_int("num_samples", num_samples, 1)
    proposal = _check_choice("proposal", proposal, PROPOSALS)
    weighting = _check_choice("weighting", weighting, WEIGHTINGS)
    beta = _check_real("beta", beta)
    scale = _check_scale(scale, D)
    training = _check_bool("training", training)
    generator = _check_generator(generator, q.device)
    cu_q, cu_k, max_q, max_k = check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    B = cu_q.shape[0] - 1
    q_landmarks = _check_landmarks("q_landmarks", q_landmarks, q, C, B)
    k_landmarks = _check_landmarks("k_landmarks", k_landmarks, q, C, B)
    _check_landmarks_used(proposal, k_landmarks)
    backend = _check_backend(backend)
    _check_finite(check_finite, q, k, v, q_landmarks=q_landmarks, k_landmarks=k_landmarks, scale=scale)
    if _degenerate(q, k, v) or B == 0:
        return _empty_result(q, k, v, q_landmarks, k_landmarks)
    if torch.compiler.is_compiling():   # one opaque op per call (lara_kernels._custom_ops)
        from . import _custom_ops

        eps = _custom_ops.draw_normal((B, H, C, D), generator, q.device) if training else None
        return _custom_ops.lara_attention_varlen_op(
            q, k, v, cu_q, cu_k, max_q, max_k, eps, num_samples=C, proposal=proposal, weighting=weighting, beta=beta,
            scale=scale, q_landmarks=q_landmarks, k_landmarks=k_landmarks, backend=backend)
    eps = None
    if training:
        eps = torch.randn((B, H, C, D), generator=generator, device=q.device, dtype=torch.float32)
    with _no_autocast(q.device):
        return run_lara(q, k, v, eps, backend, num_samples=C, proposal=proposal, weighting=weighting, beta=beta,
                        scale=scale, q_landmarks=q_landmarks, k_landmarks=k_landmarks, cu_seqlens_q=cu_q,
                        cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


def rfa_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    num_samples: int = 64,
    scale: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """RFA / Performer attention on a packed batch (layout and offsets as in
    :func:`lara_attention_varlen`). One draw of S = ``num_samples`` features per sequence
    and head: ``randn((B, H, S, D), generator=generator)``; the rows of sequence b equal
    ``rfa_attention`` on it alone with the b-th slice of the features.

    Returns:
        (total_q, H, Dv) in q's dtype.
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_qkv(q, k, v, enable_gqa, packed=True)
    T, H, D = q.shape
    S = _check_int("num_samples", num_samples, 1)
    scale = _check_scale(scale, D)
    generator = _check_generator(generator, q.device)
    cu_q, cu_k, max_q, max_k = check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    B = cu_q.shape[0] - 1
    backend = _check_backend(backend)
    _check_finite(check_finite, q, k, v, scale=scale)
    if _degenerate(q, k, v) or B == 0:
        return _empty_result(q, k, v)
    if torch.compiler.is_compiling():   # one opaque op per call (lara_kernels._custom_ops)
        from . import _custom_ops

        w = _custom_ops.draw_normal((B, H, S, D), generator, q.device)
        return _custom_ops.rfa_attention_varlen_op(q, k, v, cu_q, cu_k, max_q, max_k, w, scale=scale, backend=backend)
    w = torch.randn((B, H, S, D), generator=generator, device=q.device, dtype=torch.float32)
    with _no_autocast(q.device):
        return run_rfa(q, k, v, w, backend, scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                       max_seqlen_k=max_k)


def ra_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    biased: bool = False,
    scale: Optional[float] = None,
    training: bool = False,
    generator: Optional[torch.Generator] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    check_finite: bool = False,
) -> torch.Tensor:
    """Randomized attention (paper Section 3.2), quadratic: reference implementation only.

    Unbiased (default) is a sampler: every call draws one sample per query
    (``m* ~ Categorical(pi_n)`` and eps), whatever ``training`` says; the mean of many
    calls converges to softmax attention (Prop. 3.2). ``biased=True`` is Eq. 31, with
    eps drawn only when ``training``. ``check_finite`` as in :func:`lara_attention`.
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_qkv(q, k, v)
    _check_unsupported(is_causal, attn_mask, dropout_p)
    B, H, N, D = q.shape
    M = k.shape[2]
    biased = _check_bool("biased", biased)
    scale = _check_scale(scale, D)
    training = _check_bool("training", training)
    generator = _check_generator(generator, q.device)
    key_padding_mask, query_padding_mask = _resolve_padding(
        padding_mask, key_padding_mask, query_padding_mask, B, N, M, q.device, "ra")
    _check_finite(check_finite, q, k, v, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
                  scale=scale)
    if _degenerate(q, k, v):
        return _empty_result(q, k, v)
    from .reference import ra_reference

    with _no_autocast(q.device):
        return ra_reference(
            q, k, v, biased=biased, training=training, scale=scale, generator=generator,
            key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
        )
