"""Helpers shared by the launch wrappers and kernels: buffer allocation, block sizes,
split counts from occupancy, the device guard and launch, and the tensor-core product.

Every buffer a kernel writes (outputs, gradients, per-split partials) is allocated by
``empty`` below, never by ``torch.empty`` directly, so that the tests can replace it by
a NaN-filled allocation and an element a kernel forgot to write fails the comparison.

Every kernel is started by ``launch`` (device guard, then ``kernel[grid](...)``), so a
test can capture the grid and constants a launcher picks (on meta tensors, no GPU) and
check the guard. Host paths never synchronize with the device (no ``.item()``, no
``bool(tensor)``): a call can be captured in a CUDA graph. In the packed layout this
means cu_seqlens is only ever read by the kernels; the host sizes grids and splits by
max_seqlen (an int).

Two layouts of the long tensors (``layout``, ``long_strides``): padded (B, H, L, D) with
an optional padding mask, and packed (T, H, D) with cu_seqlens (B + 1) int32,
flash-attention's varlen convention. The kernels take the packed one as the constexpr
VARLEN with stride_b = 0: sequence b's rows start at row cu[b] (the row pointer is
base + (cu[b] + n) * stride_row, int64) and n is valid below cu[b + 1] - cu[b].

Precision of the products (``mma`` below, issue 13):
- float16 / bfloat16 inputs: ``tl.dot`` on the input dtype (tensor cores) with float32
  accumulation; float32 operands computed in the kernel (probabilities, gradients of the
  logits, C-sized rows) are rounded to the input dtype (round to nearest even) before
  the product, as flash-attention does. Everything else (exp, sums, the online softmax)
  is float32.
- float32 inputs follow ``torch.get_float32_matmul_precision()``:
  "highest" -> "ieee" (exact float32 products, float32 accumulation: ~1e-7 relative);
  "high"    -> "tf32x3" (three TF32 products per product: about float32 accuracy,
               ~1e-6 relative, at a third of the tensor-core rate; more accurate than
               PyTorch's own "high", which allows plain TF32 or bf16x3);
  "medium"  -> "tf32" (10-bit mantissa operands: ~1e-3 relative, within PyTorch's
               "medium", which allows bfloat16 products).
- Under the Triton interpreter (CPU tensors, tests) the product is emulated: operands
  are rounded to the input dtype exactly as above, then multiplied in float32 ("ieee").
  The interpreter's own half-dtype ``tl.dot`` cannot be trusted (bfloat16 is held as
  uint16 there and multiplied as integers), and with exact float32 products of rounded
  operands the result equals a tensor-core product up to the summation order.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


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


def layout(x, w, cu_seqlens, max_seqlen):
    """(varlen, length of the long axis that the grid or the splits cover, CU argument)
    of a pass on the long tensor ``x`` and the C-sized ``w`` (B, H, C, D). Padded layout
    (cu_seqlens None): x (B, H, L, D), L; CU is a stand-in pointer the kernels never read.
    Packed layout: x (T, H, D), cu_seqlens (B + 1) int32 on x's device (values trusted,
    never read on the host), max_seqlen >= every length."""
    if cu_seqlens is None:
        return False, x.shape[2], x
    assert cu_seqlens.dtype == torch.int32 and tuple(cu_seqlens.shape) == (w.shape[0] + 1,), \
        (cu_seqlens.dtype, tuple(cu_seqlens.shape), tuple(w.shape))
    assert x.dim() == 3 and x.device == cu_seqlens.device, (tuple(x.shape), cu_seqlens.device)
    return True, int(max_seqlen), cu_seqlens


def long_strides(x, varlen):
    """(stride_b, stride_h, stride_row, stride_d) of a long tensor: (B, H, L, D) as is;
    packed (T, H, D) with stride_b = 0 (the kernels offset by the sequence's first row)."""
    if varlen:
        return 0, x.stride(-2), x.stride(-3), x.stride(-1)
    return tuple(x.stride()[-4:])


# ----------------------------------------------------------------------------- device and launch


def device_guard(device: torch.device):
    """Make ``device`` current for a launch (tensors on cuda:1 with cuda:0 current)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, device, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` under the device guard. Meta tensors (shape
    tracing, and the tests that capture launch parameters) launch nothing. Only grid
    axis 0 is used (limit 2**31 - 1); axes 1 and 2 are capped at 65535."""
    assert len(grid) == 1, grid
    if device.type == "meta" or grid[0] == 0:   # an empty grid (B * H = 0) has nothing to do
        return
    with device_guard(device):
        kernel[grid](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


DEFAULT_SMS = 8  # meta and CPU: the interpreter runs programs one after another, so a few
                 # splits are fastest there, and more than one still tests the combine step


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached per device); DEFAULT_SMS elsewhere."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def arch(device: torch.device):
    """Compute capability of ``device`` as 80, 90, ... (cached per device); None for CPU
    and meta tensors (the interpreter, shape tracing), where the launchers take the
    choices of the newest architecture. The block sizes and warps of a launch depend on it
    (``blocks`` of each pass): tests/test_triton_aot.py replaces it by the architecture it
    compiles for, so the check sees the launchers' own choice for that target."""
    if device.type == "cuda":
        return _capability(device.index if device.index is not None else torch.cuda.current_device())
    return None


def num_splits(n_blocks: int, other_programs: int, device: torch.device, per_sm: int = 1, splits=None):
    """Split ``n_blocks`` blocks of the long axis into (splits, blocks_per_split) so that
    splits x other_programs fills the device once: ``per_sm`` programs of this kernel are
    resident per SM (its occupancy, from its registers and shared memory measured by the
    AOT check, tests/test_triton_aot.py), and more splits only add partials to combine."""
    if splits is None:
        splits = cdiv(per_sm * sm_count(device), max(other_programs, 1))
    splits = max(1, min(n_blocks, splits))
    per_split = cdiv(n_blocks, splits)
    if per_split == 0:   # an empty long axis: one split of no block (neutral partials)
        return 1, 0
    return cdiv(n_blocks, per_split), per_split


# ----------------------------------------------------------------------------- precision

_F32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the products for inputs of ``dtype`` (module docstring);
    for half dtypes it is unused (the operands are not float32)."""
    if dtype == torch.float32:
        return _F32_PRECISION[torch.get_float32_matmul_precision()]
    return "ieee"


def emulated(device: torch.device) -> bool:
    """Whether the kernels run under the interpreter (products emulated, see above)."""
    return device.type != "cuda"


@triton.jit
def _rne_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), held in float32. The
    interpreter converts float32 -> bfloat16 by truncation whatever the rounding asked
    for; GPUs round to nearest even, so the emulation rounds the bits itself."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rnd(x, DT: tl.constexpr, EMU: tl.constexpr):
    """x as an operand (or output) of dtype DT (float32 -> half: round to nearest even)."""
    if DT == tl.float32:
        return x.to(tl.float32)
    else:
        if x.dtype == DT:
            return x
        else:
            if EMU and DT == tl.bfloat16:
                return _rne_bf16(x.to(tl.float32)).to(DT)
            else:
                return x.to(tl.float32).to(DT, fp_downcast_rounding="rtne")


@triton.jit
def mma(a, b, DT: tl.constexpr, PREC: tl.constexpr, EMU: tl.constexpr):
    """a @ b with operands of dtype DT and float32 accumulation (module docstring)."""
    if EMU:
        return tl.dot(rnd(a, DT, EMU).to(tl.float32), rnd(b, DT, EMU).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(rnd(a, DT, EMU), rnd(b, DT, EMU), input_precision=PREC, out_dtype=tl.float32)
