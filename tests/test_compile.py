"""torch.compile(fullgraph=True) and torch.export of the layers and the custom ops, for
every documented option (CPU; aot_eager for speed, one inductor test)."""

import pytest
import torch
from torch import nn

from lara_kernels import lara_attention
from lara_kernels._custom_ops import lara_attention_op
from lara_kernels.nn import LaraAttention, LaraEncoderLayer, PerformerAttention

E, H = 16, 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def _x(B=2, N=10, seed=0, dtype=torch.float32):
    return torch.randn(B, N, E, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _model(attention="lara", layers=1, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_samples", 4)
    return nn.Sequential(*[LaraEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, attention=attention, **kw)
                           for _ in range(layers)])


def _grads(y, params):
    return torch.autograd.grad(y.square().sum(), params)


def _set_generators(model, seed):
    for m in model.modules():
        if isinstance(m, (LaraAttention, PerformerAttention)):
            m.generator = torch.Generator().manual_seed(seed)


def _reseed(model, seed):
    for m in model.modules():
        if isinstance(m, (LaraAttention, PerformerAttention)):
            m.generator.manual_seed(seed)


# ---------------------------------------------------------------- training with a generator, Performer

# fullgraph=True: any graph break would raise, so passing these tests means zero breaks
@pytest.mark.parametrize("attention, kw, layers", [
    ("lara", {}, 2), ("lara", {"landmarks": "learned", "proposal": "mixed"}, 1), ("performer", {}, 1),
], ids=["lara-2-layers", "lara-learned-mixed", "performer"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_equals_eager_with_generators(attention, kw, layers, training):
    model = _model(attention, layers, **kw).train(training)
    _set_generators(model, 5)                              # one generator per layer
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _x()
    y_comp = compiled(x)
    _reseed(model, 5)
    y_eager = model(x)
    # same draws (lara_kernels::randn calls torch.randn with the layer's generator), same ops
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    params = list(model.parameters())
    for a, b in zip(_grads(y_eager, params), _grads(y_comp, params)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    if training:   # the generators advanced: the next step draws anew, in both
        y2 = compiled(x)
        assert not torch.equal(y2, y_comp)
    else:          # eval is deterministic
        torch.testing.assert_close(compiled(x), y_comp, rtol=0, atol=0)


def test_global_rng_draws_match_eager():
    model = _model().train()                               # generator None: torch's global RNG
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _x()
    torch.manual_seed(3)
    y_comp = compiled(x)
    torch.manual_seed(3)
    torch.testing.assert_close(y_comp, model(x), rtol=0, atol=0)


def test_two_layers_sharing_one_generator_draw_twice():
    # the draws are side-effect ops: kept in order, never merged into one
    model = _model(layers=2).train()
    g = torch.Generator().manual_seed(9)
    for layer in model:
        layer.self_attn.generator = g
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = _x()
    y_comp = compiled(x)
    g.manual_seed(9)
    torch.testing.assert_close(y_comp, model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- padding masks, float and bool

@pytest.mark.parametrize("attention", ["lara", "performer"])
def test_float_padding_masks_compile_and_still_reject_biases(attention):
    model = _model(attention).eval()
    x = _x()
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    fmask = torch.zeros(2, 10).masked_fill(pad, float("-inf"))
    compiled = torch.compile(model[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, src_key_padding_mask=fmask), model[0](x, src_key_padding_mask=pad),
                               rtol=0, atol=0)
    bias = fmask.clone()
    bias[0, 3] = -2.0
    with pytest.raises(ValueError, match=r"key_padding_mask is a float mask with values other than 0 and -inf "
                                         r"\(first -2.0 at index \(0, 3\)"):
        compiled(x, src_key_padding_mask=bias)             # raised when the compiled graph runs


def test_transformer_encoder_with_padding_compiles():
    torch.manual_seed(0)
    layer = LaraEncoderLayer(E, H, 32, dropout=0.0, num_samples=4)   # torch's default layout (L, B, E)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = _x().transpose(0, 1)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 7:] = True
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, src_key_padding_mask=pad), enc(x, src_key_padding_mask=pad),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- dynamic shapes, changing scale

def test_dynamic_shapes_one_graph():
    model = _model(landmarks="learned").eval()
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm

    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=True)
    for B, N in [(2, 10), (3, 7), (4, 13)]:   # sizes 0 and 1 are always specialized
        x = _x(B, N, seed=N)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert counts["n"] == 1


def test_changing_float_scale_right_answers_and_no_recompile_per_value():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (9, 12, 12))
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm

    def f(q, k, v, scale):
        return lara_attention_op(q, k, v, num_samples=4, scale=scale)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    for scale in [0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 2.0, 3.0, 0.05]:   # more than dynamo's recompile limit
        torch.testing.assert_close(compiled(q, k, v, scale), lara_attention(q, k, v, num_samples=4, scale=scale),
                                   rtol=0, atol=0)
    assert counts["n"] <= 2                                # the first value, then one graph for all
    with pytest.raises(ValueError, match=r"scale must be a positive finite number, got -1.0"):
        compiled(q, k, v, -1.0)


# ---------------------------------------------------------------- torch.export

EXPORTED = [
    (LaraAttention, {}), (LaraAttention, {"landmarks": "learned", "proposal": "attend"}),
    (LaraAttention, {"landmarks": "pool2d", "grid": (2, 5), "landmark_proj": True}),
    (LaraAttention, {"kdim": 6, "vdim": 5}), (PerformerAttention, {}),
    (LaraEncoderLayer, {"attention": "lara"}), (LaraEncoderLayer, {"attention": "performer"}),
    (LaraEncoderLayer, {"attention": "softmax"}),
]


@pytest.mark.parametrize("cls, kw", EXPORTED, ids=[f"{c.__name__}-{'-'.join(map(str, k.values()))}" for c, k in EXPORTED])
def test_export_every_layer(cls, kw):
    torch.manual_seed(0)
    kw = dict(kw)
    if cls is LaraEncoderLayer:
        if kw["attention"] != "softmax":
            kw["num_samples"] = 4
        m = cls(E, H, 32, dropout=0.0, **kw).eval()
        args = (_x().transpose(0, 1),)
    else:
        m = cls(E, H, num_samples=4, **kw).eval()
        q = _x().transpose(0, 1)
        k = torch.randn(10, 2, kw.get("kdim", E))
        v = torch.randn(10, 2, kw.get("vdim", E))
        args = (q, q, q) if "kdim" not in kw else (q, k, v)
    ep = torch.export.export(m, args)
    out, ref = ep.module()(*args), m(*args)
    out, ref = (out[0], ref[0]) if isinstance(ref, tuple) else (out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ---------------------------------------------------------------- inductor

def test_inductor_eval_and_training_draws():
    torch.manual_seed(0)
    model = LaraAttention(E, H, num_samples=4, landmarks="learned", batch_first=True).eval()
    x = _x()
    compiled = torch.compile(lambda x: model(x, x, x)[0], fullgraph=True, backend="inductor")
    # inductor fuses and reorders the float32 projections and layer norms: rounding only
    # (about 1e-7 relative per op, a few ops deep)
    torch.testing.assert_close(compiled(x), model(x, x, x)[0], rtol=1e-5, atol=1e-5)
    model.train()
    _set_generators(model, 4)
    y = compiled(x)
    _reseed(model, 4)
    # the eps draws are eager's under inductor too (dropout is 0 here: inductor's own RNG
    # for dropout differs from eager's, as for any torch model)
    torch.testing.assert_close(y, model(x, x, x)[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- double backward

def test_double_backward_eager_op_is_correct_and_compiled_path_raises():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in (6, 7, 7))

    def second(fn):
        y = fn(q, k, v, num_samples=3, proposal="mixed")
        gq, = torch.autograd.grad(y.square().sum(), q, create_graph=True)
        return torch.autograd.grad(gq.square().sum(), (q, k, v))

    for a, b in zip(second(lara_attention_op), second(lara_attention)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)   # float64: rounding only
    assert any(t.abs().max() > 0 for t in second(lara_attention_op))

    compiled = torch.compile(lambda q, k, v: lara_attention_op(q, k, v, num_samples=3), fullgraph=True,
                             backend="aot_eager")
    y = compiled(q, k, v)
    gq, = torch.autograd.grad(y.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gq.sum(), k)


def test_backward_op_raises_when_differentiated():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 4, generator=g, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 1, 5, 4, requires_grad=True)
    scale = torch.tensor(0.5, dtype=torch.float64)
    out = torch.ops.lara_kernels.lara_attention_backward(grad, q, k, v, None, None, None, None, None, 2,
                                                          "segment", "optimal", 1.0, scale, "auto")
    with pytest.raises(RuntimeError, match=r"double backward .* not supported.*Eager lara_attention"):
        out[0].sum().backward()


def test_compiled_layer_under_autocast_equals_eager():
    torch.manual_seed(0)
    model = LaraAttention(E, H, num_samples=4, landmarks="learned", batch_first=True).eval()
    x = _x()
    compiled = torch.compile(lambda x: model(x, x, x)[0], fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_comp, y_eager = compiled(x), model(x, x, x)[0]
    assert y_comp.dtype == y_eager.dtype == torch.bfloat16
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)


def test_rfa_op_opcheck_and_gradients_equal_the_eager_backend():
    from lara_kernels._custom_ops import rfa_features

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (9, 12, 12))
    w = torch.randn(2, 2, 4, 8, generator=g)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 9:] = True
    scale = torch.tensor(0.35, dtype=torch.float64)
    result = torch.library.opcheck(torch.ops.lara_kernels.rfa_attention.default, (q, k, v, w, kpm, None, scale, "auto"))
    assert all(r == "SUCCESS" for r in result.values()), result
    y_op = torch.ops.lara_kernels.rfa_attention(q, k, v, w, kpm, None, scale, "auto")
    y_eager = rfa_features(q, k, v, w, scale=0.35, key_padding_mask=kpm)
    torch.testing.assert_close(y_op, y_eager, rtol=0, atol=0)
    dy = torch.randn_like(y_op)
    for a, b in zip(torch.autograd.grad(y_eager, (q, k, v), dy), torch.autograd.grad(y_op, (q, k, v), dy)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_export_in_training_draws_like_eager(cls):
    torch.manual_seed(0)
    m = cls(E, H, num_samples=4).train()                  # generator None: the global RNG
    x = _x().transpose(0, 1)
    ep = torch.export.export(m, (x, x, x))
    torch.manual_seed(8)
    out = ep.module()(x, x, x)[0]
    torch.manual_seed(8)
    torch.testing.assert_close(out, m(x, x, x)[0], rtol=0, atol=0)
