"""Kernel launches and host synchronization of a call on a GPU (issue 13 item 5).

The targets: a forward of the default configuration (``proposal="segment"``,
``weighting="optimal"``, no padding masks, ``training=False``) in at most 6 kernel launches
(with ``training=True`` the draw of the noise, ``torch.randn`` in the API, is one more),
and no host-device synchronization anywhere in forward or backward. The launches are
counted by the CUDA profiler (every kernel the call puts on the device: the passes, the
small C x D / C x C kernels, and any torch op that launches one); the synchronizations by
``torch.cuda.set_sync_debug_mode("error")``, which raises on any call that waits for the
device (``.item()``, ``bool(tensor)``, a copy to the host, ``nonzero``). The same checks run
without a GPU on the backends' own terms: tests/test_triton_whole.py counts the Triton
launches under the interpreter, tests/test_cuda_ops.py the CUDA launches under the
emulation. Every test here needs a GPU (marker ``gpu``).
"""

import pytest
import torch

from lara_kernels import dispatch, lara_attention

pytestmark = pytest.mark.gpu

B, H, N, D, C = 2, 4, 1024, 64, 64
MAX_FORWARD_LAUNCHES = 6
BACKENDS = ["triton", "cuda"]


def _inputs(dtype, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g, device="cuda", dtype=dtype).requires_grad_(requires_grad)
            for _ in range(3)]


def _call(backend, q, k, v, training=True, **extra):
    g = torch.Generator(device="cuda").manual_seed(1) if training else None
    return lara_attention(q, k, v, num_samples=C, training=training, generator=g, backend=backend, **extra)


def _ready(backend, q):
    reasons = dispatch.backends()[backend].not_supported_reasons("lara", q, q, q, num_samples=C)
    assert not reasons, f"backend {backend!r} cannot run on this GPU: {reasons}"


def _kernels(fn):
    """Names of the kernels ``fn()`` launches (after a warm-up call: compilation, caches)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
            and "memset" not in e.name.lower()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("training", [False, True])
def test_forward_launches(backend, dtype, training):
    q, k, v = _inputs(dtype)
    _ready(backend, q)
    with torch.no_grad():
        names = _kernels(lambda: _call(backend, q, k, v, training=training))
    limit = MAX_FORWARD_LAUNCHES + int(training)    # training: + the noise draw
    assert 0 < len(names) <= limit, f"{backend} forward launched {len(names)} kernels: {names}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_no_host_sync(backend, masked):
    q, k, v = _inputs(torch.bfloat16, requires_grad=True)
    _ready(backend, q)
    extra = {}
    if masked:
        pad = torch.zeros(B, N, dtype=torch.bool, device="cuda")
        pad[0, N // 2:] = True
        pad[1] = True                      # an element with no valid key or query: output 0
        extra = dict(padding_mask=pad)
    _call(backend, q, k, v, **extra).sum().backward()   # warm-up (compilation may synchronize)
    torch.cuda.synchronize()
    dy = torch.randn(B, H, N, D, device="cuda", dtype=q.dtype)
    torch.cuda.set_sync_debug_mode("error")      # any synchronizing call raises from here on
    try:
        y = _call(backend, q, k, v, **extra)
        grads = torch.autograd.grad(y, (q, k, v), dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape == (B, H, N, D) and torch.isfinite(y).all()
    assert all(g.shape == t.shape and torch.isfinite(g).all() for g, t in zip(grads, (q, k, v)))
    if masked:   # the element with no valid key or query: output and gradients exactly 0
        assert (y[1] == 0).all() and all((g[1] == 0).all() for g in grads)
