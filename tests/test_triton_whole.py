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
PACKED_LENGTHS = {"packed": ([7, 0, 12, 5], [9, 0, 0, 6]), "packed2": ([13, 4, 20], [8, 30, 3]),
                  "packed3": ([3, 200, 0, 57, 130], [150, 180, 20, 0, 66])}


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
        elif layout == "masks-split":   # element 1 without a valid key, element 2 with 25 valid queries
            kpm[1] = True
            qpm[2] = True
            qpm[2, torch.randperm(N, generator=g)[:25]] = False
            opts.update(query_padding_mask=qpm, key_padding_mask=kpm)
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


# ----------------------------------------------------------------------------- landmarks split along the sequence
#
# The landmarks kernels run programs per (side-head, block of BLOCK_C segments, D chunk)
# (triton_kernels/landmarks.py). At these sizes the launcher's own choice keeps one block
# (a program reads >= ROWS = 1024 rows), so the tests set ROWS = 16: C = 40 segments then
# come in blocks of 16 (N_S = 3 programs per side-head), and the launch is checked to be so.
#
# LM_TOL = 1e-6 (relative RMS against float64, forward and the float32 backward): qt, kt
# are float32 sums of at most ~10 rows here (the one-hot product is exact: 0/1 times the
# inputs, "ieee" float32 accumulation), then a division and the scale; dq, dk are sums of
# three float32 terms. float32's unit roundoff is 6e-8, so errors are a few 1e-8 .. 1e-7;
# a row in the wrong segment or program, or a missed or doubly counted row, gives 1e-2
# or more. bfloat16 inputs: the forward is held to the same LM_TOL (bfloat16 values are
# exact in float32, nothing is rounded to the input dtype); the backward's results are
# bfloat16, rounded once from float32 to nearest even, so their error is at most one unit
# roundoff (2**-8) and they equal the float64 result rounded to bfloat16 except where the
# float32 sum lies within its own rounding error of a tie: LM_MISMATCH = 1% of elements
# may differ (measured 0 .. 7e-5; a truncating conversion differs at about half).
# Measured: float32 and the bfloat16 forward 3e-8 .. 5e-8, the bfloat16 backward 1.7e-3.

from lara_kernels import _passes_torch, _varlen  # noqa: E402
from lara_kernels.triton_kernels import landmarks as lm  # noqa: E402

LM_TOL = 1e-6
LM_MISMATCH = 0.01
LM_C = 40
LM_PACKED = ([3, 200, 0, 57, 130], [150, 180, 20, 0, 66])   # lengths of very different sizes, two empty


def _lm_inputs(kind, dtype, seed=5):
    """(q, k, qpm, kpm, packed kwargs, (B, H, H_kv)) of a direct landmarks case. "masks":
    B = 3, H = 2, H_kv = 1 (GQA), N = 100, M = 75 (not multiples of C), element 0 with runs
    of padding (leading, between runs of valid rows and trailing) right before the blocks'
    first rows,
    element 1 with 25 valid queries (C_eff = 25 < C), element 2 without a valid key
    (C_eff = 0); "nomask": the same shapes unpadded; "packed": LM_PACKED."""
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, D = (5 if kind == "packed" else 3), 2, 1, 24
    if kind == "packed":
        nq, nk = LM_PACKED
        cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32)  # noqa: E731
        q = torch.randn(sum(nq), H, D, generator=g).to(dtype)
        k = torch.randn(sum(nk), Hkv, D, generator=g).to(dtype)
        return q, k, None, None, dict(cu_q=cu(nq), cu_k=cu(nk), max_q=max(nq), max_k=max(nk)), (B, H, Hkv)
    N, M = 100, 75
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, M, D, generator=g).to(dtype)
    if kind == "nomask":
        return q, k, None, None, {}, (B, H, Hkv)
    qpm = torch.rand(B, N, generator=g) < 0.3
    kpm = torch.rand(B, M, generator=g) < 0.3
    # element 0: 40 valid queries in 5 runs of 8 (rows 4 + 12 i ..), 55 valid keys in 5 runs of
    # 11 (rows 15 i ..): with C_eff = 40 the blocks of 16 segments start at positions 16, 32
    # (queries) and 22, 44 (keys), the first rows of runs, right after padded rows
    n, m = torch.arange(N), torch.arange(M)
    qpm[0] = ~((n >= 4) & (n < 64) & ((n - 4) % 12 < 8))
    kpm[0] = (m % 15) >= 11
    qpm[1] = True
    qpm[1, torch.randperm(N, generator=g)[:25]] = False
    kpm[2] = True
    return q, k, qpm, kpm, {}, (B, H, Hkv)


def _lm_reference(q, k, qpm, kpm, packed, C, ss):
    """(qt, kt, c_eff) by the float64 eager landmarks (_passes_torch), and the layouts."""
    if packed:
        qpad = _varlen.Packed(packed["cu_q"], packed["max_q"])
        kpad = _varlen.Packed(packed["cu_k"], packed["max_k"])
        nq, nk = qpad.lengths(), kpad.lengths()
    else:
        qpad, kpad = qpm, kpm
        nq = torch.full((q.shape[0],), q.shape[2]) if qpm is None else (~qpm).sum(1)
        nk = torch.full((k.shape[0],), k.shape[2]) if kpm is None else (~kpm).sum(1)
    c_eff = torch.minimum(torch.minimum(nq, nk), torch.tensor(C)).long()
    qt = ss * _passes_torch.landmarks(q.double(), qpad, c_eff, C)
    kt = ss * _passes_torch.landmarks(k.double(), kpad, c_eff, C)
    return qt, kt, c_eff, qpad, kpad


def _block_starts(pad_row, ce, block):
    """First rows of the segment blocks s >= 1 of one mask row that have rows."""
    rows = (~pad_row).nonzero().flatten()
    nv = rows.numel()
    return [int(rows[-(-s * block * nv // ce)]) for s in range(1, -(-ce // block))]


def _recorded(monkeypatch):
    """Grids and constexprs of the landmarks launches."""
    seen = []
    launch = _common.launch

    def recording(kernel, grid, device, *args, **kwargs):
        seen.append((kernel.fn.__name__, grid, kwargs))
        return launch(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(_common, "launch", recording)
    return seen


@pytest.mark.parametrize("chunks", [False, True], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["masks", "nomask", "packed"])
def test_landmarks_kernels_split(kind, dtype, chunks, monkeypatch):
    """landmarks_fwd / landmarks_bwd on several programs per sequence against the float64
    eager landmarks and their autograd: qt, kt, c_eff (exactly; rows c >= C_eff exactly 0),
    dq = dq_a [+ dq_b] + landmarks' part, dk = dk_a + landmarks' part, every row written
    (NaN poison); "chunks": D = 24 in two chunks of 16 (more programs asked for)."""
    monkeypatch.setattr(lm, "ROWS", 16)
    if chunks:
        monkeypatch.setattr(_common, "sm_count", lambda dev: 64)
    seen = _recorded(monkeypatch)
    q, k, qpm, kpm, packed, (B, H, Hkv) = _lm_inputs(kind, dtype)
    C, ss, D = LM_C, 0.7, q.shape[-1]
    inputs = [t.clone() for t in (q, k, qpm, kpm) if t is not None]
    qt, kt, c_eff = lm.landmarks_fwd(q, k, qpm, kpm, C, ss, **packed)
    qt0, kt0, ce0, qpad, kpad = _lm_reference(q, k, qpm, kpm, packed, C, ss)

    name, grid, kw = seen[-1]
    assert name == "_landmarks_fwd_kernel" and kw["BLOCK_C"] == 16, (name, kw)
    n_dc = 2 if chunks else 1
    assert kw["N_DC"] == n_dc and grid == (B * (H + Hkv) * 3 * n_dc,), (grid, kw)
    assert torch.equal(c_eff, ce0), (c_eff, ce0)
    if kind == "masks":
        assert ce0.tolist() == [C, 25, 0]
        # padded rows right before a block's first row (owned by the block before it)
        starts = _block_starts(qpm[0], C, 16), _block_starts(kpm[0], C, 16)
        assert starts == ([28, 52], [30, 60]), starts
        assert all(qpm[0, r - 1] for r in starts[0]) and all(kpm[0, r - 1] for r in starts[1]), starts
    if kind == "packed":
        assert ce0.tolist() == [3, C, 0, 0, C]
    for b in range(B):
        assert (qt[b, :, int(ce0[b]):] == 0).all() and (kt[b, :, int(ce0[b]):] == 0).all(), b
    _check("qt", qt.double(), qt0, LM_TOL)
    _check("kt", kt.double(), kt0, LM_TOL)

    g = torch.Generator().manual_seed(11)
    dq_a, dq_b = (torch.randn(q.shape, generator=g).to(dtype) for _ in range(2))
    dk_a = torch.randn(k.shape, generator=g).to(dtype)
    dqt, dkt = torch.randn(qt.shape, generator=g), torch.randn(kt.shape, generator=g)
    if kind == "nomask":
        dq_b = None                                   # the "balance" weighting's call
    dq, dk = lm.landmarks_bwd(dq_a, dq_b, dk_a, dqt, dkt, c_eff, q, k, qpm, kpm, ss, **packed)
    name, grid, kw = seen[-1]
    assert name == "_landmarks_bwd_kernel" and grid == (B * (H + Hkv) * 3 * n_dc,), (grid, kw)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    outs = (ss * _passes_torch.landmarks(q64, qpad, ce0, C), ss * _passes_torch.landmarks(k64, kpad, ce0, C))
    gq, gk = torch.autograd.grad(outs, (q64, k64), (dqt.double(), dkt.double()))
    dq0 = dq_a.double() + (0 if dq_b is None else dq_b.double()) + gq
    dk0 = dk_a.double() + gk
    for nm, got, want in (("dq", dq, dq0), ("dk", dk, dk0)):
        assert got.dtype == dtype and torch.isfinite(got).all(), nm
        if dtype == torch.float32:
            _check(nm, got.double(), want, LM_TOL)
        else:
            _check(nm, got.double(), want, 2.0 ** -8)
            differ = (got != want.to(dtype)).double().mean().item()
            assert differ <= LM_MISMATCH, f"{nm}: {differ:.3g} of the elements differ from the rounded reference"
    if kind == "masks":    # padded rows: the other gradients unchanged (rounded once)
        assert torch.equal(dq.transpose(1, 2)[qpm], (dq_a.float() + dq_b.float()).to(dtype).transpose(1, 2)[qpm])
        assert torch.equal(dk[2], dk_a[2])            # C_eff = 0: no landmarks' part
    after = [t for t in (q, k, qpm, kpm) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(inputs, after)), "inputs mutated"


# the lean path with the landmarks split (ROWS = 16: C = 40 in N_S = 3 blocks of 16)
SPLIT_CASES = [
    ("split-masks-mixed-gqa2", 3, 2, 1, 100, 75, 24, 16, 40, "mixed", "optimal", True, "masks-split"),
    ("split-packed-balance", 5, 2, 2, 0, 0, 16, 16, 40, "segment", "balance", True, "packed3"),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_split_equals_pipeline(case, monkeypatch):
    """The lean path with its landmarks on three programs per sequence equals the pipeline
    (masks with C_eff < C and C_eff = 0, N and M not multiples of C, GQA; packed sequences
    of lengths 0 .. 200)."""
    monkeypatch.setattr(lm, "ROWS", 16)
    seen = _recorded(monkeypatch)
    q, k, v, eps, opts = _inputs(case, torch.float32)
    y, grads, fn = _grads(_whole_triton.lara, q, k, v, eps, opts)
    assert type(fn).__name__ == "_WholeTritonBackward", type(fn).__name__
    blocks = [kw["BLOCK_C"] for name, _, kw in seen if name.startswith("_landmarks")]
    assert blocks == [16, 16], seen
    y0, grads0, _ = _grads(_pipeline_call, q, k, v, eps, opts)
    for name, a, b in zip(("y", "dq", "dk", "dv"), (y,) + grads, (y0,) + grads0):
        _check(name, a, b, PIPE_TOL[torch.float32])


def test_mixed_softmax_stays_normalized_at_large_logits():
    """The "mixed" proposal's softmax over the key landmarks (small.proposal_fwd) and its
    backward (small.mixed_bwd) at logits kt . kt ~ 1e23, the size the input range bound
    allows, where log(C) is far below one ulp of the maximum: equal rows give the uniform
    softmax, so kmix equals kt (through max + log(sum of exp), every weight used to be
    exp(0) = 1: kmix was C times kt, and y wrong by 36% at the range bound). The backward
    is finite there; its value is rounding (it cancels products ~1e24 in float32, as the
    float32 reference does), so only finiteness is asserted."""
    from lara_kernels.triton_kernels import small

    C, D = 6, 16
    x = torch.randn(D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x / x.norm() * 8.7e11                                        # |x|^2 ~ 7.6e23
    kt = x.expand(1, 1, C, D).float().contiguous()
    qt = torch.zeros(1, 1, C, D)
    c_eff = torch.tensor([C])
    mu, w, kmix, lse = small.proposal_fwd(qt, kt, None, c_eff, True)
    assert rel_rms(kmix, kt) < 1e-6 and torch.equal(mu, kmix), rel_rms(kmix, kt)   # float32 sums of 6 terms
    dmus = torch.randn(1, 1, C, D, generator=torch.Generator().manual_seed(4))
    dkt = small.mixed_bwd(kt, dmus, kmix, lse, c_eff)
    assert torch.isfinite(dkt).all()
