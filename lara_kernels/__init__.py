"""lara-kernels: fused kernels for LARA, linear randomized attention.

    from lara_kernels import lara_attention
    y = lara_attention(q, k, v, num_samples=64)      # q, k, v: (B, H, N, D)

See README.md and docs/math.md for the definition every backend computes.
"""

from .api import (PROPOSALS, WEIGHTINGS, lara_attention, lara_attention_varlen, ra_attention, rfa_attention,
                  rfa_attention_varlen)
from ._varlen import pack, unpack
from .dispatch import backends
from . import nn  # noqa: E402  (layers: LaraAttention, PerformerAttention, LaraEncoderLayer)

__version__ = "0.1.0"

__all__ = ["pack", "unpack", "lara_attention", "lara_attention_varlen", "rfa_attention", "rfa_attention_varlen", "ra_attention", "backends", "PROPOSALS", "WEIGHTINGS", "__version__"]
