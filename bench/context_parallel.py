"""Context parallelism: measured on this CPU (gloo) and modelled at scale, LARA against ring attention.

Measured: ``lara_kernels.distributed.context_parallel_lara_attention`` with P = 1, 2 and
4 processes (one thread each, gloo, a file store in a temp dir) on a self-attention
sequence of N tokens split evenly, against the single-process ``lara_attention`` on the
whole sequence (one process, one thread). For each N: median time per call (forward, and
forward + backward; the slowest rank of each run), the per-rank peak of torch's CPU
allocator over one call beyond the inputs (``lara_kernels.bench.peak_memory_bytes``: the
profiler's memory events; the largest over the ranks), and the bytes each rank handed to
the collectives (counted by wrapping them, checked against
``lara_kernels.distributed.bytes_per_call``). The N = 256k end is cut when the previous
length predicts a call longer than ``--max-call-s``; cuts are listed. Processes beyond the
machine's cores time-share them, so P = 4 on a 2-core machine measures correctness and
memory, not speed.

Modelled (from formulas, no run): communication per rank per layer (forward + backward,
bytes on the wire) of LARA (``bytes_per_call``; a ring all_reduce moves 2 (R-1)/R of its
buffer per rank, the header all_gather (R-1) x 128 B) against ring attention (each rank
receives the R-1 other K, V blocks in the forward; the backward circulates K, V again and
dK, dV: 3 (R-1)/R N H 2 D bytes in all), for N up to 1M tokens, R = 8 .. 64 ranks, D = 64
and 128, H = 16 heads, bfloat16 inputs (LARA's partials are float32), C = 64, B = 1. The
link bandwidth at which communication would take as long as the computation is
bytes / compute time, with the compute time from FLOP counts at an assumed 300 TFLOP/s per
device for both methods (softmax attention 4 N^2 D H / R per rank forward, x 3.5 with the
backward; LARA about 12 C N D H / R forward, x 3 with the backward): below that bandwidth
communication dominates. LARA's few collectives are latency-bound long before that:
the table gives their count.

    python bench/context_parallel.py                       # CPU, N = 16k .. 256k, P = 1, 2, 4
    python bench/context_parallel.py --lengths 16384 32768 --procs 1 2

Writes ``context-parallel-cpu.md``, ``.json`` and ``.png`` into ``--out`` (bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

B, H, D, C = 1, 2, 64, 32
TFLOPS = 300e12
MODEL = dict(B=1, H=16, C=64, e_ring=2, ranks=(8, 16, 32, 64), dims=(64, 128),
             lengths=(65536, 262144, 1048576), link=50e9, latency=20e-6)


# --------------------------------------------------------------------------- model


def lara_wire(N, R, D, H, C, Bt=1):
    """Wire bytes per rank per layer, fwd + bwd, of LARA (bf16 inputs: float32 partials)."""
    from lara_kernels.distributed import HEADER, bytes_per_call

    fwd, bwd = bytes_per_call("lara", B=Bt, H=H, N=N, M=N, D=D, Dv=D, num_samples=C, dtype=torch.bfloat16,
                              training=True)
    head = 8 * HEADER
    return (R - 1) * head + 2 * (R - 1) / R * (fwd - head + bwd)


def ring_wire(N, R, D, H, e=2, Bt=1):
    return 3 * (R - 1) / R * N * Bt * H * 2 * D * e


def flops(method, N, R, D, H, C, Bt=1):
    if method == "ring":
        return 3.5 * 4 * N * N * D * H * Bt / R
    return 3 * 12 * C * N * D * H * Bt / R


def model_rows():
    rows = []
    for D_ in MODEL["dims"]:
        for R in MODEL["ranks"]:
            for N in MODEL["lengths"]:
                lw = lara_wire(N, R, D_, MODEL["H"], MODEL["C"])
                rw = ring_wire(N, R, D_, MODEL["H"], MODEL["e_ring"])
                lt = flops("lara", N, R, D_, MODEL["H"], MODEL["C"]) / TFLOPS
                rt = flops("ring", N, R, D_, MODEL["H"], MODEL["C"]) / TFLOPS
                rows.append(dict(D=D_, R=R, N=N, lara_bytes=lw, ring_bytes=rw, lara_compute_s=lt,
                                 ring_compute_s=rt, lara_bw=lw / lt, ring_bw=rw / rt))
    return rows


# --------------------------------------------------------------------------- measurement


def _counting():
    import torch.distributed as dist

    counted = {"n": 0}
    for nm in ("all_reduce", "all_gather", "broadcast"):
        fn = getattr(dist, nm)

        def counting(*args, _fn=fn, _nm=nm, **kwargs):
            t = args[1] if _nm == "all_gather" else args[0]
            counted["n"] += t.numel() * t.element_size()
            return _fn(*args, **kwargs)

        setattr(dist, nm, counting)
    return counted


def _worker(rank, P, store, out, lengths, modes, reps, max_call_s):
    import torch.distributed as dist

    torch.set_num_threads(1)
    from lara_kernels import lara_attention
    from lara_kernels.bench import peak_memory_bytes
    from lara_kernels.distributed import bytes_per_call, context_parallel_lara_attention

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=1800))
    counted = _counting()
    methods = ["single", "cp"] if P == 1 else ["cp"]
    results, last = [], {}
    for N in lengths:
        for method in methods:
            for mode in modes:
                key = (method, mode)
                if key in last and last[key] * 2 > max_call_s:       # linear in N: predicted 2x
                    results.append(dict(P=P, method=method, mode=mode, N=N,
                                        cut=f"~{last[key] * 2:.0f} s/call predicted"))
                    last[key] = float("inf")
                    continue
                if last.get(key) == float("inf"):
                    results.append(dict(P=P, method=method, mode=mode, N=N, cut="shorter length already cut"))
                    continue
                n_r = N // P
                g = torch.Generator().manual_seed(rank)
                q, k, v = (torch.randn(B, H, n_r, D, generator=g) for _ in range(3))
                if mode == "fwd+bwd":
                    for t in (q, k, v):
                        t.requires_grad_(True)
                if method == "single":
                    call = lambda: lara_attention(q, k, v, num_samples=C, backend="cpu")  # noqa: E731
                else:
                    call = lambda: context_parallel_lara_attention(q, k, v, num_samples=C, backend="cpu")  # noqa

                def run():
                    if mode == "fwd":
                        with torch.no_grad():
                            return call()
                    y = call()
                    y.pow(2).mean().backward()
                    return y

                times = []
                for i in range(reps + 1):
                    dist.barrier()
                    t0 = time.perf_counter()
                    run()
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)      # the slowest rank of this run
                    if i > 0:                                       # the first run warms up
                        times.append(float(dt))
                counted["n"] = 0
                run()
                sent = counted["n"]
                dist.barrier()
                peak = torch.tensor([float(peak_memory_bytes(run, torch.device("cpu")))], dtype=torch.float64)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                med = statistics.median(times)
                last[key] = med
                row = dict(P=P, method=method, mode=mode, N=N, time_s=med, runs=len(times),
                           peak_bytes=float(peak), bytes=sent if method == "cp" else 0)
                if method == "cp":
                    f, b = bytes_per_call("lara", B=B, H=H, N=N, M=N, D=D, Dv=D, num_samples=C,
                                          dtype=torch.float32)
                    row["formula_bytes"] = f + (b if mode == "fwd+bwd" else 0)
                results.append(row)
                if rank == 0:
                    print(f"P={P} {method} {mode} N={N}: {med * 1e3:.0f} ms, peak {peak.item() / 2**20:.0f} MiB, "
                          f"sent {sent} B", flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(procs, lengths, modes, reps, max_call_s):
    import torch.multiprocessing as mp

    rows = []
    for P in procs:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            mp.spawn(_worker, args=(P, os.path.join(tmp, "store"), out, lengths, modes, reps, max_call_s),
                     nprocs=P, join=True)
            with open(out) as f:
                rows += json.load(f)
    return rows


# --------------------------------------------------------------------------- report


def _size(b):
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= s:
            return f"{b / s:.1f} {unit}"
    return f"{b:.0f} B"


def _bw(x):
    for unit, s in (("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6)):
        if x >= s:
            return f"{x / s:.3g} {unit}"
    return f"{x / 1e3:.3g} kB/s"


def _t(s):
    return f"{s * 1e6:.0f} us" if s < 1e-3 else (f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.1f} s")


def _n(N):
    return f"{N // 1024}k" if N < 1048576 else f"{N // 1048576}M"


def report(rows, model, env, runtime, command, load):
    lines = [f"Context parallelism on CPU (gloo): B={B}, H={H}, D={D}, C={C}, float32, self-attention, "
             "even shards, backend cpu, one thread per process.",
             f"Machine: {env['device_name']}, torch {env['torch']}, commit {env['commit']}, {env['date']}.",
             "Cell: median time per call (slowest rank) / per-rank peak allocation beyond the inputs / bytes "
             "this rank handed to the collectives (forward, or forward + backward). "
             "P processes beyond the machine's cores share them: times at P = 4 on 2 cores are not speed-ups. "
             f"Load average (1 min) at the start and the end of the run: {load[0]:.1f} and {load[1]:.1f} "
             f"on {os.cpu_count()} cores (the machine is shared): the times are noisy; the memory and "
             "byte columns are exact.", ""]
    Ns = sorted({r["N"] for r in rows})
    for mode in ("fwd", "fwd+bwd"):
        sub = [r for r in rows if r["mode"] == mode]
        if not sub:
            continue
        lines += [f"**{mode}**", "", "| run | " + " | ".join(f"N={_n(N)}" for N in Ns) + " |",
                  "|---|" + "---:|" * len(Ns)]
        keys = sorted({(r["method"], r["P"]) for r in sub}, key=lambda x: (x[0] != "single", x[1]))
        for method, P in keys:
            name = "lara_attention, 1 process" if method == "single" else f"context parallel, P={P}"
            cells = []
            for N in Ns:
                r = next((r for r in sub if r["method"] == method and r["P"] == P and r["N"] == N), None)
                if r is None:
                    cells.append("")
                elif "cut" in r:
                    cells.append(f"cut ({r['cut']})")
                else:
                    c = f"{r['time_s'] * 1e3:.0f} ms / {_size(r['peak_bytes'])}"
                    if method == "cp":
                        c += f" / {r['bytes']} B"
                    cells.append(c)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    cp = [r for r in rows if r.get("method") == "cp" and "bytes" in r and "cut" not in r]
    ok = all(r["bytes"] == r["formula_bytes"] for r in cp)
    lines.append(f"Bytes counted against `bytes_per_call`: {'equal in every run' if ok else 'MISMATCH'} "
                 f"({len(cp)} runs); the same at every N.")
    lines += ["", f"**Modelled: communication per rank per layer, forward + backward** (B=1, H={MODEL['H']}, "
              f"C={MODEL['C']}, bfloat16; LARA's partials float32). Bandwidth = bytes / compute time at "
              f"{TFLOPS / 1e12:.0f} TFLOP/s: below it communication dominates. LARA makes 4 collectives in the "
              "forward (header, landmarks with eps, max and sum of the key statistics with the normalizer; "
              "+1 with a padding mask, +2 for proposal 'attend') and 2 in the backward: about 6 latencies "
              "per layer.", "",
              f"At {MODEL['link'] / 1e9:.0f} GB/s per rank (400 Gb/s InfiniBand), transfer time of each; "
              f"LARA's 6 collectives add about 6 x {MODEL['latency'] * 1e6:.0f} us of latency.", "",
              "| D | ranks | N | LARA bytes | ring bytes | ring / LARA | LARA compute | ring compute | "
              f"LARA at {MODEL['link'] / 1e9:.0f} GB/s | ring at {MODEL['link'] / 1e9:.0f} GB/s | "
              "LARA: comm dominates below | ring: comm dominates below |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in model:
        lines.append(f"| {m['D']} | {m['R']} | {_n(m['N'])} | {_size(m['lara_bytes'])} | {_size(m['ring_bytes'])} | "
                     f"{m['ring_bytes'] / m['lara_bytes']:.0f}x | {_t(m['lara_compute_s'])} | "
                     f"{_t(m['ring_compute_s'])} | "
                     f"{_t(m['lara_bytes'] / MODEL['link'])} | {_t(m['ring_bytes'] / MODEL['link'])} | "
                     f"{_bw(m['lara_bw'])} | {_bw(m['ring_bw'])} |")
    lines += ["", f"Script runtime: {runtime:.0f} s. Command: {command}"]
    return "\n".join(lines) + "\n"


def plot(rows, model, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(17, 4.5))
    for key in sorted({(r["method"], r["P"]) for r in rows}):
        pts = [(r["N"], r["peak_bytes"] / 2**20) for r in rows if (r["method"], r["P"]) == key
               and r["mode"] == "fwd+bwd" and "cut" not in r]
        if pts:
            a3.plot(*zip(*pts), marker="o", label="single" if key[0] == "single" else f"CP P={key[1]}")
    a3.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="MiB",
           title="per-rank peak allocation, fwd+bwd (measured)")
    a3.legend(fontsize=7)
    for mode, ls in (("fwd", "-"), ("fwd+bwd", "--")):
        for key in sorted({(r["method"], r["P"]) for r in rows}):
            pts = [(r["N"], r["time_s"]) for r in rows if (r["method"], r["P"]) == key and r["mode"] == mode
                   and "cut" not in r]
            if pts:
                lbl = ("single" if key[0] == "single" else f"CP P={key[1]}") + f" {mode}"
                a1.plot(*zip(*pts), ls, marker="o", label=lbl)
    a1.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="s per call", title="measured on this CPU (gloo)")
    a1.legend(fontsize=7)
    for D_, c in zip(MODEL["dims"], ("C0", "C1")):
        for R, ls in ((8, "-"), (64, "--")):
            pts = [(m["N"], m["lara_bytes"], m["ring_bytes"]) for m in model if m["D"] == D_ and m["R"] == R]
            Ns, lb, rb = zip(*pts)
            a2.plot(Ns, lb, ls, color=c, marker=".", label=f"LARA D={D_} R={R}")
            a2.plot(Ns, rb, ls, color=c, marker="x", alpha=0.5, label=f"ring D={D_} R={R}")
    a2.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="bytes per rank per layer (fwd+bwd)",
           title="modelled communication")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072, 262144])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-call-s", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    for n in args.lengths:
        if n % max(args.procs) or n <= 0:
            p.error(f"--lengths: each must be a positive multiple of the largest --procs, got {n}")
    from lara_kernels.bench import environment

    t0 = time.time()
    load0 = os.getloadavg()[0]
    torch.set_num_threads(1)
    rows = measure(args.procs, args.lengths, args.modes, args.reps, args.max_call_s)
    model = model_rows()
    env = environment(torch.device("cpu"))
    command = "python bench/context_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    load = (load0, os.getloadavg()[0])
    md = report(rows, model, env, time.time() - t0, command.strip(), load)
    (args.out / "context-parallel-cpu.md").write_text(md)
    (args.out / "context-parallel-cpu.json").write_text(json.dumps(
        {"environment": env, "load_average_1min": load, "shape": dict(B=B, H=H, D=D, C=C), "measured": rows,
         "model": model,
         "model_assumptions": dict(MODEL, tflops=TFLOPS)}, indent=1))
    plot(rows, model, args.out / "context-parallel-cpu.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
