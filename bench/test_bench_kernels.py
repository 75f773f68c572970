"""Microbenchmarks of the core ops, for regressions: ``pytest bench/ --benchmark-compare``.

lara_attention (forward, forward+backward) and rfa_attention (forward, forward+backward)
on every backend that can run the inputs, except the Triton interpreter, next to
``scaled_dot_product_attention``, at a few small shapes. Each case first checks its
output against the eager reference on the same inputs, so a fast but wrong kernel fails
here rather than posting a good time. With ``--benchmark-disable`` every case runs once
(CI: proves the suite executes, well under a minute on a CPU).
"""

import pytest
import torch
import torch.nn.functional as F

from lara_kernels import dispatch
from lara_kernels.bench import attention_fn, make_inputs, rel_rms, runnable_backends

# (B, H, N, D, C): small, and N not a multiple of C in one of them
SHAPES = [(1, 2, 256, 64, 32), (2, 4, 1000, 64, 64)]
SHAPE_IDS = [f"B{b}H{h}N{n}D{d}C{c}" for b, h, n, d, c in SHAPES]
DTYPE = torch.float32


def _cases():
    """(method, shape) for every backend that fits on this machine's default device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = []
    for shape, sid in zip(SHAPES, SHAPE_IDS):
        B, H, N, D, C = shape
        probe = torch.empty((1, 1, 8, D), device=device, dtype=DTYPE)
        cases.append(pytest.param("sdpa", shape, id=f"sdpa-{sid}"))
        for op in ("lara", "rfa"):
            names, _ = runnable_backends(op, probe, probe, probe, C)
            cases += [pytest.param(f"{op}/{b}", shape, id=f"{op}-{b}-{sid}") for b in names]
    return cases


CASES = _cases()


def _inputs(shape, device, grad):
    B, H, N, D, C = shape
    q, k, v = make_inputs(B, H, N, D, DTYPE, device)
    if grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return q, k, v


def _check(method, shape, q, k, v, y):
    """Same-input check against the reference (SDPA against exact softmax)."""
    q, k, v = (t.detach() for t in (q, k, v))
    if method == "sdpa":
        from lara_kernels.reference import softmax_reference

        ref = softmax_reference(q.double(), k.double(), v.double())
    else:
        op = method.split("/")[0]
        ref = attention_fn(f"{op}/reference", shape[4])(q.double(), k.double(), v.double())
    assert y.shape == ref.shape
    assert rel_rms(y.detach(), ref) < 2e-3, f"{method} disagrees with the reference"


@pytest.mark.parametrize("method,shape", CASES)
def test_forward(benchmark, method, shape, device):
    fn = attention_fn(method, shape[4])
    q, k, v = _inputs(shape, device, grad=False)
    benchmark.group = f"forward {shape}"
    benchmark.extra_info.update(method=method, shape=shape, dtype=str(DTYPE), device=str(device))

    def run():
        with torch.no_grad():
            y = fn(q, k, v)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return y

    y = benchmark(run)
    _check(method, shape, q, k, v, y)


@pytest.mark.parametrize("method,shape", CASES)
def test_forward_backward(benchmark, method, shape, device):
    fn = attention_fn(method, shape[4])
    q, k, v = _inputs(shape, device, grad=True)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    benchmark.group = f"fwd+bwd {shape}"
    benchmark.extra_info.update(method=method, shape=shape, dtype=str(DTYPE), device=str(device))

    def run():
        y = fn(q, k, v)
        grads = torch.autograd.grad(y, (q, k, v), dy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return y, grads

    y, grads = benchmark(run)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    _check(method, shape, q, k, v, y)


def test_interpreter_never_timed():
    """The Triton backend on CPU tensors (interpreter) is skipped with a reason."""
    if "triton" not in dispatch.backends():
        pytest.skip("triton backend not registered")
    probe = torch.empty((1, 1, 8, 64))
    names, skipped = runnable_backends("lara", probe, probe, probe, 16)
    assert "triton" not in names and skipped["triton"]
