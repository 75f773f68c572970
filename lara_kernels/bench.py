"""``lara-bench`` (also ``python -m lara_kernels.bench``): time and memory of every backend.

For each shape of a preset (all shapes are declared in ``SHAPES`` below), it times
``lara_attention`` and ``rfa_attention`` on every backend that can run the inputs (or the
ones named by ``--backends``), next to two baselines:
``torch.nn.functional.scaled_dot_product_attention`` (exact softmax attention; on CUDA with
float16/bfloat16 inputs pinned to its flash backend through
``torch.nn.attention.sdpa_kernel``, see ``--sdpa``) and the eager reference
(``backend="reference"``), forward and forward+backward. The definition every backend
computes is docs/math.md.

- **Correctness gate first**: each backend is compared with ``backend="reference"`` on the
  same small inputs (float64 where the backend supports it, else float32), output and the
  gradients of q, k, v. Speed-ups are printed only for backends whose gate passed.
- **Timing**: ``triton.testing.do_bench`` on CUDA (median and 25/75 % quantiles);
  ``torch.utils.benchmark.Timer.blocked_autorange`` on CPU (median and IQR). A spread is
  shown only where there were several runs; a single run says "1 run".
- **Peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` during one call minus
  what was allocated before it. On CPU, torch has no peak counter: the call runs once
  under ``torch.profiler`` with ``profile_memory=True`` and the peak is the running
  maximum of the (allocation - free) events of torch's CPU allocator, relative to the
  start. Both count what the call allocates beyond its inputs (output and, for
  forward+backward, the saved activations and the gradients); neither counts memory that
  is not allocated through torch (Python objects, the Triton/CUDA runtime).
- Backends with ``not_supported_reasons`` are skipped with their reasons; the Triton
  interpreter (``triton`` on CPU tensors under ``TRITON_INTERPRET=1``) is never timed.

Writes ``<out>/<stem>.json`` (device, versions, commit, date, every figure), ``.md`` (the
printed table and the key figures) and ``.png`` (time and memory against N, log-log);
the stem is ``bench-<preset>-<device type>`` unless ``--stem`` names one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from . import __version__, dispatch, lara_attention, rfa_attention


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    preset: str
    B: int
    H: int
    N: int      # queries = keys (self-attention)
    D: int      # head dim (= value head dim)
    C: int      # num_samples (LARA samples / landmarks, RFA features)
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _sweep(preset, B, H, Ns, D, C, dtype):
    return [Shape(preset, B, H, N, D, C, dtype) for N in Ns]


# Every shape lara-bench times, in one table.
SHAPES: List[Shape] = [
    # quick: a CPU in well under a minute
    *_sweep("quick", 1, 4, (256, 512, 1024, 2048), 64, 64, "float32"),
    # paper: the attention of Table 6's simulation model (embedding 192 = 3 heads x 64,
    # 16 samples/landmarks), N = 1024 .. 8192, one sequence
    *_sweep("paper", 1, 3, (1024, 2048, 4096, 8192), 64, 16, "float32"),
    # gpu: long-sequence sweep
    *_sweep("gpu", 8, 12, (1024, 2048, 4096, 8192, 16384, 32768), 64, 64, "bfloat16"),
]
PRESETS = sorted({s.preset for s in SHAPES})
PRESET_HELP = {
    "quick": "CPU in under a minute: B=1, H=4, D=64, C=64, float32, N=256..2048",
    "paper": "Table 6's attention shapes: B=1, H=3, D=64, C=16, float32, N=1024..8192",
    "gpu": "long sequences: B=8, H=12, D=64, C=64, bfloat16, N=1k..32k (needs CUDA)",
}


def shapes_for(preset: str, lengths: Optional[List[int]] = None) -> List[Shape]:
    shapes = [s for s in SHAPES if s.preset == preset]
    if lengths:
        base = shapes[0]
        shapes = [Shape(preset, base.B, base.H, N, base.D, base.C, base.dtype) for N in lengths]
    return shapes


# --------------------------------------------------------------------------- environment
def git_commit() -> str:
    """The commit of the repository this package lives in (``+dirty`` if modified)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "lara_kernels": __version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }


# --------------------------------------------------------------------------- backends
INTERPRETER_REASON = ("Triton interpreter on CPU tensors (TRITON_INTERPRET): correct but far too slow "
                      "to time; never benchmarked")


def runnable_backends(op: str, q, k, v, num_samples: int, only: Optional[List[str]] = None):
    """(names that can run ``op`` on these inputs, fastest first; {skipped name: reasons}).

    The reference comes last; the Triton interpreter on CPU is never listed as runnable.
    ``only``: consider these backends alone (default: every registered one).
    """
    regs = dispatch.backends()
    order = [n for n in dispatch.auto_order(q.device.type) if n != "reference"]
    order += [n for n in regs if n not in order and n != "reference"] + ["reference"]
    run, skipped = [], {}
    for name in order:
        if name not in regs or (only is not None and name not in only):
            continue
        reasons = regs[name].not_supported_reasons(op, q, k, v, num_samples=num_samples)
        if not reasons and name == "triton" and q.device.type != "cuda":
            reasons = [INTERPRETER_REASON]
        if reasons:
            skipped[name] = reasons
        else:
            run.append(name)
    return run, skipped


# --sdpa choices: torch's own pick, or one of torch.nn.attention.SDPBackend pinned
SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                "cudnn": "CUDNN_ATTENTION"}


def sdpa_choice(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The SDPA kernel to time: ``auto`` pins flash on CUDA for float16/bfloat16 (the
    strongest exact baseline there), and leaves the choice to torch elsewhere."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "default"


def attention_fn(method: str, C: int, seed: int = 0, sdpa: str = "default") -> Callable:
    """``fn(q, k, v) -> y`` for a method label: ``sdpa``, ``lara/<backend>``, ``rfa/<backend>``.

    RFA gets a generator in a fixed state on every call, so two backends see the same
    features (and the draw is part of the timed work, as in real use). ``sdpa``:
    ``default`` (torch picks) or a key of ``SDPA_KERNELS``, pinned with ``sdpa_kernel``.
    """
    if method == "sdpa":
        if sdpa == "default":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = getattr(SDPBackend, SDPA_KERNELS[sdpa])

        def pinned(q, k, v):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v)

        return pinned
    op, backend = method.split("/")
    if op == "lara":
        return lambda q, k, v: lara_attention(q, k, v, num_samples=C, backend=backend)
    if op == "rfa":
        def rfa(q, k, v):
            g = torch.Generator(device=q.device).manual_seed(seed)
            return rfa_attention(q, k, v, num_samples=C, backend=backend, generator=g)

        return rfa
    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------- inputs, gate
def make_inputs(B, H, N, D, dtype, device, seed=0):
    """Inputs with locality (as in trained models), from the demo; v standard normal."""
    from .demo import clustered_inputs

    g = torch.Generator().manual_seed(seed)
    return clustered_inputs(B, H, N, D, generator=g, dtype=dtype, device=device)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


GATE_TOL = {torch.float64: 1e-9, torch.float32: 2e-3}


def gate(method: str, shape: Shape, device: torch.device) -> dict:
    """Compare ``method`` with ``backend="reference"`` on the same small inputs, output and grads."""
    op, backend = method.split("/")
    if backend == "reference":
        return {"passed": True, "note": "the oracle itself"}
    regs = dispatch.backends()
    probe = torch.empty((1, 1, 1, shape.D), device=device, dtype=torch.float64)
    dtype = torch.float64 if not regs[backend].not_supported_reasons(op, probe, probe, probe,
                                                                     num_samples=shape.C) else torch.float32
    N = min(shape.N, 257)  # awkward on purpose: C need not divide it
    q, k, v = make_inputs(1, 2, N, shape.D, dtype, device, seed=123)
    fn, ref = attention_fn(method, shape.C), attention_fn(f"{op}/reference", shape.C)
    errs = {}
    try:
        outs = []
        for f in (fn, ref):
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            y = f(qq, kk, vv)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32).to(y)
            grads = torch.autograd.grad(y, (qq, kk, vv), dy)
            outs.append((y, *grads))
        for name, a, b in zip(("y", "dq", "dk", "dv"), outs[0], outs[1]):
            errs[name] = rel_rms(a, b)
    except Exception as exc:  # a crash is a red gate, with its reason
        return {"passed": False, "dtype": str(dtype), "N": N, "error": f"{type(exc).__name__}: {exc}"}
    tol = GATE_TOL[dtype]
    passed = all(math.isfinite(e) and e <= tol for e in errs.values())
    return {"passed": passed, "dtype": str(dtype), "N": N, "tol": tol, "rel_rms_err": errs}


# --------------------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device: torch.device, min_run_time: float) -> dict:
    """Median and spread of ``fn()`` in milliseconds.

    ``runs`` is the number of measurements the median is taken over (on CUDA, the timed
    repetitions of ``do_bench``, given at least five calls' time; ``None`` for a Triton
    whose ``do_bench`` cannot return them). With a single measurement there is no spread:
    the quantiles and ``iqr_ms`` are ``None``.
    """
    if device.type == "cuda":
        import time

        import triton.testing

        # do_bench repeats for `rep` ms, at least once: give a slow call time for 5 runs
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        rep = int(min(max(100.0, 5e3 * (time.perf_counter() - t0)), 5000.0))
        try:
            times = sorted(triton.testing.do_bench(fn, rep=rep, return_mode="all"))
        except (AssertionError, TypeError, ValueError):   # a Triton without return_mode="all"
            med, q25, q75 = triton.testing.do_bench(fn, rep=rep, quantiles=[0.5, 0.25, 0.75])
            return {"median_ms": med, "q25_ms": q25, "q75_ms": q75, "iqr_ms": q75 - q25,
                    "runs": None, "timer": "triton.testing.do_bench"}
        rec = {"median_ms": statistics.median(times), "q25_ms": None, "q75_ms": None, "iqr_ms": None,
               "runs": len(times), "timer": "triton.testing.do_bench"}
    else:
        m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                            ).blocked_autorange(min_run_time=min_run_time)
        times = sorted(t * 1e3 for t in m.times)
        rec = {"median_ms": m.median * 1e3, "q25_ms": None, "q75_ms": None, "iqr_ms": None,
               "runs": len(times), "timer": "torch.utils.benchmark blocked_autorange"}
    if len(times) > 1:
        q25, _, q75 = statistics.quantiles(times, n=4)
        rec.update(q25_ms=q25, q75_ms=q75, iqr_ms=q75 - q25)
    return rec


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one call minus memory_allocated before it",
    "cpu": ("peak of torch's CPU allocator during one call (running sum of the allocation and "
            "free events recorded by torch.profiler with profile_memory=True), relative to the start"),
}


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for a moment."""
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable, device: torch.device) -> int:
    """Bytes the call allocates at its peak, beyond what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(method: str, shape: Shape, mode: str, device: torch.device, min_run_time: float,
            sdpa: str = "default") -> dict:
    """Time and peak memory of one method, ``mode`` = "fwd" or "fwd+bwd"."""
    f = attention_fn(method, shape.C, sdpa=sdpa)
    q, k, v = make_inputs(shape.B, shape.H, shape.N, shape.D, shape.torch_dtype, device)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return f(q, k, v)
    else:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        dy = torch.randn_like(q)

        def fn():
            return torch.autograd.grad(f(q, k, v), (q, k, v), dy)
    try:
        fn()  # warm-up (compilation, autotuning, allocator)
        _sync(device)
        rec = time_ms(fn, device, min_run_time)
        rec["peak_bytes"] = peak_memory_bytes(fn, device)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rec = {"error": "out of memory"}
    return rec


# --------------------------------------------------------------------------- run, report
def run(preset: str, device: torch.device, lengths=None, min_run_time: float = 0.1,
        progress: bool = True, backends: Optional[List[str]] = None, ops=("lara", "rfa"),
        sdpa: str = "auto", key_n: Optional[int] = None, ratio: Optional[tuple] = None) -> dict:
    """Gate and measure every method of a preset. ``backends``: only these (default all);
    ``ops``: "lara" and/or "rfa"; ``sdpa``: see ``sdpa_choice``; ``key_n`` and ``ratio``
    (N_hi, N_lo): the key figures of the summary (forward at N=key_n, forward time at
    N_hi over N_lo)."""
    shapes = shapes_for(preset, lengths)
    env = environment(device)
    # backends: decided once per preset on a representative input of its first shape
    s0 = shapes[0]
    sdpa = sdpa_choice(sdpa, device, s0.torch_dtype)
    probe = torch.empty((1, 1, 8, s0.D), device=device, dtype=s0.torch_dtype)
    methods, skipped, gates = ["sdpa"], {}, {}
    for op in ops:
        run_b, skip_b = runnable_backends(op, probe, probe, probe, s0.C, only=backends)
        methods += [f"{op}/{b}" for b in run_b]
        skipped.update({f"{op}/{b}": r for b, r in skip_b.items()})
    for m in methods:
        if m != "sdpa":
            gates[m] = gate(m, s0, device)
    jobs = [(s, m, mode) for s in shapes for m in methods for mode in ("fwd", "fwd+bwd")]
    try:
        from tqdm import tqdm

        it = tqdm(jobs, desc=f"lara-bench {preset}", unit="case", disable=not progress, file=sys.stderr)
    except ImportError:  # tqdm is in the bench extra; run without a bar
        it = jobs
    results = []
    for s, m, mode in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(f"N={s.N} {m} {mode}")
        rec = measure(m, s, mode, device, min_run_time, sdpa=sdpa)
        results.append({"shape": asdict(s), "method": m, "mode": mode, **rec})
    return {
        "env": env,
        "preset": preset,
        "preset_help": PRESET_HELP.get(preset, ""),
        "memory_method": MEMORY_METHOD["cuda" if device.type == "cuda" else "cpu"],
        "methods": methods,
        "requested_backends": backends,
        "sdpa_kernel": sdpa,
        "key_n": key_n,
        "ratio": list(ratio) if ratio else None,
        "baselines": {"sdpa": "torch.nn.functional.scaled_dot_product_attention (exact softmax; "
                              + ("torch's own kernel choice" if sdpa == "default" else
                                 f"pinned to SDPBackend.{SDPA_KERNELS[sdpa]} with sdpa_kernel") + ")",
                      "lara/reference": "eager reference (backend='reference')",
                      "rfa/reference": "eager reference (backend='reference')"},
        "gates": gates,
        "skipped": skipped,
        "results": results,
    }


def _lookup(report):
    return {(r["shape"]["N"], r["method"], r["mode"]): r for r in report["results"]}


def format_table(report: dict) -> str:
    """The result as a markdown table: times, spread, peak memory, speed-ups (gate passed only)."""
    tab = _lookup(report)
    gates = report["gates"]
    Ns = sorted({r["shape"]["N"] for r in report["results"]})
    s0 = report["results"][0]["shape"]
    unit = "IQR" if report["env"]["device"].startswith("cpu") else "q25-q75"
    lines = [
        f"lara-bench preset `{report['preset']}` on {report['env']['device_name']}; "
        f"B={s0['B']} H={s0['H']} D={s0['D']} C={s0['C']} {s0['dtype']}; torch {report['env']['torch']}, "
        f"triton {report['env']['triton']}, commit {report['env']['commit'][:12]}, {report['env']['date']}",
        "",
        f"| N | method | gate | fwd ms (±{unit}) | fwd+bwd ms (±{unit}) | peak MiB fwd | peak MiB fwd+bwd "
        "| speed-up vs SDPA fwd / fwd+bwd | vs eager reference fwd / fwd+bwd |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell_t(r):
        if "error" in r:
            return "OOM"
        if r.get("iqr_ms") is None:   # one measurement: no spread to show
            return f"{r['median_ms']:.2f} (1 run)" if r.get("runs") == 1 else f"{r['median_ms']:.2f}"
        return f"{r['median_ms']:.2f} ±{r['iqr_ms']:.2f}"

    def cell_m(r):
        return "OOM" if "error" in r else f"{r['peak_bytes'] / 2**20:.1f}"

    def ratio(base, r):
        if base is None or "error" in base or "error" in r:
            return "-"
        return f"{base['median_ms'] / r['median_ms']:.2f}x"

    for N in Ns:
        for m in report["methods"]:
            f, fb = tab[(N, m, "fwd")], tab[(N, m, "fwd+bwd")]
            if m == "sdpa":
                g, sp, sr = "baseline", "1.00x / 1.00x", "-"
            else:
                ok = gates[m]["passed"]
                g = ("pass" if ok else "FAIL") + ("" if m.endswith("/reference") else
                                                  f" ({gates[m]['dtype'].replace('torch.', '')})")
                if m.endswith("/reference"):
                    g = "oracle"
                if ok:
                    sp = f"{ratio(tab[(N, 'sdpa', 'fwd')], f)} / {ratio(tab[(N, 'sdpa', 'fwd+bwd')], fb)}"
                    refm = m.split("/")[0] + "/reference"
                    sr = "-" if m == refm else (f"{ratio(tab.get((N, refm, 'fwd')), f)} / "
                                                f"{ratio(tab.get((N, refm, 'fwd+bwd')), fb)}")
                else:
                    sp = sr = "(gate failed: not reported)"
            lines.append(f"| {N} | {m} | {g} | {cell_t(f)} | {cell_t(fb)} | {cell_m(f)} | {cell_m(fb)} | {sp} | {sr} |")
    lines.append("")
    lines.append(f"Timer: {report['results'][0].get('timer', '?')}, median. Peak memory: {report['memory_method']}.")
    lines.append(f"Baseline sdpa: {report.get('baselines', {}).get('sdpa', 'scaled_dot_product_attention')}.")
    lines += key_figures(report)
    for m, reasons in report["skipped"].items():
        lines.append(f"Skipped {m}: {'; '.join(reasons)}")
    for m, gt in report["gates"].items():
        if "rel_rms_err" in gt:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in gt["rel_rms_err"].items())
            lines.append(f"Gate {m}: {'pass' if gt['passed'] else 'FAIL'} vs reference at N={gt['N']}, "
                         f"{gt['dtype']}, relative RMS error {errs} (tolerance {gt['tol']:g})")
        elif "error" in gt:
            lines.append(f"Gate {m}: FAIL ({gt['error']})")
    return "\n".join(lines)


def key_figures(report: dict) -> List[str]:
    """Lines "Key figure: ..." for the summary: every method's forward time at
    N = ``report["key_n"]`` (with its speed-up over SDPA where its gate passed), and the
    ratio of its forward times at the two lengths of ``report["ratio"]`` (linear scaling
    gives the ratio of the lengths, quadratic its square)."""
    tab = _lookup(report)
    lines = []

    def fwd(N, m):
        r = tab.get((N, m, "fwd"))
        return None if r is None or "error" in r else r["median_ms"]

    def ok(m):
        return m == "sdpa" or report["gates"][m]["passed"]

    key_n = report.get("key_n")
    if key_n:
        base = fwd(key_n, "sdpa")
        cells = []
        for m in report["methods"]:
            t = fwd(key_n, m)
            if t is None:
                cells.append(f"{m} not measured" if (key_n, m, "fwd") not in tab else f"{m} OOM")
            elif not ok(m):
                cells.append(f"{m} {t:.3f} ms (gate FAILED)")
            else:
                cells.append(f"{m} {t:.3f} ms" + ("" if m == "sdpa" or base is None else f" ({base / t:.2f}x SDPA)"))
        lines.append(f"Key figure: forward at N={key_n}: " + "; ".join(cells))
    if report.get("ratio"):
        hi, lo = report["ratio"]
        cells = []
        for m in report["methods"]:
            a, b = fwd(hi, m), fwd(lo, m)
            cells.append(f"{m} " + ("not measured" if a is None or b is None else f"{a / b:.2f}")
                         + ("" if ok(m) else " (gate FAILED)"))
        lines.append(f"Key figure: forward time N={hi} / N={lo} (N ratio {hi / lo:g}): " + "; ".join(cells))
    return lines


def plot(report: dict, path: Path) -> Optional[Path]:
    """Log-log time (fwd, fwd+bwd) and peak memory (fwd+bwd) against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'lara-kernels[bench]')", file=sys.stderr)
        return None
    tab = _lookup(report)
    Ns = sorted({r["shape"]["N"] for r in report["results"]})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("fwd", "median_ms", "forward time (ms)"), ("fwd+bwd", "median_ms", "forward+backward time (ms)"),
              ("fwd+bwd", "peak_bytes", "forward+backward peak memory (MiB)")]
    for ax, (mode, key, title) in zip(axes, panels):
        for m in report["methods"]:
            pts = [(N, tab[(N, m, mode)][key]) for N in Ns if key in tab[(N, m, mode)]]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if key == "peak_bytes":
                ys = [max(y, 1) / 2**20 for y in ys]
            failed = m != "sdpa" and not report["gates"][m]["passed"]
            ax.plot(xs, ys, marker="o", linestyle="--" if failed or m.endswith("reference") else "-",
                    label=m + (" (gate FAILED)" if failed else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    s0 = report["results"][0]["shape"]
    env = report["env"]
    fig.suptitle(f"lara-bench {report['preset']}: B={s0['B']} H={s0['H']} D={s0['D']} C={s0['C']} {s0['dtype']} "
                 f"on {env['device_name']}\ntorch {env['torch']}, triton {env['triton']}, "
                 f"commit {env['commit'][:12]}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _positive(kind):
    """argparse type: a number of ``kind`` >= 1 (int) or > 0 (float), else a usage error naming it."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if (kind is int and value < 1) or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'>= 1' if kind is int else '> 0'}")
        return value

    parse.__name__ = "positive " + kind.__name__
    return parse


def parse_device(parser: argparse.ArgumentParser, text: Optional[str]) -> torch.device:
    """``--device``: a torch device that can run here (cpu, or cuda with a GPU present)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device {text!r} is not a torch device ({exc})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text!r}: no CUDA device available (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        parser.error(f"--device {text!r}: lara-bench measures on cpu or cuda only")
    return device


KEY_FIGURES_GPU = (8192, "32768/4096")   # the gpu preset's key figures: forward at 8k, 32k over 4k


def sanitize(name: str) -> str:
    """A device name as a file-name part: lower case, runs of other characters as '-'."""
    out = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in name.lower())
    return "-".join(filter(None, out.split("-"))) or "unknown"


def main(argv=None) -> int:
    """Run lara-bench; returns (and, as a script, exits with) 1 when a gate failed or a
    backend named in ``--backends`` could not run, else 0. Usage errors exit with 2."""
    parser = argparse.ArgumentParser(
        prog="lara-bench", description=__doc__.split("\n\n")[0],
        epilog="presets: " + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--out", default="bench/results", help="directory for the JSON, table and PNG "
                        "(default: bench/results, created if missing)")
    parser.add_argument("--stem", default=None,
                        help="file name of the results without suffix (default: bench-<preset>-<device type>)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument("--lengths", type=_positive(int), nargs="+", help="override the preset's sequence lengths")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to time (default: every one that can run the inputs); "
                             "SDPA is always timed as the baseline")
    parser.add_argument("--ops", default="lara,rfa", help="comma-separated: lara, rfa (default: both)")
    parser.add_argument("--sdpa", default="auto", choices=["auto", "default", *SDPA_KERNELS],
                        help="SDPA kernel of the baseline: auto (flash on CUDA for float16/bfloat16, else "
                             "torch's choice), default (torch's choice) or one pinned with sdpa_kernel")
    parser.add_argument("--key-n", type=_positive(int), default=None,
                        help="length of the key figure 'forward at N' (gpu preset default: 8192)")
    parser.add_argument("--ratio", default=None,
                        help="HI/LO: key figure 'forward time at N=HI over N=LO' (gpu preset default: 32768/4096)")
    parser.add_argument("--min-run-time", type=_positive(float), default=0.1,
                        help="seconds per measurement on CPU (torch.utils.benchmark; default 0.1)")
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch CPU threads (default: torch's own; on a shared machine 1 is steadier)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = parse_device(parser, args.device)
    known = sorted(dispatch.backends())
    backends = None
    if args.backends is not None:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in known]
        if not backends or unknown:
            parser.error(f"--backends {args.backends!r}: unknown backend(s) {unknown or backends}; known: {known}")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops or any(o not in ("lara", "rfa") for o in ops):
        parser.error(f"--ops {args.ops!r}: give lara, rfa or both, comma-separated")
    key_n, ratio = args.key_n, None
    if args.preset == "gpu":
        key_n = key_n or KEY_FIGURES_GPU[0]
        args.ratio = args.ratio or KEY_FIGURES_GPU[1]
    if args.ratio is not None:
        try:
            ratio = tuple(int(x) for x in args.ratio.split("/"))
            if len(ratio) != 2 or min(ratio) < 1:
                raise ValueError
        except ValueError:
            parser.error(f"--ratio {args.ratio!r}: give two lengths >= 1 as HI/LO, e.g. 32768/4096")
    if args.preset == "gpu" and device.type != "cuda" and not args.lengths:
        parser.error("the gpu preset needs a CUDA device (N up to 32k, B=8, H=12); "
                     "pass --lengths to run a cut-down version on CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.preset, device, args.lengths, args.min_run_time, progress=not args.no_progress,
                 backends=backends, ops=ops, sdpa=args.sdpa, key_n=key_n, ratio=ratio)
    table = format_table(report)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.stem or f"bench-{args.preset}-{device.type}")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    png = plot(report, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}" + (f", {png}" if png else ""))
    failed = [m for m, g in report["gates"].items() if not g["passed"]]
    missing = [m for m in report["skipped"] if backends is not None and m.split("/")[1] in backends]
    if failed or missing:
        print(f"lara-bench: gate failed for {failed or 'none'}; requested but not run: {missing or 'none'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
