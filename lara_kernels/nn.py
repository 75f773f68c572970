"""Drop-in attention layers: ``LaraAttention``, ``PerformerAttention``, ``LaraEncoderLayer``.

``LaraAttention`` stands where ``torch.nn.MultiheadAttention`` stood: the same constructor
arguments in the same order (``embed_dim, num_heads, dropout, bias, add_bias_kv,
add_zero_attn, kdim, vdim, batch_first, device, dtype``) with the same defaults
(``batch_first=False``: inputs are (L, B, E) unless you say otherwise), the same
parameter names (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
``out_proj``), so an MHA state dict loads into it with ``strict=True`` and its state dict
loads into MHA, and the same call ``attn(query, key, value, key_padding_mask=...) ->
(output, None)`` on batched or unbatched inputs. ``LaraEncoderLayer`` does the same for
``nn.TransformerEncoderLayer`` and stacks in ``nn.TransformerEncoder``.

Grouped-query attention (keyword-only ``num_kv_heads``, default None = ``num_heads``:
MHA's layout, parameters and state dict): with ``num_kv_heads`` = H_kv < ``num_heads``
(H_kv must divide it), the key and value projections output H_kv * head_dim features and
query head h attends with key/value head ``h // (num_heads // H_kv)`` (the attention
runs with ``enable_gqa=True``: k and v are never repeated). The projection weights are
then always the separate ``q_proj_weight`` (E, E), ``k_proj_weight`` (H_kv * head_dim,
kdim) and ``v_proj_weight`` (H_kv * head_dim, vdim), and ``in_proj_bias`` holds the q, k
and v biases back to back (E + 2 * H_kv * head_dim), as MHA's own separate-weight layout.
Such a layer has no ``nn.MultiheadAttention`` counterpart: an MHA state dict does not load
into it (``load_state_dict`` raises RuntimeError naming both head counts), nor its state
dict into MHA.

Differences from ``nn.MultiheadAttention``, on purpose:

- ``need_weights`` defaults to False and True raises ValueError: LARA never forms the
  N x M attention matrix.
- ``attn_mask``, ``is_causal=True``, ``add_bias_kv=True`` and ``add_zero_attn=True``
  raise NotImplementedError (LARA is non-causal and supports padding masks only).
- ``dropout`` is applied to the attention output (before ``out_proj``), not to attention
  probabilities, which do not exist here.
- ``key_padding_mask``: bool (True = padding) or, as MHA accepts, a float mask added to
  the logits; a float mask must hold only 0 (keep) and -inf (pad), anything else raises
  ValueError (under ``torch.compile`` when the compiled code runs).
- Self-attention: when ``query is key`` (the same tensor object, as
  ``nn.TransformerEncoderLayer`` passes it) the key padding mask is also the query
  padding mask, so padded positions do not enter the query landmarks; their output rows
  are ``out_proj`` of zeros (MHA computes something there, which callers ignore anyway).
  Equal values in two different tensors are not taken as self-attention (that would be
  a guess: cross-attention of a sequence with a copy of itself is legitimate); pass
  ``query_padding_mask`` to set the query mask explicitly in any call.
- Randomness: in ``train()`` mode every forward draws fresh eps (LARA) or features
  (Performer) from ``self.generator`` (None = torch's global RNG); in ``eval()`` the
  result is deterministic. Under ``torch.compile`` the draws are the op
  ``lara_kernels::randn``, which calls ``torch.randn`` with that generator: compiled
  and eager runs draw the same numbers (with ``aot_eager`` and ``inductor``). The
  layer's ``dropout`` is ``F.dropout``: under ``inductor`` it uses inductor's own random
  numbers, which differ from eager's (as for any torch model).
- ``check_finite=True`` (constructor): ValueError if ``query``, ``key``, ``value``, their
  projections or the layer's landmarks hold NaN or inf at a non-padded position; the
  index in the message is in the shape of the tensor named (the user's layout for the
  inputs and projections; (batch, head, num_samples, head_dim) for landmarks).
- Compiled code (``torch.compile(fullgraph=True)``, ``torch.export``) runs the attention
  as the custom ops of :mod:`lara_kernels._custom_ops`; eager code calls
  :func:`lara_kernels.lara_attention` (the backends' own autograd). Double backward
  (``create_graph=True``) works eagerly and raises a RuntimeError through a compiled
  graph.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _custom_ops as _ops
from .api import PROPOSALS, WEIGHTINGS, lara_attention
from .api import _check_backend, _check_bool, _check_int, _check_real
from .api import _check_choice as _choice

__all__ = ["LaraAttention", "PerformerAttention", "LaraEncoderLayer", "segment_pool", "LANDMARKS", "convert"]

LANDMARKS = ("mean", "learned", "pool2d")


def _check_probability(name, p):
    p = _check_real(name, p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} probability has to be between 0 and 1, but got {p}")
    return p


def _check_optional_dim(name, value):
    return None if value is None else _check_int(name, value, 1)


def _check_num_kv_heads(num_kv_heads, num_heads):
    """None -> num_heads; else an int dividing num_heads (grouped-query attention)."""
    if num_kv_heads is None:
        return num_heads
    num_kv_heads = _check_int("num_kv_heads", num_kv_heads, 1)
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads must divide num_heads (each key/value head serves num_heads // num_kv_heads "
                         f"query heads), got num_kv_heads={num_kv_heads} and num_heads={num_heads}")
    return num_kv_heads


def _check_kv_heads_of_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
    """A state dict whose key/value projections have another number of heads than the layer
    (an ``nn.MultiheadAttention`` one into a grouped-query layer, or the other way) is an
    error that says so, besides load_state_dict's own missing-key or shape errors."""
    packed, k_w = state_dict.get(prefix + "in_proj_weight"), state_dict.get(prefix + "k_proj_weight")
    D = module.head_dim
    if isinstance(packed, torch.Tensor):
        theirs = module.num_heads          # one packed (3E, E) weight: MHA's layout, as many k/v heads as q heads
    elif isinstance(k_w, torch.Tensor) and k_w.dim() == 2 and k_w.shape[0] % D == 0:
        theirs = k_w.shape[0] // D
    else:
        return
    if theirs != module.num_kv_heads:
        what = "packed in_proj_weight" if isinstance(packed, torch.Tensor) else f"k_proj_weight of shape {_shape(k_w)}"
        error_msgs.append(
            f"{type(module).__name__} with num_heads={module.num_heads}, num_kv_heads={module.num_kv_heads} (head_dim "
            f"{D}) cannot load a state dict with {theirs} key/value heads ({what}): the key/value projections "
            f"differ in shape; an nn.MultiheadAttention state dict loads only into a layer with num_kv_heads=None "
            f"(= num_heads)")


def _shape(t):
    return tuple(t.shape)


def _to_user_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, L, ...) -> the caller's layout."""
    if layout == "seq_first":
        return x.transpose(0, 1)
    if layout == "unbatched":
        return x.squeeze(0)
    return x


def _user_padding(pad: Optional[torch.Tensor], layout: str) -> Optional[torch.Tensor]:
    """(B, L) padding -> broadcastable to a (.., .., E) tensor in the caller's layout."""
    return None if pad is None else _to_user_layout(pad, layout)[..., None]


def _padding_mask(name: str, mask, batch: Optional[int], length: int, layout: str, of: str,
                  like: torch.Tensor, batch_first: bool) -> Optional[torch.Tensor]:
    """MHA's mask conventions -> bool (B, L), True = padding; shapes in the caller's terms."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    want = (length,) if layout == "unbatched" else (batch, length)
    if _shape(mask) != want:
        what = "(source length,)" if layout == "unbatched" else "(batch, source length)"
        if name == "query_padding_mask":
            what = what.replace("source", "target")
        where = "" if layout == "unbatched" else f" (batch_first={batch_first})"
        raise ValueError(f"{name} must have shape {what} = {want} for {of} of shape {_shape(like)}{where}, "
                         f"got {_shape(mask)}")
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {like.device}")
    if mask.dtype == torch.bool:
        pad = mask
    elif mask.is_floating_point():
        # 0 = keep, -inf = pad; the check of the other values is data-dependent, so under
        # torch.compile it is an op kept in the graph that raises when the graph runs
        _ops.check_padding_mask(mask, name)
        pad = torch.isneginf(mask)
    else:
        raise TypeError(f"{name} must be a bool (True = padding) or float (0 / -inf) tensor, got dtype {mask.dtype}")
    return pad.unsqueeze(0) if layout == "unbatched" else pad


def segment_pool(x: torch.Tensor, padding: Optional[torch.Tensor], num_segments: int,
                 c_eff: torch.Tensor) -> torch.Tensor:
    """Means of x (B, H, L, D) over ``c_eff`` contiguous segments of its valid positions.

    Same segments as lara_attention's own landmarks (docs/math.md section 1): valid
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
    """MHA's projections, parameter names and calling conventions; subclasses supply ``_attend``."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, num_kv_heads=None):
        super().__init__()
        embed_dim = _check_int("embed_dim", embed_dim, 1)
        num_heads = _check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads}")
        num_kv_heads = _check_num_kv_heads(num_kv_heads, num_heads)
        dropout = _check_probability("dropout", dropout)
        bias = _check_bool("bias", bias)
        if _check_bool("add_bias_kv", add_bias_kv) or _check_bool("add_zero_attn", add_zero_attn):
            raise NotImplementedError(
                f"{type(self).__name__} does not support add_bias_kv=True or add_zero_attn=True (got "
                f"add_bias_kv={add_bias_kv}, add_zero_attn={add_zero_attn}): LARA has no bias key/value row")
        kdim = _check_optional_dim("kdim", kdim)
        vdim = _check_optional_dim("vdim", vdim)
        batch_first = _check_bool("batch_first", batch_first)
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        kv_dim = self.kv_dim
        # grouped-query attention: the k/v projections are narrower than q's, so never one
        # packed in_proj_weight (MHA's separate-weight names, as for kdim/vdim != embed_dim)
        same = self.kdim == embed_dim and self.vdim == embed_dim and num_kv_heads == num_heads
        self._same_dims = same
        if same:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:   # q | k | v biases back to back, as MHA's in_proj_bias
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self._reset_projections()
        self.register_load_state_dict_pre_hook(_check_kv_heads_of_state_dict)

    @property
    def kv_dim(self) -> int:
        """Output features of the key and value projections: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def _gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    def _kv_repr(self) -> str:
        return f", num_kv_heads={self.num_kv_heads}" if self._gqa else ""

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
        """(B, N, E), (B, M, kdim), (B, M, vdim) -> q as (B, H, N, head_dim), k and v as
        (B, num_kv_heads, M, head_dim)."""
        q, k, v = self._linear_qkv(query, key, value)
        return self._heads(q), self._heads(k), self._heads(v)

    def _linear_qkv(self, query, key, value):
        E = self.embed_dim
        if self._same_dims:
            wq, wk, wv = self.in_proj_weight.split(E)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split([E, self.kv_dim, self.kv_dim])
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _heads(self, x):
        """(B, L, heads * head_dim) -> (B, heads, L, head_dim); heads = H or num_kv_heads."""
        return x.unflatten(-1, (x.shape[-1] // self.head_dim, self.head_dim)).transpose(1, 2)

    def _check_inputs(self, query, key, value):
        """Shapes in the caller's terms; returns the layout and (B or None, N, M)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {_shape(query)}")
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must be {query.dim()}-D like query, got {name} of shape {_shape(t)} "
                                 f"and query of shape {_shape(query)}")
        for name, t, dim, what in (("query", query, self.embed_dim, "embed_dim"), ("key", key, self.kdim, "kdim"),
                                   ("value", value, self.vdim, "vdim")):
            if t.shape[-1] != dim:
                raise ValueError(f"{name}'s last dimension must be {what}={dim}, got {name} of shape {_shape(t)}")
        if query.dim() == 2:
            layout, lens = "unbatched", (None, query.shape[0], key.shape[0])
            seq = 0
        else:
            layout = "batch_first" if self.batch_first else "seq_first"
            b = 0 if self.batch_first else 1
            seq = 1 - b
            for name, t in (("key", key), ("value", value)):
                if t.shape[b] != query.shape[b]:
                    raise ValueError(
                        f"query and {name} must have the same batch size (dim {b} with batch_first="
                        f"{self.batch_first}), got query of shape {_shape(query)} and {name} of shape {_shape(t)}")
            lens = (query.shape[b], query.shape[seq], key.shape[seq])
        if value.shape[seq] != key.shape[seq]:
            raise ValueError(f"key and value must have the same sequence length (dim {seq}), got key of shape "
                             f"{_shape(key)} and value of shape {_shape(value)}")
        return layout, lens

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, *, query_padding_mask: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, None]:
        """Like ``nn.MultiheadAttention.forward``; returns ``(output, None)``.

        query (L, B, E), key (S, B, kdim), value (S, B, vdim) with ``batch_first=False``
        (the default), (B, L, E) ... with ``batch_first=True``, or unbatched (L, E) ...
        key_padding_mask (B, S) ((S,) unbatched): bool, True = padding, or float 0 / -inf.
        query_padding_mask (B, L) ((L,) unbatched), same conventions; defaults to
        key_padding_mask when ``query is key`` (see the module doc).
        grid: (h, w) token grid for ``landmarks="pool2d"`` (overrides the constructor's).
        """
        if need_weights:
            raise ValueError(
                f"{type(self).__name__} cannot return attention weights (need_weights=True): it never forms "
                "the N x M attention matrix; call it with need_weights=False"
            )
        if attn_mask is not None:
            raise NotImplementedError(
                "attn_mask is not supported; pass key_padding_mask (B, S), True = padding"
            )
        if is_causal:
            raise NotImplementedError(f"is_causal=True is not supported: {type(self).__name__} is non-causal")
        layout, (B, N, M) = self._check_inputs(query, key, value)
        self_attention = query is key
        k_pad = _padding_mask("key_padding_mask", key_padding_mask, B, M, layout, "key", key, self.batch_first)
        q_pad = _padding_mask("query_padding_mask", query_padding_mask, B, N, layout, "query", query,
                              self.batch_first)
        if q_pad is None and self_attention:
            q_pad = k_pad
        if self.check_finite:
            self._check_finite_inputs(query, key, value, q_pad, k_pad, layout)
        if layout == "unbatched":
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif layout == "seq_first":
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._linear_qkv(query, key, value)                    # (B, L, E)
        if self.check_finite:
            for name, t, pad in (("projected query", q, q_pad), ("projected key", k, k_pad),
                                 ("projected value", v, k_pad)):
                _ops.check_finite_layer(_to_user_layout(t, layout), _user_padding(pad, layout), name)
        y = self._attend(self._heads(q), self._heads(k), self._heads(v), q_pad, k_pad, grid)   # (B, H, N, D)
        y = y.transpose(1, 2).flatten(2)                                  # (B, N, E)
        y = F.dropout(y, self.dropout, self.training)
        out = self.out_proj(y)
        return _to_user_layout(out, layout), None

    def _check_finite_inputs(self, query, key, value, q_pad, k_pad, layout):
        seen = []
        for name, t, pad in (("query", query, q_pad), ("key", key, k_pad), ("value", value, k_pad)):
            if any(t is s for s in seen):          # self-attention: one check of x
                continue
            seen.append(t)
            _ops.check_finite_layer(t, _user_padding(pad, layout), name)

    def _attend(self, q, k, v, q_pad, k_pad, grid):
        raise NotImplementedError


class LaraAttention(_ProjectedAttention):
    """Multi-head LARA attention, a drop-in for ``nn.MultiheadAttention`` (see module doc).

    Args: MHA's, in MHA's order and with its defaults (``batch_first=False``), then,
    keyword-only:
        num_samples: C, samples/proposals/landmarks per head.
        proposal, weighting, beta: as in :func:`lara_kernels.lara_attention`.
        landmarks: ``"mean"`` (segment means of the projected q/k, lara_attention's own),
            ``"learned"`` (paper Appendix H.2: segment means, then ``Linear(D, D)`` +
            ``LayerNorm(D)`` shared across heads; one for queries, one for keys), or
            ``"pool2d"`` (2-D average pooling of the (h, w) token grid to a
            sqrt(C) x sqrt(C) grid, as the paper's ViTs; C must be a perfect square).
        landmark_proj: apply the learned Linear + LayerNorm after pooling; default True
            for ``"learned"``, False for ``"pool2d"``; must be True for ``"learned"``.
            With ``proposal="attend"`` the key landmarks are not used (mu = qt + the
            attention of qt over the keys), so the key-side projection is not created:
            every parameter of the layer gets a gradient (DDP with
            ``find_unused_parameters=False`` works for every configuration).
        grid: (h, w) of the token grid for ``"pool2d"``; may also be given to forward.
        backend: lara_attention's backend (``"auto"`` picks the fastest that fits).
        generator: the torch.Generator eps is drawn from in training (None = global RNG).
        check_finite: see the module doc.
        context_parallel_group: a ``torch.distributed`` process group over which the
            sequence is sharded (rank order = sequence order; each rank passes its shard
            and its shard of the masks); attention runs as
            :func:`lara_kernels.distributed.context_parallel_lara_attention`, eagerly.
            Needs ``landmarks="mean"``. None (default): single-process. With grouped-query
            attention k and v are repeated to ``num_heads`` heads for it (the same result).
        num_kv_heads: key/value heads for grouped-query attention (module doc); None =
            ``num_heads``. Learned or pooled key landmarks are computed once per key/value
            head and shared by its group, as ``lara_attention``'s own with ``enable_gqa``.

    Attribute ``generator``: eps is redrawn from it at every training forward, never in
    eval(). Under ``torch.autocast`` float32 inputs run and return in the autocast dtype,
    as ``nn.MultiheadAttention`` does; float64 inputs are never cast.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, num_samples=64, proposal="segment", weighting="optimal", beta=1.0,
                 landmarks="mean", landmark_proj=None, grid=None, backend="auto",
                 generator: Optional[torch.Generator] = None, check_finite=False, context_parallel_group=None,
                 num_kv_heads=None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype, num_kv_heads=num_kv_heads)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.proposal = _choice("proposal", proposal, PROPOSALS)
        self.weighting = _choice("weighting", weighting, WEIGHTINGS)
        self.beta = _check_real("beta", beta)
        self.landmarks = _choice("landmarks", landmarks, LANDMARKS)
        if landmark_proj is None:
            landmark_proj = landmarks == "learned"
        landmark_proj = _check_bool("landmark_proj", landmark_proj)
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
        self.backend = _check_backend(backend)
        self.generator = _check_generator_type(generator)
        self.check_finite = _check_bool("check_finite", check_finite)
        if context_parallel_group is not None:
            from .distributed import check_layer_group

            context_parallel_group = check_layer_group(context_parallel_group, landmarks)
        self.context_parallel_group = context_parallel_group
        fk = {"device": device, "dtype": dtype}
        D = self.head_dim
        self.q_landmark_proj = self.k_landmark_proj = None
        if landmark_proj:
            self.q_landmark_proj = nn.Sequential(nn.Linear(D, D, **fk), nn.LayerNorm(D, **fk))
            if self.uses_key_landmarks:
                self.k_landmark_proj = nn.Sequential(nn.Linear(D, D, **fk), nn.LayerNorm(D, **fk))

    @property
    def uses_key_landmarks(self) -> bool:
        """False for ``proposal="attend"``, whose proposal means never read the key landmarks."""
        return self.proposal != "attend"

    @staticmethod
    def _check_grid(grid):
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
            raise ValueError(f"grid must be a pair (h, w) of positive ints, got {grid!r}")
        return (int(grid[0]), int(grid[1]))

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{self._kv_repr()}, "
                f"num_samples={self.num_samples}, proposal={self.proposal!r}, weighting={self.weighting!r}, "
                f"beta={self.beta}, landmarks={self.landmarks!r}, batch_first={self.batch_first}")

    def compute_landmarks(self, q, k, q_pad, k_pad, grid=None):
        """The (q_landmarks, k_landmarks) this layer passes to lara_attention, or (None, None).

        k_landmarks is None when the proposal does not use them (``"attend"``)."""
        if self.landmarks == "mean":
            return None, None
        ql, kl = self._landmarks(q, k, q_pad, k_pad, grid)
        if kl is not None and kl.shape[1] != q.shape[1]:   # grouped-query: one per key/value head, shared by its group
            kl = kl.repeat_interleave(q.shape[1] // kl.shape[1], dim=1)
        return ql, kl

    def _landmarks(self, q, k, q_pad, k_pad, grid):
        B, H, N, D = q.shape
        M = k.shape[2]
        C = self.num_samples
        with_k = self.uses_key_landmarks
        if self.landmarks == "learned":
            c_eff = _c_eff(B, N, M, C, q_pad, k_pad, q.device)
            ql = segment_pool(q, q_pad, C, c_eff)
            kl = segment_pool(k, k_pad, C, c_eff) if with_k else None
        else:
            grid = self._check_grid(grid) if grid is not None else self.grid
            if grid is None:
                raise ValueError("landmarks='pool2d' needs grid=(h, w), at construction or in forward")
            if q_pad is not None or k_pad is not None:
                raise NotImplementedError("landmarks='pool2d' does not support padding masks")
            h, w = grid
            if N != h * w or M != h * w:
                raise ValueError(f"landmarks='pool2d' with grid {grid} needs {h * w} queries and keys, got "
                                 f"{N} queries and {M} keys")
            if C > N:
                raise ValueError(f"landmarks='pool2d' needs num_samples <= the number of tokens, got {C} > {N}")
            side = self.pool_side

            def pool(x):
                heads = x.shape[1]
                img = x.transpose(-1, -2).reshape(B * heads, D, h, w)
                return F.adaptive_avg_pool2d(img, side).reshape(B, heads, D, C).transpose(-1, -2)

            ql, kl = pool(q), (pool(k) if with_k else None)
        if self.q_landmark_proj is not None:
            ql = self.q_landmark_proj(ql)
            kl = None if kl is None else self.k_landmark_proj(kl)
        return ql, kl

    def _attend(self, q, k, v, q_pad, k_pad, grid):
        ql, kl = self.compute_landmarks(q, k, q_pad, k_pad, grid)
        if self.check_finite:
            for name, t in (("q_landmarks", ql), ("k_landmarks", kl)):
                if t is not None:
                    _ops.check_finite_layer(t, None, f"{name} (batch, head, num_samples, head_dim)")
        # Under torch.autocast the functions cast as SDPA is cast (float64 never) and run
        # their backends without autocast. Eager: the function with its backends' own autograd. Under torch.compile / export:
        # the same computation as one custom op (lara_kernels._custom_ops), so the graph
        # does not break and the eps draw is the op lara_kernels::randn.
        gqa = {"enable_gqa": True} if self._gqa else {}
        if self.context_parallel_group is not None:
            from .distributed import layer_attention

            fn = layer_attention(self.context_parallel_group)
        else:
            fn = _ops.lara_attention_op if torch.compiler.is_compiling() else lara_attention
        return fn(
            q, k, v, num_samples=self.num_samples, proposal=self.proposal,
            weighting=self.weighting, beta=self.beta, training=self.training,
            generator=self.generator if self.training else None,
            key_padding_mask=k_pad, query_padding_mask=q_pad,
            q_landmarks=ql, k_landmarks=kl, backend=self.backend, **gqa,
        )


def _check_generator_type(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _features_bits(seed: int, num_heads: int, num_samples: int, head_dim: int, device) -> torch.Tensor:
    """The evaluation features of PerformerAttention, float32 N(0, I) of shape
    (1, H, S, D) drawn on the CPU from ``seed``, stored as their int32 bit patterns so that
    ``module.half()`` / ``.double()`` never round them (``.to(device)`` moves them)."""
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn((1, num_heads, num_samples, head_dim), generator=g, dtype=torch.float32)
    return w.view(torch.int32).to(device)


class PerformerAttention(_ProjectedAttention):
    """Multi-head RFA / Performer attention (positive random features).

    Same interface and conventions as :class:`LaraAttention` (MHA's arguments and
    defaults, then keyword-only ``num_samples, backend, generator, seed, check_finite,
    num_kv_heads``; grouped-query attention as in the module doc, each query head with its
    own features).

    Training: every forward draws fresh features ``w`` as float32
    ``randn((B, H, S, D), generator=self.generator)`` (None = global RNG), exactly as
    :func:`lara_kernels.rfa_attention` draws them, so it equals that function called with
    a generator in the same state.

    Evaluation: one fixed set of features of shape (H, S, D), drawn from ``seed`` (a
    random one by default) and shared by every batch element, so the result is
    deterministic and does not depend on an element's position in the batch. The seed is
    the buffer ``feature_seed``, saved in the state dict; loading a state dict without it
    (an ``nn.MultiheadAttention`` one, with ``strict=True``) keeps the current seed.
    Loading a PerformerAttention state dict into ``nn.MultiheadAttention`` needs
    ``strict=False`` (or the key ``feature_seed`` removed).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, num_samples=64, backend="auto", generator=None, seed=None, check_finite=False,
                 num_kv_heads=None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype, num_kv_heads=num_kv_heads)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.backend = _check_backend(backend)
        self.generator = _check_generator_type(generator)
        self.check_finite = _check_bool("check_finite", check_finite)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=generator))
        seed = _check_int("seed", seed, 0)
        self.register_buffer("feature_seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self.register_buffer("_eval_features", _features_bits(seed, num_heads, self.num_samples,
                                                              self.head_dim, device), persistent=False)
        self.register_load_state_dict_pre_hook(_keep_seed_if_absent)
        self.register_load_state_dict_post_hook(_redraw_features)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{self._kv_repr()}, "
                f"num_samples={self.num_samples}, batch_first={self.batch_first}")

    def eval_features(self) -> torch.Tensor:
        """The fixed evaluation features, float32 (1, H, S, D)."""
        return self._eval_features.view(torch.float32)

    def _attend(self, q, k, v, q_pad, k_pad, grid):
        if grid is not None:
            raise ValueError("grid is only used by LaraAttention(landmarks='pool2d')")
        B, H, _, D = q.shape
        if self.training:
            w = _ops.draw_normal((B, H, self.num_samples, D), self.generator, q.device)
        else:
            w = self.eval_features().expand(B, H, self.num_samples, D)
        return _ops.rfa_features(q, k, v, w, key_padding_mask=k_pad, query_padding_mask=q_pad,
                                 backend=self.backend, enable_gqa=self._gqa)


def _keep_seed_if_absent(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
    """A state dict without ``feature_seed`` (nn.MultiheadAttention's) keeps the layer's seed."""
    key = prefix + "feature_seed"
    if key not in state_dict:
        state_dict[key] = module.feature_seed.detach().clone()


def _redraw_features(module, incompatible_keys):
    f = module._eval_features
    module._eval_features = _features_bits(int(module.feature_seed), module.num_heads, module.num_samples,
                                           module.head_dim, f.device)


ATTENTIONS = ("lara", "performer", "softmax")


def _activation(activation):
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")   # torch's error
    if not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    return activation


class LaraEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` with a choice of attention.

    Same arguments in the same order and with the same defaults as
    ``nn.TransformerEncoderLayer`` (``d_model, nhead, dim_feedforward=2048, dropout=0.1,
    activation=relu, layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True,
    device, dtype``; ``activation`` is ``"relu"``, ``"gelu"`` or a callable), the same
    structure (self-attention, then a two-layer feed-forward block, each with dropout and
    a residual; ``norm_first`` chooses pre-norm or post-norm) and the same parameter
    names, so a torch layer's state dict loads into it (``strict=True``) and it stacks in
    ``nn.TransformerEncoder``. Keyword-only: ``attention`` picks ``"lara"``
    (:class:`LaraAttention`), ``"performer"`` (:class:`PerformerAttention`) or
    ``"softmax"`` (``nn.MultiheadAttention``, i.e. SDPA); ``num_kv_heads`` (None =
    ``nhead``) makes the self-attention grouped-query (see :class:`LaraAttention`; not for
    ``"softmax"``); ``**attn_kwargs`` go to the attention's constructor (e.g.
    ``num_samples=16, landmarks="learned"``, ``check_finite=True``). ``src_mask`` and
    ``is_causal=True`` raise NotImplementedError (padding masks only:
    ``src_key_padding_mask``, bool or float 0 / -inf).
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1,
                 activation: Union[str, Callable[[torch.Tensor], torch.Tensor]] = F.relu,
                 layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None,
                 dtype=None, *, attention="lara", num_kv_heads=None, **attn_kwargs):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.attention = _choice("attention", attention, ATTENTIONS)
        d_model = _check_int("d_model", d_model, 1)
        nhead = _check_int("nhead", nhead, 1)
        dim_feedforward = _check_int("dim_feedforward", dim_feedforward, 1)
        dropout = _check_probability("dropout", dropout)
        layer_norm_eps = _check_real("layer_norm_eps", layer_norm_eps, positive=True)
        batch_first = _check_bool("batch_first", batch_first)
        self.norm_first = _check_bool("norm_first", norm_first)
        bias = _check_bool("bias", bias)
        act = _activation(activation)
        if attention == "softmax":
            if attn_kwargs:
                raise ValueError(f"attention='softmax' takes no extra arguments, got {sorted(attn_kwargs)}")
            if num_kv_heads is not None and _check_num_kv_heads(num_kv_heads, nhead) != nhead:
                raise ValueError(f"attention='softmax' (nn.MultiheadAttention) has no grouped-query attention: "
                                 f"num_kv_heads must be None or nhead={nhead}, got num_kv_heads={num_kv_heads}")
            self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                   batch_first=batch_first, **fk)
        else:
            cls = LaraAttention if attention == "lara" else PerformerAttention
            self.self_attn = cls(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, **fk,
                                 num_kv_heads=num_kv_heads, **attn_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **fk)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **fk)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = act

    @property
    def batch_first(self) -> bool:
        return self.self_attn.batch_first

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


def _lara_from_mha(mha: nn.MultiheadAttention, options: dict) -> LaraAttention:
    """A LaraAttention with ``mha``'s configuration, weights, device, dtype and mode."""
    w = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
    if mha.bias_k is not None or mha.add_zero_attn:
        raise NotImplementedError(
            f"convert: nn.MultiheadAttention with add_bias_kv={mha.bias_k is not None} and add_zero_attn="
            f"{mha.add_zero_attn} has no LARA counterpart (LARA has no bias key/value row)")
    new = LaraAttention(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                        kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device=w.device,
                        dtype=w.dtype, **options)
    missing, unexpected = new.load_state_dict(mha.state_dict(), strict=False)
    extra = [k for k in missing if "landmark_proj" not in k]
    if unexpected or extra:     # cannot happen for the MHA configurations accepted above
        raise RuntimeError(f"convert: weights did not map (missing {extra}, unexpected {unexpected})")
    new.train(mha.training)
    return new


def convert(module: nn.Module, **options) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``module`` by :class:`LaraAttention`, in place.

    This covers the attention of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
    (their ``self_attn`` / ``multihead_attn``) and any model holding MHA modules. Each new
    layer gets the MHA's ``embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first``,
    its device, dtype and train/eval mode, and its weights (``in_proj_weight`` or
    ``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``); ``options`` are
    LaraAttention's keyword-only arguments (``num_samples=``, ``landmarks=``, ...), the same
    for every layer. With ``landmarks="learned"`` the landmark projections are new
    parameters, freshly initialized.

    Returns ``module`` (or, when ``module`` itself is an ``nn.MultiheadAttention``, its
    replacement). The calls of the converted model must then be ones LaraAttention takes:
    padding masks only (an ``attn_mask``/``src_mask`` or ``is_causal=True``, as a
    ``TransformerDecoderLayer``'s causal self-attention, raises NotImplementedError), and
    ``need_weights=False`` (``nn.TransformerEncoderLayer`` already passes it).
    MHA with ``add_bias_kv=True`` or ``add_zero_attn=True`` raises NotImplementedError
    before anything is replaced.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if options.get("num_kv_heads") is not None:
        raise ValueError(f"convert keeps each nn.MultiheadAttention's heads (num_heads key/value heads, its weights); "
                         f"num_kv_heads is not an option of convert, got num_kv_heads={options['num_kv_heads']}")
    LaraAttention(8, 1, **options)          # check the options once, before touching the model
    if isinstance(module, nn.MultiheadAttention):
        return _lara_from_mha(module, options)
    # every name of every MHA (a module shared by two parents gets one replacement, shared too)
    targets = [(name, m) for name, m in module.named_modules(remove_duplicate=False)
               if isinstance(m, nn.MultiheadAttention)]
    built = {}
    for _, m in targets:                    # build all first: a failure leaves the model unchanged
        if id(m) not in built:
            built[id(m)] = _lara_from_mha(m, options)
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, built[id(m)])
    return module
