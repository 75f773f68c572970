"""Context parallelism (lara_kernels.distributed) against the single-process call.

One spawn of 4 CPU processes (gloo, a file store in a temp dir) runs every case; groups of
2, 3 and 4 ranks (rank order = sequence order). Each rank compares its output rows and the
gradients of its shards with ``lara_attention`` / ``rfa_attention`` on the gathered
sequence, computed in the same process, and reports the largest relative error of each
tensor (max |a - b| / max |b|). The parametrized tests below check the reports.

Tolerances: float64, 1e-12: the distributed call computes the same formulas; only the
order of the sums over positions differs (per-rank partial sums combined by all_reduce,
log-sum-exps combined from shifted partials), errors of a few ulps (1e-16) grown by the
softmax and C x C steps; 1e-12 leaves four orders of margin and still fails on any wrong
term. float32 (Triton under the interpreter), 2e-5: the same reordering in float32
(ulp 6e-8), through the same chain of steps.
"""

import json
import os
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch

WORLD = 4
TOL64 = 1e-12
TOL32 = 2e-5
# float32 inputs under CPU autocast (bfloat16): both calls cast q, k, v to bfloat16 and compute
# in float32, so outputs and gradients are float32 results rounded to bfloat16 (ulp 2^-8 =
# 3.9e-3 relative); a reordered sum can round one element to the neighbouring value: 1e-2.
TOLBF16 = 1e-2

# name -> case. n / m: shard lengths per rank (len = group size); masks: None, "self"
# (padding_mask, N == M shards), "both" (query and key masks), "key" (key mask only).
CASES = {
    "w2-segment-optimal-plain": dict(n=[5, 7], m=[5, 7], C=4),
    "w3-mixed-optimal-train-self-mask-empty": dict(n=[6, 0, 5], m=[6, 0, 5], C=4, proposal="mixed", training=True,
                                                   masks="self", B=3, drop=True),
    "w4-attend-balance-cross-empty-nan-padding": dict(n=[3, 4, 0, 2], m=[7, 1, 5, 0], C=5, proposal="attend",
                                                      weighting="balance", beta=2.0, masks="both", garbage=True),
    "w4-segment-balance-train-allpad-shard-nan": dict(n=[4, 4, 4, 4], m=[4, 4, 4, 4], C=6, weighting="balance",
                                                      training=True, masks="self", pad_rank=1, garbage=True),
    "w3-mixed-balance-cut-C-scale": dict(n=[2, 4, 3], m=[5, 1, 5], C=16, proposal="mixed", weighting="balance",
                                         scale=0.3),
    "w2-mixed-optimal-landmarks-train": dict(n=[4, 6], m=[3, 8], C=4, proposal="mixed", training=True,
                                             landmarks="qk", masks="key"),
    "w3-attend-optimal-qlandmarks-mask": dict(n=[3, 5, 2], m=[4, 0, 6], C=3, proposal="attend", landmarks="q",
                                              masks="both", beta=0.5, training=True),
    "w4-segment-optimal-keymask-cross": dict(n=[2, 3, 1, 4], m=[3, 3, 3, 3], C=4, masks="key", Dv=3),
    "w3-ref-mixed-optimal-train-mask-double": dict(n=[4, 2, 5], m=[4, 2, 5], C=4, proposal="mixed", training=True,
                                                   masks="self", backend="reference", double=True),
    "w2-ref-attend-optimal-double": dict(n=[5, 4], m=[3, 6], C=3, proposal="attend", backend="reference",
                                         double=True),
    "w4-ref-segment-balance-cross-empty": dict(n=[0, 5, 3, 2], m=[4, 4, 0, 3], C=4, weighting="balance",
                                               masks="both", backend="reference", training=True),
    "w2-rfa-cpu-cross-empty-nan-padding": dict(op="rfa", n=[0, 6], m=[5, 3], C=5, masks="both", garbage=True),
    "w3-rfa-cpu-self-mask": dict(op="rfa", n=[4, 4, 3], m=[4, 4, 3], C=4, masks="self", B=3, drop=True),
    "w4-rfa-reference-double": dict(op="rfa", n=[2, 3, 2, 1], m=[3, 1, 2, 4], C=3, backend="reference",
                                    double=True),
    "w2-triton-f32-segment-optimal-mask": dict(n=[5, 3], m=[5, 3], C=3, masks="self", backend="triton",
                                               dtype="float32", B=1, H=1),
    "w3-cpu-autocast-bf16-attend-optimal-train": dict(n=[3, 4, 2], m=[5, 0, 4], C=3, proposal="attend",
                                                      training=True, masks="both", dtype="float32",
                                                      autocast=True),
    # grouped-query attention (enable_gqa): k, v with H_kv heads, shared key landmarks
    "w3-gqa-mixed-optimal-train-self-mask": dict(n=[4, 3, 5], m=[4, 3, 5], C=4, H=4, Hkv=2, proposal="mixed",
                                                 training=True, masks="self"),
    "w2-gqa-attend-balance-cross-klandmarks": dict(n=[3, 5], m=[6, 2], C=3, H=4, Hkv=1, proposal="attend",
                                                   weighting="balance", masks="both", landmarks="q"),
    "w3-gqa-rfa-cross-empty": dict(op="rfa", n=[0, 4, 3], m=[5, 2, 0], C=4, H=4, Hkv=2, masks="both"),
}
BYTE_CONFIGS = {
    "lara-segment-optimal": dict(op="lara"),
    "lara-attend-optimal-train-mask": dict(op="lara", proposal="attend", training=True, masks=True),
    "lara-mixed-balance-qlandmarks": dict(op="lara", proposal="mixed", weighting="balance", q_landmarks=True),
    "rfa-mask": dict(op="rfa", masks=True),
    "lara-gqa-segment-optimal": dict(op="lara", kv_heads=1),
}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0 if a.shape == b.shape else float("inf")
    if a.shape != b.shape:
        return float("inf")
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


def _shards(lengths):
    out, lo = [], 0
    for n in lengths:
        out.append((lo, lo + n))
        lo += n
    return out


def _run_case(case, group, r):
    from lara_kernels import lara_attention, rfa_attention
    from lara_kernels.distributed import context_parallel_lara_attention, context_parallel_rfa_attention

    dtype = torch.float64 if case.get("dtype", "float64") == "float64" else torch.float32
    B, H, D = case.get("B", 2), case.get("H", 2), case.get("D", 6)
    Dv = case.get("Dv", 5)
    n, m = case["n"], case["m"]
    N, M = sum(n), sum(m)
    g = torch.Generator().manual_seed(1234)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    Hkv = case.get("Hkv", H)
    q, k, v, dy = rn(B, H, N, D), rn(B, Hkv, M, D), rn(B, Hkv, M, Dv), rn(B, H, N, Dv)
    lms = {"q": rn(B, H, case["C"], D), "k": rn(B, H, case["C"], D)}
    opts = dict(num_samples=case["C"], backend=case.get("backend", "cpu"))
    if Hkv != H:
        opts["enable_gqa"] = True
    if "scale" in case:
        opts["scale"] = case["scale"]
    op = case.get("op", "lara")
    if op == "lara":
        opts.update(proposal=case.get("proposal", "segment"), weighting=case.get("weighting", "optimal"),
                    beta=case.get("beta", 1.0), training=case.get("training", False))
    masks = case.get("masks")
    qpad = kpad = None
    if masks is not None:
        qpad = torch.rand(B, N, generator=g) < 0.3
        kpad = qpad.clone() if masks == "self" else torch.rand(B, M, generator=g) < 0.3
        if "pad_rank" in case:
            lo, hi = _shards(n)[case["pad_rank"]]
            qpad[:, lo:hi] = True
            kpad[:, lo:hi] = True
        if case.get("drop"):                         # an element with no valid query: dropped, zeros
            qpad[-1] = True
            if masks == "self":
                kpad[-1] = True
        if masks == "key":
            qpad = None
    if case.get("garbage"):                          # padded positions may hold anything: NaN here
        if qpad is not None:
            q = q.masked_fill(qpad[:, None, :, None], float("nan"))
        k = k.masked_fill(kpad[:, None, :, None], float("nan"))
        v = v.masked_fill(kpad[:, None, :, None], float("nan"))
    names = ["q", "k", "v"] + [f"{c}_landmarks" for c in case.get("landmarks", "")]
    full = [q, k, v] + [lms[c] for c in case.get("landmarks", "")]

    def mask_kwargs(qp, kp):
        if masks == "self":
            return {"padding_mask": qp}
        return {"query_padding_mask": qp, "key_padding_mask": kp}

    def call(fn, tensors, qp, kp, **extra):
        kw = dict(opts, **extra, **mask_kwargs(qp, kp))
        if op == "lara":
            kw.update({nm: t for nm, t in zip(names[3:], tensors[3:])})
        return fn(*tensors[:3], generator=torch.Generator().manual_seed(99), **kw)

    single = lara_attention if op == "lara" else rfa_attention
    para = context_parallel_lara_attention if op == "lara" else context_parallel_rfa_attention
    (nlo, nhi), (mlo, mhi) = _shards(n)[r], _shards(m)[r]
    double = case.get("double", False)

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("autocast", False))
    leaves = [t.clone().requires_grad_() for t in full]
    with amp:
        y = call(single, leaves, qpad, kpad)
    grads = torch.autograd.grad((y * dy).sum(), leaves, create_graph=double)
    cut = [slice(nlo, nhi), slice(mlo, mhi), slice(mlo, mhi)] + [slice(None)] * (len(full) - 3)
    mine = [t[:, :, s].clone().requires_grad_() for t, s in zip(full, cut)]
    with amp:
        yp = call(para, mine, None if qpad is None else qpad[:, nlo:nhi],
                  None if kpad is None else kpad[:, mlo:mhi], group=group)
    if case.get("autocast") and y.dtype != torch.bfloat16:
        raise AssertionError(f"autocast: the single-process call returned {y.dtype}")
    gp = torch.autograd.grad((yp * dy[:, :, nlo:nhi]).sum(), mine, create_graph=double)
    errs = {"y": _rel(yp, y[:, :, nlo:nhi])}
    for nm, a, b, s in zip(names, gp, grads, cut):
        if nm.endswith("landmarks"):        # replicated input: each rank holds its share of the gradient
            a = a.clone()
            torch.distributed.all_reduce(a, group=group)
            errs["d" + nm] = _rel(a, b)
        else:
            errs["d" + nm] = _rel(a, b[:, :, s])
    if double:     # second order: d/d(inputs) of <first gradients, h>, h the same on every rank
        h = [torch.randn(t.shape, generator=torch.Generator().manual_seed(7 + i), dtype=t.dtype)
             for i, t in enumerate(full)]
        s2 = sum((gg * hh).sum() for gg, hh in zip(grads, h))
        g2 = torch.autograd.grad(s2, leaves)
        s2p = sum((gg * hh[:, :, s]).sum() for gg, hh, s in zip(gp, h, cut))
        g2p = torch.autograd.grad(s2p, mine)
        for nm, a, b, s in zip(names, g2p, g2, cut):
            errs["dd" + nm] = _rel(a, b[:, :, s])
    return {"errors": errs, "dtype": str(yp.dtype)}


def _count_bytes(group, config, scale):
    """Bytes handed to the collectives by this rank in one forward and one backward."""
    import torch.distributed as dist

    from lara_kernels.distributed import (bytes_per_call, context_parallel_lara_attention,
                                          context_parallel_rfa_attention)

    B, H, D, Dv, C = 2, 2, 4, 3, 4
    R, r = dist.get_world_size(group), dist.get_rank(group)
    n_r, m_r = 5 * scale, 3 * scale
    g = torch.Generator().manual_seed(r)
    Hkv = config.get("kv_heads", H)
    q = torch.randn(B, H, n_r, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, m_r, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, m_r, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(num_samples=C, backend="cpu", enable_gqa=Hkv != H)
    masked = config.get("masks", False)
    if masked:
        kw.update(query_padding_mask=torch.rand(B, n_r, generator=g) < 0.3,
                  key_padding_mask=torch.rand(B, m_r, generator=g) < 0.3)
    if config["op"] == "lara":
        kw.update(proposal=config.get("proposal", "segment"), weighting=config.get("weighting", "optimal"),
                  training=config.get("training", False))
        if config.get("q_landmarks"):
            kw["q_landmarks"] = torch.randn(B, H, C, D, dtype=torch.float64)
    counted = {"n": 0, "calls": 0}
    originals = {nm: getattr(dist, nm) for nm in ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor",
                                                   "reduce_scatter", "all_to_all", "send", "recv")}

    def wrap(nm, fn):
        def counting(*args, **kwargs):
            t = args[1] if nm == "all_gather" else args[0]
            counted["n"] += t.numel() * t.element_size()
            counted["calls"] += 1
            return fn(*args, **kwargs)
        return counting

    for nm, fn in originals.items():
        setattr(dist, nm, wrap(nm, fn))
    try:
        fn = context_parallel_lara_attention if config["op"] == "lara" else context_parallel_rfa_attention
        y = fn(q, k, v, group=group, **kw)
        fwd, fwd_calls = counted["n"], counted["calls"]
        counted.update(n=0, calls=0)
        y.pow(2).sum().backward()
        bwd, bwd_calls = counted["n"], counted["calls"]
    finally:
        for nm, fn in originals.items():
            setattr(dist, nm, fn)
    N, M = R * n_r, R * m_r
    formula = bytes_per_call(config["op"], B=B, H=H, N=N, M=M, D=D, Dv=Dv, num_samples=C, dtype=torch.float64,
                             proposal=config.get("proposal", "segment"), weighting=config.get("weighting", "optimal"),
                             training=config.get("training", False), q_landmarks=config.get("q_landmarks", False),
                             masked=masked, kv_heads=config.get("kv_heads"))
    return {"fwd": fwd, "bwd": bwd, "fwd_calls": fwd_calls, "bwd_calls": bwd_calls, "formula": list(formula)}


def _run_layers(group, r):
    """LaraAttention and LaraEncoderLayer with context_parallel_group against the same
    layer without one on the gathered sequence (batch_first, padding, training)."""
    import torch.distributed as dist

    from lara_kernels.nn import LaraAttention, LaraEncoderLayer

    R = dist.get_world_size(group)
    n = [5, 3, 6, 4][:R]
    N = sum(n)
    B, E, heads = 2, 8, 2
    lo, hi = _shards(n)[r]
    out = {}
    for kind in ("attention", "encoder"):
        torch.manual_seed(0)
        if kind == "attention":
            make = lambda **kw: LaraAttention(E, heads, batch_first=True, num_samples=4, dtype=torch.float64,  # noqa
                                              generator=torch.Generator().manual_seed(5), **kw)
        else:
            make = lambda **kw: LaraEncoderLayer(E, heads, dim_feedforward=16, dropout=0.0, batch_first=True,  # noqa
                                                 dtype=torch.float64, num_samples=4,
                                                 generator=torch.Generator().manual_seed(5), **kw)
        ref = make()
        cp = make(context_parallel_group=group)
        cp.load_state_dict(ref.state_dict())
        ref.train()
        cp.train()
        g = torch.Generator().manual_seed(3)
        x = torch.randn(B, N, E, generator=g, dtype=torch.float64)
        pad = torch.rand(B, N, generator=g) < 0.25
        dy = torch.randn(B, N, E, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        xp = x[:, lo:hi].clone().requires_grad_()
        if kind == "attention":
            y = ref(xr, xr, xr, key_padding_mask=pad)[0]
            yp = cp(xp, xp, xp, key_padding_mask=pad[:, lo:hi])[0]
        else:
            y = ref(xr, src_key_padding_mask=pad)
            yp = cp(xp, src_key_padding_mask=pad[:, lo:hi])
        (y * dy).sum().backward()
        (yp * dy[:, lo:hi]).sum().backward()
        errs = {"y": _rel(yp, y[:, lo:hi]), "dx": _rel(xp.grad, xr.grad[:, lo:hi])}
        for (nm, p), pr in zip(cp.named_parameters(), ref.parameters()):
            gsum = p.grad.clone()               # replicated parameters: the group sums their gradients
            dist.all_reduce(gsum, group=group)
            errs["d" + nm] = _rel(gsum, pr.grad)
        out[kind] = errs
    return out


def _run_mismatch(group, r):
    """Ranks that disagree on an option get the same clear error (and no hang)."""
    from lara_kernels.distributed import context_parallel_lara_attention

    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    try:
        context_parallel_lara_attention(q, q, q, group=group, num_samples=4 + r)
    except ValueError as exc:
        return {"message": str(exc)}
    return {"message": None}


def _worker(rank, world, store_path, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    groups = {size: dist.new_group(list(range(size))) for size in (2, 3, 4)}
    results = {}

    def record(key, fn, group):
        t0 = time.perf_counter()
        try:
            results[key] = fn(group, dist.get_rank(group))
        except Exception:                      # reported by the test of that case
            results[key] = {"exception": traceback.format_exc()}
        results[key]["seconds"] = time.perf_counter() - t0

    for name, case in CASES.items():
        size = len(case["n"])
        if rank < size:
            record(name, lambda grp, r, case=case: _run_case(case, grp, r), groups[size])
    for name, config in BYTE_CONFIGS.items():
        if rank < 2:
            record("bytes:" + name, lambda grp, r, config=config: {s: _count_bytes(grp, config, s) for s in (1, 2)},
                   groups[2])
    if rank < 3:
        record("layers", _run_layers, groups[3])
    if rank < 2:
        record("mismatch", _run_mismatch, groups[2])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(WORLD, os.path.join(tmp, "store"), tmp), nprocs=WORLD, join=True)
        per_rank = []
        for rank in range(WORLD):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                per_rank.append(json.load(f))
    return per_rank


def _reports(results, key):
    got = [(rank, res[key]) for rank, res in enumerate(results) if key in res]
    assert got, f"no rank ran {key}"
    for rank, rep in got:
        assert "exception" not in rep, f"rank {rank}: {rep['exception']}"
    return got


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(results, name):
    case = CASES[name]
    got = _reports(results, name)
    assert len(got) == len(case["n"])
    tol = TOLBF16 if case.get("autocast") else (TOL64 if case.get("dtype", "float64") == "float64" else TOL32)
    for rank, rep in got:
        assert rep["dtype"] == ("torch.bfloat16" if case.get("autocast") else f"torch.{case.get('dtype', 'float64')}")
        expected = {"y", "dq", "dk", "dv"} | {f"d{c}_landmarks" for c in case.get("landmarks", "")}
        assert expected <= set(rep["errors"])
        if case.get("double"):
            assert {"ddq", "ddk", "ddv"} <= set(rep["errors"])
        bad = {t: e for t, e in rep["errors"].items() if not e <= tol}
        assert not bad, f"rank {rank}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("name", list(BYTE_CONFIGS))
def test_bytes_per_call(results, name):
    for rank, rep in _reports(results, "bytes:" + name):
        one, two = rep["1"], rep["2"]
        # doubling N and M changes nothing that crosses ranks
        assert (one["fwd"], one["bwd"]) == (two["fwd"], two["bwd"]), (rank, one, two)
        assert [one["fwd"], one["bwd"]] == one["formula"], (rank, one)
        # a handful of collectives, one per step (module doc of lara_kernels.distributed)
        cfg = BYTE_CONFIGS[name]
        attend = cfg.get("proposal") == "attend"
        if cfg["op"] == "rfa":
            calls = (1 + cfg.get("masks", False) + 1 + 2, 1)     # header (+ counts), w, max + sum | sum
        else:
            calls = (1 + cfg.get("masks", False) + 1 + 2 * attend + 2, 1 + attend + 1)
        assert (one["fwd_calls"], one["bwd_calls"]) == calls, (rank, one)
        assert one["fwd"] > 0 and one["bwd"] > 0


def test_layers_match_single_process(results):
    for rank, rep in _reports(results, "layers"):
        for kind in ("attention", "encoder"):
            errs = rep[kind]
            assert len(errs) > 3
            bad = {t: e for t, e in errs.items() if not e <= TOL64}
            assert not bad, f"rank {rank}, {kind}: relative errors above {TOL64}: {bad}"


def test_ranks_that_disagree_get_a_clear_error(results):
    for rank, rep in _reports(results, "mismatch"):
        assert rep["message"] is not None, f"rank {rank}: no error"
        assert "disagree on num_samples" in rep["message"] and "rank 0 has 4, rank 1 has 5" in rep["message"]


def test_bad_arguments_are_named_before_any_collective():
    from lara_kernels.distributed import context_parallel_lara_attention, context_parallel_rfa_attention

    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="q must be 4-D"):
        context_parallel_lara_attention(q[0], q, q)
    with pytest.raises(ValueError, match="proposal must be one of"):
        context_parallel_lara_attention(q, q, q, proposal="nope")
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, M\) = \(1, 4\)"):
        context_parallel_rfa_attention(q, q, q, key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))


def test_needs_initialized_process_group():
    import torch.distributed as dist

    from lara_kernels.distributed import context_parallel_lara_attention

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_lara_attention(q, q, q)
