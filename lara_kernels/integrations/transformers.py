"""LARA as a Hugging Face ``transformers`` attention implementation.

Usage::

    from lara_kernels.integrations.transformers import register
    register(num_samples=32)                                    # once per process
    model = AutoModel.from_pretrained(path, attn_implementation="lara")

``register(name="lara", **defaults)`` registers two functions under ``name``: the
attention function (``transformers.AttentionInterface``) and the mask function
(``transformers.masking_utils.AttentionMaskInterface``). Both are needed: a name known
only to the attention interface makes transformers build *no* mask at all, so padding
would be silently attended to.

Supported: encoder (bidirectional) models that call the attention interface, i.e. the
BERT family (BERT, RoBERTa, MiniLM, XLM-R, ELECTRA, ...) and the ViT family (ViT,
DeiT, ...), with any number of key/value heads (grouped-query models run with
``enable_gqa=True``: the shared k/v heads are read as they are, never repeated).
Tested with transformers 5.24.0; 5.0 or newer is required (``register`` checks).

Options. LARA's options are, in increasing priority: the library's defaults, the
keyword arguments of ``register``, and the model config's attribute ``lara_options``
(a dict), e.g.::

    config = AutoConfig.from_pretrained(path)
    config.lara_options = {"num_samples": 64, "proposal": "mixed"}
    model = AutoModel.from_pretrained(path, config=config, attn_implementation="lara")

or ``model.config.lara_options = {...}`` after loading (read at every call).
``from_pretrained(path, lara_options=...)`` does not work: transformers hands unknown
keywords to the model's constructor, not to the config. Keys: ``num_samples``,
``proposal``, ``weighting``, ``beta``, ``backend``, ``check_finite`` (as in
:func:`lara_kernels.lara_attention`), ``generator`` (a ``torch.Generator`` for the
training-mode draws; ``register`` only, a generator does not serialize) and
``attention_dropout``: ``"output"`` (default) or ``"none"``.

Behaviour, on purpose:

- Padding: transformers' 2-D ``attention_mask`` (1 = token, 0 = padding) becomes
  LARA's padding masks. In self-attention it is both the key and the query mask
  (``lara_attention(padding_mask=...)``), so a padded batch gives every sequence the
  result it gets alone; in cross-attention (a module whose class name contains
  ``CrossAttention``, or ``is_cross_attention=True``, or queries and keys of different
  lengths) it is the key mask only and every query is treated as valid. Masks made
  elsewhere and handed to the function as they are (4-D float masks with 0 and
  ``finfo.min`` or -inf, 4-D bool masks) are accepted when they are padding masks
  (every query row the same); any other mask (a causal, sliding-window or bias mask)
  raises NotImplementedError.
- Causal models (``config.is_decoder``, a module with ``is_causal=True``, a causal
  mask function) raise NotImplementedError: LARA is non-causal, and a causal model run
  bidirectionally would give wrong results without an error.
- ``output_attentions=True`` raises ValueError: LARA never forms the attention matrix.
- Dropout: transformers passes ``attention_probs_dropout_prob`` in training. LARA has
  no attention probabilities; with ``attention_dropout="output"`` the same rate is
  applied to the attention output (per head, before the output projection), as
  :class:`lara_kernels.nn.LaraAttention` does; ``"none"`` ignores it. In ``eval()``
  nothing is dropped either way.
- Randomness: in training mode (``model.train()``) every call draws fresh samples
  (``training=True``); in ``eval()`` the result is deterministic.
- ``scaling`` (the model's logit scale) is passed as ``scale``. Sliding windows,
  soft-capping and attention sinks raise NotImplementedError.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..api import lara_attention

try:
    import transformers as _tf
    from transformers import AttentionInterface as _AttentionInterface
    from transformers import masking_utils as _masking
except ImportError as e:      # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lara_kernels.integrations.transformers needs the 'transformers' package "
        "(pip install 'lara-kernels[transformers]')") from e

__all__ = ["register", "lara_attention_forward", "lara_mask", "OPTIONS", "CONFIG_ATTRIBUTE"]

CONFIG_ATTRIBUTE = "lara_options"
OPTIONS = ("num_samples", "proposal", "weighting", "beta", "backend", "check_finite", "generator",
           "attention_dropout")
_DROPOUT_MODES = ("output", "none")
_MIN_VERSION = (5, 0)

# name -> the defaults given to register()
_REGISTERED: dict = {}


def _version_tuple(v: str):
    parts = []
    for p in v.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _check_options(options: dict, where: str) -> dict:
    if not isinstance(options, dict):
        raise TypeError(f"{where} must be a dict of LARA options, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{where} has unknown LARA option(s) {unknown}; the options are {list(OPTIONS)}")
    mode = options.get("attention_dropout", "output")
    if mode not in _DROPOUT_MODES:
        raise ValueError(f"attention_dropout must be one of {_DROPOUT_MODES}, got {mode!r} (in {where})")
    gen = options.get("generator")
    if gen is not None and not isinstance(gen, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(gen).__name__} (in {where})")
    return dict(options)


def register(name: str = "lara", **defaults) -> str:
    """Register LARA with transformers under ``name``; returns ``name``.

    ``defaults``: LARA options (see the module doc) for every model using ``name``; a
    model's ``config.lara_options`` overrides them key by key. Registering the same name
    again replaces its defaults.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if _version_tuple(_tf.__version__) < _MIN_VERSION:
        raise ImportError(
            f"lara_kernels.integrations.transformers needs transformers >= "
            f"{'.'.join(map(str, _MIN_VERSION))}, found {_tf.__version__}")
    if name in ("eager", "sdpa", "flex_attention") or name.startswith("flash_attention") or name.startswith("paged"):
        raise ValueError(f"name={name!r} is one of transformers' own implementations; pick another name")
    defaults = _check_options(defaults, "register()'s options")

    def attention(module, query, key, value, attention_mask, **kwargs):
        return lara_attention_forward(module, query, key, value, attention_mask, _defaults=defaults, **kwargs)

    attention.__name__ = attention.__qualname__ = f"lara_attention_forward[{name}]"
    _AttentionInterface.register(name, attention)
    _masking.AttentionMaskInterface.register(name, lara_mask)
    _REGISTERED[name] = defaults
    return name


def _is_causal_function(fn) -> bool:
    return fn is getattr(_masking, "causal_mask_function", None) or fn is getattr(
        _masking, "sliding_window_causal_mask_function", None)


def lara_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """The mask function registered with ``register``: transformers' mask -> a padding mask.

    Returns None (no padding) or a bool tensor (batch, 1, 1, kv_length), True = attend
    (SDPA's convention, so it also broadcasts as a key mask anywhere a 4-D bool mask is
    expected). Refuses causal and other structured masks: only padding is LARA's.
    """
    bidir = getattr(_masking, "bidirectional_mask_function", None)
    if mask_function is not None and mask_function is not bidir:
        if _is_causal_function(mask_function):
            raise NotImplementedError(
                "attn_implementation='lara' cannot run a causal (decoder) model: LARA is non-causal, and "
                "running the model bidirectionally would give wrong results; use 'sdpa' for this model")
        # Another pattern (or/and mask functions): accept it only if it masks nothing.
        full = _masking.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                  q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                  attention_mask=None, allow_is_causal_skip=False,
                                  allow_is_bidirectional_skip=True, use_vmap=kwargs.get("use_vmap", False),
                                  device=attention_mask.device if attention_mask is not None else "cpu")
        if full is not None and not bool(full.all()):
            raise NotImplementedError(
                "attn_implementation='lara' got a structured attention mask (not a padding mask); LARA "
                "supports padding masks only")
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)
    if keep.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, length), got shape {tuple(keep.shape)}")
    keep = keep[:, kv_offset:kv_offset + kv_length]
    if keep.shape != (batch_size, kv_length):
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover "
                         f"(batch, kv_length) = ({batch_size}, {kv_length})")
    if bool(keep.all()):
        return None
    return keep[:, None, None, :]


def _key_padding(mask: Optional[torch.Tensor], B: int, N: int, M: int) -> Optional[torch.Tensor]:
    """Any mask transformers may hand over -> bool (B, M), True = padding, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(
            f"attn_implementation='lara' got an attention mask of type {type(mask).__name__} (a BlockMask or "
            "another object); it takes padding masks as tensors only")
    if mask.dim() == 2:
        keep = mask.to(torch.bool)
        if keep.shape != (B, M):
            raise ValueError(f"a 2-D attention mask must have shape (batch, keys) = ({B}, {M}), got "
                             f"{tuple(mask.shape)}")
        return ~keep
    if mask.dim() != 4:
        raise ValueError(f"attention mask must be 2-D or 4-D, got shape {tuple(mask.shape)}")
    b, _, n, m = mask.shape
    if b not in (1, B) or n not in (1, N) or m != M:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"(batch, heads, queries, keys) = ({B}, ., {N}, {M})")
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        # transformers' float masks: 0 = attend, finfo(dtype).min (not -inf) = masked
        lo = torch.finfo(mask.dtype).min
        masked = (mask == float("-inf")) | (mask == lo)
        if not bool(((mask == 0) | masked).all()):
            raise NotImplementedError(
                "attn_implementation='lara' got a float attention mask with values other than 0 and "
                f"{lo:g} / -inf: an additive bias, which LARA cannot apply; only padding masks are supported")
        keep = ~masked
    else:
        raise TypeError(f"attention mask must be bool or float, got dtype {mask.dtype}")
    row = keep[:, :1, :1, :]
    if not bool((keep == row).all()):
        raise NotImplementedError(
            "attn_implementation='lara' got an attention mask that differs between queries or heads (causal, "
            "sliding-window or another structured mask); LARA supports padding masks only")
    pad = ~row[:, 0, 0, :].expand(B, M)
    return pad if bool(pad.any()) else None


def _is_cross_attention(module, N: int, M: int) -> bool:
    if N != M:
        return True
    if getattr(module, "is_cross_attention", False):
        return True
    return "CrossAttention" in type(module).__name__


def _refuse_output_attentions(module):
    config = getattr(module, "config", None)
    wanted = bool(getattr(config, "output_attentions", False))
    if not wanted:
        try:          # transformers >= 5 records attentions through a context variable
            from transformers.utils.output_capturing import _active_collector

            collected = _active_collector.get()
            wanted = isinstance(collected, dict) and any(
                k in collected for k in ("attentions", "cross_attentions"))
        except (ImportError, LookupError, AttributeError):
            pass
    if wanted:
        raise ValueError(
            "output_attentions=True is not supported with attn_implementation='lara': LARA never forms the "
            "attention matrix; run without output_attentions (or with attn_implementation='eager')")


def _options(module, defaults: dict) -> dict:
    config = getattr(module, "config", None)
    from_config = getattr(config, CONFIG_ATTRIBUTE, None) if config is not None else None
    opts = dict(defaults)
    if from_config is not None:
        opts.update(_check_options(dict(from_config), f"config.{CONFIG_ATTRIBUTE}"))
    return opts


def lara_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                           _defaults: Optional[dict] = None, **kwargs):
    """transformers' attention-function signature: (B, H, N, D) q/k/v -> ((B, N, H, Dv), None)."""
    config = getattr(module, "config", None)
    if is_causal or getattr(module, "is_causal", False) or (
            config is not None and getattr(config, "is_decoder", False) and not _is_cross_attention(
                module, query.shape[2], key.shape[2])):
        raise NotImplementedError(
            f"attn_implementation='lara' cannot run the causal attention of {type(module).__name__}: LARA is "
            "non-causal, and running it bidirectionally would give wrong results; use 'sdpa' for this model")
    for arg in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(arg) is not None:
            raise NotImplementedError(f"attn_implementation='lara' does not support {arg}={kwargs[arg]!r}")
    _refuse_output_attentions(module)
    opts = _options(module, _defaults or {})
    mode = opts.pop("attention_dropout", "output")
    B, H, N, _ = query.shape
    Hkv, M = key.shape[1], key.shape[2]
    if value.shape[1] != Hkv:
        raise ValueError(f"key has {Hkv} heads but value has {value.shape[1]}")
    if Hkv != H and (Hkv == 0 or H % Hkv != 0):
        raise ValueError(f"query has {H} heads, not a multiple of the key/value heads {Hkv}")
    pad = _key_padding(attention_mask, B, N, M)
    masks = {}
    if _is_cross_attention(module, N, M):
        if pad is not None:
            masks = {"key_padding_mask": pad,
                     "query_padding_mask": torch.zeros(B, N, dtype=torch.bool, device=query.device)}
    elif pad is not None:
        masks = {"padding_mask": pad}
    training = bool(getattr(module, "training", False))
    gen = opts.pop("generator", None)
    out = lara_attention(query, key, value, scale=scaling, training=training,
                         generator=gen if training else None, enable_gqa=Hkv != H, **masks, **opts)
    if mode == "output" and training and dropout:
        out = F.dropout(out, p=float(dropout), training=True)
    return out.transpose(1, 2).contiguous(), None
