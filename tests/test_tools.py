"""The command-line tools say what is true: lara-bench's usage errors and spreads,
``python -m lara_kernels.info`` per device, and bench/gpu_check.sh's dry run (issue 12
items 11-12, issue 13 item 7)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lara_kernels import bench, info

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- lara-bench arguments


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2, argv
    return capsys.readouterr().err


@pytest.mark.parametrize("device", ["foo", "cuda:x", "mps"])
def test_bench_rejects_unknown_device(capsys, device):
    err = _usage_error(capsys, ["--device", device, "--no-progress"])
    assert f"--device {device!r}" in err and "usage: lara-bench" in err


def test_bench_rejects_cuda_without_gpu(capsys):
    if torch.cuda.is_available():   # the same check, for a device index this machine lacks
        err = _usage_error(capsys, ["--device", f"cuda:{torch.cuda.device_count()}"])
        assert "CUDA device(s)" in err
    else:
        err = _usage_error(capsys, ["--device", "cuda", "--preset", "quick"])
        assert "--device 'cuda': no CUDA device available (torch.cuda.is_available() is False)" in err


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_bench_rejects_lengths_below_one(capsys, value):
    err = _usage_error(capsys, ["--lengths", "256", value])
    assert "--lengths" in err and repr(value) in err


@pytest.mark.parametrize("argv, words", [
    (["--backends", "cpu,nope"], ["--backends 'cpu,nope'", "'nope'", "known:"]),
    (["--ops", "lara,softmax"], ["--ops 'lara,softmax'"]),
    (["--ratio", "32768"], ["--ratio '32768'"]),
    (["--threads", "0"], ["--threads", "'0'"]),
    (["--min-run-time", "0"], ["--min-run-time", "'0'"]),
])
def test_bench_rejects_other_bad_values(capsys, argv, words):
    err = _usage_error(capsys, argv)
    assert all(w in err for w in words), err


def test_bench_backend_filter_and_sdpa_choice():
    probe = torch.empty(1, 1, 8, 16)
    run, skipped = bench.runnable_backends("lara", probe, probe, probe, 4, only=["reference"])
    assert run == ["reference"] and skipped == {}
    run, skipped = bench.runnable_backends("lara", probe, probe, probe, 4, only=["triton", "reference"])
    assert run == ["reference"] and list(skipped) == ["triton"]       # the interpreter is never timed
    assert bench.sdpa_choice("auto", torch.device("cuda"), torch.bfloat16) == "flash"
    assert bench.sdpa_choice("auto", torch.device("cuda"), torch.float32) == "default"
    assert bench.sdpa_choice("auto", torch.device("cpu"), torch.bfloat16) == "default"
    assert bench.sdpa_choice("math", torch.device("cpu"), torch.float32) == "math"
    q, k, v = (torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pinned = bench.attention_fn("sdpa", 4, sdpa="math")(q, k, v)
    torch.testing.assert_close(pinned, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert bench.sanitize("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.sanitize("  /// ") == "unknown"


def _report(runs_sdpa, runs_lara, gate_ok=True):
    """A two-method report as ``bench.run`` writes it (figures made up for the formatting)."""
    shape = dict(preset="gpu", B=1, H=1, N=0, D=8, C=4, dtype="float32")
    results = []
    for N, scale in ((16, 1.0), (32, 2.0)):
        for m, runs, base in (("sdpa", runs_sdpa, 2.0), ("lara/cpu", runs_lara, 1.0)):
            for mode in ("fwd", "fwd+bwd"):
                spread = {} if runs == 1 else {"q25_ms": 0.9 * base, "q75_ms": 1.2 * base, "iqr_ms": 0.3 * base}
                results.append({"shape": dict(shape, N=N), "method": m, "mode": mode, "median_ms": base * scale,
                                "runs": runs, "q25_ms": None, "q75_ms": None, "iqr_ms": None, **spread,
                                "peak_bytes": 2**20, "timer": "t"})
    gate = {"passed": gate_ok, "dtype": "torch.float64", "N": 16, "tol": 1e-9,
            "rel_rms_err": {"y": 1e-16 if gate_ok else 1.0}}
    return {"env": {"device": "cpu", "device_name": "cpu", "torch": "t", "triton": "t", "commit": "c" * 12,
                    "date": "d"}, "preset": "gpu", "memory_method": "m", "methods": ["sdpa", "lara/cpu"],
            "gates": {"lara/cpu": gate}, "skipped": {}, "results": results, "key_n": 32, "ratio": [32, 16],
            "baselines": {"sdpa": "SDPA"}}


def test_bench_table_shows_a_spread_only_for_several_runs():
    table = bench.format_table(_report(runs_sdpa=1, runs_lara=7))
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines()
            if line.startswith("| 16 ")}
    assert "2.00 (1 run)" in rows[("16", "sdpa")] and "±" not in rows[("16", "sdpa")]
    assert "1.00 ±0.30" in rows[("16", "lara/cpu")] and "1 run" not in rows[("16", "lara/cpu")]


def test_bench_single_measurement_has_no_spread():
    # one 30 ms call against a 1 ms budget: blocked_autorange stops after its first block
    rec = bench.time_ms(lambda: __import__("time").sleep(0.03), torch.device("cpu"), 0.001)
    assert rec["runs"] >= 1 and rec["median_ms"] >= 30
    if rec["runs"] == 1:
        assert rec["iqr_ms"] is None and rec["q25_ms"] is None
    else:
        assert rec["q25_ms"] <= rec["median_ms"] <= rec["q75_ms"]


# five runs: quartiles 1.5 and 4.5 (statistics.quantiles, exclusive method), IQR 3
@pytest.mark.parametrize("times, runs, iqr", [([7.0], 1, None), ([4.0, 1.0, 2.0, 3.0, 5.0], 5, 3.0)])
def test_bench_cuda_timer_counts_its_runs(monkeypatch, times, runs, iqr):
    # the do_bench path, with do_bench and the device sync stood in (no GPU needed)
    triton_testing = pytest.importorskip("triton.testing")
    asked = {}

    def do_bench(fn, rep=100, return_mode="mean", **_):
        asked.update(rep=rep, return_mode=return_mode)
        return list(times)

    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    monkeypatch.setattr(bench, "_sync", lambda device: None)
    rec = bench.time_ms(lambda: None, torch.device("cuda"), 0.1)
    assert asked == {"rep": 100, "return_mode": "all"}
    assert rec["runs"] == runs and rec["median_ms"] == sorted(times)[len(times) // 2] and rec["iqr_ms"] == iqr


def test_bench_key_figures():
    lines = bench.key_figures(_report(runs_sdpa=5, runs_lara=5))
    assert lines[0] == "Key figure: forward at N=32: sdpa 4.000 ms; lara/cpu 2.000 ms (2.00x SDPA)"
    assert lines[1] == "Key figure: forward time N=32 / N=16 (N ratio 2): sdpa 2.00; lara/cpu 2.00"
    failed = bench.key_figures(_report(runs_sdpa=5, runs_lara=5, gate_ok=False))
    assert "lara/cpu 2.000 ms (gate FAILED)" in failed[0] and "SDPA)" not in failed[0]


# ----------------------------------------------------------------------------- info


def test_info_says_what_runs_on_each_device(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")      # as for a user: the interpreter is for tests
    info.main([])
    text = capsys.readouterr().out
    assert re.search(r"^_C +(built|NOT built)", text, re.M)            # what was built is still shown
    cpu, cuda = text.split("\ncpu: ", 1)[1].split("\ncuda: ", 1)
    assert re.search(r"^  reference +runs here$", cpu, re.M)
    assert re.search(r"^  triton +no: .*TRITON_INTERPRET=1", cpu, re.M)
    assert " OK" not in text
    if torch.cuda.is_available():
        assert cuda.startswith(f"cuda:0 {torch.cuda.get_device_name(0)}")
        assert re.search(r"^  reference +runs here$", cuda, re.M)
    else:
        assert cuda.startswith(info.NO_CUDA)
        assert "runs here" not in cuda and "auto picks here: none" in cuda
        for name in ("reference", "triton", "cuda", "cpu"):
            assert re.search(rf"^  {name} +no: no CUDA device available \(torch.cuda.is_available\(\) is False\)",
                             cuda, re.M), name


def test_info_rows_put_an_absent_device_first(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = info.runnable_here("cuda")
    assert rows and all(reasons[0] == info.NO_CUDA for _, _, reasons in rows)
    assert any(not reasons for _, _, reasons in info.runnable_here("cpu"))


# ----------------------------------------------------------------------------- gpu_check.sh


def _gpu_check(*args, env=None, timeout=300):
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=dict(os.environ, **(env or {})))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="gpu_check.sh needs bash and timeout (coreutils)")
def test_gpu_check_dry_run(tmp_path):
    # the benchmark at a tiny size on CPU and the summary; the other steps are listed
    out = _gpu_check("--steps", "bench", "--log-dir", str(tmp_path), env={"GPU_CHECK_DRY": "1",
                                                                          "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.split("== gpu_check summary (dry run on CPU", 1)[1]
    for name in ("build", "tests", "sanitizer", "cuda-graph"):
        assert re.search(rf"^  {name} +0 +s  skipped \(not selected by --steps\)$", summary, re.M), name
    assert re.search(r"^  bench +\d+ +s  pass$", summary, re.M)
    assert "Key figure: forward at N=32: sdpa " in summary and "forward time N=32 / N=16" in summary
    assert "gpu_check: all steps passed or skipped" in summary
    report = json.loads((tmp_path / "bench" / "gpu-dry-run-cpu.json").read_text())
    assert report["preset"] == "gpu" and report["methods"][0] == "sdpa" and "lara/cpu" in report["methods"]
    assert {r["shape"]["N"] for r in report["results"]} == {16, 32}
    assert all(g["passed"] for g in report["gates"].values())
    table = (tmp_path / "bench" / "gpu-dry-run-cpu.md").read_text()
    assert "| 32 | lara/cpu | pass (float64) |" in table and "bfloat16" in table
    assert (tmp_path / "bench.log").is_file()


@pytest.mark.parametrize("args, env, message", [
    (["--bogus"], {}, "unknown argument '--bogus'"),
    (["--dry-run", "--steps", "tests,nope"], {}, "unknown step 'nope'"),
    (["--out"], {}, "--out needs a directory"),
    ([], {"GPU_CHECK_DRY": "yes"}, "GPU_CHECK_DRY must be 0 or 1"),
    (["--dry-run"], {"GPU_CHECK_BUDGET": "5m"}, "GPU_CHECK_BUDGET must be whole seconds"),
])
def test_gpu_check_usage_errors(tmp_path, args, env, message):
    out = _gpu_check("--log-dir", str(tmp_path), *args, env=env, timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_without_gpu_asks_for_dry_run(tmp_path):
    out = _gpu_check("--steps", "tests", "--log-dir", str(tmp_path), env={"PYTHON": sys.executable}, timeout=60)
    assert out.returncode == 2 and "torch.cuda.is_available() is False" in out.stderr and "--dry-run" in out.stderr
