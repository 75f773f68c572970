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

``--preset varlen`` measures, per backend, ``lara_attention_varlen`` on a packed batch of
sequences of drawn lengths against ``lara_attention`` on the padded batch with
``padding_mask`` and SDPA on the padded batch with its boolean ``attn_mask``, and GQA
(H = 32 query heads, H_kv = 8) with ``enable_gqa=True`` against repeating k and v to 32
heads (timed) and SDPA with ``enable_gqa=True``; ratios against those baselines of the same
run. Writes ``<out>/varlen-<device type>.{json,md,png}``; see ``run_varlen``.
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
PRESETS = sorted({s.preset for s in SHAPES} | {"varlen"})   # varlen: its own shapes, VARLEN_DEFAULTS
PRESET_HELP = {
    "quick": "CPU in under a minute: B=1, H=4, D=64, C=64, float32, N=256..2048",
    "paper": "Table 6's attention shapes: B=1, H=3, D=64, C=16, float32, N=1024..8192",
    "gpu": "long sequences: B=8, H=12, D=64, C=64, bfloat16, N=1k..32k (needs CUDA)",
    "varlen": ("lara_attention_varlen on a packed batch of drawn lengths vs the padded call and SDPA; "
               "GQA H=32, H_kv=8 vs repeated k, v and SDPA enable_gqa (CPU: 8 sequences of 64..4096, "
               "float32, a few minutes; CUDA: 16 of 64..8192, bfloat16)"),
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


# --------------------------------------------------------------------------- varlen and GQA preset
# ``--preset varlen`` measures two things the other presets do not, each against baselines
# timed in the same run (ratios only, never absolute claims):
#   varlen: a packed batch of sequences of drawn lengths, ``lara_attention_varlen`` on the
#     packed rows against ``lara_attention`` on the zero-padded batch with ``padding_mask``
#     (same backend) and SDPA on the padded batch with the boolean attn_mask of the padding;
#   gqa: H = 32 query heads on H_kv = 8 key/value heads, ``lara_attention(enable_gqa=True)``
#     against repeating k and v to H heads (``repeat_interleave``, inside the timed region)
#     and then ``lara_attention``, and SDPA with ``enable_gqa=True``.
@dataclass(frozen=True)
class VarlenConfig:
    seqs: int            # sequences in the packed batch
    min_len: int         # their lengths are drawn log-uniformly in [min_len, max_len]
    max_len: int
    H: int               # heads of the varlen part (H_kv = H)
    D: int               # head dim (= value head dim) of the varlen part
    gqa_B: int
    gqa_D: int
    gqa_lengths: tuple   # N = M of the GQA sweep
    C: int               # num_samples
    dtype: str
    gqa_H: int = 32
    gqa_H_kv: int = 8


# Per device type. The CPU defaults finish in a few minutes on 2 cores (the padded SDPA
# baseline is quadratic in the longest sequence); the CUDA ones draw from 64 to 8192.
VARLEN_DEFAULTS = {
    "cpu": VarlenConfig(seqs=8, min_len=64, max_len=4096, H=4, D=64, gqa_B=1, gqa_D=64,
                        gqa_lengths=(512, 1024, 2048), C=64, dtype="float32"),
    "cuda": VarlenConfig(seqs=16, min_len=64, max_len=8192, H=16, D=64, gqa_B=2, gqa_D=128,
                         gqa_lengths=(2048, 8192, 32768), C=64, dtype="bfloat16"),
}
VARLEN_PARTS = ("varlen", "gqa")
VARLEN_SEED = 0


def draw_lengths(count: int, lo: int, hi: int, seed: int = VARLEN_SEED) -> List[int]:
    """``count`` lengths drawn log-uniformly in [lo, hi] (many short sequences, a few long
    ones, as in real corpora), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=g, dtype=torch.float64)
    lengths = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).round().long().clamp(lo, hi)
    return lengths.tolist()


def padding_fraction(lengths: List[int]) -> float:
    """Share of the padded batch (len(lengths) x max(lengths) rows) that is padding."""
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def varlen_inputs(lengths: List[int], H: int, D: int, dtype, device, seed: int = 0) -> dict:
    """One batch in both layouts: each sequence drawn alone with ``clustered_inputs``.

    ``packed``: q, k, v (total, H, D) back to back; ``padded``: q, k, v (B, H, max, D),
    zeros in the padding; ``cu_seqlens`` int32 (B + 1,); ``max_seqlen``; ``padding_mask``
    (B, max) bool, True = padding; ``attn_mask`` (B, 1, 1, max) bool, True = attend (SDPA's
    convention).
    """
    from .demo import clustered_inputs

    g = torch.Generator().manual_seed(seed)
    seqs = [clustered_inputs(1, H, L, D, generator=g, dtype=dtype, device=device) for L in lengths]
    B, n = len(lengths), max(lengths)
    packed = tuple(torch.cat([s[i][0].transpose(0, 1) for s in seqs]).contiguous() for i in range(3))
    padded = tuple(torch.zeros((B, H, n, D), dtype=dtype, device=device) for _ in range(3))
    for b, (s, L) in enumerate(zip(seqs, lengths)):
        for i in range(3):
            padded[i][b, :, :L] = s[i][0]
    lens = torch.tensor(lengths, device=device)
    padding_mask = torch.arange(n, device=device)[None, :] >= lens[:, None]
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return {"packed": packed, "padded": padded, "cu_seqlens": cu.to(device), "max_seqlen": n,
            "padding_mask": padding_mask, "attn_mask": ~padding_mask[:, None, None, :]}


def gqa_inputs(B: int, H: int, H_kv: int, N: int, D: int, dtype, device, seed: int = 0):
    """q (B, H, N, D), k and v (B, H_kv, N, D), with locality as ``make_inputs``."""
    q = make_inputs(B, H, N, D, dtype, device, seed=seed)[0]
    _, k, v = make_inputs(B, H_kv, N, D, dtype, device, seed=seed + 1)
    return q, k, v


def _sdpa_call(sdpa: str) -> Callable:
    """``scaled_dot_product_attention``, or pinned to a kernel of ``SDPA_KERNELS``."""
    if sdpa == "default":
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, SDPA_KERNELS[sdpa])

    def pinned(*args, **kwargs):
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(*args, **kwargs)

    return pinned


def varlen_method_fn(method: str, C: int, case: Optional[dict] = None, sdpa: str = "default") -> Callable:
    """``fn(q, k, v) -> y`` for a label of the varlen preset.

    ``sdpa/padded`` (boolean attn_mask of the padding), ``sdpa/gqa`` (``enable_gqa=True``),
    ``lara/<backend>/varlen`` (packed q, k, v), ``lara/<backend>/padded`` (``padding_mask``),
    ``lara/<backend>/gqa`` (``enable_gqa=True``), ``lara/<backend>/repeat`` (k and v repeated
    to q's heads, then ``lara_attention``). ``case``: the batch's offsets and masks from
    ``varlen_inputs`` (varlen part only).
    """
    from . import lara_attention_varlen

    if method == "sdpa/padded":
        f, mask = _sdpa_call(sdpa), case["attn_mask"]
        return lambda q, k, v: f(q, k, v, attn_mask=mask)
    if method == "sdpa/gqa":
        f = _sdpa_call(sdpa)
        return lambda q, k, v: f(q, k, v, enable_gqa=True)
    op, backend, layout = method.split("/")
    if op != "lara":
        raise ValueError(f"unknown method {method!r}")
    if layout == "varlen":
        cu, n = case["cu_seqlens"], case["max_seqlen"]
        return lambda q, k, v: lara_attention_varlen(q, k, v, cu, cu, n, n, num_samples=C, backend=backend)
    if layout == "padded":
        pad = case["padding_mask"]
        return lambda q, k, v: lara_attention(q, k, v, num_samples=C, padding_mask=pad, backend=backend)
    if layout == "gqa":
        return lambda q, k, v: lara_attention(q, k, v, num_samples=C, enable_gqa=True, backend=backend)
    if layout == "repeat":
        def repeat(q, k, v):
            G = q.shape[1] // k.shape[1]
            return lara_attention(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1),
                                  num_samples=C, backend=backend)

        return repeat
    raise ValueError(f"unknown method {method!r}")


def measure_call(fn: Callable, q, k, v, mode: str, device: torch.device, min_run_time: float) -> dict:
    """Time and peak memory of ``fn(q, k, v)``, ``mode`` = "fwd" or "fwd+bwd" (gradients of
    q, k, v). An out-of-memory is recorded as such, any other failure with its message."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        dy = []

        def call():
            y = fn(q, k, v)
            if not dy:   # drawn at the warm-up call, outside the timed runs
                dy.append(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))
            return torch.autograd.grad(y, (q, k, v), dy[0])
    try:
        call()  # warm-up (compilation, autotuning, allocator)
        _sync(device)
        rec = time_ms(call, device, min_run_time)
        rec["peak_bytes"] = peak_memory_bytes(call, device)
    except Exception as exc:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rec = {"error": "out of memory" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"}
    return rec


GATE_LENGTHS = (37, 130, 64)   # the gate's packed batch: C need not divide the lengths


def varlen_gate(method: str, cfg: VarlenConfig, device: torch.device) -> dict:
    """``lara/<backend>/<layout>`` against the same call with ``backend="reference"`` on
    small inputs (float64 where the backend takes it, else float32): output and the
    gradients of q, k, v, as ``gate``."""
    _, backend, layout = method.split("/")
    if backend == "reference":
        return {"passed": True, "note": "the oracle itself"}
    regs = dispatch.backends()
    probe = torch.empty((1, 1, 1, cfg.D), device=device, dtype=torch.float64)
    dtype = torch.float64 if not regs[backend].not_supported_reasons("lara", probe, probe, probe,
                                                                     num_samples=cfg.C) else torch.float32
    case = None
    if layout in ("varlen", "padded"):
        case = varlen_inputs(list(GATE_LENGTHS), 2, cfg.D, dtype, device, seed=123)
        q, k, v = case["packed" if layout == "varlen" else "padded"]
        where = f"lengths {list(GATE_LENGTHS)}, H=2"
    else:
        N = 130
        q, k, v = gqa_inputs(1, 4, 2, N, cfg.gqa_D, dtype, device, seed=123)
        where = f"N={N}, H=4, H_kv=2"
    errs = {}
    try:
        outs = []
        for b in (backend, "reference"):
            f = varlen_method_fn(f"lara/{b}/{layout}", cfg.C, case)
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            y = f(qq, kk, vv)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32).to(y)
            outs.append((y, *torch.autograd.grad(y, (qq, kk, vv), dy)))
        for name, a, b in zip(("y", "dq", "dk", "dv"), outs[0], outs[1]):
            errs[name] = rel_rms(a, b)
    except Exception as exc:  # a crash is a red gate, with its reason
        return {"passed": False, "dtype": str(dtype), "where": where, "error": f"{type(exc).__name__}: {exc}"}
    tol = GATE_TOL[dtype]
    passed = all(math.isfinite(e) and e <= tol for e in errs.values())
    return {"passed": passed, "dtype": str(dtype), "where": where, "tol": tol, "rel_rms_err": errs}


VARLEN_MEMORY_NOTE = ("inputs (packed or padded, masks, offsets) are built before the timed region: each "
                      "call gets its batch in its own layout")


def run_varlen(device: torch.device, cfg: VarlenConfig, lengths: Optional[List[int]] = None,
               min_run_time: float = 0.1, progress: bool = True, backends: Optional[List[str]] = None,
               sdpa: str = "auto", parts=VARLEN_PARTS, seed: int = VARLEN_SEED, command: str = "") -> dict:
    """Gate and measure the varlen preset. ``lengths``: the packed batch's sequence lengths
    (default: ``cfg.seqs`` drawn with ``seed``); ``backends``: only these (default: every one
    that can run, without the reference on CUDA); ``sdpa``: ``auto`` (= torch's choice here:
    flash takes no attn_mask) or a key of ``SDPA_KERNELS``, pinned for both SDPA baselines."""
    env = environment(device)
    dtype = getattr(torch, cfg.dtype)
    sdpa = "default" if sdpa == "auto" else sdpa
    drawn = lengths is None
    if drawn:
        lengths = draw_lengths(cfg.seqs, cfg.min_len, cfg.max_len, seed)
    probe = torch.empty((1, 1, 8, cfg.D), device=device, dtype=dtype)
    only = backends
    if only is None and device.type == "cuda":   # the eager oracle: not a contender on a GPU
        only = [b for b in dispatch.backends() if b != "reference"]
    run_b, skip_b = runnable_backends("lara", probe, probe, probe, cfg.C, only=only)
    skipped = {f"lara/{b}": r for b, r in skip_b.items()}
    methods = {}
    if "varlen" in parts:
        methods["varlen"] = ["sdpa/padded"] + [f"lara/{b}/{lay}" for b in run_b for lay in ("varlen", "padded")]
    if "gqa" in parts:
        methods["gqa"] = ["sdpa/gqa"] + [f"lara/{b}/{lay}" for b in run_b for lay in ("gqa", "repeat")]
    gates = {m: varlen_gate(m, cfg, device) for part in methods for m in methods[part] if not m.startswith("sdpa")}
    jobs = []
    if "varlen" in parts:
        jobs += [("varlen", None, m, mode) for m in methods["varlen"] for mode in ("fwd", "fwd+bwd")]
    if "gqa" in parts:
        jobs += [("gqa", N, m, mode) for N in cfg.gqa_lengths for m in methods["gqa"] for mode in ("fwd", "fwd+bwd")]
    try:
        from tqdm import tqdm

        it = tqdm(jobs, desc="lara-bench varlen", unit="case", disable=not progress, file=sys.stderr)
    except ImportError:  # tqdm is in the bench extra; run without a bar
        it = jobs
    results, inputs = [], {}
    for part, N, m, mode in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(f"{part} {'' if N is None else f'N={N} '}{m} {mode}")
        if (part, N) not in inputs:
            inputs.clear()   # one batch alive at a time
            if part == "varlen":
                inputs[(part, N)] = varlen_inputs(lengths, cfg.H, cfg.D, dtype, device, seed=seed)
            else:
                inputs[(part, N)] = {"gqa": gqa_inputs(cfg.gqa_B, cfg.gqa_H, cfg.gqa_H_kv, N, cfg.gqa_D, dtype,
                                                       device, seed=seed)}
        case = inputs[(part, N)]
        if m in gates and not gates[m]["passed"]:
            rec = {"error": "not measured: gate failed"}
        else:
            f = varlen_method_fn(m, cfg.C, case, sdpa=sdpa)
            qkv = case["gqa"] if part == "gqa" else case["packed" if m.endswith("/varlen") else "padded"]
            rec = measure_call(f, *qkv, mode, device, min_run_time)
        results.append({"part": part, "N": N, "method": m, "mode": mode, **rec})
    total = sum(lengths)
    return {
        "env": env,
        "command": command,
        "preset": "varlen",
        "preset_help": PRESET_HELP["varlen"],
        "memory_method": MEMORY_METHOD["cuda" if device.type == "cuda" else "cpu"],
        "inputs_note": VARLEN_MEMORY_NOTE,
        "config": asdict(cfg),
        "sdpa_kernel": sdpa,
        "baselines": {
            "sdpa": "torch.nn.functional.scaled_dot_product_attention (exact softmax; "
                    + ("torch's own kernel choice" if sdpa == "default" else
                       f"pinned to SDPBackend.{SDPA_KERNELS[sdpa]} with sdpa_kernel") + ")",
            "sdpa/padded": "SDPA on the padded batch, attn_mask (B, 1, 1, max) = not padding",
            "sdpa/gqa": "SDPA with enable_gqa=True",
            "lara/<backend>/padded": "lara_attention on the padded batch with padding_mask, same backend",
            "lara/<backend>/repeat": "k, v repeat_interleave'd to H heads (timed), then lara_attention, "
                                     "same backend",
        },
        "requested_backends": backends,
        "backends": run_b,
        "skipped": skipped,
        "methods": methods,
        "varlen": {"lengths": lengths, "drawn": drawn, "seed": seed if drawn else None,
                   "distribution": (f"log-uniform in [{cfg.min_len}, {cfg.max_len}]" if drawn
                                    else "given by --lengths"),
                   "sequences": len(lengths), "total_rows": total, "padded_rows": len(lengths) * max(lengths),
                   "max_seqlen": max(lengths), "padding_fraction": padding_fraction(lengths)},
        "gates": gates,
        "results": results,
    }


def _ratio(base: Optional[dict], r: Optional[dict], key: str = "median_ms") -> Optional[float]:
    """base / r (> 1: r is faster or smaller), None where either is missing or failed."""
    if not base or not r or key not in base or key not in r or not r[key]:
        return None
    return base[key] / r[key]


def _fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _varlen_lookup(report):
    return {(r["part"], r["N"], r["method"], r["mode"]): r for r in report["results"]}


def varlen_baseline(method: str) -> Optional[str]:
    """The same-backend baseline of a LARA method (padded for varlen, repeat for gqa)."""
    parts = method.split("/")
    if len(parts) != 3:
        return None
    return {"varlen": f"lara/{parts[1]}/padded", "gqa": f"lara/{parts[1]}/repeat"}.get(parts[2])


def format_varlen_table(report: dict) -> str:
    """The varlen preset as markdown: one table per part, times, peak memory and ratios
    against the baselines measured in the same run."""
    tab = _varlen_lookup(report)
    env, cfg, vl = report["env"], report["config"], report["varlen"]
    unit = "IQR" if env["device"].startswith("cpu") else "q25-q75"
    lines = [
        f"lara-bench preset `varlen` on {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
        f"lara_kernels {env['lara_kernels']}, commit {env['commit'][:12]}, {env['date']}",
        "",
        f"Command: `{report['command']}`" if report.get("command") else "",
        "",
        "Ratios are baseline time (or peak memory) / this row's, both measured in this run: "
        "> 1 means this row is faster (smaller). The baselines: LARA on the padded batch with "
        "padding_mask (varlen rows) or on k, v repeated to H heads (gqa rows), same backend; SDPA "
        "on the padded batch with its boolean attn_mask, or with enable_gqa=True.",
    ]

    def cell_t(r):
        if r is None:
            return "-"
        if "error" in r:
            return {"out of memory": "OOM", "not measured: gate failed": "not run"}.get(r["error"], "error")
        if r.get("iqr_ms") is None:
            return f"{r['median_ms']:.2f} (1 run)" if r.get("runs") == 1 else f"{r['median_ms']:.2f}"
        return f"{r['median_ms']:.2f} ±{r['iqr_ms']:.2f}"

    def cell_m(r):
        if r is None or "error" in r:
            return "-"
        return f"{r['peak_bytes'] / 2**20:.1f}"

    def gate_cell(m):
        if m.startswith("sdpa"):
            return "baseline"
        g = report["gates"][m]
        if m.split("/")[1] == "reference":
            return "oracle"
        return ("pass" if g["passed"] else "FAIL") + f" ({g['dtype'].replace('torch.', '')})"

    def ratios(part, N, m, base):
        if base is None or (m in report["gates"] and not report["gates"][m]["passed"]):
            return "-"
        b = [tab.get((part, N, base, mode)) for mode in ("fwd", "fwd+bwd")]
        r = [tab.get((part, N, m, mode)) for mode in ("fwd", "fwd+bwd")]
        return (f"{_fmt_ratio(_ratio(b[0], r[0]))} / {_fmt_ratio(_ratio(b[1], r[1]))} / "
                f"{_fmt_ratio(_ratio(b[1], r[1], 'peak_bytes'))}")

    header = (f"| fwd ms (±{unit}) | fwd+bwd ms (±{unit}) | peak MiB fwd | peak MiB fwd+bwd "
              "| vs LARA {0} (same backend): fwd / fwd+bwd / mem fwd+bwd | vs {1}: fwd / fwd+bwd / mem fwd+bwd |")
    if "varlen" in report["methods"]:
        lines += [
            "",
            f"### Varlen: {vl['sequences']} sequences, lengths {vl['distribution']}"
            + (f" (seed {vl['seed']})" if vl["drawn"] else "")
            + f"; {vl['total_rows']} rows packed, {vl['sequences']} x {vl['max_seqlen']} = {vl['padded_rows']} padded: "
            f"padding fraction {100 * vl['padding_fraction']:.1f}%; H={cfg['H']} D={cfg['D']} C={cfg['C']} "
            f"{cfg['dtype']}",
            "",
            f"Lengths: {', '.join(map(str, vl['lengths']))}",
            "",
            "| method | gate " + header.format("padded", "SDPA padded"),
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in report["methods"]["varlen"]:
            f, fb = tab.get(("varlen", None, m, "fwd")), tab.get(("varlen", None, m, "fwd+bwd"))
            lines.append(f"| {m} | {gate_cell(m)} | {cell_t(f)} | {cell_t(fb)} | {cell_m(f)} | {cell_m(fb)} "
                         f"| {ratios('varlen', None, m, varlen_baseline(m))} | "
                         f"{'-' if m == 'sdpa/padded' else ratios('varlen', None, m, 'sdpa/padded')} |")
    if "gqa" in report["methods"]:
        lines += [
            "",
            f"### GQA: B={cfg['gqa_B']}, H={cfg['gqa_H']} query heads, H_kv={cfg['gqa_H_kv']}, D={cfg['gqa_D']} "
            f"C={cfg['C']} {cfg['dtype']}, N = M",
            "",
            "| N | method | gate " + header.format("repeat", "SDPA enable_gqa"),
            "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for N in cfg["gqa_lengths"]:
            for m in report["methods"]["gqa"]:
                f, fb = tab.get(("gqa", N, m, "fwd")), tab.get(("gqa", N, m, "fwd+bwd"))
                lines.append(f"| {N} | {m} | {gate_cell(m)} | {cell_t(f)} | {cell_t(fb)} | {cell_m(f)} | {cell_m(fb)} "
                             f"| {ratios('gqa', N, m, varlen_baseline(m))} | "
                             f"{'-' if m == 'sdpa/gqa' else ratios('gqa', N, m, 'sdpa/gqa')} |")
    lines += ["", f"Timer: {next((r['timer'] for r in report['results'] if 'timer' in r), '?')}, median. "
              f"Peak memory: {report['memory_method']}; {report['inputs_note']}.",
              f"SDPA: {report['baselines']['sdpa']}."]
    lines += varlen_key_figures(report)
    for r in report["results"]:
        if "error" in r and r["error"] not in ("out of memory", "not measured: gate failed"):
            at = "" if r["N"] is None else f"N={r['N']} "
            lines.append(f"Error {r['part']} {at}{r['method']} {r['mode']}: {r['error']}")
    for m, reasons in report["skipped"].items():
        lines.append(f"Skipped {m}: {'; '.join(reasons)}")
    for m, gt in report["gates"].items():
        if "rel_rms_err" in gt:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in gt["rel_rms_err"].items())
            lines.append(f"Gate {m}: {'pass' if gt['passed'] else 'FAIL'} vs reference ({gt['where']}, "
                         f"{gt['dtype']}), relative RMS error {errs} (tolerance {gt['tol']:g})")
        elif "error" in gt:
            lines.append(f"Gate {m}: FAIL ({gt['error']})")
    return "\n".join(lines)


def varlen_key_figures(report: dict) -> List[str]:
    """Lines "Key figure: ...": per LARA method of a passed gate, the fwd+bwd time and
    memory ratios against its baselines (varlen at the batch's padding fraction; gqa at
    the longest N)."""
    tab = _varlen_lookup(report)
    lines = []
    for part, sdpa_m in (("varlen", "sdpa/padded"), ("gqa", "sdpa/gqa")):
        if part not in report["methods"]:
            continue
        N = None if part == "varlen" else max(report["config"]["gqa_lengths"])
        cells = []
        for m in report["methods"][part]:
            base = varlen_baseline(m)
            if base is None or not report["gates"][m]["passed"]:
                continue
            r = tab.get((part, N, m, "fwd+bwd"))
            b, s = tab.get((part, N, base, "fwd+bwd")), tab.get((part, N, sdpa_m, "fwd+bwd"))
            cells.append(f"{m} {_fmt_ratio(_ratio(b, r))} the speed of {base.split('/')[2]} "
                         f"(which peaks at {_fmt_ratio(_ratio(b, r, 'peak_bytes'))} its memory), "
                         f"{_fmt_ratio(_ratio(s, r))} the speed of {sdpa_m} "
                         f"(which peaks at {_fmt_ratio(_ratio(s, r, 'peak_bytes'))} its memory)")
        if cells:
            where = (f"padding fraction {100 * report['varlen']['padding_fraction']:.1f}%" if part == "varlen"
                     else f"N={N}")
            lines.append(f"Key figure: {part} fwd+bwd at {where}: " + "; ".join(cells))
    return lines


def plot_varlen(report: dict, path: Path) -> Optional[Path]:
    """Top: the varlen batch, bars per method (fwd, fwd+bwd time, fwd+bwd peak memory);
    bottom: GQA time and memory against N, log-log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'lara-kernels[bench]')", file=sys.stderr)
        return None
    tab = _varlen_lookup(report)
    parts = [p for p in VARLEN_PARTS if p in report["methods"]]
    panels = [("fwd", "median_ms", "fwd time (ms)"), ("fwd+bwd", "median_ms", "fwd+bwd time (ms)"),
              ("fwd+bwd", "peak_bytes", "fwd+bwd peak memory (MiB)")]
    fig, axes = plt.subplots(len(parts), 3, figsize=(15, 4.2 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        methods = report["methods"][part]
        for ax, (mode, key, title) in zip(row, panels):
            if part == "varlen":
                vals = [tab[("varlen", None, m, mode)].get(key) for m in methods]
                ys = [0 if x is None else (x / 2**20 if key == "peak_bytes" else x) for x in vals]
                colors = ["tab:gray" if m.startswith("sdpa") else "tab:blue" if m.endswith("/varlen") else "tab:orange"
                          for m in methods]
                bars = ax.barh(range(len(methods)), ys, color=colors)   # linear from 0: bars compare honestly
                ax.bar_label(bars, labels=["failed" if x is None else f"{y:.0f}" if y >= 100 else f"{y:.3g}"
                                           for x, y in zip(vals, ys)],
                             fontsize=7, padding=2)
                ax.set_yticks(range(len(methods)), methods, fontsize=8)
                ax.invert_yaxis()
                ax.margins(x=0.15)
                ax.set_title(f"varlen ({100 * report['varlen']['padding_fraction']:.0f}% padding): {title}",
                             fontsize=9)
                ax.grid(True, axis="x", alpha=0.3)
            else:
                colors = {}   # one colour per backend: enable_gqa solid, its repeat baseline dashed
                for m in methods:
                    pts = [(N, tab[("gqa", N, m, mode)][key]) for N in report["config"]["gqa_lengths"]
                           if key in tab[("gqa", N, m, mode)]]
                    if not pts:
                        continue
                    xs, ys = zip(*pts)
                    if key == "peak_bytes":
                        ys = [max(y, 1) / 2**20 for y in ys]
                    who = m.split("/")[1] if m.startswith("lara/") else m
                    color = colors.setdefault(who, "tab:gray" if who.startswith("sdpa") else f"C{len(colors)}")
                    ax.plot(xs, ys, marker="o", color=color, linestyle="--" if m.endswith("/repeat") else "-",
                            label=m)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length N")
                ax.set_title(f"GQA H={report['config']['gqa_H']}, H_kv={report['config']['gqa_H_kv']}: {title}",
                             fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                if ax is row[0]:
                    ax.legend(fontsize=8)
    env = report["env"]
    fig.suptitle(f"lara-bench varlen on {env['device_name']}\ntorch {env['torch']}, triton {env['triton']}, "
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
    parser.add_argument("--lengths", type=_positive(int), nargs="+",
                        help="override the preset's sequence lengths (varlen: the lengths of the packed batch, "
                             "in place of the drawn ones)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends to time (default: every one that can run the inputs); "
                             "SDPA is always timed as the baseline")
    parser.add_argument("--ops", default=None, help="comma-separated: lara, rfa (default: both; varlen: lara only)")
    parser.add_argument("--sdpa", default="auto", choices=["auto", "default", *SDPA_KERNELS],
                        help="SDPA kernel of the baseline: auto (flash on CUDA for float16/bfloat16, else "
                             "torch's choice; varlen: torch's choice, flash takes no attn_mask), default "
                             "(torch's choice) or one pinned with sdpa_kernel")
    parser.add_argument("--key-n", type=_positive(int), default=None,
                        help="length of the key figure 'forward at N' (gpu preset default: 8192)")
    parser.add_argument("--ratio", default=None,
                        help="HI/LO: key figure 'forward time at N=HI over N=LO' (gpu preset default: 32768/4096)")
    parser.add_argument("--min-run-time", type=_positive(float), default=0.1,
                        help="seconds per measurement on CPU (torch.utils.benchmark; default 0.1)")
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch CPU threads (default: torch's own; on a shared machine 1 is steadier)")
    parser.add_argument("--no-progress", action="store_true")
    varlen = parser.add_argument_group("varlen preset")
    varlen.add_argument("--seqs", type=_positive(int), default=None,
                        help="sequences in the packed batch, lengths drawn log-uniformly in --len-range "
                             "(default: 8 on CPU, 16 on CUDA)")
    varlen.add_argument("--len-range", type=_positive(int), nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="range of the drawn lengths (default: 64 4096 on CPU, 64 8192 on CUDA)")
    varlen.add_argument("--seed", type=int, default=VARLEN_SEED, help=f"seed of the drawn lengths and the "
                        f"inputs (default {VARLEN_SEED})")
    varlen.add_argument("--gqa-lengths", type=_positive(int), nargs="+", default=None,
                        help="N = M of the GQA sweep (default: 512 1024 2048 on CPU, 2048 8192 32768 on CUDA)")
    varlen.add_argument("--parts", default=",".join(VARLEN_PARTS),
                        help="comma-separated: varlen, gqa (default: both)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])

    device = parse_device(parser, args.device)
    known = sorted(dispatch.backends())
    backends = None
    if args.backends is not None:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in known]
        if not backends or unknown:
            parser.error(f"--backends {args.backends!r}: unknown backend(s) {unknown or backends}; known: {known}")
    if args.preset == "varlen":
        return main_varlen(parser, args, device, backends, argv if argv is not None else sys.argv[1:])
    varlen_only = [f for f, v in (("--seqs", args.seqs), ("--len-range", args.len_range),
                                  ("--gqa-lengths", args.gqa_lengths)) if v is not None]
    if varlen_only:
        parser.error(f"{', '.join(varlen_only)}: options of --preset varlen")
    args.ops = args.ops or "lara,rfa"
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


def main_varlen(parser, args, device: torch.device, backends: Optional[List[str]], argv: List[str]) -> int:
    """``--preset varlen``: the configuration from VARLEN_DEFAULTS and the flags, then
    ``run_varlen``, the table, JSON and plot (stem ``varlen-<device type>``)."""
    from dataclasses import replace

    if args.key_n is not None or args.ratio is not None:
        parser.error("--key-n and --ratio are options of the N sweeps (quick, paper, gpu), not of varlen")
    if args.ops not in (None, "lara"):
        parser.error(f"--ops {args.ops!r}: the varlen preset measures lara only")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in VARLEN_PARTS for p in parts):
        parser.error(f"--parts {args.parts!r}: give varlen, gqa or both, comma-separated")
    cfg = VARLEN_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    if args.seqs is not None:
        cfg = replace(cfg, seqs=args.seqs)
    if args.len_range is not None:
        lo, hi = args.len_range
        if lo > hi:
            parser.error(f"--len-range {lo} {hi}: MIN must not exceed MAX")
        cfg = replace(cfg, min_len=lo, max_len=hi)
    if args.gqa_lengths is not None:
        cfg = replace(cfg, gqa_lengths=tuple(args.gqa_lengths))
    if args.lengths is not None and (args.seqs is not None or args.len_range is not None):
        parser.error("--lengths gives the batch's lengths: drop --seqs and --len-range")
    if args.threads:
        torch.set_num_threads(args.threads)
    import shlex

    command = shlex.join(["lara-bench", *argv])
    report = run_varlen(device, cfg, args.lengths, args.min_run_time, progress=not args.no_progress,
                        backends=backends, sdpa=args.sdpa, parts=parts, seed=args.seed, command=command)
    table = format_varlen_table(report)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.stem or f"varlen-{device.type}")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    png = plot_varlen(report, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}" + (f", {png}" if png else ""))
    failed = [m for m, g in report["gates"].items() if not g["passed"]]
    errors = sorted({r["method"] for r in report["results"]
                     if "error" in r and r["error"] not in ("out of memory", "not measured: gate failed")})
    missing = [m for m in report["skipped"] if backends is not None and m.split("/")[1] in backends]
    if failed or errors or missing:
        print(f"lara-bench: gate failed for {failed or 'none'}; errors in {errors or 'none'}; "
              f"requested but not run: {missing or 'none'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
