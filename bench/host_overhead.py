"""Host time of one ``lara_attention`` call at a tiny shape, against SDPA, and where it goes.

    python bench/host_overhead.py [--threads 1] [--B 1 --H 2 --N 16 --D 16 --C 4] [--calls 200 --rounds 41]

At a tiny shape the arithmetic is next to nothing, so the time per call is host cost:
Python checks, op dispatch, the small torch ops between the passes, autograd records.
On a GPU that host cost is what a small call costs (the stand-in measured here, on CPU
tensors, with the ``cpu`` backend). Each figure is the median over ``--rounds`` rounds
of the mean of ``--calls`` back-to-back calls, in microseconds.

Printed:

- totals: SDPA and ``lara_attention(backend="cpu")`` forward without grad, forward with
  grad (inputs requiring grad, no backward), and forward+backward (``y.sum().backward()``
  style, with a fixed upstream gradient), for each path the cpu backend has: ``whole``
  (one op per direction, ``lara_kernels._whole``, when present) and ``pipeline`` (the
  passes of ``_pipeline.lara_forward`` with torch ops between them);
- the breakdown of a no-grad pipeline forward: the Python checks and defaults
  (``api.checked_lara_args``), the backend selection (``dispatch.select``), each compiled
  op called on its own with the inputs the pipeline gives it, and the pipeline with
  its passes replaced by stubs that return precomputed results (= the torch ops between
  the passes plus the pipeline's Python);
- with ``whole`` present: the bare ``lara_kernels::lara_fwd`` / ``lara_bwd`` op calls, and
  ``_whole.lara`` (the whole path below ``api`` and ``dispatch``) without grad, with grad
  (its autograd Function) and forward+backward, so that a total above splits into the ops,
  ``_whole``'s Python and Function, and the layers above it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from lara_kernels import _pipeline, api, dispatch, lara_attention

try:
    from lara_kernels import _whole
except ImportError:   # before the whole-op path existed
    _whole = None


def per_call_us(fn, calls, rounds):
    """Median over rounds of the mean time of `calls` back-to-back calls, in us."""
    for _ in range(max(3, calls // 10)):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out)


class _Recording:
    """A passes object that runs the compiled passes and records each call with its arguments."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def run(*args):
            out = fn(*args)
            self.calls.append((name, args, out))
            return out

        return run


class _Stub:
    """A passes object that returns the recorded results, in order, without computing."""

    def __init__(self, calls):
        self.calls, self.i = calls, 0

    def __getattr__(self, name):
        def run(*args):
            out = self.calls[self.i % len(self.calls)][2]
            self.i += 1
            return out

        return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("B", 1), ("H", 2), ("N", 16), ("M", None), ("D", 16), ("C", 4)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--proposal", default="segment", choices=["segment", "mixed", "attend"])
    p.add_argument("--weighting", default="optimal", choices=["optimal", "balance"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=200, help="calls per round")
    p.add_argument("--rounds", type=int, default=41, help="rounds; the median is reported")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, H, N, D, C = args.B, args.H, args.N, args.D, args.C
    M = N if args.M is None else args.M
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, M, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, M, D, generator=g, dtype=dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    dy = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    opts = dict(num_samples=C, proposal=args.proposal, weighting=args.weighting, backend="cpu")
    cr, rd = args.calls, args.rounds
    T = lambda fn: per_call_us(fn, cr, rd)  # noqa: E731

    print(f"host time per call, us (median of {rd} rounds x {cr} calls); B={B} H={H} N={N} M={M} D={D} C={C} "
          f"{args.dtype} {args.proposal}/{args.weighting}, torch {torch.__version__}, {args.threads} thread(s)")

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def sdpa_fwd_grad():
        F.scaled_dot_product_attention(qg, kg, vg)

    def sdpa_fwd_bwd():
        torch.autograd.backward(F.scaled_dot_product_attention(qg, kg, vg), dy)

    def lara_fwd():
        with torch.no_grad():
            lara_attention(q, k, v, **opts)

    def lara_fwd_grad():
        lara_attention(qg, kg, vg, **opts)

    def lara_fwd_bwd():
        torch.autograd.backward(lara_attention(qg, kg, vg, **opts), dy)

    print(f"{'':34s}{'forward':>10s}{'fwd (grad)':>12s}{'fwd+bwd':>10s}")
    print(f"{'sdpa':34s}{T(sdpa_fwd):10.1f}{T(sdpa_fwd_grad):12.1f}{T(sdpa_fwd_bwd):10.1f}")
    paths = ["pipeline"] if _whole is None else ["whole", "pipeline"]
    results = {}
    for path in paths:
        if _whole is not None:
            _whole.ENABLED = path == "whole"
        try:
            results[path] = (T(lara_fwd), T(lara_fwd_grad), T(lara_fwd_bwd))
        finally:
            if _whole is not None:
                _whole.ENABLED = True
        print(f"{'lara cpu, ' + path:34s}{results[path][0]:10.1f}{results[path][1]:12.1f}{results[path][2]:10.1f}")
    if len(results) == 2:
        w, pl = results["whole"], results["pipeline"]
        print(f"{'speedup (pipeline / whole)':34s}{pl[0] / w[0]:9.2f}x{pl[1] / w[1]:11.2f}x{pl[2] / w[2]:9.2f}x")

    # ---- breakdown of a no-grad pipeline forward
    print("\nbreakdown of a no-grad forward (pipeline path), us per call:")
    scale = D ** -0.5
    full = dict(num_samples=C, proposal=args.proposal, weighting=args.weighting, beta=1.0, scale=scale)

    def checks():
        api.checked_lara_args(q, k, v, num_samples=C, proposal=args.proposal, weighting=args.weighting, beta=1.0,
                              scale=None, training=False, generator=None, key_padding_mask=None,
                              query_padding_mask=None, padding_mask=None, q_landmarks=None, k_landmarks=None,
                              backend="cpu", is_causal=False, attn_mask=None, dropout_p=0.0, check_finite=False)

    def select():
        dispatch.select("lara", "cpu", q, k, v, **full)

    passes = dispatch._COMPILED_PASSES
    rec = _Recording(passes)
    with torch.no_grad():
        _pipeline.lara_forward(rec, q, k, v, None, **full)
    stub = _Stub(rec.calls)

    def pipeline_stubbed():
        with torch.no_grad():
            _pipeline.lara_forward(stub, q, k, v, None, **full)

    def pipeline_real():
        with torch.no_grad():
            _pipeline.lara_forward(passes, q, k, v, None, **full)

    rows = [("api.checked_lara_args", T(checks)), ("dispatch.select", T(select))]
    total_ops = 0.0
    for i, (name, a, _) in enumerate(rec.calls):
        def call(name=name, a=a):
            with torch.no_grad():
                getattr(passes, name)(*a)
        t = T(call)
        total_ops += t
        rows.append((f"op {i}: {name}", t))
    stubbed = T(pipeline_stubbed)
    rows.append(("pipeline, passes stubbed (torch ops)", stubbed))
    rows.append(("pipeline, real passes", T(pipeline_real)))
    for name, t in rows:
        print(f"  {name:40s}{t:9.1f}")
    print(f"  {'(sum of the op calls)':40s}{total_ops:9.1f}")

    if _whole is not None:
        print("\nthe whole-op path, us per call:")
        for name, t in _whole.bench_ops(q, k, v, dy, C, args.proposal, args.weighting, scale, T):
            print(f"  {name:40s}{t:9.1f}")

    if args.proposal != "attend":
        triton_host_part(q, k, v, dy, C, args.proposal, args.weighting, scale, T)


def triton_host_part(q, k, v, dy, C, proposal, weighting, scale, T):
    """The triton backend's lean path (lara_kernels/_whole_triton.py) with every launch
    replaced by a counter: its own host cost (allocations, block and split choices,
    argument lists), without Triton's launcher or the kernels. A GPU call adds Triton's
    per-launch cost to this, once per launch counted."""
    try:
        from unittest import mock

        from lara_kernels import _whole_triton as wt
        from lara_kernels.triton_kernels import _common
    except ImportError as e:   # no Triton
        print(f"\ntriton lean path: not measured ({e})")
        return
    launches = [0]

    def count(*a, **kw):
        launches[0] += 1

    mixed, optimal = proposal == "mixed", weighting == "optimal"
    eps = torch.randn(q.shape[0], q.shape[1], C, q.shape[-1], dtype=torch.float32)
    ss = math.sqrt(scale)
    with mock.patch.object(_common, "launch", count):
        y, state = wt._forward(q, k, v, eps, None, None, None, None, 0, 0, C, mixed, optimal, 1.0, ss)
        launches[0] = 0
        wt._forward(q, k, v, eps, None, None, None, None, 0, 0, C, mixed, optimal, 1.0, ss)
        n_fwd, launches[0] = launches[0], 0
        wt._backward(dy, q, k, v, None, None, None, None, 0, 0, mixed, optimal, 1.0, ss, state)
        n_bwd = launches[0]
        fwd = T(lambda: wt._forward(q, k, v, eps, None, None, None, None, 0, 0, C, mixed, optimal, 1.0, ss))
        bwd = T(lambda: wt._backward(dy, q, k, v, None, None, None, None, 0, 0, mixed, optimal, 1.0, ss, state))
    print("\ntriton lean path, launches not made (its host part only), us per call:")
    print(f"  {f'forward ({n_fwd} launches)':40s}{fwd:9.1f}")
    print(f"  {f'backward ({n_bwd} launches)':40s}{bwd:9.1f}")


if __name__ == "__main__":
    main()
