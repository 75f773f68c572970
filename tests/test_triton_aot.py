"""The Triton kernels compiled ahead of time for sm_80 and sm_90, no GPU needed (issue 13).

The interpreter accepts code a GPU compiler rejects or compiles badly, so every kernel is
compiled as the launchers specialize it: each launcher runs on meta tensors (B=8, H=12,
N=M=8192, as in a real call; the launch helper is replaced by a recorder, so the grid,
the constexprs and the num_warps / num_stages are the launcher's own, and the split
counts use an H100's 132 SMs), in both layouts of the long tensors: padded (B, H, L, D)
and packed (T, H, D) with cu_seqlens (T = B * 8192, max_seqlen 8192), whose kernels are
the VARLEN specializations (issue 16). The packed ones hold a few more scalars (the
sequence's first row and length, the live-block count) and compile to about the same
registers and stack as the padded ones: at the CI configurations (bf16, D = C = 64 /
128) their stack frames in bytes are, packed (padded): key backward sm_90 0 / 192
(0 / 184), sm_80 0 / 504 (0 / 528); key forward sm_90 0 / 0 (0 / 0), sm_80 168 / 96
(96 / 128); query backward sm_90 0 / 0 (0 / 0), sm_80 0 / 0 (0 / 16); query forward
0 / 0 on both (Triton 3.9; figures vary a little between runs). Each recorded launch
is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``; the cubin is
read with the cuobjdump bundled with Triton (registers, stack frame, SASS), the PTX for
the tensor-core instructions.

Fails on:
- a compile error;
- shared memory over the architecture's limit per block (sm_80 163 KB, sm_90 227 KB);
- a half-dtype kernel without tensor-core instructions (``mma`` / ``wgmma`` in the PTX)
  where it has products (all but the split combine);
- spills at the main configurations (D <= 128, C <= 128): a stack frame above
  MAX_STACK = 320 bytes per thread (where ptxas puts spilled registers), on sm_80 and
  sm_90 (SPILL_ARCHS), except the known spills of SPILL_KNOWN, each held to its own
  stated bound. Before issue 13 the key backward had a 12 KB frame, and the query
  backward up to 7.6 KB on sm_80 and 4.8 KB on sm_90 (float32): the mma.sync layout of
  sm_80 puts every product's warps along its rows, and the query backward held its
  N x C tiles with 16 query rows along them, so 8 warps held 8 copies of each. It now
  holds them transposed (C x BLOCK_N, the warps along C) and walks the head-dim chunks
  of the logits in a loop (triton_kernels/query_pass.py), with chunks of 32 on sm_80
  and for float32 inputs at C >= 64: in float16/bfloat16 0 bytes on sm_90 and 0-16 on
  sm_80 (112 for the lean path's specialization at D = C = 128), in float32 up to 176
  (sm_80) and 192 (sm_90) bytes (Triton 3.9, ``.ci/triton_aot_check.py --main``). In
  float16/bfloat16 the forward kernels spill nothing or up to 168 bytes at these sizes.
  The key backward at C = D = 128 still spills (SPILL_KNOWN): on sm_80 504-528 bytes in
  float16/bfloat16 (8 warps; 16 warps: 848; the lean path's specializations 96-296).
  In float32 it spilled up to 880 bytes on sm_80 and 288 (packed) to 5296 (padded) on
  sm_90, where ptxas gave the padded kernel 32-64 registers of the 128 it may use; its
  float32 launches now take C blocks of 64 rows at D = 128 (``key_pass.blocks``): dw
  programs per C block and the dk/dv kernel, stack 0-88 bytes on both architectures
  (``test_float32_key_backward_within_budget``, in CI). The half dtypes' C x 16-key
  tiles are already along the warps; what it holds is dw (C x D float32, 64 registers at
  8 warps) and four C x D operands (w and dkap, each in the layouts of two products),
  which the PTX shows loaded once before the key loop. Holding dk, dv transposed (the
  query backward's cure) did not help (448-488 bytes); chunking D would read k and v
  once per chunk; left to a later change. The lean path's own kernels (landmarks, the
  small C-sized steps; CI configurations) spill nothing or up to 16 bytes. In float32
  (``tl.dot`` without tensor cores at the default "highest" precision: FMAs whose
  operands each thread holds whole, its rows x K and K x its columns) the forward
  kernels spilled at most main configurations on both architectures (query forward
  0.2-7.9 KB, key forward up to 10 KB, ptxas often falling back to 32 registers; 30
  failures of ``--main``). Their float32 launches now take smaller blocks (``blocks``
  of each pass: 16 keys a block and at least 8 warps in the key forward; chunks of 16
  walked in a loop, 32-64 query rows and 8 warps in the query forward): stack 0-24
  bytes on both architectures, both layouts, every main configuration; the half-dtype
  launches are unchanged (the same figures). CI compiles the float32 forward kernels at
  the two ends (``CI_FP32_FWD``);
- a grid axis other than 0, or a grid beyond axis 0's limit (2**31 - 1) at B*H = 70000.

A compile takes 10-30 s on CI's two cores, so CI compiles the two ends of the main
configurations (``CI``: D = C = 64 and D = C = 128, bfloat16) for both architectures,
with the variants that hold the most state (values, norm term, MIS, padding), and at the
same two ends the float32 forward kernels alone (``CI_FP32_FWD``: about a minute more)
and the float32 key backward at D = C = 128 (its two kernels at the "highest" and "high"
float32 matmul precisions, about three minutes; the other float32 backward kernels,
long to compile, are left to ``--main``);
``.ci/triton_aot_check.py --main`` runs all main configurations (``MAIN``, every dtype)
and without ``--main`` the whole matrix (D in {64, 128, 256}, C in {16, 64, 128, 256},
every dtype and variant), by hand, also with Triton 3.6 (the GPU machine's version).
Identical specializations are compiled once, in a pool of two processes, with the Triton
cache in a temporary folder.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

from lara_kernels.triton_kernels import _common  # noqa: E402
from lara_kernels.triton_kernels import key_pass as kp  # noqa: E402
from lara_kernels.triton_kernels import query_pass as qp  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_STACK = 320         # bytes per thread of spills allowed at the main configurations (see above)
SPILL_ARCHS = (80, 90)  # where the spill bound is enforced
# Known spills above MAX_STACK at the main configurations, each with its own bound (see
# above): (kernel, arch, D, C, dtypes) -> bytes per thread; measured figures in comments.
SPILL_KNOWN = {
    ("_key_bwd_kernel", 80, 128, 128, ("bf16", "fp16")): 640,   # 504 (packed), 528 (padded)
}
H100_SMS = 132
B_, H_, L_ = 8, 12, 8192
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAIN = [(D, C, dt) for D in (64, 128) for C in (16, 64, 128) for dt in ("bf16", "fp16", "fp32")]
CI = [(64, 64, "bf16"), (128, 128, "bf16")]   # the main configurations' two ends, in CI
CI_FP32_FWD = [(64, 64, "fp32"), (128, 128, "fp32")]   # the same ends in float32, forward kernels only
FWD_KERNELS = ("_key_fwd_kernel", "_query_fwd_kernel")
FULL = [(D, C, dt) for D in (64, 128, 256) for C in (16, 64, 128, 256) for dt in DTYPES]
GQA_KEY = [(D, 512, dt) for D in (64, 128) for dt in DTYPES]   # key pass of G = 8 query heads x C = 64
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
       torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1"}
LAYOUTS = ("padded", "packed")
# kernels without a product of half inputs (no tensor-core instruction expected): the
# split combine; the lean path's small kernels (products of float32 C-sized tensors in
# "ieee" precision, as torch's float32 matmul) and its landmarks backward (a float32
# one-hot product only: the segment sums of the float32 dqt rows)
NO_HALF_PRODUCTS = {"_key_combine_kernel", "_proposal_kernel", "_stats_kernel", "_small_bwd_rows_kernel",
                    "_small_bwd_cols_kernel", "_mixed_bwd_kernel", "_landmarks_bwd_kernel"}


# ----------------------------------------------------------------------------- capture


def capture(C, D, DV, dtype, *, B=B_, H=H_, L=L_, full=True, sms=H100_SMS, arch=90, layouts=LAYOUTS,
            passes=("key", "query")):
    """Every launch of the four kernel-set functions on meta tensors, as (kernel, grid,
    args, kwargs), as the launchers choose them for compute capability ``arch``. ``full``:
    every variant (with and without values, norm term, MIS, padding); else the ones
    holding the most state (values and norm term, MIS, padding). ``layouts``: the padded
    layout ((B, H, L, D) with or without a padding mask) and the packed one ((T, H, D)
    with cu_seqlens, T = B * L, max_seqlen = L: the VARLEN specializations). ``passes``:
    ("key",) alone for the key pass of grouped-query attention (G * C rows, past the query
    pass's limit of C); "lean" adds the forward and backward of the triton backend's lean
    path (lara_kernels/_whole_triton.py: landmarks, the small C x D / C x C kernels and
    the split launches of the passes), "mixed" proposal with "optimal" weighting (the
    most kernels), and with ``full`` also "segment" with "balance"."""
    rec = []

    def record(kernel, grid, device, *args, **kwargs):
        assert device.type == "meta"
        rec.append((kernel, tuple(grid), args, kwargs))

    meta = dict(device="meta")
    f32 = torch.float32
    q = torch.empty(B, H, L, D, dtype=dtype, **meta)
    k = torch.empty(B, H, L, D, dtype=dtype, **meta)
    v = torch.empty(B, H, L, DV, dtype=dtype, **meta)
    w = torch.empty(B, H, C, D, dtype=f32, **meta)
    Zs = torch.empty(B, H, C, dtype=f32, **meta)
    kap = torch.empty(B, H, C, DV, dtype=f32, **meta)
    c_eff = torch.empty(B, dtype=torch.int64, **meta)
    cases = []     # (q, k, v, padding, cu_seqlens, max_seqlen)
    if "padded" in layouts:
        cases += [(q, k, v, pad, None, 0) for pad in
                  [torch.empty(B, L, dtype=torch.bool, **meta)] + ([None] if full else [])]
    if "packed" in layouts:
        packed = [torch.empty(B * L, H, x.shape[-1], dtype=dtype, **meta) for x in (q, k, v)]
        cases.append((*packed, None, torch.empty(B + 1, dtype=torch.int32, **meta), L))
    with mock.patch.object(_common, "launch", record), \
            mock.patch.object(_common, "emulated", lambda dev: False), \
            mock.patch.object(_common, "sm_count", lambda dev: sms), \
            mock.patch.object(_common, "arch", lambda dev: arch):
        for q_, k_, v_, pad, cu, max_len in cases:
            if "lean" in passes:
                from lara_kernels import _whole_triton as wt

                eps = torch.empty(B, H, C, D, dtype=f32, **meta)
                for mixed, optimal in [(True, True)] + ([(False, False)] if full else []):
                    y, state = wt._forward(q_, k_, v_, eps, pad, pad, cu, cu, max_len, max_len, C, mixed, optimal,
                                           0.5, 0.3)
                    wt._backward(torch.empty_like(y), q_, k_, v_, pad, pad, cu, cu, max_len, max_len, mixed,
                                 optimal, 0.5, 0.3, state)
            if "key" not in passes:
                continue
            key_variants = [(v_, True)] + ([(k_, False), (None, False)] if full else [])
            for vv, sub in key_variants:
                Z, kp_ = kp.key_pass_fwd(w, k_, vv, pad, 0.3, sub, cu, max_len)
                kp.key_pass_bwd(w, k_, vv, pad, 0.3, sub, Z, kp_, Zs, kp_, cu, max_len)
            if "query" not in passes:
                continue
            for mis in ([True, False] if full else [True]):
                extra = (w, Zs, Zs, 0.5) if mis else (None, None, None, 0.0)
                qp.query_pass_fwd(q_, w, Zs, kap, c_eff, pad, 0.3, *extra, cu, max_len)
                qp.query_pass_bwd(q_, w, Zs, kap, c_eff, pad, 0.3, *extra, torch.empty_like(v_), cu, max_len)
    return rec


def spec(kernel, args, kwargs):
    """(signature, constexprs, options) as the JIT would specialize this launch: tensors
    as pointers of their dtype, ints equal to 1 (not in do_not_specialize) as constants,
    other ints as i32 (i64 when they need it), floats as fp32."""
    names = kernel.arg_names
    opts = {n: kwargs[n] for n in ("num_warps", "num_stages") if n in kwargs}
    consts = {n: val for n, val in kwargs.items() if n not in opts}
    dns = set(getattr(kernel, "do_not_specialize", ()) or ())
    dns |= {names[i] for i in dns if isinstance(i, int)}
    sig = {}
    for name, val in zip(names, args):
        if isinstance(val, torch.Tensor):
            sig[name] = PTR[val.dtype]
        elif isinstance(val, bool):
            sig[name] = "i1"
        elif isinstance(val, int):
            if val == 1 and name not in dns:
                consts[name] = 1
                sig[name] = "constexpr"
            else:
                sig[name] = "i32" if -2 ** 31 <= val < 2 ** 31 else "i64"
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(val)}")
    for name in consts:
        sig[name] = "constexpr"
    return sig, consts, opts


def _key(kernel, sig, consts, opts, arch):
    return (kernel.__name__, arch, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
            tuple(sorted(opts.items())))


def _tool(name):
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    return path if os.path.exists(path) else name


def compile_one(job):
    """Compile one specialization; returns its figures (run in a worker process)."""
    mod, fname, sig, consts, opts, arch = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    fn = getattr(importlib.import_module(mod), fname)
    try:
        kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as exc:  # reported, and failed on, by the caller
        return dict(kernel=fname, arch=arch, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
    ptx = kern.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
        cubin = f.name
    try:
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    finally:
        os.unlink(cubin)
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return dict(
        kernel=fname, arch=arch, shared=kern.metadata.shared,
        regs=int(regs.group(1)) if regs else None, stack=int(stack.group(1)) if stack else None,
        spill_stores=len(re.findall(r"\bSTL\b", sass)),
        mma=bool(re.search(r"\bwgmma\.|\bmma\.sync", ptx)),
        sass_mma=bool(re.search(r"\bHGMMA\b|\bHMMA\b", sass)),
        num_warps=kern.metadata.num_warps, num_stages=kern.metadata.num_stages,
    )


def jobs_for(configs, archs, full, key_configs=(), lean_configs=()):
    """Deduplicated compile jobs: {key: (job, [(D, C, dtype), ...])}; ``key_configs``:
    configurations of the key pass alone (grouped-query attention's G * C rows);
    ``lean_configs``: of the lean path's kernels (``capture``'s "lean")."""
    out = {}
    todo = ([(cfg, ("key", "query")) for cfg in configs] + [(cfg, ("key",)) for cfg in key_configs]
            + [(cfg, ("lean",)) for cfg in lean_configs])
    for (D, C, dt), passes in todo:
        for arch in archs:   # the launch parameters depend on the target (_common.arch)
            for kernel, grid, args, kwargs in capture(C, D, D, DTYPES[dt], full=full, arch=arch, passes=passes):
                sig, consts, opts = spec(kernel, args, kwargs)
                key = _key(kernel, sig, consts, opts, arch)
                fn = getattr(kernel, "fn", kernel)
                job = (fn.__module__, fn.__name__, sig, consts, opts, arch)
                out.setdefault(key, (job, []))[1].append((D, C, dt))
    return out


def run_jobs(jobs, workers=2):
    """Compile in a pool of ``workers`` processes, Triton's cache in a temporary folder."""
    with tempfile.TemporaryDirectory() as cache:
        env = {"TRITON_CACHE_DIR": cache}
        old = {k: os.environ.get(k) for k in (*env, "TRITON_INTERPRET")}
        os.environ.update(env)
        os.environ.pop("TRITON_INTERPRET", None)
        try:
            ctx = __import__("multiprocessing").get_context("spawn")
            with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                keys = list(jobs)
                results = list(pool.map(compile_one, [jobs[k][0] for k in keys]))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return [(r, jobs[k][1], jobs[k][0][3]) for k, r in zip(keys, results)]


def layout_of(consts):
    """"packed" for a VARLEN specialization, else "padded" (the split combine has neither)."""
    return "packed" if str(consts.get("VARLEN")) == "True" else "padded"


def stack_bound(kernel, arch, cfgs):
    """The stack frame allowed to a kernel compiled for ``arch`` at the configurations
    ``cfgs`` [(D, C, dtype), ...]: MAX_STACK, or the bound of SPILL_KNOWN where every
    configuration is a known spill."""
    bounds = []
    for D, C, dt in cfgs:
        known = [b for (k, a, d, c, dts), b in SPILL_KNOWN.items()
                 if (k, a, d, c) == (kernel, arch, D, C) and dt in dts]
        bounds.append(known[0] if known else MAX_STACK)
    return min(bounds, default=MAX_STACK)


# kernels held to MAX_STACK past the main configurations too: the key backward's dk/dv
# kernel exists only past C x D = 128 x 128 (several C blocks), with its own small blocks
BOUNDED_AT_EVERY_SIZE = {"_key_bwd_dkv_kernel"}
DKV_CI = [(64, 512, "bf16"), (128, 256, "bf16")]   # G * C = 8 x 64 rows at D = 64; C = 256 at D = 128


def problems(results, main_only=False):
    """Every failed requirement, as lines."""
    bad = []
    for r, cfgs, consts in results:
        where = f"{r['kernel']} sm_{r['arch']} {layout_of(consts)} (D, C, dtype) in {sorted(set(cfgs))}"
        if "error" in r:
            bad.append(f"{where}: compile error {r['error']}")
            continue
        if r["shared"] > SMEM_LIMIT[r["arch"]]:
            bad.append(f"{where}: shared memory {r['shared']} > {SMEM_LIMIT[r['arch']]}")
        half = any(dt != "fp32" for _, _, dt in cfgs)
        if half and r["kernel"] not in NO_HALF_PRODUCTS and not r["mma"]:
            bad.append(f"{where}: no mma/wgmma instruction")
        main = all(D <= 128 and C <= 128 for D, C, _ in cfgs) or r["kernel"] in BOUNDED_AT_EVERY_SIZE
        bound = stack_bound(r["kernel"], r["arch"], cfgs)
        if main and r["arch"] in SPILL_ARCHS and (r["stack"] or 0) > bound:
            bad.append(f"{where}: {r['stack']} bytes of stack frame (spills) > {bound}")
    return bad


def table(results):
    """Markdown table of the results, the packed (VARLEN) specialization of a kernel next to
    the padded ones of the same configurations."""
    lines = ["| kernel | sm | (D, C, dtype) | layout | warps | stages | regs | stack B | STL | shared KB | mma |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda x: (x[0]["kernel"], x[0]["arch"], sorted(x[1]), layout_of(x[2]) == "packed")  # noqa: E731
    for r, cfgs, consts in sorted(results, key=order):
        head = f"| {r['kernel']} | {r['arch']} | {', '.join(map(str, sorted(set(cfgs))))} | {layout_of(consts)} |"
        if "error" in r:
            lines.append(f"{head} error | | | | | | |")
            continue
        lines.append(f"{head} {r['num_warps']} | {r['num_stages']} | {r['regs']} | {r['stack']} | "
                     f"{r['spill_stores']} | {r['shared'] / 1024:.1f} | {'yes' if r['mma'] else 'no'} |")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _has_nvidia_backend():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(_tool("ptxas")) or os.path.exists(_tool("cuobjdump"))


# ----------------------------------------------------------------------------- tests


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas, cuobjdump)")
def test_key_dkv_kernel_within_budget():
    # the key backward's dk/dv kernel (several C blocks), both layouts, both architectures
    jobs = {key: job for key, job in jobs_for([], (80, 90), full=False, key_configs=DKV_CI).items()
            if job[0][1] == "_key_bwd_dkv_kernel"}
    results = run_jobs(jobs)
    print("\n" + table(results))
    assert len(results) == 2 * 2 * 2     # two configurations, two layouts, two architectures
    assert all(r["kernel"] == "_key_bwd_dkv_kernel" and r["mma"] for r, _, _ in results)
    bad = problems(results)
    assert not bad, "\n".join(bad)


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas, cuobjdump)")
def test_float32_forward_within_budget():
    # the forward kernels with float32 inputs at the default precision ("ieee": FMA
    # products, no tensor cores), both layouts, both architectures
    assert torch.get_float32_matmul_precision() == "highest"
    jobs = {key: job for key, job in jobs_for(CI_FP32_FWD, (80, 90), full=False).items()
            if job[0][1] in FWD_KERNELS}
    results = run_jobs(jobs)
    print("\n" + table(results))
    # two configurations, two kernels, two layouts, two architectures
    assert len(results) == 2 * 2 * 2 * 2
    assert all(consts["PREC"] == "ieee" for _, _, consts in results)
    bad = problems(results)
    assert not bad, "\n".join(bad)


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas, cuobjdump)")
def test_float32_key_backward_within_budget():
    # the key backward with float32 inputs at C = D = 128, at the default precision ("ieee":
    # C blocks of 64 rows) and at "high" ("tf32x3": blocks of 32): the dw kernel and the
    # dk/dv kernel, both layouts, both architectures, at the main bound (in one program the
    # "ieee" kernel had a 5.3 KB stack frame on sm_90; "tf32x3" in blocks of 64, 7.2 KB on sm_80)
    results = []
    for setting, prec, rows in (("highest", "ieee", 64), ("high", "tf32x3", 32)):
        assert kp.blocks(128, 128, 128, bwd=True, fp32=True, prec=prec)[0] == rows
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(setting)
        try:
            jobs = {key: job for key, job in jobs_for([], (80, 90), full=False,
                                                      key_configs=[(128, 128, "fp32")]).items()
                    if job[0][1] in ("_key_bwd_kernel", "_key_bwd_dkv_kernel")}
        finally:
            torch.set_float32_matmul_precision(before)
        part = run_jobs(jobs)
        assert len(part) == 2 * 2 * 2     # two kernels, two layouts, two architectures
        assert all(str(consts["PREC"]) == prec for _, _, consts in part)
        dw = [consts for r, _, consts in part if r["kernel"] == "_key_bwd_kernel"]
        assert all(str(c["NCB"]) == str(128 // rows) and str(c["DKV"]) == "False" for c in dw), dw
        results += part
    print("\n" + table(results))
    bad = problems(results)
    assert not bad, "\n".join(bad)


@pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas, cuobjdump)")
def test_main_configs_compile_within_budget():
    results = run_jobs(jobs_for(CI, (80, 90), full=False, lean_configs=CI))
    print("\n" + table(results))
    # five kernels padded, the four with a long axis packed too, two architectures at least;
    # the lean path's seven kernels (landmarks forward and backward in both layouts)
    assert len(results) >= (9 + 9) * 2
    lean = {"_landmarks_fwd_kernel", "_landmarks_bwd_kernel", "_proposal_kernel", "_stats_kernel",
            "_small_bwd_rows_kernel", "_small_bwd_cols_kernel", "_mixed_bwd_kernel"}
    assert lean <= {r["kernel"] for r, _, _ in results}
    assert {layout_of(consts) for _, _, consts in results} == set(LAYOUTS)
    bad = problems(results)
    assert not bad, "\n".join(bad)


def test_grids_use_axis_0_only():
    # B*H = 70000 > 65535 (the limit of grid axes 1 and 2) through every launcher
    for C, D in ((16, 64), (256, 256)):
        # several C blocks at (256, 256): the key backward's dk/dv kernel besides its dw one
        dkv = 1 if kp.blocks(C, D, D, bwd=True)[0] < C else 0
        assert dkv == (C == 256)
        rec = capture(C, D, D, torch.bfloat16, B=7000, H=10, L=300)
        # padded with and without a mask, packed; three key-pass variants, two query-pass ones
        assert len(rec) == 3 * (3 * (3 + dkv) + 2 * 2)
        for kernel, grid, _, _ in rec:
            assert len(grid) == 1 and 1 <= grid[0] < 2 ** 31, (kernel, grid)
            least = -(-7000 * 10 * C // 16) if kernel.__name__ == "_key_combine_kernel" else 7000 * 10
            assert grid[0] >= least, (kernel, grid)   # every (b, h) has its programs, on axis 0
        # the lean path's launches (its landmarks, small kernels and split passes)
        rec = capture(C, D, D, torch.bfloat16, B=7000, H=10, L=300, passes=("lean",))
        # mixed-optimal (key pass and normalizer) and segment-balance (key pass), per layout
        assert len(rec) == 3 * ((6 + 7 + 2 * dkv) + (5 + 5 + dkv))
        for kernel, grid, _, _ in rec:
            assert len(grid) == 1 and 7000 * 10 <= grid[0] < 2 ** 31, (kernel, grid)


def test_packed_launches_cover_max_seqlen():
    # the packed layout sizes its grids and splits by max_seqlen as the padded one by L
    # (B = 3 sequences of up to 1000 rows in T = 1200), every (b, h) on axis 0, the rows
    # addressed through cu_seqlens (stride_b 0 and the VARLEN specialization)
    def launches(layout):
        rec = capture(64, 64, 64, torch.bfloat16, B=3, H=4, L=1000, full=False, layouts=(layout,))
        return {kernel.__name__: (grid, dict(zip(kernel.arg_names, args)), kw) for kernel, grid, args, kw in rec}

    padded, packed = launches("padded"), launches("packed")
    assert padded.keys() == packed.keys()
    for name, (grid, args, kw) in packed.items():
        assert grid == padded[name][0], name
        if name != "_key_combine_kernel":
            assert kw["VARLEN"] and not padded[name][2]["VARLEN"], name
            assert args["CU"].dtype == torch.int32 and args["CU"].shape == (4,), name
            stride_b = [n for n in args if n.startswith("s") and n.endswith("_b") and n != "sp_b"]
            assert stride_b and all(args[n] == 0 for n in stride_b), (name, stride_b)


def test_split_counts_follow_the_device():
    # the split count of the long axis fills the device: more SMs, more splits
    def splits(sms):
        rec = capture(64, 64, 64, torch.bfloat16, B=1, H=2, L=8192, full=False, sms=sms)
        return {kernel.__name__: args[kernel.arg_names.index("S")] for kernel, _, args, _ in rec
                if "S" in kernel.arg_names and kernel.__name__ != "_key_combine_kernel"}

    few, many = splits(8), splits(132)
    for name in few:
        assert 1 <= few[name] < many[name], (name, few[name], many[name])
        assert many[name] <= 132 * 2, (name, many[name])


def test_launch_parameters_follow_the_target():
    # the launchers ask _common.arch for the device's compute capability: on sm_80 the
    # backward kernels take smaller head-dim chunks / fewer warps (spills, see above);
    # meta and CPU tensors (arch None: shape tracing, the interpreter) take the sm_90 choices
    def launches(C, D, arch):
        rec = capture(C, D, D, torch.bfloat16, B=1, H=2, L=256, full=False, arch=arch)
        return {kernel.__name__: k for kernel, _, _, k in rec}

    assert _common.arch(torch.device("meta")) is None and _common.arch(torch.device("cpu")) is None
    q80, q90, qnone = (launches(64, 64, a)["_query_bwd_kernel"] for a in (80, 90, None))
    assert (q80["BLOCK_DC"], q80["NJ"]) == (32, 2) and (q90["BLOCK_DC"], q90["NJ"]) == (64, 1)
    assert qnone == q90
    k80, k90, knone = (launches(128, 128, a)["_key_bwd_kernel"] for a in (80, 90, None))
    assert k80["num_warps"] == 8 and k90["num_warps"] == 16 and knone == k90
    # float32 inputs take chunks of 32 at C >= 64 on every architecture (twice the registers)
    rec = capture(64, 64, 64, torch.float32, B=1, H=2, L=256, full=False, arch=90)
    q90f = {kernel.__name__: k for kernel, _, _, k in rec}["_query_bwd_kernel"]
    assert (q90f["BLOCK_DC"], q90f["NJ"]) == (32, 2)


def test_float32_forward_blocks():
    # the forward kernels' float32 launches take their own blocks (FMA products, see above):
    # the key forward 16 keys a block and 8 warps at least, the query forward its head-dim
    # chunks of 16 in a loop (UNROLL False), 64 query rows up to C = 64 and 32 at C = 128,
    # 8 warps; the half-dtype launches keep theirs (chunks unrolled)
    def launches(C, D, dtype, arch):
        rec = capture(C, D, D, dtype, B=1, H=2, L=256, full=False, arch=arch, layouts=("padded",))
        return {kernel.__name__: k for kernel, _, _, k in rec}

    for arch in (80, 90):
        for D in (64, 128):
            for C, block_n in ((16, 64), (64, 64), (128, 32)):
                f32, bf16 = launches(C, D, torch.float32, arch), launches(C, D, torch.bfloat16, arch)
                q, k = f32["_query_fwd_kernel"], f32["_key_fwd_kernel"]
                assert (q["BLOCK_N"], q["BLOCK_DC"], q["BLOCK_VC"], q["N_DC"], q["UNROLL"], q["num_warps"]) == \
                    (block_n, 16, 16, D // 16, False, 8), (arch, D, C, q)
                assert k["BLOCK_M"] == 16 and k["num_warps"] >= 8, (arch, D, C, k)
                qh, kh = bf16["_query_fwd_kernel"], bf16["_key_fwd_kernel"]
                tile = C * D
                assert qh["UNROLL"] and qh["BLOCK_DC"] == min(D, 64 if C <= 64 else 32), (arch, D, C, qh)
                assert qh["BLOCK_N"] == (64 if tile <= 32 * 64 else 32 if tile <= 64 * 64 else 16), (arch, D, C, qh)
                assert kh["BLOCK_M"] == (64 if tile <= 64 * 64 else 32), (arch, D, C, kh)
                assert kh["num_warps"] == (4 if tile <= 64 * 64 else 8), (arch, D, C, kh)


def test_spill_bound_on_both_archs():
    # the requirement itself (no compile): a stack frame over MAX_STACK at a main
    # configuration fails on sm_80 and sm_90, a known spill only over its own bound, and
    # configurations past the main ones are not held to it
    def result(kernel, arch, stack, cfgs):
        r = dict(kernel=kernel, arch=arch, shared=0, regs=255, stack=stack, spill_stores=0, mma=True)
        return r, cfgs, {}

    assert set(SPILL_ARCHS) == {80, 90}
    q, k = "_query_bwd_kernel", "_key_bwd_kernel"
    for arch in (80, 90):
        assert not problems([result(q, arch, MAX_STACK, [(128, 128, "bf16")])])
        assert len(problems([result(q, arch, MAX_STACK + 8, [(128, 128, "bf16")])])) == 1
        assert len(problems([result(k, arch, MAX_STACK + 8, [(64, 128, "bf16")])])) == 1
        assert not problems([result(q, arch, 4096, [(256, 128, "bf16")])])       # D = 256: not main
    known = SPILL_KNOWN[(k, 80, 128, 128, ("bf16", "fp16"))]
    assert MAX_STACK < known
    assert not problems([result(k, 80, known, [(128, 128, "bf16")])])
    assert len(problems([result(k, 80, known + 8, [(128, 128, "bf16")])])) == 1
    assert len(problems([result(k, 90, MAX_STACK + 8, [(128, 128, "bf16")])])) == 1   # known on sm_80 only
    assert len(problems([result(k, 80, MAX_STACK + 8, [(128, 64, "bf16")])])) == 1    # other sizes: MAX_STACK


def test_device_guard_in_every_launch(monkeypatch):
    # every launch is made under torch.cuda.device(<the inputs' device>): with a stand-in for
    # torch.cuda.device, a "cuda:1" launch enters the guard with index 1 before launching
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(("enter", self.device))

        def __exit__(self, *exc):
            entered.append(("exit", self.device))

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *a, **k: entered.append(("launch", grid))

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    _common.launch(FakeKernel(), (5,), torch.device("cuda", 1), 1, 2, BLOCK=16)
    assert entered == [("enter", torch.device("cuda", 1)), ("launch", (5,)), ("exit", torch.device("cuda", 1))]
    # and each launcher passes its inputs' device to the launch helper
    devices = []
    monkeypatch.setattr(_common, "launch", lambda kernel, grid, device, *a, **k: devices.append(device))
    f32 = torch.float32
    w = torch.zeros(1, 1, 4, 16, device="meta")
    x = torch.zeros(1, 1, 20, 16, device="meta")
    kp.key_pass_fwd(w, x, x, None, 0.5, True)
    kp.key_pass_bwd(w, x, x, None, 0.5, True, torch.zeros(1, 1, 4, device="meta"),
                    torch.zeros(1, 1, 4, 16, device="meta"), None, None)
    qp.query_pass_fwd(x, w, torch.zeros(1, 1, 4, device="meta", dtype=f32), torch.zeros(1, 1, 4, 16, device="meta"),
                      torch.zeros(1, dtype=torch.int64, device="meta"), None, 0.5)
    qp.query_pass_bwd(x, w, torch.zeros(1, 1, 4, device="meta"), torch.zeros(1, 1, 4, 16, device="meta"),
                      torch.zeros(1, dtype=torch.int64, device="meta"), None, 0.5, None, None, None, 0.0, x)
    assert devices == [torch.device("meta")] * 5


def test_device_guard_cpu_is_a_no_op():
    # CPU and meta tensors (the interpreter, shape tracing) get no CUDA context: nothing is
    # made current and CUDA is not initialized by the guard
    was_initialized = torch.cuda.is_initialized()
    for dev in (torch.device("cpu"), torch.device("meta")):
        guard = _common.device_guard(dev)
        assert isinstance(guard, contextlib.nullcontext), (dev, type(guard))
        with guard:
            pass
    assert torch.cuda.is_initialized() == was_initialized


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
