"""The packed layout of variable-length batches (flash-attention's varlen convention).

A packed batch holds B sequences of different lengths back to back: q is (T, H, D) with
``cu_seqlens`` (B + 1) int32 offsets, sequence b being rows ``cu_seqlens[b] ..
cu_seqlens[b + 1] - 1`` (``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[B] = T``),
and ``max_seqlen`` an int at least every length (it sizes the GPU grids, so the kernels
never read the offsets on the host). The C-sized tensors of the passes (landmarks,
samples, key statistics) stay (B, H, C, ...), one row block per sequence.

In the passes, a :class:`Packed` value takes the place of the padding mask: the fused
backends hand its two fields to their kernels, which index each sequence by its offsets
(no padded copy, no work on rows that do not exist). The eager passes
(``_passes_torch``: the double-backward and forward-AD paths) scatter the rows into a
zero-padded (B, H, max_seqlen, D) tensor with a padding mask and back, with
differentiable index ops (:func:`to_padded`, :func:`to_packed`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Packed(NamedTuple):
    """The layout argument of a packed batch: offsets (B + 1) int32 and the longest length."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def lengths(self) -> torch.Tensor:
        """(B,) int64 lengths, on the offsets' device (no host synchronization)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()


def is_packed(padding) -> bool:
    return isinstance(padding, Packed)


def no_packed_vmap(cu_seqlens) -> None:
    """The vmap rules of the passes and landmarks ops refuse a packed batch (``cu_seqlens``
    given): it already holds many sequences."""
    if cu_seqlens is not None:
        raise NotImplementedError(
            "torch.vmap over packed (varlen) batches is not supported (lara_attention_varlen, "
            "rfa_attention_varlen): a packed batch already holds many sequences; pack the vmapped ones into it "
            "instead")


def _rows(layout: Packed, total: int):
    """(destination row in the padded (B * max_seqlen) view, padding mask (B, max_seqlen))
    of each of the ``total`` packed rows, computed on the device without synchronizing."""
    cu = layout.cu_seqlens.long()
    B, L = layout.num_seqs, max(int(layout.max_seqlen), 1)
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(B, device=cu.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[:-1][seq]
    dest = seq * L + pos
    padding = torch.arange(L, device=cu.device)[None, :] >= lengths[:, None]
    return dest, padding, B, L


def to_padded(x: torch.Tensor, layout: Packed):
    """(T, H, D) packed rows -> ((B, H, max_seqlen, D) zero-padded, padding mask (B, max_seqlen))."""
    T, H, D = x.shape
    dest, padding, B, L = _rows(layout, T)
    out = x.new_zeros((B * L, H, D)).index_put((dest,), x)
    return out.view(B, L, H, D).transpose(1, 2), padding


def to_packed(y: torch.Tensor, layout: Packed, total: int):
    """(B, H, max_seqlen, Dv) padded -> (T, H, Dv) packed rows (``total`` = T)."""
    B, H, L, Dv = y.shape
    dest, _, _, _ = _rows(layout, total)
    return y.transpose(1, 2).reshape(B * L, H, Dv)[dest]


# ----------------------------------------------------------------------------- public helpers


def pack(x: torch.Tensor, padding_mask: torch.Tensor):
    """A padded batch -> the packed layout of :func:`lara_kernels.lara_attention_varlen`.

    Args:
        x: (B, L, ...) with the sequence axis second (as ``batch_first`` layers hold it;
            for (B, H, L, D) attention inputs pass ``x.transpose(1, 2)``).
        padding_mask: (B, L) bool, True = padding (the ``nn.MultiheadAttention``
            convention). Valid positions need not be contiguous: they are packed in order.

    Returns:
        (packed (T, ...), cu_seqlens (B + 1,) int32, max_seqlen int, indices (T,) int64):
        ``packed = x.flatten(0, 1)[indices]``; :func:`unpack` puts rows back. Reads the
        mask's counts once on the host (for T and max_seqlen), like flash-attention's
        ``unpad_input``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor (B, L, ...), got {tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        raise TypeError("padding_mask must be a bool tensor (B, L), True = padding")
    if tuple(padding_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"padding_mask must have shape (B, L) = {tuple(x.shape[:2])}, got {tuple(padding_mask.shape)}")
    if padding_mask.device != x.device:
        raise ValueError(f"padding_mask is on {padding_mask.device} but x is on {x.device}")
    valid = ~padding_mask
    lengths = valid.sum(-1, dtype=torch.int32)
    cu = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu[1:] = lengths.cumsum(0)
    indices = valid.flatten().nonzero().flatten()
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return x.flatten(0, 1)[indices], cu, max_seqlen, indices


def unpack(packed: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (T, ...) rows -> (B, L, ...), zeros at padded positions
    (differentiable; the gradient of a padded position is 0)."""
    out = packed.new_zeros((batch * length,) + tuple(packed.shape[1:]))
    return out.index_put((indices,), packed).view((batch, length) + tuple(packed.shape[1:]))
