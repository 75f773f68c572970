"""Efficiency of the fused CPU passes as a fraction of this machine's matrix-product rate.

    python bench/efficiency.py [--threads 2] [--out bench/results]

One run times, on the same inputs (B=2, H=4, N=M=4096, D=Dv=64, C=64, float32, eval,
segment proposal, optimal weighting by default):

- the machine's float32 matrix-product throughput: a square 1024 x 1024 x 1024
  ``torch.mm`` (2 * 1024^3 flops), the yardstick;
- ``lara_attention`` on the ``cpu`` backend, forward (under no_grad) and forward+backward;
- the same on the eager ``reference`` backend, and ``scaled_dot_product_attention``;
- each long pass of the ``cpu`` backend on its own (the compiled ops), to show where the
  time goes.

Work is counted as the passes compute it (docs/design.md): each matrix product over a
long axis costs 2 * C * D flops per query or key (D or Dv for the value side). Forward:
key pass 2 products per key (logits, values), query normalizer 1 per query, query pass
3 per query (logits, r, output). Backward, which recomputes the tiles: key pass 5 per
key, normalizer 3 per query, query pass 8 per query. The C x D and C x C steps and the
landmarks are O((N + M) D + C^2 D) and not counted. Efficiency = counted flops / time /
the torch.mm rate. Peak memory is what the call allocates through torch's allocator
beyond its inputs (the compiled passes allocate their scratch through it too).

Writes ``<out>/efficiency-cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lara_kernels import _passes_torch, lara_attention
from lara_kernels.bench import environment, peak_memory_bytes, time_ms

ops = torch.ops.lara_kernels


def mm_rate(min_run_time):
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = time_ms(lambda: torch.mm(a, b), torch.device("cpu"), min_run_time)
    return 2 * 1024 ** 3 / (t["median_ms"] * 1e-3), t


def counted_flops(B, H, N, M, D, DV, C, weighting):
    per = 2 * C
    q_fwd = per * ((2 * D + DV) if weighting == "optimal" else (D + DV))
    q_bwd = per * ((6 * D + 2 * DV) if weighting == "optimal" else (3 * D + 2 * DV))
    k_fwd, k_bwd = per * (D + DV), per * (3 * D + 2 * DV)
    n_fwd = per * D if weighting == "optimal" else 0
    n_bwd = 3 * per * D if weighting == "optimal" else 0
    fwd = B * H * (M * k_fwd + N * (n_fwd + q_fwd))
    bwd = B * H * (M * k_bwd + N * (n_bwd + q_bwd))
    return fwd, fwd + bwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--C", type=int, default=64)
    p.add_argument("--weighting", default="optimal", choices=["optimal", "balance"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing (torch.utils.benchmark)")
    p.add_argument("--no-sdpa-bwd", action="store_true", help="skip SDPA forward+backward (slow on CPU)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    B, H, N, D, C = args.B, args.H, args.N, args.D, args.C
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    dy = torch.randn(B, H, N, D, generator=g)
    opts = dict(num_samples=C, weighting=args.weighting)
    fwd_flops, total_flops = counted_flops(B, H, N, N, D, D, C, args.weighting)

    rate, mm_t = mm_rate(args.min_run_time)
    rows = []

    def record(name, mode, fn, flops=None, memory=True):
        fn()
        t = time_ms(fn, cpu, args.min_run_time)
        row = {"name": name, "mode": mode, "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"], "runs": t["runs"]}
        if flops is not None:
            row["gflops"] = flops / (t["median_ms"] * 1e-3) / 1e9
            row["efficiency"] = flops / (t["median_ms"] * 1e-3) / rate
        if memory:
            row["peak_mib"] = peak_memory_bytes(fn, cpu) / 2 ** 20
        rows.append(row)
        print(f"{name:34s} {mode:8s} {t['median_ms']:9.2f} ms"
              + (f"  {row['gflops']:6.1f} GFLOP/s  {100 * row['efficiency']:5.1f}% of mm" if flops else "")
              + (f"  peak {row['peak_mib']:8.1f} MiB" if memory else ""), file=sys.stderr)
        return row

    def attn(backend):
        def fwd():
            with torch.no_grad():
                return lara_attention(q, k, v, backend=backend, **opts)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def fwd_bwd():
            return torch.autograd.grad(lara_attention(qg, kg, vg, backend=backend, **opts), (qg, kg, vg), dy)
        return fwd, fwd_bwd

    def sdpa_fns():
        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

        def fwd_bwd():
            return torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), dy)
        return fwd, fwd_bwd

    print(f"torch.mm 1024^3: {mm_t['median_ms']:.2f} ms = {rate / 1e9:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads)", file=sys.stderr)
    cf, cfb = attn("cpu")
    r_cpu_f = record("lara cpu", "fwd", cf, fwd_flops)
    r_cpu_fb = record("lara cpu", "fwd+bwd", cfb, total_flops)
    rf, rfb = attn("reference")
    r_ref_f = record("lara reference (eager)", "fwd", rf, fwd_flops)
    r_ref_fb = record("lara reference (eager)", "fwd+bwd", rfb, total_flops)
    sf, sfb = sdpa_fns()
    r_sdpa_f = record("scaled_dot_product_attention", "fwd", sf)
    r_sdpa_fb = None if args.no_sdpa_bwd else record("scaled_dot_product_attention", "fwd+bwd", sfb)

    # the passes on their own (compiled ops, float32 C-sized inputs)
    ss = D ** -0.25
    w = torch.randn(B, H, C, D, generator=g)
    qt = 0.1 * torch.randn(B, H, C, D, generator=g)
    bias, bh = torch.randn(B, H, C, generator=g), torch.rand(B, H, C, generator=g)
    kap = torch.randn(B, H, C, D, generator=g)
    lam = _passes_torch.query_normalizer(qt, q, None, ss)
    c_eff = torch.full((B,), C)
    Z, kp = ops.key_pass_fwd(w, k, v, None, ss, True)
    dZ, dkap = torch.randn_like(Z), torch.randn_like(kp)
    per = 2 * C * B * H * N
    mis = args.weighting == "optimal"
    margs = (qt, lam, bh) if mis else (None, None, None)
    record("  key pass (op)", "fwd", lambda: ops.key_pass_fwd(w, k, v, None, ss, True), 2 * per * D, False)
    record("  key pass (op)", "bwd", lambda: ops.key_pass_bwd(w, k, v, None, ss, True, Z, kp, dZ, dkap),
           5 * per * D, False)
    if mis:
        record("  query normalizer (op)", "fwd", lambda: ops.key_pass_fwd(qt, q, None, None, ss, False),
               per * D, False)
        record("  query normalizer (op)", "bwd",
               lambda: ops.key_pass_bwd(qt, q, None, None, ss, False, lam, None, dZ, None), 3 * per * D, False)
    record("  query pass (op)", "fwd", lambda: ops.query_pass_fwd(q, w, bias, kap, c_eff, None, ss, *margs, 1.0),
           (3 if mis else 2) * per * D, False)
    record("  query pass (op)", "bwd",
           lambda: ops.query_pass_bwd(q, w, bias, kap, c_eff, None, ss, *margs, 1.0, dy),
           (8 if mis else 5) * per * D, False)

    io_mib = 4 * B * H * N * D * 4 / 2 ** 20   # q, k, v, y in float32
    summary = {
        "fwd_efficiency": r_cpu_f["efficiency"],
        "fwd_bwd_efficiency": r_cpu_fb["efficiency"],
        "speedup_vs_sdpa_fwd": r_sdpa_f["median_ms"] / r_cpu_f["median_ms"],
        "speedup_vs_sdpa_fwd_bwd": None if r_sdpa_fb is None else r_sdpa_fb["median_ms"] / r_cpu_fb["median_ms"],
        "speedup_vs_reference_fwd": r_ref_f["median_ms"] / r_cpu_f["median_ms"],
        "speedup_vs_reference_fwd_bwd": r_ref_fb["median_ms"] / r_cpu_fb["median_ms"],
        "io_mib": io_mib,
    }
    report = {
        "env": environment(cpu),
        "shape": dict(B=B, H=H, N=N, M=N, D=D, Dv=D, C=C, dtype="float32", weighting=args.weighting,
                      proposal="segment", training=False),
        "mm_1024_ms": mm_t["median_ms"], "mm_gflops": rate / 1e9,
        "counted_gflop": {"fwd": fwd_flops / 1e9, "fwd+bwd": total_flops / 1e9},
        "rows": rows, "summary": summary,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency-cpu.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Fused CPU passes: efficiency against torch.mm",
        "",
        f"{report['env']['device_name']}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"commit {report['env']['commit']}, {report['env']['date']}.",
        f"Shape B={B} H={H} N=M={N} D=Dv={D} C={C} float32, {args.weighting} weighting, eval. "
        f"torch.mm 1024^3: {mm_t['median_ms']:.2f} ms = {rate / 1e9:.1f} GFLOP/s. Counted work: "
        f"{fwd_flops / 1e9:.2f} GFLOP forward, {total_flops / 1e9:.2f} GFLOP forward+backward.",
        "",
        "| what | mode | median ms | GFLOP/s | % of mm | peak MiB beyond inputs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        gf = f"{r['gflops']:.1f}" if "gflops" in r else ""
        ef = f"{100 * r['efficiency']:.1f}" if "efficiency" in r else ""
        pm = f"{r['peak_mib']:.1f}" if "peak_mib" in r else ""
        lines.append(f"| {r['name'].strip()} | {r['mode']} | {r['median_ms']:.2f} | {gf} | {ef} | {pm} |")
    lines += [
        "",
        f"Forward at {100 * summary['fwd_efficiency']:.1f}% of the torch.mm rate, forward+backward at "
        f"{100 * summary['fwd_bwd_efficiency']:.1f}%; {summary['speedup_vs_sdpa_fwd']:.1f}x SDPA's forward"
        + ("" if summary["speedup_vs_sdpa_fwd_bwd"] is None else
           f" and {summary['speedup_vs_sdpa_fwd_bwd']:.1f}x its forward+backward")
        + f"; {summary['speedup_vs_reference_fwd']:.1f}x / {summary['speedup_vs_reference_fwd_bwd']:.1f}x the eager "
        f"reference. q, k, v and y take {io_mib:.0f} MiB.",
    ]
    (out / "efficiency-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
