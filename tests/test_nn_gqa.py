"""Grouped-query attention in the layers (``num_kv_heads``): the layer equals the same
layer computed by hand with its projected k, v heads repeated, parameters and state
dicts, errors, torch.compile (CPU, small shapes, backend="reference")."""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lara_kernels.nn as lnn
from lara_kernels import lara_attention, rfa_attention
from lara_kernels._custom_ops import rfa_features
from lara_kernels.nn import LaraAttention, LaraEncoderLayer, PerformerAttention

E, H, D, C = 16, 4, 4, 4           # head_dim D = E // H; C samples
REF = "reference"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seq(L, B, dim=E, seed=0, dtype=torch.float64):
    """(L, B, dim): MHA's default layout."""
    return torch.randn(L, B, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _layer(cls, num_kv_heads, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_samples", C)
    m = cls(E, H, num_kv_heads=num_kv_heads, backend=REF, dtype=dtype, **kw)
    with torch.no_grad():                  # nonzero biases, so that the bias split is exercised
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return m


def _by_hand(m, query, key, value, k_pad=None, q_pad=None, grid=None, generator=None):
    """The layer's output computed by hand (seq-first inputs): its projections, k and v
    heads repeated with repeat_interleave, then plain lara_attention / rfa_attention."""
    Hkv = m.num_kv_heads
    if m.in_proj_weight is not None:
        wq, wk, wv = m.in_proj_weight.split(E)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    assert wk.shape[0] == wv.shape[0] == Hkv * D
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.split([E, Hkv * D, Hkv * D])

    def heads(x, w, b, n):                 # (L, B, dim) -> (B, n, L, D)
        return F.linear(x.transpose(0, 1), w, b).unflatten(-1, (n, D)).transpose(1, 2)

    q, k, v = heads(query, wq, bq, H), heads(key, wk, bk, Hkv), heads(value, wv, bv, Hkv)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    assert k.shape[1] == v.shape[1] == H
    if isinstance(m, LaraAttention):
        ql, kl = m.compute_landmarks(q, k, q_pad, k_pad, grid)   # per head of the repeated k
        y = lara_attention(q, k, v, num_samples=C, proposal=m.proposal, training=m.training, generator=generator,
                           key_padding_mask=k_pad, query_padding_mask=q_pad, q_landmarks=ql, k_landmarks=kl,
                           backend=REF)
    elif m.training:
        y = rfa_attention(q, k, v, num_samples=C, generator=generator, key_padding_mask=k_pad,
                          query_padding_mask=q_pad, backend=REF)
    else:                                  # eval: the layer's fixed features
        w = m.eval_features().expand(q.shape[0], H, C, D)
        y = rfa_features(q, k, v, w, key_padding_mask=k_pad, query_padding_mask=q_pad, backend=REF)
    return m.out_proj(y.transpose(1, 2).flatten(2)).transpose(0, 1)


def _grads(out, params):
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    return torch.autograd.grad((out * r).sum(), params)


CASES = [
    (LaraAttention, {}),
    (LaraAttention, {"landmarks": "learned", "proposal": "mixed"}),
    (LaraAttention, {"kdim": 6, "vdim": 5, "bias": False, "proposal": "attend"}),
    (PerformerAttention, {}),
    (PerformerAttention, {"kdim": 6, "vdim": 5}),
]


@pytest.mark.parametrize("cls, kw", CASES, ids=["lara", "lara-learned-mixed", "lara-kdim-vdim-attend", "performer",
                                                "performer-kdim-vdim"])
@pytest.mark.parametrize("num_kv_heads", [1, 2, H])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_equals_repeated_kv_heads_by_hand_forward_and_parameter_grads(cls, kw, num_kv_heads, training):
    m = _layer(cls, num_kv_heads, **kw).train(training)
    kd, vd = kw.get("kdim", E), kw.get("vdim", E)
    query, key, value = _seq(7, 2), _seq(9, 2, kd, seed=1), _seq(9, 2, vd, seed=2)
    k_pad = torch.zeros(2, 9, dtype=torch.bool)
    k_pad[1, 6:] = True
    m.generator = torch.Generator().manual_seed(3)
    out, _ = m(query, key, value, key_padding_mask=k_pad)
    ref = _by_hand(m, query, key, value, k_pad=k_pad, generator=torch.Generator().manual_seed(3))
    assert out.shape == (7, 2, E)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    params = [p for p in m.parameters()]
    for (name, _), a, b in zip(m.named_parameters(), _grads(out, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_self_attention_padding_and_unbatched(cls, num_kv_heads):
    # query is key: the key mask is also the query mask (padded rows: out_proj of zeros)
    m = _layer(cls, num_kv_heads, check_finite=True).eval()   # the checks take the narrower k, v projections
    x = _seq(8, 2)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 5:] = True
    out, _ = m(x, x, x, key_padding_mask=pad)
    torch.testing.assert_close(out, _by_hand(m, x, x, x, k_pad=pad, q_pad=pad), rtol=1e-10, atol=1e-12)
    one, _ = m(x[:5, 0], x[:5, 0], x[:5, 0])                         # unbatched, the valid rows alone
    torch.testing.assert_close(one, out[:5, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_pool2d_landmarks_per_key_value_head(num_kv_heads):
    m = _layer(LaraAttention, num_kv_heads, landmarks="pool2d", grid=(3, 3)).eval()
    x = _seq(9, 2)
    torch.testing.assert_close(m(x, x, x)[0], _by_hand(m, x, x, x, grid=(3, 3)), rtol=1e-10, atol=1e-12)
    qh, kh, _ = m.project(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))
    assert kh.shape == (2, num_kv_heads, 9, D)
    _, kl = m.compute_landmarks(qh, kh, None, None)                   # shared by each group
    assert kl.shape == (2, H, C, D)
    torch.testing.assert_close(kl, kl[:, ::H // num_kv_heads].repeat_interleave(H // num_kv_heads, 1),
                               rtol=0, atol=0)


def test_attention_gets_the_unrepeated_kv_heads_and_enable_gqa(monkeypatch):
    seen = []

    def spy(fn):
        def call(q, k, v, *args, **kw):
            seen.append((q.shape[1], k.shape[1], v.shape[1], kw.get("enable_gqa", False)))
            return fn(q, k, v, *args, **kw)
        return call

    monkeypatch.setattr(lnn, "lara_attention", spy(lnn.lara_attention))
    monkeypatch.setattr(lnn._ops, "rfa_features", spy(lnn._ops.rfa_features))
    x = _seq(6, 2)
    for cls in (LaraAttention, PerformerAttention):
        for kv in (None, 2):
            _layer(cls, kv)(x, x, x)
    assert seen == [(H, H, H, False), (H, 2, 2, True)] * 2


# ---------------------------------------------------------------- parameters and state dicts

@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
@pytest.mark.parametrize("kw", [{}, {"kdim": 6, "vdim": 5}, {"bias": False}], ids=["same-dims", "kdim-vdim", "no-bias"])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_parameter_names_shapes_and_counts(cls, kw, num_kv_heads):
    m = cls(E, H, num_samples=C, num_kv_heads=num_kv_heads, **kw)
    kd, vd, bias = kw.get("kdim", E), kw.get("vdim", E), kw.get("bias", True)
    kv = num_kv_heads * D
    want = {"q_proj_weight": (E, E), "k_proj_weight": (kv, kd), "v_proj_weight": (kv, vd),
            "out_proj.weight": (E, E)}
    if bias:
        want.update({"in_proj_bias": (E + 2 * kv,), "out_proj.bias": (E,)})
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == want
    assert m.in_proj_weight is None and m.num_kv_heads == num_kv_heads and m.kv_dim == kv
    count = E * E + kv * (kd + vd) + E * E + ((E + 2 * kv) + E if bias else 0)
    assert sum(p.numel() for p in m.parameters()) == count
    mha = sum(p.numel() for p in nn.MultiheadAttention(E, H, **kw).parameters())
    assert count == mha - (H - num_kv_heads) * D * (kd + vd + (2 if bias else 0))
    # num_kv_heads = num_heads is MHA's layout, exactly as None
    full = {n: p.shape for n, p in cls(E, H, num_samples=C, num_kv_heads=H, **kw).named_parameters()}
    assert full == {n: p.shape for n, p in nn.MultiheadAttention(E, H, **kw).named_parameters()}
    assert cls(E, H, num_kv_heads=H).num_kv_heads == cls(E, H).num_kv_heads == H


def test_encoder_layer_passes_num_kv_heads_through():
    for attention in ("lara", "performer"):
        torch.manual_seed(0)
        layer = LaraEncoderLayer(E, H, 32, dropout=0.0, attention=attention, num_kv_heads=2, num_samples=C,
                                 backend=REF, dtype=torch.float64)
        assert layer.self_attn.num_kv_heads == 2 and layer.self_attn.k_proj_weight.shape == (2 * D, E)
        x = _seq(7, 2)
        attn = layer.self_attn.eval()
        layer.eval()
        ref = layer.norm1(x + _by_hand(attn, x, x, x))
        ref = layer.norm2(ref + layer.linear2(F.relu(layer.linear1(ref))))
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-12)
    assert LaraEncoderLayer(E, H, 32, num_kv_heads=None).self_attn.in_proj_weight.shape == (3 * E, E)
    assert isinstance(LaraEncoderLayer(E, H, 32, attention="softmax", num_kv_heads=H).self_attn,
                      nn.MultiheadAttention)


@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_state_dict_round_trip(cls):
    a = _layer(cls, 2, landmarks="learned") if cls is LaraAttention else _layer(cls, 2)
    a.eval()
    torch.manual_seed(1)
    b = (cls(E, H, num_samples=C, num_kv_heads=2, backend=REF, dtype=torch.float64,
             **({"landmarks": "learned"} if cls is LaraAttention else {})).eval())
    x = _seq(8, 2)
    assert not torch.equal(a(x, x, x)[0], b(x, x, x)[0])
    with tempfile.TemporaryDirectory() as d:               # through a file, as a checkpoint
        path = os.path.join(d, "gqa.pt")
        torch.save(a.state_dict(), path)
        state = torch.load(path)
    keys = {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    assert keys <= set(state) and "in_proj_weight" not in state
    b.load_state_dict(state, strict=True)
    torch.testing.assert_close(b(x, x, x)[0], a(x, x, x)[0], rtol=0, atol=0)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    # the encoder layer too
    la = LaraEncoderLayer(E, H, 32, num_kv_heads=1, num_samples=C)
    lb = LaraEncoderLayer(E, H, 32, num_kv_heads=1, num_samples=C)
    lb.load_state_dict(la.state_dict(), strict=True)
    assert all(torch.equal(p, q) for p, q in zip(la.state_dict().values(), lb.state_dict().values()))


@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
@pytest.mark.parametrize("kw", [{}, {"kdim": 6, "vdim": 5}], ids=["same-dims", "kdim-vdim"])
def test_mha_state_dict_does_not_load_into_a_gqa_layer(cls, kw):
    # the layer's own error, naming both head counts, with strict=True and strict=False
    mha = nn.MultiheadAttention(E, H, **kw)
    gqa = cls(E, H, num_samples=C, num_kv_heads=2, **kw)
    before = {n: p.clone() for n, p in gqa.state_dict().items()}
    what = "packed in_proj_weight" if not kw else r"k_proj_weight of shape \(16, 6\)"
    msg = (rf"{cls.__name__} with num_heads=4, num_kv_heads=2 \(head_dim 4\) cannot load a state dict with 4 "
           rf"key/value heads \({what}\).*num_kv_heads=None")
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=msg):
            gqa.load_state_dict(mha.state_dict(), strict=strict)
    # as for any load_state_dict error, entries of matching shape (out_proj) were copied; the
    # key/value projections were not
    for n in ("k_proj_weight", "v_proj_weight", "in_proj_bias"):
        assert n not in before or torch.equal(gqa.state_dict()[n], before[n])
    # the other way: a GQA state dict into MHA is load_state_dict's own error; into a
    # layer with another num_kv_heads (None included), the layer's
    with pytest.raises(RuntimeError, match="in_proj_weight" if not kw else "size mismatch for k_proj_weight"):
        nn.MultiheadAttention(E, H, **kw).load_state_dict(gqa.state_dict())
    for other in (None, 1):
        with pytest.raises(RuntimeError, match=r"cannot load a state dict with 2 key/value heads \(k_proj_weight "):
            cls(E, H, num_samples=C, num_kv_heads=other, **kw).load_state_dict(gqa.state_dict())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_context_parallel_path_with_kv_heads():
    # context_parallel_lara_attention with enable_gqa (k, v not repeated). A world of one
    # process (in this process) runs that path and must give the single-process GQA
    # result and gradients.
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(d, "store"), rank=0, world_size=1)
        try:
            m = _layer(LaraAttention, 2).eval()
            x = _seq(8, 2)
            pad = torch.zeros(2, 8, dtype=torch.bool)
            pad[1, 5:] = True
            want = m(x, x, x, key_padding_mask=pad)[0]
            m.context_parallel_group = dist.new_group([0])
            got = m(x, x, x, key_padding_mask=pad)[0]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            params = list(m.parameters())
            for a, b in zip(_grads(got, params), _grads(want, params)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        finally:
            dist.destroy_process_group()


def test_convert_rejects_num_kv_heads():
    model = nn.TransformerEncoderLayer(E, H, 32)
    with pytest.raises(ValueError, match="num_kv_heads is not an option of convert, got num_kv_heads=2"):
        lnn.convert(model, num_kv_heads=2, num_samples=C)
    assert isinstance(model.self_attn, nn.MultiheadAttention)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_bad_num_kv_heads(cls):
    for value in (3, 8):
        with pytest.raises(ValueError, match=rf"num_kv_heads must divide num_heads .*got num_kv_heads={value} "
                                             rf"and num_heads=4"):
            cls(E, H, num_kv_heads=value)
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1, got 0"):
        cls(E, H, num_kv_heads=0)
    for value in (2.0, True, "2"):
        with pytest.raises(TypeError, match="num_kv_heads must be an int"):
            cls(E, H, num_kv_heads=value)
    with pytest.raises(TypeError):                          # keyword-only, as the other extensions
        cls(E, H, 0.0, True, False, False, None, None, False, None, None, 2)
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        LaraEncoderLayer(E, H, 32, attention="lara" if cls is LaraAttention else "performer", num_kv_heads=3)
    with pytest.raises(ValueError, match=r"attention='softmax' \(nn.MultiheadAttention\) has no grouped-query "
                                         r"attention: num_kv_heads must be None or nhead=4, got num_kv_heads=2"):
        LaraEncoderLayer(E, H, 32, attention="softmax", num_kv_heads=2)
    with pytest.raises(TypeError, match="num_kv_heads must be an int"):
        LaraEncoderLayer(E, H, 32, attention="softmax", num_kv_heads=4.0)


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("attention, kw", [("lara", {}), ("lara", {"landmarks": "learned"}), ("performer", {})],
                         ids=["lara", "lara-learned", "performer"])
def test_compiled_gqa_layer_equals_eager(attention, kw):
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        layer = LaraEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, attention=attention, num_kv_heads=2,
                                 num_samples=C, backend=REF, **kw).eval()
        x = torch.randn(2, 8, E, generator=torch.Generator().manual_seed(0))
        pad = torch.zeros(2, 8, dtype=torch.bool)
        pad[1, 6:] = True
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")   # fullgraph: no graph break
        y_comp = compiled(x, src_key_padding_mask=pad)
        y_eager = layer(x, src_key_padding_mask=pad)
        torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
        params = list(layer.parameters())
        for a, b in zip(_grads(y_eager, params), _grads(y_comp, params)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
