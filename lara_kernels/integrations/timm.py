"""LARA in timm vision transformers.

Usage::

    import timm
    from lara_kernels.integrations.timm import convert, lara_attn_layer

    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    convert(model, num_samples=49, landmarks="pool2d")      # in place, weights kept

    # or build with it: attn_layer must be a class, lara_attn_layer makes one
    model = timm.models.VisionTransformer(..., attn_layer=lara_attn_layer(num_samples=49))

:class:`LaraTimmAttention` has the constructor signature of ``timm.layers.Attention``
(``dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm, scale_norm, proj_bias,
gated, attn_drop, proj_drop, norm_layer, device, dtype``) and its parameter names
(``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``), so a softmax
checkpoint loads into it with ``strict=True`` (except with ``landmarks="learned"``,
whose landmark projections are new parameters). Its forward is ``forward(x,
attn_mask=None, is_causal=False)`` like timm's; ``attn_mask`` and ``is_causal=True``
raise NotImplementedError (LARA is non-causal and these models pass no mask).

LARA options (keyword-only): ``num_samples`` (C), ``proposal``, ``weighting``, ``beta``,
``backend``, ``generator`` (as in :func:`lara_kernels.lara_attention`), and
``landmarks``:

- ``"mean"`` (default): lara_attention's segment means over the whole token sequence.
- ``"learned"``: segment means, then ``Linear(D, D)`` + ``LayerNorm(D)`` (shared by
  the heads; one for queries, one for keys), as :class:`lara_kernels.nn.LaraAttention`.
- ``"pool2d"``: the paper's ViT landmarks. The first ``num_prefix_tokens`` tokens (the
  class token and register tokens) are not image patches: each is its own landmark,
  and the ``h x w`` patch grid after them is average-pooled to a
  ``sqrt(C) x sqrt(C)`` grid, so the layer uses ``C + num_prefix_tokens`` samples.
  ``num_samples`` must be a perfect square; the grid is ``grid=(h, w)``, or, if not
  given, the square root of the number of patch tokens (which must then be a square).
  ``convert`` sets ``num_prefix_tokens`` and ``grid`` from the model.

``attn_drop`` (timm drops attention probabilities, which LARA never forms) is applied
to the attention output, before ``norm`` and ``proj``, as
:class:`lara_kernels.nn.LaraAttention` does. In ``train()`` mode every call draws fresh
samples (from ``generator``, None = torch's global RNG); in ``eval()`` the result is
deterministic. Tested with timm 1.0.31.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _custom_ops as _ops
from ..api import PROPOSALS, WEIGHTINGS, _check_backend, _check_choice, _check_int, _check_real
from ..api import lara_attention

try:
    import timm.layers as _timm_layers
except ImportError as e:      # pragma: no cover - exercised only without timm
    raise ImportError("lara_kernels.integrations.timm needs the 'timm' package (pip install timm)") from e

__all__ = ["LaraTimmAttention", "lara_attn_layer", "convert", "LANDMARKS"]

LANDMARKS = ("mean", "learned", "pool2d")


def _check_grid(grid):
    if grid is None:
        return None
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair (h, w) of positive ints or None, got {grid!r}")
    return (int(grid[0]), int(grid[1]))


class LaraTimmAttention(nn.Module):
    """``timm.layers.Attention`` with LARA in place of softmax attention (see the module doc)."""

    _defaults: dict = {}

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., norm_layer=None, device=None, dtype=None, **options):
        super().__init__()
        options = {**self._defaults, **options}
        unknown = sorted(set(options) - {"num_samples", "proposal", "weighting", "beta", "landmarks",
                                         "num_prefix_tokens", "grid", "backend", "generator"})
        if unknown:
            raise TypeError(f"LaraTimmAttention got unknown argument(s) {unknown}")
        dd = {"device": device, "dtype": dtype}
        dim = _check_int("dim", dim, 1)
        num_heads = _check_int("num_heads", num_heads, 1)
        dim_out = dim if dim_out is None else _check_int("dim_out", dim_out, 1)
        if attn_head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
            head_dim = dim // num_heads
        else:
            head_dim = _check_int("attn_head_dim", attn_head_dim, 1)
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError(f"norm_layer must be given with qk_norm={qk_norm} or scale_norm={scale_norm}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = False          # timm reads this attribute on its attention layers
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        self.num_samples = _check_int("num_samples", options.get("num_samples", 64), 1)
        self.proposal = _check_choice("proposal", options.get("proposal", "segment"), PROPOSALS)
        self.weighting = _check_choice("weighting", options.get("weighting", "optimal"), WEIGHTINGS)
        self.beta = _check_real("beta", options.get("beta", 1.0))
        self.landmarks = _check_choice("landmarks", options.get("landmarks", "mean"), LANDMARKS)
        self.num_prefix_tokens = _check_int("num_prefix_tokens", options.get("num_prefix_tokens", 1), 0)
        self.grid = _check_grid(options.get("grid"))
        self.backend = _check_backend(options.get("backend", "auto"))
        gen = options.get("generator")
        if gen is not None and not isinstance(gen, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(gen).__name__}")
        self.generator = gen
        self.pool_side = None
        if self.landmarks == "pool2d":
            side = math.isqrt(self.num_samples)
            if side * side != self.num_samples:
                raise ValueError(f"landmarks='pool2d' needs num_samples to be a perfect square, got {self.num_samples}")
            self.pool_side = side
        self.q_landmark_proj = self.k_landmark_proj = None
        if self.landmarks == "learned":
            self.q_landmark_proj = nn.Sequential(nn.Linear(head_dim, head_dim, **dd), nn.LayerNorm(head_dim, **dd))
            if self.proposal != "attend":
                self.k_landmark_proj = nn.Sequential(nn.Linear(head_dim, head_dim, **dd),
                                                     nn.LayerNorm(head_dim, **dd))

    def extra_repr(self):
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, num_samples={self.num_samples}, "
                f"landmarks={self.landmarks!r}, num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid}")

    def _patch_grid(self, n_patches: int) -> Tuple[int, int]:
        if self.grid is not None:
            h, w = self.grid
            if h * w != n_patches:
                raise ValueError(f"landmarks='pool2d' with grid {self.grid} needs {h * w} patch tokens after the "
                                 f"{self.num_prefix_tokens} prefix tokens, got {n_patches}")
            return self.grid
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(f"landmarks='pool2d' without grid=(h, w) needs a square number of patch tokens, got "
                             f"{n_patches} (after {self.num_prefix_tokens} prefix tokens); pass grid=(h, w)")
        return side, side

    def compute_landmarks(self, q: torch.Tensor, k: torch.Tensor):
        """(q_landmarks, k_landmarks, C) for lara_attention; (None, None, C) for ``"mean"``."""
        B, H, N, D = q.shape
        C = self.num_samples
        with_k = self.proposal != "attend"
        if self.landmarks == "mean":
            return None, None, C
        if self.landmarks == "learned":
            from ..nn import _c_eff, segment_pool

            c_eff = _c_eff(B, N, N, C, None, None, q.device)
            ql = segment_pool(q, None, C, c_eff)
            kl = segment_pool(k, None, C, c_eff) if with_k else None
            ql = self.q_landmark_proj(ql)
            kl = self.k_landmark_proj(kl) if with_k else None
            return ql, kl, C
        P = self.num_prefix_tokens
        if N <= P:
            raise ValueError(f"landmarks='pool2d' needs patch tokens after the {P} prefix tokens, got {N} tokens")
        h, w = self._patch_grid(N - P)
        side = self.pool_side
        if side > min(h, w):
            raise ValueError(f"landmarks='pool2d' pools the {h} x {w} patch grid to {side} x {side}: "
                             f"num_samples={C} is too large for it")

        def pool(x):
            img = x[:, :, P:].transpose(-1, -2).reshape(B * H, D, h, w)
            pooled = F.adaptive_avg_pool2d(img, side).reshape(B, H, D, side * side).transpose(-1, -2)
            return torch.cat([x[:, :, :P], pooled], dim=2)       # prefix tokens: their own landmarks

        return pool(q), (pool(k) if with_k else None), C + P

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("LaraTimmAttention does not take attn_mask (LARA supports padding masks only, "
                                      "and timm's VisionTransformer passes none)")
        if is_causal:
            raise NotImplementedError("is_causal=True is not supported: LARA is non-causal")
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (batch, tokens, dim) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        ql, kl, C = self.compute_landmarks(q, k)
        fn = _ops.lara_attention_op if torch.compiler.is_compiling() else lara_attention
        y = fn(q, k, v, num_samples=C, proposal=self.proposal, weighting=self.weighting, beta=self.beta,
               scale=self.scale, training=self.training, generator=self.generator if self.training else None,
               q_landmarks=ql, k_landmarks=kl, backend=self.backend)
        y = self.attn_drop(y)
        y = y.transpose(1, 2).reshape(B, N, self.attn_dim)
        y = self.norm(y)
        if gate is not None:
            y = y * gate
        return self.proj_drop(self.proj(y))


def lara_attn_layer(**options) -> type:
    """A subclass of :class:`LaraTimmAttention` with ``options`` as defaults, for timm's
    ``attn_layer=`` (which must be a class): ``VisionTransformer(...,
    attn_layer=lara_attn_layer(num_samples=49, landmarks="pool2d"))``."""
    LaraTimmAttention(8, 1, **options)          # check the options now, not at model build
    return type("LaraTimmAttention", (LaraTimmAttention,), {"_defaults": dict(options),
                                                            "__module__": __name__})


def convert(model: nn.Module, **options) -> nn.Module:
    """Replace every ``timm.layers.Attention`` in ``model`` by :class:`LaraTimmAttention`, in place.

    The new layer takes over the old one's modules (``qkv``, ``q_norm``, ``k_norm``,
    ``norm``, ``gate``, ``proj``, dropouts): the weights are the same tensors, so the
    state dict keeps its keys and values (``landmarks="learned"`` adds its landmark
    projections). ``num_prefix_tokens`` and ``grid`` default to the model's
    (``model.num_prefix_tokens``, ``model.patch_embed.grid_size``; no fixed grid with
    ``dynamic_img_size=True``). Other attention classes (``AttentionRope``, ...) are not
    converted; ValueError if the model has no ``timm.layers.Attention``. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = dict(options)
    if "num_prefix_tokens" not in options and hasattr(model, "num_prefix_tokens"):
        options["num_prefix_tokens"] = int(model.num_prefix_tokens)
    patch = getattr(model, "patch_embed", None)
    if "grid" not in options and patch is not None and not getattr(model, "dynamic_img_size", False):
        gs = getattr(patch, "grid_size", None)
        if gs is not None:
            options["grid"] = (int(gs[0]), int(gs[1]))
    if type(model) is _timm_layers.Attention:
        holder = nn.ModuleDict({"attn": model})
        convert(holder, **options)
        return holder["attn"]
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if type(m) is _timm_layers.Attention]
    if not targets:
        raise ValueError(f"convert found no timm.layers.Attention in {type(model).__name__}")
    built = {}
    for _, old in targets:                 # build all first: a failure leaves the model unchanged
        if id(old) in built:
            continue
        w = old.qkv.weight
        new = LaraTimmAttention(old.qkv.in_features, old.num_heads, attn_head_dim=old.head_dim,
                                dim_out=old.proj.out_features, device=w.device, dtype=w.dtype, **options)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(new, name, getattr(old, name))
        new.gate = getattr(old, "gate", None)
        new.scale = old.scale
        new.train(old.training)
        built[id(old)] = new
    for name, old in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, built[id(old)])
    return model
