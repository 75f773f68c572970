"""``lara_attention`` captured in a CUDA graph and replayed equals eager (issue 13 item 7).

For the ``triton`` and ``cuda`` backends, evaluation mode, without and with padding
masks: the forward alone (under no_grad), and the forward with the backward
(``torch.autograd.grad`` inside the capture, as in torch's whole-network capture). The
static inputs (and masks) are refilled with new values before each replay, and the
replayed results must equal, bit for bit, an eager call on those values: both run the
same kernels with the same launch configurations, and the passes are deterministic
(fixed-order partial sums, no atomics), so any difference means a replay read stale
data or the capture missed work. The second masks pad every key of the last batch
element (its output rows are 0). A host synchronization anywhere in the call would
make the capture itself fail. Every test needs a GPU (marker ``gpu``).
"""

import pytest
import torch

from lara_kernels import dispatch, lara_attention

pytestmark = pytest.mark.gpu

B, H, N, M, D, DV, C = 2, 3, 300, 257, 64, 48, 16   # N, M not multiples of C or of a block
BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16]


def _values(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, N, D), (B, H, M, D), (B, H, M, DV), (B, H, N, DV))
    return [torch.randn(s, generator=g).to("cuda", dtype) for s in shapes]


def _masks(seed):
    """(key_padding_mask, query_padding_mask), True = padding, about 30 % padded; element 0
    keeps its first rows; with seed 2 every key of the last element is padding."""
    g = torch.Generator().manual_seed(100 + seed)
    kpm, qpm = torch.rand(B, M, generator=g) < 0.3, torch.rand(B, N, generator=g) < 0.3
    kpm[0, 0] = qpm[0, 0] = False
    if seed == 2:
        kpm[-1] = True
    return kpm.cuda(), qpm.cuda()


def _call(backend, q, k, v, masks=None):
    kpm, qpm = masks if masks is not None else (None, None)
    return lara_attention(q, k, v, num_samples=C, proposal="segment", weighting="optimal", backend=backend,
                          key_padding_mask=kpm, query_padding_mask=qpm)


def _ready(backend, q):
    reasons = dispatch.backends()[backend].not_supported_reasons("lara", q, q, q, num_samples=C)
    assert not reasons, f"backend {backend!r} cannot run on this GPU: {reasons}"


def _capture(work):
    """Warm ``work`` up on a side stream (compilation, autotuning, allocator), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = work()
    return graph, out


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_replay_equals_eager(backend, dtype, masked):
    q, k, v, _ = _values(dtype, 0)
    masks = _masks(0) if masked else None
    _ready(backend, q)

    def work():
        with torch.no_grad():
            return _call(backend, q, k, v, masks)

    graph, y = _capture(work)
    seen = []
    for seed in (1, 2):
        new = _values(dtype, seed)[:3]
        new_masks = _masks(seed) if masked else None
        for static, value in zip((q, k, v) + (masks or ()), new + list(new_masks or ())):
            static.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = _call(backend, *new, masks=new_masks)
        assert torch.isfinite(y).all()
        assert torch.equal(y, eager), f"replay differs from eager by {(y.float() - eager.float()).abs().max():.3g}"
        seen.append(y.clone())
    assert not torch.equal(seen[0], seen[1])   # the replays computed on the new inputs


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward_replay_equals_eager(backend, dtype, masked):
    q, k, v, dy = (t.requires_grad_(i < 3) for i, t in enumerate(_values(dtype, 0)))
    masks = _masks(0) if masked else None
    _ready(backend, q)

    def work():
        y = _call(backend, q, k, v, masks)
        return (y.detach(), *torch.autograd.grad(y, (q, k, v), dy))

    graph, outs = _capture(work)
    for seed in (1, 2):
        new = _values(dtype, seed)
        new_masks = _masks(seed) if masked else None
        with torch.no_grad():
            for static, value in zip((q, k, v, dy) + (masks or ()), new + list(new_masks or ())):
                static.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        leaves = [t.clone().requires_grad_(True) for t in new[:3]]
        y = _call(backend, *leaves, masks=new_masks)
        eager = (y.detach(), *torch.autograd.grad(y, leaves, new[3]))
        for name, got, want in zip(("y", "dq", "dk", "dv"), outs, eager):
            assert torch.isfinite(got).all(), name
            diff = (got.float() - want.float()).abs().max()
            assert torch.equal(got, want), f"{name}: replay differs from eager by {diff:.3g}"
