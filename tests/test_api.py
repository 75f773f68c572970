"""Input checks of the public functions: every misuse gets an error that names the
argument and its value, and no call (good or bad) modifies its inputs."""

import subprocess
import sys

import pytest
import torch

from helpers import make_qkv
from lara_kernels import dispatch, lara_attention, ra_attention, rfa_attention

B, H, N, M, D = 2, 3, 10, 12, 8


@pytest.fixture
def qkv():
    return make_qkv(B, H, N, M, D, dtype=torch.float32, seed=0)


def _poked(shape, index, value):
    t = torch.randn(shape)
    t[index] = value
    return t


def _bad_cases():
    """(id, function, override of q/k/v or kwargs, exception, regex of the message)."""
    f32 = dict(dtype=torch.float32)
    nan, inf = float("nan"), float("inf")
    return [
        ("q-3d", lara_attention, dict(q=torch.randn(B, N, D)), ValueError, r"q must be 4-D .*got shape \(2, 10, 8\)"),
        ("k-5d", lara_attention, dict(k=torch.randn(1, B, H, M, D)), ValueError, r"k must be 4-D .*\(1, 2, 3, 12, 8\)"),
        ("q-list", lara_attention, dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor, got list"),
        ("batch", lara_attention, dict(k=torch.randn(3, H, M, D), v=torch.randn(3, H, M, D)), ValueError,
         r"k has batch size 3 .* but q has 2"),
        ("heads", lara_attention, dict(v=torch.randn(B, 4, M, D)), ValueError, r"v has 4 heads .* but q has 3"),
        ("headdim", lara_attention, dict(k=torch.randn(B, H, M, 6)), ValueError, r"k has head dim 6 .* but q has 8"),
        ("kv-length", lara_attention, dict(v=torch.randn(B, H, M + 1, D)), ValueError,
         r"k has 12 keys .* but v has 13"),
        ("mixed-dtype", lara_attention, dict(k=torch.randn(B, H, M, D, dtype=torch.float64)), TypeError,
         r"k has dtype torch.float64 but q has torch.float32"),
        ("int-q", lara_attention, dict(q=torch.ones(B, H, N, D, dtype=torch.int64)), TypeError,
         r"q must be float64, float32, float16 or bfloat16, got torch.int64"),
        ("complex-v", lara_attention, dict(v=torch.ones(B, H, M, D, dtype=torch.complex64)), TypeError,
         r"v must be float64, .* got torch.complex64"),
        ("meta-device", lara_attention, dict(v=torch.randn(B, H, M, D, device="meta")), ValueError,
         r"v is on meta but q is on cpu"),
        ("kpm-shape", lara_attention, dict(key_padding_mask=torch.zeros(B, N, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(B, M\) = \(2, 12\), got \(2, 10\)"),
        ("kpm-dtype", lara_attention, dict(key_padding_mask=torch.zeros(B, M)), TypeError,
         r"key_padding_mask must be a bool tensor .*got dtype torch.float32"),
        ("qpm-shape", lara_attention, dict(query_padding_mask=torch.zeros(B, 1, N, dtype=torch.bool)), ValueError,
         r"query_padding_mask must have shape \(B, N\) = \(2, 10\), got \(2, 1, 10\)"),
        ("qpm-list", lara_attention, dict(query_padding_mask=[True] * N), TypeError,
         r"query_padding_mask must be a bool tensor .* got list"),
        ("samples-0", lara_attention, dict(num_samples=0), ValueError, r"num_samples must be >= 1, got 0"),
        ("samples-neg", rfa_attention, dict(num_samples=-3), ValueError, r"num_samples must be >= 1, got -3"),
        ("samples-float", lara_attention, dict(num_samples=2.5), TypeError, r"num_samples must be an int, got 2.5"),
        ("samples-bool", lara_attention, dict(num_samples=True), TypeError, r"num_samples must be an int, got True"),
        ("proposal", lara_attention, dict(proposal="segments"), ValueError,
         r"proposal must be one of 'segment', 'mixed', 'attend', got 'segments'"),
        ("weighting", lara_attention, dict(weighting="mis-opt"), ValueError,
         r"weighting must be one of 'optimal', 'balance', got 'mis-opt'"),
        ("backend", lara_attention, dict(backend="flash"), ValueError, r"backend must be 'auto' or one of .* got 'flash'"),
        ("backend-rfa", rfa_attention, dict(backend=3), TypeError, r"backend must be a str, got int"),
        ("beta-nan", lara_attention, dict(beta=float("nan")), ValueError, r"beta must be a finite number, got nan"),
        ("beta-str", lara_attention, dict(beta="1"), TypeError, r"beta must be a real number, got '1'"),
        ("scale-neg", lara_attention, dict(scale=-1.0), ValueError, r"scale must be a positive finite number, got -1.0"),
        ("scale-inf", rfa_attention, dict(scale=float("inf")), ValueError, r"scale must be a positive finite number, got inf"),
        ("training", lara_attention, dict(training="yes"), TypeError, r"training must be a bool, got 'yes'"),
        ("generator", lara_attention, dict(generator=0), TypeError, r"generator must be a torch.Generator .* got int"),
        ("landmark-shape", lara_attention, dict(q_landmarks=torch.randn(B, H, 5, D), num_samples=4), ValueError,
         r"q_landmarks must have shape \(B, H, num_samples, D\) = \(2, 3, 4, 8\), got \(2, 3, 5, 8\)"),
        ("landmark-dtype", lara_attention, dict(k_landmarks=torch.randn(B, H, 4, D, dtype=torch.float64), num_samples=4),
         TypeError, r"k_landmarks has dtype torch.float64 but q has torch.float32"),
        ("causal", lara_attention, dict(is_causal=True), NotImplementedError, r"is_causal=True is not supported"),
        ("causal-rfa", rfa_attention, dict(is_causal=True), NotImplementedError, r"is_causal=True is not supported"),
        ("causal-ra", ra_attention, dict(is_causal=True), NotImplementedError, r"is_causal=True is not supported"),
        ("attn-mask", lara_attention, dict(attn_mask=torch.zeros(N, M)), NotImplementedError,
         r"attn_mask is not supported: pass key_padding_mask"),
        ("dropout", lara_attention, dict(dropout_p=0.1), NotImplementedError, r"dropout_p=0.1 is not supported"),
        ("ra-biased", ra_attention, dict(biased=1), TypeError, r"biased must be a bool, got 1"),
        ("headdim-0", lara_attention, dict(q=torch.randn(B, H, N, 0), k=torch.randn(B, H, M, 0)), ValueError,
         r"head dim must be >= 1"),
        ("nan-k", lara_attention, dict(k=_poked((B, H, M, D), (0, 1, 5, 2), nan), check_finite=True), ValueError,
         r"check_finite: k has 1 non-finite value \(first nan at index \(0, 1, 5, 2\)\)"),
        ("inf-q-rfa", rfa_attention, dict(q=_poked((B, H, N, D), (1, 0, 0, 3), -inf), check_finite=True), ValueError,
         r"check_finite: q has 1 non-finite value \(first -inf at index \(1, 0, 0, 3\)\)"),
        ("inf-landmarks", lara_attention, dict(q_landmarks=_poked((B, H, 4, D), (0, 0, 3, 0), inf), num_samples=4,
                                               check_finite=True), ValueError,
         r"check_finite: q_landmarks has 1 non-finite value \(first inf at index \(0, 0, 3, 0\)\)"),
        ("check-finite-int", ra_attention, dict(check_finite=1), TypeError, r"check_finite must be a bool, got 1 \(int\)"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_naming_argument_and_value(qkv, case):
    _, fn, override, exc, pattern = case
    q, k, v = qkv
    originals = [t.clone() for t in (q, k, v)]
    args = {"q": q, "k": k, "v": v}
    kwargs = {}
    for key, val in override.items():
        (args if key in args else kwargs)[key] = val
    with pytest.raises(exc, match=pattern):
        fn(args["q"], args["k"], args["v"], **kwargs)
    for t, o in zip((q, k, v), originals):
        assert torch.equal(t, o)


def test_explicit_backend_that_cannot_run_lists_every_reason(qkv):
    q, k, v = qkv
    with pytest.raises(RuntimeError) as info:
        lara_attention(q.to("meta"), k.to("meta"), v.to("meta"), backend="cpu")
    msg = str(info.value)
    assert msg.startswith("backend='cpu' cannot run lara_attention on meta torch.float32 inputs q(2, 3, 10, 8)")
    for name in dispatch.backends():
        assert f"  {name}:" in msg
    assert "device 'meta' not in ('cpu',)" in msg


def test_auto_picks_a_backend_with_no_reasons(qkv):
    q, k, v = qkv
    for name in dispatch.auto_order("cpu"):
        reasons = dispatch.backends()[name].not_supported_reasons("lara", q, k, v, num_samples=8)
        if not reasons:
            assert dispatch.select("lara", "auto", q, k, v, num_samples=8).name == name
            break
    else:
        pytest.fail("no backend fits CPU float32 inputs")


def test_inputs_unchanged_after_forward_and_backward():
    q, k, v = make_qkv(B, H, N, M, D, dtype=torch.float32, seed=1)
    ql = torch.randn(B, H, 4, D)
    kpad = torch.zeros(B, M, dtype=torch.bool)
    kpad[0, 3] = True
    tensors = [q, k, v, ql, kpad]
    originals = [t.clone() for t in tensors]
    for backend in dispatch.auto_order("cpu"):
        ins = [t.clone().requires_grad_() for t in (q, k, v, ql)]
        keep = [t.clone() for t in ins]
        y = lara_attention(*ins[:3], num_samples=4, q_landmarks=ins[3], key_padding_mask=kpad, training=True,
                           generator=torch.Generator().manual_seed(0), backend=backend)
        y.sum().backward()
        for a, b in zip(ins, keep):
            assert torch.equal(a.detach(), b)
    rfa_attention(q, k, v, num_samples=4, key_padding_mask=kpad).sum()
    ra_attention(q, k, v, key_padding_mask=kpad).sum()
    for t, o in zip(tensors, originals):
        assert torch.equal(t, o)


def test_strided_inputs_equal_contiguous():
    q, k, v = make_qkv(B, N, H, M, D, dtype=torch.float64, seed=2)   # (B, L, H, D) layout
    base_k = torch.randn(B, M, H, D, dtype=torch.float64)
    qs, ks, vs = q.transpose(1, 2), base_k.transpose(1, 2), torch.randn(B, M, H, 2 * D, dtype=torch.float64)[..., ::2].transpose(1, 2)
    assert not (qs.is_contiguous() or ks.is_contiguous() or vs.is_contiguous())
    for backend in dispatch.auto_order("cpu"):
        a = lara_attention(qs, ks, vs, num_samples=4, backend=backend)
        b = lara_attention(qs.contiguous(), ks.contiguous(), vs.contiguous(), num_samples=4, backend=backend)
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)


def test_empty_inputs_give_empty_or_zero_outputs():
    q, k, v = make_qkv(B, H, 0, M, D, dtype=torch.float32)
    assert lara_attention(q, k, v).shape == (B, H, 0, D)
    q, k, v = make_qkv(B, H, N, 0, D, Dv=5, dtype=torch.float32)
    q.requires_grad_()
    y = lara_attention(q, k, v)
    assert y.shape == (B, H, N, 5) and (y == 0).all()
    y.sum().backward()
    assert (q.grad == 0).all()


def test_info_runs_and_lists_backends():
    out = subprocess.run([sys.executable, "-m", "lara_kernels.info"], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout and "_C" in out.stdout
    for name in dispatch.backends():
        assert f"  {name}" in out.stdout


def test_info_into_a_closed_pipe_prints_no_traceback():
    """``python -m lara_kernels.info | head -3`` where the reader has gone: the report's
    writes fail with EPIPE. That is not a crash: exit status 1 (output cut short), no traceback.
    The read end is closed before the child starts, so every write fails, deterministically."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "lara_kernels.info"], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
