"""Drop-in attention layers: ``LaraAttention``, ``PerformerAttention``, ``LaraEncoderLayer``.

``LaraAttention`` stands where ``torch.nn.MultiheadAttention`` stood: same constructor
arguments (``embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first``), the same
parameter names (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
``out_proj``), so an MHA state dict loads into it, and the same call
``attn(query, key, value, key_padding_mask=...) -> (output, None)``.

Differences from ``nn.MultiheadAttention``, on purpose:

- ``need_weights`` defaults to False and True raises ValueError: LARA never forms the
  N x M attention matrix.
- ``attn_mask`` and ``is_causal=True`` raise NotImplementedError (LARA is non-causal).
- ``dropout`` is applied to the attention output (before ``out_proj``), not to attention
  probabilities, which do not exist here.
- ``key_padding_mask``: bool (True = padding) or, as MHA accepts, a float mask added to
  the logits; a float mask must hold only 0 (keep) and -inf (pad), anything else raises.
- In self-attention (``query is key``) the key padding mask is also the query padding
  mask, so padded positions do not enter the query landmarks; their output rows are
  ``out_proj`` of zeros (MHA computes something there, which callers ignore anyway).
  Pass ``query_padding_mask`` to set it explicitly.
- Randomness: in ``train()`` mode every forward draws fresh eps from ``self.generator``
  (None = torch's global RNG); in ``eval()`` the result is deterministic.
- ``check_finite=True`` (constructor) passes ``check_finite`` to the attention function:
  ValueError if the projected q, k, v (B, H, L, head_dim), or the landmarks, hold NaN or
  inf at a non-padded position; the index in the message is in that layout.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .api import PROPOSALS, WEIGHTINGS, lara_attention, rfa_attention
from .api import _check_bool, _check_int
from .api import _check_choice as _choice

__all__ = ["LaraAttention", "PerformerAttention", "LaraEncoderLayer", "segment_pool", "LANDMARKS"]

LANDMARKS = ("mean", "learned", "pool2d")


def _bool_padding_mask(name: str, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """MHA's mask conventions -> bool, True = padding."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        pad = torch.isneginf(mask)
        if not bool(((mask == 0) | pad).all()):
            raise ValueError(
                f"{name} is a float mask with values other than 0 and -inf; LARA supports padding "
                "only (0 = keep, -inf = pad), not additive biases. Pass a bool mask, True = padding"
            )
        return pad
    raise TypeError(f"{name} must be a bool (True = padding) or float (0 / -inf) tensor, got dtype {mask.dtype}")


def segment_pool(x: torch.Tensor, padding: Optional[torch.Tensor], num_segments: int,
                 c_eff: torch.Tensor) -> torch.Tensor:
    """Means of x (B, H, L, D) over ``c_eff`` contiguous segments of its valid positions.

    Same segments as lara_attention's own landmarks (lara-math.md section 1): valid
    position p (padded positions skipped) lies in segment ``floor(p * c_eff / L_valid)``.
    Returns (B, H, num_segments, D) in x's dtype; rows c >= c_eff are 0. Elements with no
    valid position give zeros (and finite gradients).
    """
    B, _, L, _ = x.shape
    valid = torch.ones(B, L, dtype=torch.bool, device=x.device) if padding is None else ~padding
    pos = valid.long().cumsum(-1) - 1
    n_valid = valid.long().sum(-1, keepdim=True).clamp(min=1)
    seg = torch.div(pos * c_eff[:, None], n_valid, rounding_mode="floor")
    seg = torch.where(valid, seg, torch.full_like(seg, num_segments))
    member = F.one_hot(seg, num_segments + 1)[..., :num_segments].to(x.dtype)   # (B, L, C)
    if padding is not None:   # 0 * nan = nan: padded rows must not enter the product at all
        x = x.masked_fill(padding[:, None, :, None], 0.0)
    total = torch.einsum("blc,bhld->bhcd", member, x)
    return total / member.sum(1).clamp(min=1)[:, None, :, None]


def _c_eff(B, N, M, C, q_pad, k_pad, device):
    n = torch.full((B,), N, device=device) if q_pad is None else (~q_pad).long().sum(-1)
    m = torch.full((B,), M, device=device) if k_pad is None else (~k_pad).long().sum(-1)
    return torch.clamp(torch.minimum(n, m), max=C).clamp(min=1).long()


class _ProjectedAttention(nn.Module):
    """MHA's projections and parameter names; subclasses supply ``_attend``."""

    def __init__(self, embed_dim, num_heads, *, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=True, device=None,
                 dtype=None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("add_bias_kv and add_zero_attn are not supported")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        same = self.kdim == embed_dim and self.vdim == embed_dim
        self._same_dims = same
        if same:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self._reset_projections()

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # nn.TransformerEncoderLayer reads this attribute of its self_attn to decide on its
        # fused *softmax* fast path (eval + no_grad). Always False, so that a layer swapped
        # into it is never bypassed by that path. LaraEncoderLayer does not need this.
        return False

    def _reset_projections(self):
        if self._same_dims:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def project(self, query, key, value):
        """(B, N, E), (B, M, kdim), (B, M, vdim) -> q, k, v as (B, H, L, head_dim)."""
        E = self.embed_dim
        if self._same_dims:
            wq, wk, wv = self.in_proj_weight.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split(E)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

        def heads(x):
            return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        return heads(q), heads(k), heads(v)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, query_padding_mask: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, None]:
        """Like ``nn.MultiheadAttention.forward``; returns ``(output, None)``.

        query (B, N, E), key (B, M, kdim), value (B, M, vdim) with ``batch_first=True``
        (else (N, B, E) ...); unbatched (N, E) inputs are accepted as MHA does.
        key_padding_mask (B, M): bool, True = padding, or float 0 / -inf.
        query_padding_mask (B, N): bool; defaults to key_padding_mask when ``query is key``.
        grid: (h, w) token grid for ``landmarks="pool2d"`` (overrides the constructor's).
        """
        if need_weights:
            raise ValueError(
                f"{type(self).__name__} cannot return attention weights (need_weights=True): it never forms "
                "the N x M attention matrix; call it with need_weights=False"
            )
        if attn_mask is not None:
            raise NotImplementedError(
                "attn_mask is not supported; pass key_padding_mask (B, M), True = padding"
            )
        if is_causal:
            raise NotImplementedError(f"is_causal=True is not supported: {type(self).__name__} is non-causal")
        self_attention = query is key
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if query_padding_mask is not None:
                query_padding_mask = query_padding_mask.unsqueeze(0)
        elif query.dim() != 3:
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got shape {tuple(query.shape)}")
        k_pad = _bool_padding_mask("key_padding_mask", key_padding_mask)
        q_pad = _bool_padding_mask("query_padding_mask", query_padding_mask)
        if q_pad is None and self_attention:
            q_pad = k_pad
        B, N, _ = query.shape
        q, k, v = self.project(query, key, value)
        y = self._attend(q, k, v, q_pad, k_pad, grid)                     # (B, H, N, D)
        y = y.transpose(1, 2).flatten(2)                                  # (B, N, E)
        y = F.dropout(y, self.dropout, self.training)
        out = self.out_proj(y)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _attend(self, q, k, v, q_pad, k_pad, grid):
        raise NotImplementedError


def _autocast_qkv(q, k, v, *extra):
    """Cast as SDPA is cast under autocast: to the autocast dtype, all in one dtype."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    cast = [t.to(dt) for t in (q, k, v)]
    cast += [None if t is None else t.to(dt) for t in extra]
    return cast


def _compiled_lara():
    from ._custom_ops import lara_attention_op

    return lara_attention_op


class LaraAttention(_ProjectedAttention):
    """Multi-head LARA attention, a drop-in for ``nn.MultiheadAttention`` (see module doc).

    Args (beyond MHA's):
        num_samples: C, samples/proposals/landmarks per head.
        proposal, weighting, beta: as in :func:`lara_kernels.lara_attention`.
        landmarks: ``"mean"`` (segment means of the projected q/k, lara_attention's own),
            ``"learned"`` (paper Appendix H.2: segment means, then ``Linear(D, D)`` +
            ``LayerNorm(D)`` shared across heads; one for queries, one for keys), or
            ``"pool2d"`` (2-D average pooling of the (h, w) token grid to a
            sqrt(C) x sqrt(C) grid, as the paper's ViTs; C must be a perfect square).
        landmark_proj: apply the learned Linear + LayerNorm after pooling; default True
            for ``"learned"``, False for ``"pool2d"``; must be True for ``"learned"``.
        grid: (h, w) of the token grid for ``"pool2d"``; may also be given to forward.
        backend: lara_attention's backend (``"auto"`` picks the fastest that fits).
        check_finite: lara_attention's ``check_finite`` (see module doc), at every forward.

    Attribute ``generator``: the torch.Generator eps is drawn from in training (None =
    global RNG). eps is redrawn at every training forward, never in eval().
    """

    def __init__(self, embed_dim, num_heads, *, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=True, device=None,
                 dtype=None, num_samples=64, proposal="segment", weighting="optimal", beta=1.0,
                 landmarks="mean", landmark_proj=None, grid=None, backend="auto",
                 generator: Optional[torch.Generator] = None, check_finite=False):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.proposal = _choice("proposal", proposal, PROPOSALS)
        self.weighting = _choice("weighting", weighting, WEIGHTINGS)
        self.beta = float(beta)
        self.landmarks = _choice("landmarks", landmarks, LANDMARKS)
        if landmark_proj is None:
            landmark_proj = landmarks == "learned"
        if landmarks == "learned" and not landmark_proj:
            raise ValueError("landmarks='learned' needs landmark_proj=True (use landmarks='mean' for plain means)")
        if landmarks == "mean" and landmark_proj:
            raise ValueError("landmark_proj=True needs landmarks='learned' or 'pool2d'")
        self.pool_side = None
        if landmarks == "pool2d":
            side = math.isqrt(num_samples)
            if side * side != num_samples:
                raise ValueError(f"landmarks='pool2d' needs num_samples to be a perfect square, got {num_samples}")
            self.pool_side = side
        self.grid = None if grid is None else self._check_grid(grid)
        self.backend = backend
        self.generator = generator
        self.check_finite = _check_bool("check_finite", check_finite)
        fk = {"device": device, "dtype": dtype}
        if landmark_proj:
            D = self.head_dim
            self.q_landmark_proj = nn.Sequential(nn.Linear(D, D, **fk), nn.LayerNorm(D, **fk))
            self.k_landmark_proj = nn.Sequential(nn.Linear(D, D, **fk), nn.LayerNorm(D, **fk))
        else:
            self.q_landmark_proj = self.k_landmark_proj = None

    @staticmethod
    def _check_grid(grid):
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(isinstance(g, int) and g > 0 for g in grid)):
            raise ValueError(f"grid must be a pair (h, w) of positive ints, got {grid!r}")
        return (int(grid[0]), int(grid[1]))

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_samples={self.num_samples}, "
                f"proposal={self.proposal!r}, weighting={self.weighting!r}, beta={self.beta}, "
                f"landmarks={self.landmarks!r}, batch_first={self.batch_first}")

    def compute_landmarks(self, q, k, q_pad, k_pad, grid=None):
        """The (q_landmarks, k_landmarks) this layer passes to lara_attention, or (None, None)."""
        if self.landmarks == "mean":
            return None, None
        B, H, N, D = q.shape
        M = k.shape[2]
        C = self.num_samples
        if self.landmarks == "learned":
            c_eff = _c_eff(B, N, M, C, q_pad, k_pad, q.device)
            ql, kl = segment_pool(q, q_pad, C, c_eff), segment_pool(k, k_pad, C, c_eff)
        else:
            grid = self._check_grid(grid) if grid is not None else self.grid
            if grid is None:
                raise ValueError("landmarks='pool2d' needs grid=(h, w), at construction or in forward")
            if q_pad is not None or k_pad is not None:
                raise NotImplementedError("landmarks='pool2d' does not support padding masks")
            h, w = grid
            if N != h * w or M != h * w:
                raise ValueError(f"landmarks='pool2d' with grid {grid} needs N = M = {h * w} tokens, got N={N}, M={M}")
            if C > N:
                raise ValueError(f"landmarks='pool2d' needs num_samples <= the number of tokens, got {C} > {N}")
            side = self.pool_side

            def pool(x):
                img = x.transpose(-1, -2).reshape(B * H, D, h, w)
                return F.adaptive_avg_pool2d(img, side).reshape(B, H, D, C).transpose(-1, -2)

            ql, kl = pool(q), pool(k)
        if self.q_landmark_proj is not None:
            ql, kl = self.q_landmark_proj(ql), self.k_landmark_proj(kl)
        return ql, kl

    def _attend(self, q, k, v, q_pad, k_pad, grid):
        ql, kl = self.compute_landmarks(q, k, q_pad, k_pad, grid)
        q, k, v, ql, kl = _autocast_qkv(q, k, v, ql, kl)
        # Eager: the function with its backends' own autograd. Under torch.compile: the same
        # computation as one custom op (lara_kernels._custom_ops), so the graph does not break.
        fn = _compiled_lara() if torch.compiler.is_compiling() else lara_attention
        with torch.autocast(q.device.type, enabled=False):
            return fn(
                q, k, v, num_samples=self.num_samples, proposal=self.proposal,
                weighting=self.weighting, beta=self.beta, training=self.training,
                generator=self.generator if self.training else None,
                key_padding_mask=k_pad, query_padding_mask=q_pad,
                q_landmarks=ql, k_landmarks=kl, backend=self.backend, check_finite=self.check_finite,
            )


class PerformerAttention(_ProjectedAttention):
    """Multi-head RFA / Performer attention (positive random features) via rfa_attention.

    Same interface as :class:`LaraAttention`. In training every forward draws fresh
    features from ``self.generator`` (None = global RNG). In eval() the features come
    from a generator seeded with the ``feature_seed`` buffer (saved in the state dict),
    so evaluation is deterministic: one fixed draw of shape (B, H, S, D), i.e. the same
    features for the same batch size and position in the batch. ``check_finite`` as in
    :class:`LaraAttention`.
    """

    def __init__(self, embed_dim, num_heads, *, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=True, device=None,
                 dtype=None, num_samples=64, backend="auto", generator=None, seed=None, check_finite=False):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.backend = backend
        self.generator = generator
        self.check_finite = _check_bool("check_finite", check_finite)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
        self.register_buffer("feature_seed", torch.tensor(int(seed), dtype=torch.int64))

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_samples={self.num_samples}, "
                f"batch_first={self.batch_first}")

    def _attend(self, q, k, v, q_pad, k_pad, grid):
        if grid is not None:
            raise ValueError("grid is only used by LaraAttention(landmarks='pool2d')")
        if self.training:
            gen = self.generator
        else:
            gen = torch.Generator(device=q.device)
            gen.manual_seed(int(self.feature_seed))
        q, k, v = _autocast_qkv(q, k, v)
        with torch.autocast(q.device.type, enabled=False):
            return rfa_attention(q, k, v, num_samples=self.num_samples, generator=gen,
                                 key_padding_mask=k_pad, query_padding_mask=q_pad, backend=self.backend,
                                 check_finite=self.check_finite)


ATTENTIONS = ("lara", "performer", "softmax")


class LaraEncoderLayer(nn.Module):
    """A transformer encoder layer (``batch_first=True``) with a choice of attention.

    Same structure and arguments as ``nn.TransformerEncoderLayer`` (self-attention, then
    a two-layer feed-forward block, each with dropout and a residual; ``norm_first``
    chooses pre-norm or post-norm). ``attention`` picks ``"lara"`` (:class:`LaraAttention`),
    ``"performer"`` (:class:`PerformerAttention`) or ``"softmax"``
    (``nn.MultiheadAttention``, i.e. SDPA); ``**attn_kwargs`` go to the attention's
    constructor (e.g. ``num_samples=16, landmarks="learned"``, ``check_finite=True``).
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 layer_norm_eps=1e-5, norm_first=False, bias=True, attention="lara", device=None,
                 dtype=None, **attn_kwargs):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.attention = _choice("attention", attention, ATTENTIONS)
        if attention == "softmax":
            if attn_kwargs:
                raise ValueError(f"attention='softmax' takes no extra arguments, got {sorted(attn_kwargs)}")
            self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                   batch_first=True, **fk)
        else:
            cls = LaraAttention if attention == "lara" else PerformerAttention
            self.self_attn = cls(d_model, nhead, dropout=dropout, bias=bias, batch_first=True, **fk,
                                 **attn_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **fk)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **fk)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if isinstance(activation, str):
            activation = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.activation = activation

    def _sa(self, x, key_padding_mask):
        y = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return self.dropout1(y)

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if src_mask is not None or is_causal:
            raise NotImplementedError("src_mask and is_causal are not supported; use src_key_padding_mask")
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_key_padding_mask)
            x = x + self._ff(self.norm2(x))
        else:
            x = self.norm1(x + self._sa(x, src_key_padding_mask))
            x = self.norm2(x + self._ff(x))
        return x
