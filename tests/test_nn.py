"""lara_kernels.nn layers and the lara_attention custom op (CPU, small, fast)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lara_kernels import lara_attention, rfa_attention
from lara_kernels._custom_ops import lara_attention_op
from lara_kernels.nn import LaraAttention, LaraEncoderLayer, PerformerAttention, segment_pool

E, H = 16, 2


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: on a shared CPU, intra-op threads cost far more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(B=2, N=10, E=E, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, E, generator=g, dtype=dtype)


def _attn(cls, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_samples", 4)
    kw.setdefault("batch_first", True)   # these tests use (B, L, E); MHA's default layout is tested in test_layers_dropin.py
    return cls(E, H, **kw)


def _rel(a, b):
    return ((a - b).float().pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


# ---------------------------------------------------------------- shapes, grads, interface

@pytest.mark.parametrize("cls, kw", [
    (LaraAttention, {}),
    (LaraAttention, {"landmarks": "learned"}),
    (LaraAttention, {"landmarks": "pool2d", "grid": (3, 4)}),
    (LaraAttention, {"landmarks": "pool2d", "grid": (3, 4), "landmark_proj": True}),
    (LaraAttention, {"proposal": "mixed", "weighting": "balance"}),
    (PerformerAttention, {}),
], ids=["lara-mean", "lara-learned", "lara-pool2d", "lara-pool2d-proj", "lara-mixed-balance", "performer"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_backward_shapes(cls, kw, training):
    m = _attn(cls, **kw).train(training)
    x = _x(N=12).requires_grad_()
    out, weights = m(x, x, x)
    assert out.shape == x.shape and weights is None
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if kw.get("landmarks") in ("learned",) or kw.get("landmark_proj"):
        assert m.q_landmark_proj[0].weight.grad.abs().sum() > 0


def test_cross_attention_kdim_vdim_and_layouts():
    m = _attn(LaraAttention, kdim=6, vdim=5).eval()
    assert m.in_proj_weight is None and m.k_proj_weight.shape == (E, 6)
    q, k, v = _x(N=7), _x(N=11, E=6, seed=1), _x(N=11, E=5, seed=2)
    out, _ = m(q, k, v)
    assert out.shape == (2, 7, E)
    # batch_first=False: same parameters, (L, B, E) layout
    m2 = _attn(LaraAttention, kdim=6, vdim=5, batch_first=False).eval()
    m2.load_state_dict(m.state_dict())
    out2, _ = m2(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    torch.testing.assert_close(out2.transpose(0, 1), out)
    # unbatched (L, E) as MHA accepts
    out3, _ = m(q[1], k[1], v[1])
    torch.testing.assert_close(out3, out[1], rtol=1e-5, atol=1e-6)


def test_mha_state_dict_loads_and_round_trip():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    m = _attn(LaraAttention)
    m.load_state_dict(mha.state_dict())                    # same parameter names and shapes
    torch.testing.assert_close(m.in_proj_weight, mha.in_proj_weight)
    for cls, kw in [(LaraAttention, {"landmarks": "learned"}), (PerformerAttention, {})]:
        a = _attn(cls, **kw).eval()
        torch.manual_seed(123)
        b = cls(E, H, num_samples=4, batch_first=True, **kw).eval()
        x = _x()
        assert not torch.equal(a(x, x, x)[0], b(x, x, x)[0])
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x, x, x)[0], b(x, x, x)[0], rtol=0, atol=0)
    assert "feature_seed" in PerformerAttention(E, H).state_dict()


def test_clear_errors():
    m = _attn(LaraAttention)
    x = _x()
    with pytest.raises(ValueError, match="need_weights"):
        m(x, x, x, need_weights=True)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(10, 10, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="is_causal"):
        m(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="float mask"):
        m(x, x, x, key_padding_mask=torch.full((2, 10), 0.5))
    with pytest.raises(TypeError, match="bool"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="perfect square"):
        LaraAttention(E, H, num_samples=5, landmarks="pool2d")
    with pytest.raises(ValueError, match="grid"):
        LaraAttention(E, H, num_samples=4, landmarks="pool2d")(x, x, x)
    with pytest.raises(ValueError, match="landmarks must be one of"):
        LaraAttention(E, H, landmarks="segments")
    with pytest.raises(ValueError, match="divisible"):
        LaraAttention(15, 2)


@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_num_samples_errors_match_the_functions(cls):
    # the layers share lara_attention's check: TypeError for a non-int, ValueError below 1
    for value, exc, pattern in [(2.5, TypeError, r"num_samples must be an int, got 2.5 \(float\)"),
                                (True, TypeError, r"num_samples must be an int, got True \(bool\)"),
                                ("4", TypeError, r"num_samples must be an int, got '4' \(str\)"),
                                (0, ValueError, r"num_samples must be >= 1, got 0")]:
        with pytest.raises(exc, match=pattern):
            cls(E, H, num_samples=value)
        x = _x().view(2, 10, H, E // H).transpose(1, 2)
        with pytest.raises(exc, match=pattern):
            (lara_attention if cls is LaraAttention else rfa_attention)(x, x, x, num_samples=value)
    assert cls(E, H, num_samples=3).num_samples == 3


# ---------------------------------------------------------------- same function as lara_attention

def test_equals_lara_attention_on_projected_inputs():
    m = _attn(LaraAttention, proposal="mixed", beta=2.0).eval()
    q, k, v = _x(N=9), _x(N=13, seed=1), _x(N=13, seed=2)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1, 10:] = True
    out, _ = m(q, k, v, key_padding_mask=kpm)
    qh, kh, vh = m.project(q, k, v)
    y = lara_attention(qh, kh, vh, num_samples=4, proposal="mixed", beta=2.0, key_padding_mask=kpm)
    torch.testing.assert_close(out, m.out_proj(y.transpose(1, 2).flatten(2)), rtol=0, atol=0)


def test_learned_landmarks_are_segment_means_then_proj():
    m = _attn(LaraAttention, landmarks="learned").eval()
    x = _x(N=11)
    qh, kh, vh = m.project(x, x, x)
    # mean of the segment means (before the projection) equals lara_attention's own landmarks
    c_eff = torch.full((2,), 4)
    pooled = segment_pool(qh, None, 4, c_eff)
    from lara_kernels.reference import segment_means
    torch.testing.assert_close(pooled, segment_means(qh, torch.ones(2, 11, dtype=torch.bool), 4, c_eff))
    ql, kl = m.compute_landmarks(qh, kh, None, None)
    torch.testing.assert_close(ql, m.q_landmark_proj(pooled))
    y = lara_attention(qh, kh, vh, num_samples=4, q_landmarks=ql, k_landmarks=kl)
    torch.testing.assert_close(m(x, x, x)[0], m.out_proj(y.transpose(1, 2).flatten(2)), rtol=0, atol=0)


def test_segment_pool_never_reads_padded_rows():
    # NaN in padded rows: the means of the valid rows are unchanged and finite
    x = torch.randn(2, H, 12, 8)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 7:] = True
    c_eff = torch.tensor([4, 4])
    clean = segment_pool(x, pad, 4, c_eff)
    dirty = segment_pool(x.masked_fill(pad[:, None, :, None], float("nan")), pad, 4, c_eff)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_pool2d_landmarks_are_2d_average_pools():
    m = _attn(LaraAttention, landmarks="pool2d", grid=(4, 4)).eval()
    qh = torch.arange(2 * H * 16 * 8, dtype=torch.float32).reshape(2, H, 16, 8)
    ql, _ = m.compute_landmarks(qh, qh, None, None)
    # landmark (0, 0) is the mean of tokens (0,0), (0,1), (1,0), (1,1) of the 4 x 4 grid
    torch.testing.assert_close(ql[:, :, 0], qh[:, :, [0, 1, 4, 5]].mean(2))
    torch.testing.assert_close(ql[:, :, 3], qh[:, :, [10, 11, 14, 15]].mean(2))


def test_performer_equals_rfa_attention_with_seeded_generator():
    m = _attn(PerformerAttention, seed=7).eval()
    x = _x()
    out = m(x, x, x)[0]
    # eval: the fixed features are randn((1, H, S, D)) from the seed, shared by every
    # batch element, so each element equals rfa_attention on it alone with that generator
    for b in range(2):
        qh, kh, vh = m.project(x[b:b + 1], x[b:b + 1], x[b:b + 1])
        y = rfa_attention(qh, kh, vh, num_samples=4, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(out[b:b + 1], m.out_proj(y.transpose(1, 2).flatten(2)), rtol=0, atol=0)
    # training: fresh features drawn exactly as rfa_attention draws them
    m.train()
    m.generator = torch.Generator().manual_seed(11)
    qh, kh, vh = m.project(x, x, x)
    y = rfa_attention(qh, kh, vh, num_samples=4, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(m(x, x, x)[0], m.out_proj(y.transpose(1, 2).flatten(2)), rtol=0, atol=0)


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_key_padding_mask_matches_unpadded_call(cls):
    m = _attn(cls).eval()
    x = _x(B=2, N=10)
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[0, 7:] = True
    out, _ = m(x, x, x, key_padding_mask=kpm)
    # element 0 alone without its padding
    alone, _ = m(x[:1, :7], x[:1, :7], x[:1, :7])
    torch.testing.assert_close(out[0, :7], alone[0], rtol=1e-5, atol=1e-6)
    # padded query rows carry no attention (out_proj of zeros)
    torch.testing.assert_close(out[0, 7:], m.out_proj.bias.expand(3, E))
    # MHA's float mask convention: 0 keep, -inf pad
    fmask = torch.zeros(2, 10).masked_fill(kpm, float("-inf"))
    torch.testing.assert_close(m(x, x, x, key_padding_mask=fmask)[0], out, rtol=0, atol=0)


def test_padding_leaves_learned_landmarks_and_grads_finite():
    m = _attn(LaraAttention, landmarks="learned")
    x = _x(B=3, N=8).requires_grad_()
    kpm = torch.zeros(3, 8, dtype=torch.bool)
    kpm[1, 2:] = True
    kpm[2, :] = True                                       # an all-padding element
    out, _ = m(x, x, x, key_padding_mask=kpm)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- randomness: train vs eval

def test_lara_eval_deterministic_train_redraws_and_follows_generator():
    m = _attn(LaraAttention)
    x = _x()
    m.eval()
    torch.testing.assert_close(m(x, x, x)[0], m(x, x, x)[0], rtol=0, atol=0)
    m.train()
    m.generator = torch.Generator().manual_seed(5)
    a, b = m(x, x, x)[0], m(x, x, x)[0]
    assert not torch.allclose(a, b)                        # a new eps every step
    m.generator = torch.Generator().manual_seed(5)
    torch.testing.assert_close(m(x, x, x)[0], a, rtol=0, atol=0)   # the generator decides
    # the eps is exactly lara_attention's draw with that generator
    qh, kh, vh = m.project(x, x, x)
    y = lara_attention(qh, kh, vh, num_samples=4, training=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, m.out_proj(y.transpose(1, 2).flatten(2)), rtol=0, atol=0)
    m.eval()
    assert not torch.allclose(m(x, x, x)[0], a)


def test_performer_eval_fixed_features_train_redraws():
    m = _attn(PerformerAttention).eval()
    x = _x()
    e1 = m(x, x, x)[0]
    torch.manual_seed(999)                                 # global RNG must not matter in eval
    torch.testing.assert_close(m(x, x, x)[0], e1, rtol=0, atol=0)
    m.train()
    m.generator = torch.Generator().manual_seed(3)
    a, b = m(x, x, x)[0], m(x, x, x)[0]
    assert not torch.allclose(a, b)
    m.generator = torch.Generator().manual_seed(3)
    torch.testing.assert_close(m(x, x, x)[0], a, rtol=0, atol=0)


# ---------------------------------------------------------------- encoder layer

@pytest.mark.parametrize("attention", ["lara", "performer", "softmax"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer(attention, norm_first):
    kw = {} if attention == "softmax" else {"num_samples": 4}
    torch.manual_seed(0)
    layer = LaraEncoderLayer(E, H, 32, dropout=0.0, norm_first=norm_first, batch_first=True, attention=attention,
                             **kw)
    x = _x().requires_grad_()
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, 8:] = True
    y = layer(x, src_key_padding_mask=kpm)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    if attention == "softmax":                             # the same computation as torch's layer
        ref = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, norm_first=norm_first, batch_first=True)
        ref.load_state_dict(layer.state_dict())
        torch.testing.assert_close(ref(x, src_key_padding_mask=kpm), y)


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("cls, kw", [(LaraAttention, {}), (LaraAttention, {"landmarks": "learned"}),
                                     (PerformerAttention, {})], ids=["lara", "lara-learned", "performer"])
def test_autocast_bf16(cls, kw):
    m = _attn(cls, **kw).eval()
    x = _x(B=2, N=16)
    ref = m(x, x, x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, x, x)[0]
        qb, _, _ = m.project(x, x, x)
    assert qb.dtype == torch.bfloat16                      # projections ran in bfloat16
    assert out.dtype == torch.bfloat16                     # as nn.MultiheadAttention under autocast
    # bfloat16 rounding of the float32 result alone is ~1.5e-3 here; observed ~5e-3
    assert _rel(out, ref) < 1e-2, _rel(out, ref)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("attention", ["lara", "performer"])
def test_short_training_loss_falls(attention):
    torch.manual_seed(0)
    model = nn.Sequential(
        LaraEncoderLayer(E, H, 32, dropout=0.0, norm_first=True, batch_first=True, attention=attention,
                         num_samples=4),
        nn.LayerNorm(E),
    )
    head = nn.Linear(E, 3)
    x = _x(B=12, N=8, seed=4)
    y = torch.arange(12) % 3
    x = x + 1.5 * F.one_hot(y, E).float()[:, None, :]     # a learnable signal
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(head(model(x).mean(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


# ---------------------------------------------------------------- custom op and torch.compile

def _op_inputs(dtype=torch.float64, landmarks=False, mask=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, s, 8, generator=g, dtype=dtype, requires_grad=True) for s in (9, 12, 12))
    kw = {}
    if landmarks:
        kw["q_landmarks"] = torch.randn(2, 2, 4, 8, generator=g, dtype=dtype, requires_grad=True)
        kw["k_landmarks"] = torch.randn(2, 2, 4, 8, generator=g, dtype=dtype, requires_grad=True)
    if mask:
        kpm = torch.zeros(2, 12, dtype=torch.bool)
        kpm[1, 9:] = True
        kw["key_padding_mask"] = kpm
    return (q, k, v), kw


@pytest.mark.parametrize("landmarks, mask, extra", [
    (False, False, {}),
    (True, True, {"proposal": "mixed", "beta": 2.0}),
    (False, True, {"weighting": "balance", "training": True}),
], ids=["plain", "landmarks-mask-mixed", "balance-train"])
def test_custom_op_matches_lara_attention(landmarks, mask, extra):
    (q, k, v), kw = _op_inputs(landmarks=landmarks, mask=mask)
    kw.update(extra, num_samples=4)
    y1 = lara_attention(q, k, v, generator=torch.Generator().manual_seed(1), **kw)
    y2 = lara_attention_op(q, k, v, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    leaves = [q, k, v] + [kw[n] for n in ("q_landmarks", "k_landmarks") if n in kw]
    g = torch.randn_like(y1)
    for a, b in zip(torch.autograd.grad(y1, leaves, g), torch.autograd.grad(y2, leaves, g)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_custom_op_opcheck():
    (q, k, v), _ = _op_inputs(dtype=torch.float32)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[0, 10:] = True
    lm = torch.randn(2, 2, 4, 8)
    op = torch.ops.lara_kernels.lara_attention.default
    scale = torch.tensor(0.35, dtype=torch.float64)        # the op takes scale as a 0-d tensor
    for args in [
        (q, k, v, None, None, None, None, None, 4, "segment", "optimal", 1.0, scale, "auto"),
        (q, k, v, torch.randn(2, 2, 4, 8), kpm, None, lm, lm.clone(), 4, "mixed", "optimal", 2.0, scale, "auto"),
    ]:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_two_layer_model_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(
        LaraEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, attention="lara", num_samples=4),
        LaraEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, attention="lara", num_samples=4,
                         landmarks="learned"),
    ).eval()
    x = _x()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")   # fullgraph: no graph breaks
    y_eager, y_comp = model(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    params = list(model.parameters())
    g_eager = torch.autograd.grad(y_eager.square().sum(), params)
    g_comp = torch.autograd.grad(y_comp.square().sum(), params)
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
