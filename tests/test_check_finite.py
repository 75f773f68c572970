"""check_finite=True: NaN / inf at a valid position of q, k, v or the landmarks raises a
ValueError naming the argument, the count and the first bad element, before dispatch
(so on every backend), eagerly and under torch.compile; padded positions are not read."""

import pytest
import torch
from torch import nn

from helpers import make_qkv
from lara_kernels import _ops, api, dispatch, lara_attention, ra_attention, rfa_attention
from lara_kernels._custom_ops import lara_attention_op
from lara_kernels.nn import LaraAttention, LaraEncoderLayer, PerformerAttention

B, H, N, M, D, C = 2, 3, 10, 12, 8, 4
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _runnable_backends():
    """Every registered backend that runs small float32 CPU inputs here (triton: interpreter)."""
    probe = torch.zeros(1, 1, 4, 8)
    return [name for name, b in dispatch.backends().items()
            if not b.not_supported_reasons("lara", probe, probe, probe, num_samples=C)]


BACKENDS = _runnable_backends()


def _inputs(seed=0):
    q, k, v = make_qkv(B, H, N, M, D, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    lm = {"q_landmarks": torch.randn(B, H, C, D, generator=g), "k_landmarks": torch.randn(B, H, C, D, generator=g)}
    return {"q": q, "k": k, "v": v}, lm


def _call(fn, t, **kw):
    if fn is not ra_attention:
        kw.setdefault("num_samples", C)
    if fn is not lara_attention:                     # rfa and (unbiased) ra draw at every call
        kw.setdefault("generator", torch.Generator().manual_seed(0))
    return fn(t["q"], t["k"], t["v"], **kw)


FUNCTIONS = [lara_attention, rfa_attention, ra_attention]


ARGUMENTS = [(fn, name) for fn in FUNCTIONS for name in ("q", "k", "v")]
ARGUMENTS += [(lara_attention, "q_landmarks"), (lara_attention, "k_landmarks")]


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("fn, name", ARGUMENTS, ids=[f"{f.__name__}-{n}" for f, n in ARGUMENTS])
def test_non_finite_raises_naming_argument_count_and_first_index(fn, name, bad):
    t, lm = _inputs()
    kw = lm if fn is lara_attention else {}
    target = t if name in t else lm
    target[name] = target[name].clone()
    target[name][1, 2, 3, 1] = BAD[bad]
    target[name][0, 1, 2, 5] = BAD[bad]            # first in row-major order
    given = {**t, **kw}
    originals = {n: x.clone() for n, x in given.items()}
    with pytest.raises(ValueError, match=rf"^check_finite: {name} has 2 non-finite values "
                                         rf"\(first {bad} at index \(0, 1, 2, 5\)\)$"):
        _call(fn, t, check_finite=True, **kw)
    for n, x in given.items():                       # inputs untouched
        torch.testing.assert_close(x, originals[n], rtol=0, atol=0, equal_nan=True)


def test_message_counts_mixed_values_and_says_value_singular():
    t, _ = _inputs()
    t["k"] = t["k"].clone()
    t["k"][0, 1, 5, 2] = float("nan")
    t["k"][1, 0, 3, 3] = float("inf")
    t["k"][1, 1, 1, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"^check_finite: k has 3 non-finite values \(first nan at index \(0, 1, 5, 2\)\)$"):
        lara_attention(t["q"], t["k"], t["v"], num_samples=C, check_finite=True)
    t, _ = _inputs()
    t["v"] = t["v"].clone()
    t["v"][1, 2, 11, 7] = float("-inf")
    with pytest.raises(ValueError, match=r"^check_finite: v has 1 non-finite value \(first -inf at index \(1, 2, 11, 7\)\)$"):
        lara_attention(t["q"], t["k"], t["v"], num_samples=C, check_finite=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_other_dtypes_and_strided_inputs(dtype):
    base = torch.randn(B, M, H, D, dtype=dtype)
    k = base.transpose(1, 2)                         # (B, H, M, D), not contiguous
    q, _, v = make_qkv(B, H, N, M, D, dtype=dtype)
    assert not k.is_contiguous()
    base[1, 4, 2, 6] = float("inf")                  # k[1, 2, 4, 6]
    with pytest.raises(ValueError, match=r"k has 1 non-finite value \(first inf at index \(1, 2, 4, 6\)\)"):
        lara_attention(q, k, v, num_samples=C, check_finite=True, backend="reference")


def test_finite_values_whose_sums_overflow_pass():
    # the screen sums rows (overflow -> inf); such rows are then counted element by element.
    # Values are not range-checked: a huge finite v passes.
    q, k, v = make_qkv(B, H, N, M, D, dtype=torch.float32)
    v = v.clone()
    v[0, 0, 0] = 3e38                                 # the row's sum overflows; every value is finite
    y = lara_attention(q, k, v, num_samples=C, check_finite=True, backend="reference")
    assert y.shape == (B, H, N, D)
    # a key row that large is finite but outside the range of finite results: named as such
    k = k.clone()
    k[0, 0, 0] = 3e38
    with pytest.raises(ValueError, match=r"k has 1 row outside the range where results are finite: "
                                         r"scale \* \|k\[0, 0, 0\]\|\^2 = inf > 5.32e\+36"):
        lara_attention(q, k, v, num_samples=C, check_finite=True, backend="reference")
    h = torch.full((1, 1, 3, 64), 60000.0, dtype=torch.float16)     # near float16's largest
    ra_attention(h, h, h, biased=True, check_finite=True)
    k[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"k has 1 non-finite value \(first nan at index \(1, 2, 3, 4\)\)"):
        lara_attention(q, k, v, num_samples=C, check_finite=True)


def _padded_case(fill):
    """Inputs with ``fill`` at every padded position (q rows by qpad; k, v rows by kpad)."""
    t, _ = _inputs(seed=3)
    qpad = torch.zeros(B, N, dtype=torch.bool)
    qpad[0, 7:] = True
    qpad[1, ::3] = True
    kpad = torch.zeros(B, M, dtype=torch.bool)
    kpad[0, 9:] = True
    kpad[1, 1] = True
    t = {"q": t["q"].masked_fill(qpad[:, None, :, None], fill),
         "k": t["k"].masked_fill(kpad[:, None, :, None], fill),
         "v": t["v"].masked_fill(kpad[:, None, :, None], fill)}
    return t, dict(key_padding_mask=kpad, query_padding_mask=qpad)


@pytest.mark.parametrize("fill", ["nan", "inf"])
@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_non_finite_only_at_padded_positions_is_accepted(fn, fill):
    clean, masks = _padded_case(0.0)
    dirty, _ = _padded_case(BAD[fill])
    backends = BACKENDS if fn is not ra_attention else [None]
    if fill == "nan" and not _ops.built():
        # as in test_triton: the torch landmarks fallback multiplies padded rows by 0
        backends = [b for b in backends if b != "triton"]
    for backend in backends:
        kw = dict(masks) if backend is None else dict(masks, backend=backend)
        y = _call(fn, dirty, check_finite=True, **kw)
        assert torch.isfinite(y).all(), backend
        assert torch.equal(y, _call(fn, clean, **kw)), backend


def test_masks_apply_to_their_own_tensors_only():
    # a key-padded row of q, or a query-padded row of k, is still checked
    t, masks = _padded_case(0.0)
    q = t["q"].clone()
    q[0, 0, 8, 0] = float("nan")                        # query 8 of element 0 is padded: allowed
    lara_attention(q, t["k"], t["v"], num_samples=C, check_finite=True, **masks)
    q[1, 0, 1, 0] = float("nan")                        # element 1: key 1 is padded, query 1 is not
    with pytest.raises(ValueError, match=r"q has 1 non-finite value \(first nan at index \(1, 0, 1, 0\)\)"):
        lara_attention(q, t["k"], t["v"], num_samples=C, check_finite=True, **masks)
    k = t["k"].clone()
    k[1, 0, 0, 0] = float("nan")                        # key 0 of element 1 is valid (its query 0 is padded)
    with pytest.raises(ValueError, match=r"k has 1 non-finite value \(first nan at index \(1, 0, 0, 0\)\)"):
        lara_attention(t["q"], k, t["v"], num_samples=C, check_finite=True, **masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gets_the_check_and_the_same_result(backend):
    t, lm = _inputs()
    y0 = lara_attention(t["q"], t["k"], t["v"], num_samples=C, backend=backend, **lm)
    y1 = lara_attention(t["q"], t["k"], t["v"], num_samples=C, backend=backend, check_finite=True, **lm)
    assert torch.equal(y0, y1)
    for name in ("q", "k", "v", "q_landmarks", "k_landmarks"):
        bad_t, bad_lm = dict(t), dict(lm)
        target = bad_t if name in bad_t else bad_lm
        target[name] = target[name].clone()
        target[name][1, 0, 2, 3] = float("nan")
        with pytest.raises(ValueError, match=rf"check_finite: {name} has 1 non-finite value"):
            lara_attention(bad_t["q"], bad_t["k"], bad_t["v"], num_samples=C, backend=backend, check_finite=True,
                           **bad_lm)
        if name in t:
            with pytest.raises(ValueError, match=rf"check_finite: {name} has 1 non-finite value"):
                rfa_attention(bad_t["q"], bad_t["k"], bad_t["v"], num_samples=C, backend=backend,
                              check_finite=True)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_check_runs_before_dispatch(fn, monkeypatch):
    def no_dispatch(*args, **kwargs):
        raise AssertionError("dispatched before the finite check")

    monkeypatch.setattr(dispatch, "select", no_dispatch)
    import lara_kernels.reference as reference

    monkeypatch.setattr(reference, "ra_reference", no_dispatch)
    t, _ = _inputs()
    t["q"] = t["q"].clone()
    t["q"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="check_finite: q has 1 non-finite value"):
        _call(fn, t, check_finite=True)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_check_finite_false_does_not_look(fn, monkeypatch):
    # the default reads no value; what non-finite inputs give is not specified
    calls = []
    monkeypatch.setattr(api, "_check_finite_values", lambda *a: calls.append(a))
    t, _ = _inputs()
    t["v"] = t["v"].clone()
    t["v"][0, 0, 0, 0] = float("nan")
    y = _call(fn, t)
    assert y.shape == (B, H, N, D) and calls == []
    _call(fn, t, check_finite=True)
    assert len(calls) == 1


@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True)], ids=["1", "0", "str", "None", "tensor"])
@pytest.mark.parametrize("fn", FUNCTIONS + [lara_attention_op], ids=lambda f: f.__name__)
def test_non_bool_check_finite_is_a_type_error(fn, value):
    t, _ = _inputs()
    with pytest.raises(TypeError, match=r"^check_finite must be a bool, got "):
        fn(t["q"], t["k"], t["v"], check_finite=value)


def test_empty_and_meta_inputs_have_nothing_to_check():
    q, k, v = make_qkv(B, H, 0, M, D, dtype=torch.float32)
    k[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="k has 1"):             # empty q: k is still checked
        lara_attention(q, k, v, check_finite=True)
    y = lara_attention(q, k[:, :, :0], v[:, :, :0], check_finite=True)
    assert y.shape == (B, H, 0, D)
    qm, km, vm = (x.to("meta") for x in make_qkv(B, H, N, M, D, dtype=torch.float32))
    assert lara_attention(qm, km, vm, num_samples=C, backend="reference", check_finite=True).device.type == "meta"


def test_gradients_unchanged_by_the_check():
    t, lm = _inputs()
    grads = []
    for check in (False, True):
        leaves = [x.clone().requires_grad_() for x in (t["q"], t["k"], t["v"], lm["q_landmarks"])]
        y = lara_attention(*leaves[:3], num_samples=C, q_landmarks=leaves[3], check_finite=check)
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("fn", [lara_attention, lara_attention_op], ids=lambda f: f.__name__)
def test_compiled_check_is_kept_and_raises_the_same_error(fn):
    # a data-dependent check: under torch.compile it is the op lara_kernels::check_finite,
    # registered as a side effect, which dead-code elimination would otherwise drop
    t, lm = _inputs()

    def f(q, k, v, ql, kl, kpm):
        return fn(q, k, v, num_samples=C, q_landmarks=ql, k_landmarks=kl, key_padding_mask=kpm, check_finite=True,
                  backend=backend)

    kpm = torch.zeros(B, M, dtype=torch.bool)
    kpm[1, 10:] = True
    backend = "auto"
    if fn is lara_attention:
        # traced through: the reference (compiled backends may not trace), without a mask
        # (its data-dependent branches break the graph); lara_attention_op is one opaque op
        backend, kpm = "reference", None
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (t["q"], t["k"], t["v"], lm["q_landmarks"], lm["k_landmarks"])]
    y_c, y_e = compiled(*leaves, kpm), f(*leaves, kpm)
    assert torch.equal(y_c, y_e)
    for a, b in zip(torch.autograd.grad(y_c.sum(), leaves), torch.autograd.grad(y_e.sum(), leaves)):
        assert torch.equal(a, b)
    k = t["k"].clone()
    if kpm is not None:
        k[1, 2, 11, 0] = float("nan")                 # padded: accepted
    assert torch.equal(compiled(t["q"], k, t["v"], lm["q_landmarks"], lm["k_landmarks"], kpm),
                       f(t["q"], t["k"], t["v"], lm["q_landmarks"], lm["k_landmarks"], kpm))
    k[0, 2, 5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"check_finite: k has 1 non-finite value \(first inf at index \(0, 2, 5, 1\)\)"):
        compiled(t["q"], k, t["v"], lm["q_landmarks"], lm["k_landmarks"], kpm)
    ql = lm["q_landmarks"].clone()
    ql[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"check_finite: q_landmarks has 1"):
        compiled(t["q"], t["k"], t["v"], ql, lm["k_landmarks"], kpm)


def test_compiled_layer_with_check_has_no_graph_break():
    torch.manual_seed(0)
    model = nn.Sequential(LaraEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, num_samples=4,
                                           check_finite=True)).eval()
    x = torch.randn(2, 10, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    bad = x.clone()
    bad[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"check_finite: query has 1 non-finite value \(first nan at index \(1, 3, 5\) "
                                         r"of shape \(2, 10, 16\)\)"):
        compiled(bad)


# ---------------------------------------------------------------- modules

@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_modules_pass_check_finite_through(cls):
    torch.manual_seed(0)
    m = cls(16, 2, num_samples=4, batch_first=True, check_finite=True).eval()
    assert m.check_finite is True and cls(16, 2, num_samples=4).check_finite is False
    x = torch.randn(2, 10, 16)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 8:] = True
    y0, _ = m(x, x, x, key_padding_mask=pad)
    dirty = x.masked_fill(pad[..., None], float("nan"))
    y1, _ = m(dirty, dirty, dirty, key_padding_mask=pad)   # NaN tokens are padding: accepted
    assert torch.equal(y1, y0)
    dirty[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"check_finite: query has 1 non-finite value \(first inf at index \(1, 2, 0\) "
                                         r"of shape \(2, 10, 16\)\)"):
        m(dirty, dirty, dirty, key_padding_mask=pad)
    y, _ = cls(16, 2, num_samples=4, batch_first=True).eval()(dirty, dirty, dirty, key_padding_mask=pad)  # no check
    assert y.shape == x.shape
    with pytest.raises(TypeError, match=r"check_finite must be a bool, got 'yes' \(str\)"):
        cls(16, 2, check_finite="yes")


def test_encoder_layer_passes_check_finite_to_its_attention():
    layer = LaraEncoderLayer(16, 2, 32, attention="performer", num_samples=4, check_finite=True)
    assert layer.self_attn.check_finite is True
    with pytest.raises(ValueError, match="takes no extra arguments"):
        LaraEncoderLayer(16, 2, 32, attention="softmax", check_finite=True)
