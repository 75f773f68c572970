"""The layers against the torch layers they replace: conventions, state dicts, arguments,
errors, unused parameters (CPU, small shapes)."""

import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lara_kernels import lara_attention, rfa_attention
from lara_kernels.nn import LaraAttention, LaraEncoderLayer, PerformerAttention

E, H = 16, 2


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seq(L, B, dim=E, seed=0, dtype=torch.float32):
    """(L, B, dim): MHA's default layout."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, B, dim, generator=g, dtype=dtype)


def _lara(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_samples", 4)
    return LaraAttention(E, H, **kw).eval()


# ---------------------------------------------------------------- layouts, as nn.MultiheadAttention

@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_default_layout_is_mhas_and_never_attends_across_the_batch(cls):
    assert cls(E, H).batch_first is False and nn.MultiheadAttention(E, H).batch_first is False
    torch.manual_seed(0)
    m = cls(E, H, num_samples=4).eval()
    x = _seq(7, 3)                                         # (L, B, E)
    out, w = m(x, x, x)
    assert w is None and out.shape == (7, 3, E)
    for b in range(3):                                     # element b alone, unbatched (L, E)
        alone, _ = m(x[:, b], x[:, b], x[:, b])
        torch.testing.assert_close(out[:, b], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_layouts_and_output_shapes_match_mha(cls):
    torch.manual_seed(0)
    seq_first = cls(E, H, num_samples=4, kdim=6, vdim=5).eval()
    batch_first = cls(E, H, num_samples=4, kdim=6, vdim=5, batch_first=True).eval()
    batch_first.load_state_dict(seq_first.state_dict())
    mha = nn.MultiheadAttention(E, H, kdim=6, vdim=5).eval()
    q, k, v = _seq(7, 2), _seq(11, 2, 6, seed=1), _seq(11, 2, 5, seed=2)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 8:] = True
    for args, kw in [((q, k, v), {}), ((q, k, v), {"key_padding_mask": kpm}),
                     ((q[:, 1], k[:, 1], v[:, 1]), {"key_padding_mask": kpm[1]})]:
        out, w = seq_first(*args, **kw)
        ref, _ = mha(*args, **kw, need_weights=False)
        assert w is None and out.shape == ref.shape
    out, _ = seq_first(q, k, v, key_padding_mask=kpm)
    out_bf, _ = batch_first(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), key_padding_mask=kpm)
    torch.testing.assert_close(out_bf.transpose(0, 1), out, rtol=0, atol=0)
    out_1, _ = seq_first(q[:, 1], k[:, 1], v[:, 1], key_padding_mask=kpm[1])
    torch.testing.assert_close(out_1, out[:, 1], rtol=1e-5, atol=1e-6)
    # MHA's float mask convention (0 keep, -inf pad) in every layout
    fmask = torch.zeros(2, 11).masked_fill(kpm, float("-inf"))
    torch.testing.assert_close(seq_first(q, k, v, key_padding_mask=fmask)[0], out, rtol=0, atol=0)
    torch.testing.assert_close(seq_first(q[:, 1], k[:, 1], v[:, 1], key_padding_mask=fmask[1])[0], out_1,
                               rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{}, {"kdim": 6, "vdim": 5}, {"bias": False}], ids=["packed", "kdim-vdim", "no-bias"])
def test_parameter_names_and_state_dict_round_trips_with_mha(kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **kw)
    lara = LaraAttention(E, H, num_samples=4, **kw)
    perf = PerformerAttention(E, H, num_samples=4, **kw)
    names = {n: p.shape for n, p in mha.named_parameters()}
    assert {n: p.shape for n, p in lara.named_parameters()} == names
    assert {n: p.shape for n, p in perf.named_parameters()} == names
    lara.load_state_dict(mha.state_dict(), strict=True)
    perf.load_state_dict(mha.state_dict(), strict=True)     # feature_seed absent: the layer keeps its seed
    for n, p in mha.named_parameters():
        assert torch.equal(dict(lara.named_parameters())[n], p) and torch.equal(dict(perf.named_parameters())[n], p)
    back = nn.MultiheadAttention(E, H, **kw)
    back.load_state_dict(lara.state_dict(), strict=True)   # and the other way
    for n, p in back.named_parameters():
        assert torch.equal(dict(lara.named_parameters())[n], p)
    missing, unexpected = back.load_state_dict(perf.state_dict(), strict=False)
    assert missing == [] and unexpected == ["feature_seed"]


def test_performer_eval_features_survive_state_dict_and_mha_loads():
    torch.manual_seed(0)
    a = PerformerAttention(E, H, num_samples=4).eval()
    b = PerformerAttention(E, H, num_samples=4).eval()
    x = _seq(9, 2)
    assert not torch.equal(a(x, x, x)[0], b(x, x, x)[0])
    with tempfile.TemporaryDirectory() as d:               # through a file, as a checkpoint
        path = os.path.join(d, "performer.pt")
        torch.save(a.state_dict(), path)
        b.load_state_dict(torch.load(path), strict=True)
    torch.testing.assert_close(b(x, x, x)[0], a(x, x, x)[0], rtol=0, atol=0)
    seed_before = int(b.feature_seed)
    y_before = b(x, x, x)[0]
    mha = nn.MultiheadAttention(E, H)
    b.load_state_dict(mha.state_dict(), strict=True)
    assert int(b.feature_seed) == seed_before
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x, x, x)[0], y_before, rtol=0, atol=0)
    # dtype casts never round the fixed features: a float64 copy uses the same float32 draw
    c = copy.deepcopy(a).double()
    torch.testing.assert_close(c.eval_features(), a.eval_features(), rtol=0, atol=0)
    assert c.eval_features().dtype == torch.float32


def test_numerics_equal_an_explicit_reimplementation_with_lara_attention():
    # MHA's weights, MHA's layout; the layer is lara_attention on the projected q, k, v
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dtype=torch.float64)
    m = LaraAttention(E, H, num_samples=4, proposal="mixed", beta=2.0, dtype=torch.float64).eval()
    m.load_state_dict(mha.state_dict(), strict=True)
    q, k = _seq(9, 2, dtype=torch.float64), _seq(13, 2, seed=1, dtype=torch.float64)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[0, 10:] = True
    out, _ = m(q, k, k, key_padding_mask=kpm)
    wq, wk, wv = mha.in_proj_weight.split(E)
    bq, bk, bv = mha.in_proj_bias.split(E)

    def heads(x):                                          # (L, B, E) -> (B, H, L, E // H)
        return x.reshape(x.shape[0], x.shape[1], H, E // H).permute(1, 2, 0, 3)

    y = lara_attention(heads(F.linear(q, wq, bq)), heads(F.linear(k, wk, bk)), heads(F.linear(k, wv, bv)),
                       num_samples=4, proposal="mixed", beta=2.0, key_padding_mask=kpm)
    ref = F.linear(y.permute(2, 0, 1, 3).reshape(9, 2, E), mha.out_proj.weight, mha.out_proj.bias)
    # float64, same operations in another order: rounding only
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- self-attention's query mask

def test_query_mask_from_key_mask_only_for_the_same_tensor():
    m = _lara(batch_first=True)
    x = torch.randn(2, 10, E)
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, 6:] = True
    out, _ = m(x, x, x, key_padding_mask=kpm)              # query is key: padded queries masked
    torch.testing.assert_close(out[1, 6:], m.out_proj.bias.expand(4, E))
    explicit, _ = m(x, x.clone(), x.clone(), key_padding_mask=kpm, query_padding_mask=kpm)
    torch.testing.assert_close(explicit, out, rtol=0, atol=0)
    # equal values in another tensor are cross-attention: no query mask is guessed
    cross, _ = m(x, x.clone(), x.clone(), key_padding_mask=kpm)
    assert not torch.allclose(cross[1, 6:], m.out_proj.bias.expand(4, E))


# ---------------------------------------------------------------- nn.TransformerEncoderLayer / Encoder

def test_encoder_layer_takes_torch_arguments_and_defaults():
    ref = nn.TransformerEncoderLayer(E, H)
    layer = LaraEncoderLayer(E, H, num_samples=4)
    assert layer.batch_first is False and ref.self_attn.batch_first is False
    assert layer.linear1.out_features == ref.linear1.out_features == 2048
    assert layer.dropout.p == ref.dropout.p and layer.norm1.eps == ref.norm1.eps
    # positional arguments in torch's order
    pos = LaraEncoderLayer(E, H, 32, 0.0, "gelu", 1e-6, True, True, False, num_samples=4)
    assert (pos.linear1.out_features, pos.dropout.p, pos.activation, pos.norm1.eps, pos.batch_first,
            pos.norm_first, pos.linear1.bias) == (32, 0.0, F.gelu, 1e-6, True, True, None)
    with pytest.raises(RuntimeError, match="activation should be relu/gelu, not tanh") as ours:
        LaraEncoderLayer(E, H, activation="tanh")
    with pytest.raises(type(ours.value)):
        nn.TransformerEncoderLayer(E, H, activation="tanh")


@pytest.mark.parametrize("activation", ["relu", "gelu", F.silu], ids=["relu", "gelu", "callable"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_softmax_encoder_layer_equals_torchs(activation, batch_first):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, activation=activation, batch_first=batch_first).eval()
    layer = LaraEncoderLayer(E, H, 32, dropout=0.0, activation=activation, batch_first=batch_first,
                             attention="softmax").eval()
    layer.load_state_dict(ref.state_dict(), strict=True)
    x = _seq(10, 2)
    x = x.transpose(0, 1) if batch_first else x
    kpm = torch.zeros(2, 10, dtype=torch.bool)
    kpm[1, 7:] = True
    with torch.no_grad():                                  # torch's fast path and ours: same function
        torch.testing.assert_close(layer(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm))
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize("attention", ["lara", "performer"])
def test_encoder_layer_loads_torchs_state_dict_and_stacks_in_transformer_encoder(attention):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0)
    layer = LaraEncoderLayer(E, H, 32, dropout=0.0, attention=attention, num_samples=4)
    layer.load_state_dict(ref.state_dict(), strict=True)
    back = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0)
    back.load_state_dict(layer.state_dict(), strict=attention == "lara")
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = _seq(10, 3)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[2, 6:] = True
    # nn.TransformerEncoder turns the bool mask into a float 0 / -inf one: same result
    y = enc(x, src_key_padding_mask=kpm)
    manual = x
    for mod in enc.layers:
        manual = mod(manual, src_key_padding_mask=kpm)
    torch.testing.assert_close(y, manual, rtol=0, atol=0)
    assert y.shape == (10, 3, E) and torch.isfinite(y).all()
    for b in range(3):                                     # each element alone, its padding removed
        n = int((~kpm[b]).sum())
        alone = enc(x[:n, b:b + 1])
        torch.testing.assert_close(y[:n, b:b + 1], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- constructor arguments

@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_constructor_validates_arguments(cls):
    for kw, exc, pattern in [
        ({"embed_dim": 0}, ValueError, r"embed_dim must be >= 1, got 0"),
        ({"embed_dim": 16.0}, TypeError, r"embed_dim must be an int, got 16.0"),
        ({"num_heads": -2}, ValueError, r"num_heads must be >= 1, got -2"),
        ({"num_heads": 3}, ValueError, r"embed_dim must be divisible by num_heads, got embed_dim=16 and num_heads=3"),
        ({"dropout": 1.5}, ValueError, r"dropout probability has to be between 0 and 1, but got 1.5"),
        ({"dropout": "0.1"}, TypeError, r"dropout must be a real number, got '0.1'"),
        ({"bias": 1}, TypeError, r"bias must be a bool, got 1"),
        ({"batch_first": None}, TypeError, r"batch_first must be a bool, got None"),
        ({"kdim": 0}, ValueError, r"kdim must be >= 1, got 0"),
        ({"add_bias_kv": True}, NotImplementedError, r"add_bias_kv=True"),
        ({"add_zero_attn": True}, NotImplementedError, r"add_zero_attn=True"),
        ({"backend": "gpu"}, ValueError, r"backend must be 'auto' or one of .*, got 'gpu'"),
        ({"generator": 3}, TypeError, r"generator must be a torch.Generator or None, got int"),
    ]:
        args = {"embed_dim": E, "num_heads": H, **kw}
        with pytest.raises(exc, match=pattern):
            cls(args.pop("embed_dim"), args.pop("num_heads"), **args)
    if cls is LaraAttention:
        with pytest.raises(ValueError, match=r"beta must be a finite number, got nan"):
            cls(E, H, beta=float("nan"))
        with pytest.raises(TypeError, match=r"landmark_proj must be a bool"):
            cls(E, H, landmarks="pool2d", num_samples=4, landmark_proj="yes")
    else:
        with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
            cls(E, H, seed=-1)


def test_encoder_layer_validates_arguments():
    for kw, exc, pattern in [
        ({"dim_feedforward": 0}, ValueError, r"dim_feedforward must be >= 1, got 0"),
        ({"dropout": -0.1}, ValueError, r"dropout probability has to be between 0 and 1, but got -0.1"),
        ({"layer_norm_eps": 0.0}, ValueError, r"layer_norm_eps must be a positive finite number, got 0.0"),
        ({"activation": 3}, TypeError, r"activation must be 'relu', 'gelu' or a callable, got 3"),
        ({"norm_first": "no"}, TypeError, r"norm_first must be a bool"),
        ({"attention": "linear"}, ValueError, r"attention must be one of 'lara', 'performer', 'softmax', got 'linear'"),
        ({"nhead": 5}, ValueError, r"embed_dim must be divisible by num_heads, got embed_dim=16 and num_heads=5"),
    ]:
        args = {"d_model": E, "nhead": H, **kw}
        with pytest.raises(exc, match=pattern):
            LaraEncoderLayer(args.pop("d_model"), args.pop("nhead"), **args)
    layer = LaraEncoderLayer(E, H, 32, num_samples=4)
    x = _seq(5, 2)
    with pytest.raises(NotImplementedError, match="src_mask and is_causal"):
        layer(x, src_mask=torch.zeros(5, 5))


# ---------------------------------------------------------------- errors name the caller's shapes

def test_shape_errors_name_the_callers_shapes():
    m = _lara()                                            # batch_first=False: (L, B, E)
    q, k = _seq(7, 2), _seq(9, 2, seed=1)
    cases = [
        ((q, k, k[:8]), {}, r"key and value must have the same sequence length \(dim 0\), got key of shape "
                            r"\(9, 2, 16\) and value of shape \(8, 2, 16\)"),
        ((q, k[:, :1], k[:, :1]), {}, r"query and key must have the same batch size \(dim 1 with batch_first=False\), "
                                      r"got query of shape \(7, 2, 16\) and key of shape \(9, 1, 16\)"),
        ((q, k, k), {"key_padding_mask": torch.zeros(9, 2, dtype=torch.bool)},
         r"key_padding_mask must have shape \(batch, source length\) = \(2, 9\) for key of shape \(9, 2, 16\) "
         r"\(batch_first=False\), got \(9, 2\)"),
        ((q, k, k), {"query_padding_mask": torch.zeros(2, 9, dtype=torch.bool)},
         r"query_padding_mask must have shape \(batch, target length\) = \(2, 7\) for query of shape \(7, 2, 16\)"),
        ((q[:, 0], k[:, 0], k[:, 0]), {"key_padding_mask": torch.zeros(1, 9, dtype=torch.bool)},
         r"key_padding_mask must have shape \(source length,\) = \(9,\) for key of shape \(9, 16\), got \(1, 9\)"),
        ((q, k[..., :6], k), {}, r"key's last dimension must be kdim=16, got key of shape \(9, 2, 6\)"),
        ((q, k[:, 0], k), {}, r"key must be 3-D like query, got key of shape \(9, 16\)"),
        ((q[None], k, k), {}, r"query must be 3-D \(batched\) or 2-D \(unbatched\), got shape \(1, 7, 2, 16\)"),
    ]
    for args, kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            m(*args, **kw)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool \(True = padding\) or float"):
        m(q, k, k, key_padding_mask=torch.zeros(2, 9, dtype=torch.long))
    bad = torch.zeros(2, 9)
    bad[1, 4] = 0.5
    with pytest.raises(ValueError, match=r"float mask with values other than 0 and -inf \(first 0.5 at index \(1, 4\)"):
        m(q, k, k, key_padding_mask=bad)


@pytest.mark.parametrize("cls", [LaraAttention, PerformerAttention])
def test_check_finite_index_is_in_the_callers_layout(cls):
    torch.manual_seed(0)
    m = cls(E, H, num_samples=4, check_finite=True).eval()   # (L, B, E)
    x = _seq(8, 2)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 6:] = True
    dirty = x.clone()
    dirty[7, 1, 3] = float("nan")                          # a padded position: accepted
    torch.testing.assert_close(m(dirty, dirty, dirty, key_padding_mask=pad)[0][:6],
                               m(x, x, x, key_padding_mask=pad)[0][:6], rtol=0, atol=0)
    dirty[5, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"check_finite: query has 1 non-finite value \(first inf at index "
                                         r"\(5, 0, 2\) of shape \(8, 2, 16\)\)"):
        m(dirty, dirty, dirty, key_padding_mask=pad)
    k = x.clone()
    k[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"check_finite: key has 1 non-finite value \(first nan at index \(2, 1, 0\)"):
        m(x, k, x)
    u = x[:, 0].clone()                                    # unbatched (L, E)
    u[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"check_finite: query has 1 non-finite value \(first nan at index \(3, 0\) "
                                         r"of shape \(8, 16\)\)"):
        m(u, x[:, 0], x[:, 0])
    with torch.no_grad():
        m.in_proj_weight[E + 1, 0] = float("nan")          # a broken key projection
    with pytest.raises(ValueError, match=r"check_finite: projected key has 16 non-finite values \(first nan at "
                                         r"index \(0, 0, 1\) of shape \(8, 2, 16\)\)"):
        m(x, x, x)


# ---------------------------------------------------------------- only the parameters a configuration uses

CONFIGS = [(p, w, lm, proj) for p in ("segment", "mixed", "attend") for w in ("optimal", "balance")
           for lm, proj in (("mean", False), ("learned", True), ("pool2d", False), ("pool2d", True))]


@pytest.mark.parametrize("proposal, weighting, landmarks, proj", CONFIGS,
                         ids=["-".join(map(str, c)) for c in CONFIGS])
def test_every_parameter_gets_a_gradient(proposal, weighting, landmarks, proj):
    torch.manual_seed(0)
    m = LaraAttention(E, H, num_samples=4, proposal=proposal, weighting=weighting, landmarks=landmarks,
                      landmark_proj=proj, grid=(3, 3), batch_first=True)
    assert (m.k_landmark_proj is not None) == (proj and proposal != "attend")
    x = torch.randn(2, 9, E)
    for training in (True, False):
        m.train(training).zero_grad(set_to_none=True)
        m(x, x, x)[0].square().sum().backward()
        unused = [n for n, p in m.named_parameters() if p.grad is None]
        assert unused == [], unused


def test_ddp_without_find_unused_parameters():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            layer = LaraEncoderLayer(E, H, 32, dropout=0.0, batch_first=True, num_samples=4, proposal="attend",
                                     landmarks="learned")
            ddp = nn.parallel.DistributedDataParallel(layer, find_unused_parameters=False)
            x = torch.randn(2, 9, E)
            for _ in range(2):   # DDP raises at the second step if a parameter got no gradient
                ddp.zero_grad()
                ddp(x).square().sum().backward()
            assert all(p.grad is not None for p in layer.parameters())
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("cls, kw", [(LaraAttention, {}), (LaraAttention, {"landmarks": "learned"}),
                                     (PerformerAttention, {})], ids=["lara", "lara-learned", "performer"])
def test_autocast_never_casts_float64(cls, kw):
    torch.manual_seed(0)
    m = cls(E, H, num_samples=4, dtype=torch.float64, **kw).eval()
    x = _seq(9, 2, dtype=torch.float64)
    ref = m(x, x, x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, x, x)[0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_custom_op_casts_under_autocast_as_the_function():
    from lara_kernels._custom_ops import lara_attention_op

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (9, 12, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_op = lara_attention_op(q, k, v, num_samples=4)
        y_fn = lara_attention(q, k, v, num_samples=4)
        mixed = lara_attention_op(q, k.bfloat16(), v, num_samples=4)      # float32 / bfloat16 mixed
        y64 = lara_attention_op(q.double(), k.double(), v.double(), num_samples=4)
    assert y_op.dtype == y_fn.dtype == mixed.dtype == torch.bfloat16 and y64.dtype == torch.float64
    torch.testing.assert_close(y_op, y_fn, rtol=0, atol=0)
    torch.testing.assert_close(mixed, y_fn, rtol=0, atol=0)
    torch.testing.assert_close(y64, lara_attention(q.double(), k.double(), v.double(), num_samples=4),
                               rtol=0, atol=0)
