"""The triton backend's lean path (lara_kernels/_whole_triton.py: one sequence of Triton
launches per direction under one Function) against the Triton pipeline it replaces
(``_pipeline.lara_forward(TritonPasses, ...)``, the same eps) and against the reference,
forward and every gradient; its launch count and the absence of torch compute ops and of
host-device synchronization.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py). Every buffer a kernel writes starts as NaN (integer ones as the most
negative value), so an element a kernel forgets to write fails the comparison.

Tolerances (relative RMS error, sqrt(mean((a - b)^2)) / sqrt(mean(b^2))):
- PIPE_TOL[float32] = 5e-6 against the pipeline: both run the same long-pass kernels on
  the same inputs; only the summation order of the C-sized steps differs (the landmarks
  as a one-hot product against the compiled segment means, the combines and C x C steps
  in kernels against torch ops, gradients summed in one kernel instead of by autograd).
  float32's unit roundoff is 6e-8; measured 1e-7 .. 7e-7 on these cases (the larger
  ones on gradients through 1 / alpha); 5e-6 leaves a margin of about seven, while a
  wrong index or formula gives 1e-3 or more.
- PIPE_TOL[half] = two unit roundoffs of the dtype (bfloat16 7.8e-3, float16 9.8e-4):
  the two paths round the same operands at the same points (y and dv come out bitwise
  equal here), but dq and dk are sums of three parts (query pass, normalizer,
  landmarks) that this path adds in float32 and rounds once, where autograd adds parts
  already rounded to the dtype: about one unit roundoff apart (measured bfloat16
  3.6e-3 .. 4.5e-3, float16 1.8e-4 .. 4.2e-4). So that the difference is not an error
  of this path, its error against the float64 reference must also be at most
  K_HALF = 1.25 times the pipeline's (+ 1e-5): measured ratios 0.89 .. 1.07 (both
  errors are dominated by the shared roundings of the operands), while a misplaced
  rounding point moves the ratio far more (test_triton.py: 5.1).
- REF_TOL = 2e-5 against the float64 reference (float32): tests/test_triton.py's
  FWD_TOL / GRAD_TOL, with its justification.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from helpers import rel_rms  # noqa: E402
from lara_kernels import _pipeline, _whole_triton, lara_attention, lara_attention_varlen  # noqa: E402
from lara_kernels._triton_backend import TritonPasses  # noqa: E402
from lara_kernels.reference import lara_reference  # noqa: E402
from lara_kernels.triton_kernels import _common  # noqa: E402

PIPE_TOL = {torch.float32: 5e-6, torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -11}
REF_TOL = 2e-5
K_HALF = 1.25

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (CPU) or a GPU")

# aten ops that only allocate or view (no compute, no copy); everything else counts
NO_COMPUTE = {"empty.memory_format", "empty_strided.default", "view.default", "view.dtype", "_unsafe_view.default",
              "as_strided.default", "slice.Tensor", "select.int", "alias.default", "detach.default"}
SYNC = {"_local_scalar_dense", "item", "is_nonzero"}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel-written buffers start as NaN; the fill is the test's, not the host path's, so
    it runs outside the op recorder (which then sees no allocation for these buffers)."""
    def nan_empty(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        with _disable_current_modes():
            return torch.full(tuple(shape), fill, dtype=dtype, device=device)

    monkeypatch.setattr(_common, "empty", nan_empty)


class _Record(TorchDispatchMode):
    """Every aten op dispatched (as "name.overload") outside kernel launches, and every
    ``_common.launch`` (kernel names). The interpreter's own tensor traffic inside a
    launch is not the host path's and is left out."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops, self.launches = [], []
        launch = _common.launch

        def recording(kernel, grid, device, *args, **kwargs):
            self.launches.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
            with _disable_current_modes():
                return launch(kernel, grid, device, *args, **kwargs)

        monkeypatch.setattr(_common, "launch", recording)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"{func.overloadpacket.__name__}.{func._overloadname}")
        return func(*args, **(kwargs or {}))

    def compute(self):
        return [o for o in self.ops if o not in NO_COMPUTE]

    def syncs(self):
        return [o for o in self.ops if o.split(".")[0] in SYNC]


# (name, B, H, H_kv, N, M, D, Dv, C, proposal, weighting, eps, layout)
# layout: "none" (padded, no mask), "masks" (query and key masks, element 1 with every
# key padded), "qmasks" (element 0 with every query padded), "kmask", "packed" (an empty
# sequence and one without keys), "packed2" (lengths below C)
CASES = [
    ("default", 2, 2, 2, 32, 24, 16, 8, 8, "segment", "optimal", True, "none"),
    ("masks-mixed", 2, 2, 2, 20, 28, 16, 16, 5, "mixed", "optimal", False, "masks"),
    ("qmasks-balance-gqa2", 2, 4, 2, 24, 20, 16, 8, 6, "segment", "balance", True, "qmasks"),
    ("gqa1-c-gt-n", 2, 4, 1, 9, 12, 16, 16, 16, "segment", "optimal", False, "kmask"),
    ("packed-mixed-balance-gqa2", 4, 4, 2, 0, 0, 16, 8, 6, "mixed", "balance", True, "packed"),
    ("packed-segment", 3, 2, 2, 0, 0, 24, 16, 12, "segment", "optimal", True, "packed2"),
]
PACKED_LENGTHS = {"packed": ([7, 0, 12, 5], [9, 0, 0, 6]), "packed2": ([13, 4, 20], [8, 30, 3])}


def _inputs(case, dtype, seed=0):
    """(q, k, v, eps, options) of a case, in dtype (eps float32)."""
    name, B, H, Hkv, N, M, D, Dv, C, proposal, weighting, with_eps, layout = case
    g = torch.Generator().manual_seed(seed)
    opts = dict(num_samples=C, proposal=proposal, weighting=weighting, beta=1.0, scale=D ** -0.5)
    if layout.startswith("packed"):
        nq, nk = PACKED_LENGTHS[layout]
        cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32)  # noqa: E731
        q = torch.randn(sum(nq), H, D, generator=g)
        k, v = torch.randn(sum(nk), Hkv, D, generator=g), torch.randn(sum(nk), Hkv, Dv, generator=g)
        opts.update(cu_seqlens_q=cu(nq), cu_seqlens_k=cu(nk), max_seqlen_q=max(nq), max_seqlen_k=max(nk))
    else:
        q = torch.randn(B, H, N, D, generator=g)
        k, v = torch.randn(B, Hkv, M, D, generator=g), torch.randn(B, Hkv, M, Dv, generator=g)
        qpm = torch.rand(B, N, generator=g) < 0.3
        kpm = torch.rand(B, M, generator=g) < 0.3
        if layout == "masks":
            kpm[1] = True
            opts.update(query_padding_mask=qpm, key_padding_mask=kpm)
        elif layout == "qmasks":
            qpm[0] = True
            opts.update(query_padding_mask=qpm, key_padding_mask=kpm)
        elif layout == "kmask":
            opts.update(key_padding_mask=kpm)
    eps = torch.randn(B, H, C, D, generator=g) if with_eps else None
    return q.to(dtype), k.to(dtype), v.to(dtype), eps, opts


def _grads(fn, q, k, v, eps, opts, dy_seed=7):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    y = fn(*xs, eps, **opts)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
    return y, torch.autograd.grad(y, xs, dy), y.grad_fn


def _pipeline_call(q, k, v, eps, **opts):
    return _pipeline.lara_forward(TritonPasses, q, k, v, eps, **opts)


def _check(name, got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert torch.isfinite(got).all(), name
    err = rel_rms(got.float(), want.float())
    assert err <= tol, f"{name}: relative RMS {err:.3g} > {tol}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_pipeline_float32(case, monkeypatch):
    q, k, v, eps, opts = _inputs(case, torch.float32)
    rec = _Record(monkeypatch)
    with rec:
        y, grads, fn = _grads(_whole_triton.lara, q, k, v, eps, opts)
    assert type(fn).__name__ == "_WholeTritonBackward", type(fn).__name__
    assert not rec.syncs(), rec.syncs()
    assert len(rec.launches) >= 10   # forward and backward ran under the recorder (balance: 5 + 5)
    y0, grads0, _ = _grads(_pipeline_call, q, k, v, eps, opts)
    for name, a, b in zip(("y", "dq", "dk", "dv"), (y,) + grads, (y0,) + grads0):
        _check(name, a, b, PIPE_TOL[torch.float32])


def test_strided_inputs():
    """q, k, v as (B, N, H, D) tensors seen as (B, H, N, D) (no copy): the kernels take the
    strides; the gradients come back in the inputs' shape."""
    q, k, v, eps, opts = _inputs(CASES[1], torch.float32)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    y, grads, fn = _grads(_whole_triton.lara, q, k, v, eps, opts)
    assert type(fn).__name__ == "_WholeTritonBackward"
    y0, grads0, _ = _grads(_pipeline_call, q, k, v, eps, opts)
    for name, a, b in zip(("y", "dq", "dk", "dv"), (y,) + grads, (y0,) + grads0):
        _check(name, a, b, PIPE_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_equals_pipeline_half(case, dtype):
    """Half inputs: within two unit roundoffs of the pipeline, and no farther from the
    float64 reference (on the same half-valued inputs and eps) than K_HALF times the
    pipeline's own error."""
    q, k, v, eps, opts = _inputs(case, dtype)
    y, grads, fn = _grads(_whole_triton.lara, q, k, v, eps, opts)
    assert type(fn).__name__ == "_WholeTritonBackward"
    y0, grads0, _ = _grads(_pipeline_call, q, k, v, eps, opts)
    y64, grads64, _ = _grads(lara_reference, q.double(), k.double(), v.double(), eps, opts)
    for name, a, b, r in zip(("y", "dq", "dk", "dv"), (y,) + grads, (y0,) + grads0, (y64,) + grads64):
        _check(name, a, b, PIPE_TOL[dtype])
        err, err0 = rel_rms(a.double(), r), rel_rms(b.double(), r)
        assert err <= K_HALF * err0 + 1e-5, f"{name}: error {err:.3g} against the pipeline's {err0:.3g}"


def _api(case, dtype, backend):
    """lara_attention(_varlen) on ``backend`` in dtype, training with a fixed generator
    (so eps is the same draw on both backends): (y, grads, grad_fn)."""
    q, k, v, eps, opts = _inputs(case, torch.float64)
    opts = dict(opts)
    varlen = "cu_seqlens_q" in opts
    opts["training"] = eps is not None

    def call(q_, k_, v_, _eps, **o):
        gen = torch.Generator().manual_seed(99)
        gqa = q_.shape[-2 if varlen else 1] != k_.shape[-2 if varlen else 1]
        f = lara_attention_varlen if varlen else lara_attention
        return f(q_, k_, v_, backend=backend, generator=gen, enable_gqa=gqa, **o)

    return _grads(call, q.to(dtype), k.to(dtype), v.to(dtype), None, opts)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_reference(case):
    y, grads, fn = _api(case, torch.float32, "triton")
    assert type(fn).__name__ == "_WholeTritonBackward", type(fn).__name__
    y64, grads64, _ = _api(case, torch.float64, "reference")
    for name, a, b in zip(("y", "dq", "dk", "dv"), (y,) + grads, (y64,) + grads64):
        _check(name, a.double(), b, REF_TOL)


def test_dropped_elements_give_zeros():
    """Elements with every key (1) or every query (0) padded: output 0 and zero gradients
    at their rows, with no torch op doing it."""
    for case, b in ((CASES[1], 1), (CASES[2], 0)):
        q, k, v, eps, opts = _inputs(case, torch.float32)
        y, (dq, dk, dv), _ = _grads(_whole_triton.lara, q, k, v, eps, opts)
        assert (y[b] == 0).all() and (dq[b] == 0).all() and (dk[b] == 0).all() and (dv[b] == 0).all()
        assert y[1 - b].abs().sum() > 0


@pytest.mark.parametrize("weighting,launches", [("optimal", 6), ("balance", 5)])
def test_forward_launches_no_torch_compute(weighting, launches, monkeypatch):
    """No-grad forward of the default config: at most 6 launches (5 for "balance"), and
    no aten op but allocations and views; and the backward's count, for the report."""
    q, k, v, eps, opts = _inputs(CASES[0], torch.float32)
    opts["weighting"] = weighting
    rec = _Record(monkeypatch)
    with torch.no_grad(), rec:
        y = _whole_triton.lara(q, k, v, eps, **opts)
    assert len(rec.launches) == launches, rec.launches
    assert not rec.compute(), rec.compute()
    assert torch.isfinite(y).all()
    # backward: six launches ("balance": five), no compute op either (dy in q's dtype)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    y = _whole_triton.lara(*xs, eps, **opts)
    dy = torch.ones_like(y)
    rec.ops.clear()
    rec.launches.clear()
    with rec:
        torch.autograd.grad(y, xs, dy)
    assert len(rec.launches) == launches, rec.launches
    assert "view.default" in rec.ops, rec.ops   # the recorder sees the backward's ops
    assert not rec.compute(), rec.compute()


def test_pipeline_forward_counts(monkeypatch):
    """What the pipeline does for the same call (for the comparison in the report): it
    has torch compute ops besides its launches."""
    q, k, v, eps, opts = _inputs(CASES[0], torch.float32)
    rec = _Record(monkeypatch)
    with torch.no_grad(), rec:
        _pipeline_call(q, k, v, eps, **opts)
    assert len(rec.compute()) > 0


def test_double_backward_takes_the_pipeline():
    """create_graph=True: the gradient of a function of the gradients equals the pipeline's."""
    q, k, v, eps, opts = _inputs(CASES[1], torch.float32)
    outs = []
    for fn in (_whole_triton.lara, _pipeline_call):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        y = fn(*xs, eps, **opts)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        g = torch.autograd.grad(y, xs, dy, create_graph=True)
        outs.append(torch.autograd.grad(sum((t * t).sum() for t in g), xs))
    for name, a, b in zip(("ddq", "ddk", "ddv"), *outs):
        _check(name, a, b, PIPE_TOL[torch.float32])


def test_applies():
    """The lean path is taken for segment/mixed without given landmarks and nothing else."""
    q = torch.randn(1, 2, 8, 16)
    assert _whole_triton.applies(q, dict(proposal="segment"))
    assert _whole_triton.applies(q, dict(proposal="mixed"))
    assert not _whole_triton.applies(q, dict(proposal="attend"))
    assert not _whole_triton.applies(q, dict(proposal="segment", q_landmarks=torch.zeros(1, 2, 4, 16)))
    y = lara_attention(q.requires_grad_(), q, q, num_samples=4, proposal="attend", backend="triton")
    assert type(y.grad_fn).__name__ != "_WholeTritonBackward"
    with torch.autograd.forward_ad.dual_level():
        assert not _whole_triton.applies(q, dict(proposal="segment"))
    assert math.isfinite(float(y.sum()))
