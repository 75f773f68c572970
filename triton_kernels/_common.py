"""Helpers shared by the launch wrappers: buffer allocation, block sizes, split counts.

Every buffer a kernel writes (outputs, gradients, per-block partials) is allocated by
``empty`` below, never by ``torch.empty`` directly, so that the tests can replace it by
a NaN-filled allocation and an element a kernel forgot to write fails the comparison.
"""

from __future__ import annotations

import torch


def empty(shape, dtype, device):
    """Uninitialized buffer that a kernel fills completely (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def pow2(x: int, least: int = 16) -> int:
    """Smallest power of two >= max(x, least); ``least`` = 16 keeps tl.dot operands legal."""
    p = least
    while p < x:
        p *= 2
    return p


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def target_programs(device: torch.device) -> int:
    """About how many programs fill the device: two waves of the SMs on a GPU; a few under
    the interpreter (it runs programs one after another, so fewer is faster, but more
    than one split still exercises the combine step)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def num_splits(n_blocks: int, other_programs: int, device: torch.device, splits=None):
    """Split ``n_blocks`` blocks of the long axis into (splits, blocks_per_split)."""
    if splits is None:
        splits = cdiv(target_programs(device), max(other_programs, 1))
    splits = max(1, min(n_blocks, splits))
    per_split = cdiv(n_blocks, splits)
    return cdiv(n_blocks, per_split), per_split
