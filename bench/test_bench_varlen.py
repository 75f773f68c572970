"""``lara-bench --preset varlen`` at a tiny size: the length draw, the two layouts of one
batch, and an end-to-end run that writes its JSON, table and plot (reference backend, so
it runs wherever the package imports; seconds on a CPU)."""

import json

import pytest
import torch

from lara_kernels import bench
from lara_kernels.bench import draw_lengths, padding_fraction, varlen_inputs


def test_draw_lengths_fixed_seed_in_range():
    a = draw_lengths(16, 64, 8192, seed=0)
    assert a == draw_lengths(16, 64, 8192, seed=0) and a != draw_lengths(16, 64, 8192, seed=1)
    assert len(a) == 16 and all(64 <= n <= 8192 for n in a)
    assert padding_fraction([4, 2, 2]) == pytest.approx(1 - 8 / 12)


def test_varlen_inputs_same_rows_in_both_layouts():
    lengths = [5, 1, 9]
    case = varlen_inputs(lengths, 2, 8, torch.float32, torch.device("cpu"))
    assert case["cu_seqlens"].tolist() == [0, 5, 6, 15] and case["cu_seqlens"].dtype == torch.int32
    assert case["max_seqlen"] == 9
    assert case["padding_mask"].sum(1).tolist() == [4, 8, 0]
    assert torch.equal(case["attn_mask"][:, 0, 0], ~case["padding_mask"])
    for packed, padded in zip(case["packed"], case["padded"]):
        assert packed.shape == (15, 2, 8) and padded.shape == (3, 2, 9, 8)
        for b, (start, n) in enumerate(zip([0, 5, 6], lengths)):
            assert torch.equal(packed[start:start + n].transpose(0, 1), padded[b, :, :n])
            assert not padded[b, :, n:].any()


def test_preset_runs_and_writes_files(tmp_path):
    argv = ["--preset", "varlen", "--device", "cpu", "--backends", "reference", "--lengths", "20", "33",
            "--gqa-lengths", "24", "--min-run-time", "0.001", "--out", str(tmp_path), "--no-progress"]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "varlen-cpu.json").read_text())
    assert report["command"].startswith("lara-bench --preset varlen")
    assert report["varlen"]["lengths"] == [20, 33]
    assert report["varlen"]["padding_fraction"] == pytest.approx(1 - 53 / 66)
    assert report["methods"] == {
        "varlen": ["sdpa/padded", "lara/reference/varlen", "lara/reference/padded"],
        "gqa": ["sdpa/gqa", "lara/reference/gqa", "lara/reference/repeat"]}
    assert report["config"]["gqa_H"] == 32 and report["config"]["gqa_H_kv"] == 8
    assert len(report["results"]) == 2 * (3 + 3)
    for r in report["results"]:
        assert "error" not in r and r["median_ms"] > 0 and r["peak_bytes"] >= 0, r
    table = (tmp_path / "varlen-cpu.md").read_text()
    assert "padding fraction 19.7%" in table and "Key figure: varlen" in table and "Key figure: gqa" in table
    pytest.importorskip("matplotlib")
    assert (tmp_path / "varlen-cpu.png").stat().st_size > 0


def test_varlen_flags_checked(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--preset", "varlen", "--len-range", "100", "50"])
    with pytest.raises(SystemExit):
        bench.main(["--preset", "quick", "--gqa-lengths", "64"])


def _cpu_reasons():
    cpu = bench.dispatch.backends().get("cpu")
    return ["no cpu backend"] if cpu is None else cpu.availability_reasons()


@pytest.mark.skipif(bool(_cpu_reasons()), reason="; ".join(_cpu_reasons()))
def test_preset_cpu_backend_passes_its_gates(tmp_path):
    argv = ["--preset", "varlen", "--device", "cpu", "--backends", "cpu", "--lengths", "20", "33",
            "--gqa-lengths", "24", "--min-run-time", "0.001", "--out", str(tmp_path), "--stem", "tiny",
            "--no-progress"]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert set(report["gates"]) == {"lara/cpu/varlen", "lara/cpu/padded", "lara/cpu/gqa", "lara/cpu/repeat"}
    assert all(g["passed"] and g["dtype"] == "torch.float64" for g in report["gates"].values())
    assert all("error" not in r for r in report["results"])
