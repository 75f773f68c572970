"""lara_kernels.nn.convert: nn.MultiheadAttention -> LaraAttention in an existing model."""

import pytest
import torch
from torch import nn

from lara_kernels import lara_attention
from lara_kernels.nn import LaraAttention, convert


def _encoder(batch_first, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).double().eval()


def _hand_written(mha_state, x, pad, num_samples):
    """One layer of LARA written out from the MHA weights: (B, L, E) -> (B, L, E)."""
    E, H = 16, 4
    w, b = mha_state["in_proj_weight"], mha_state["in_proj_bias"]
    q, k, v = (torch.nn.functional.linear(x, w[i * E:(i + 1) * E], b[i * E:(i + 1) * E]) for i in range(3))
    heads = [t.unflatten(-1, (H, E // H)).transpose(1, 2) for t in (q, k, v)]
    y = lara_attention(*heads, num_samples=num_samples, padding_mask=pad)
    y = y.transpose(1, 2).flatten(2)
    return torch.nn.functional.linear(y, mha_state["out_proj.weight"], mha_state["out_proj.bias"])


@pytest.mark.parametrize("batch_first", [False, True])
def test_convert_transformer_encoder(batch_first):
    model = _encoder(batch_first)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = convert(model, num_samples=4)
    assert out is model
    for layer in model.layers:
        assert isinstance(layer.self_attn, LaraAttention)
        assert layer.self_attn.batch_first == batch_first
        assert layer.self_attn.num_samples == 4
        assert not layer.self_attn.training
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)

    # The converted model computes LARA with the kept weights: first layer written by hand
    # (post-norm encoder layer, relu feed-forward, no dropout in eval), float64.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)             # (B, L, E)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    layer = model.layers[0]
    sa = _hand_written(before_layer_state(before, 0), x, pad, 4)
    h = layer.norm1(x + sa)
    want = layer.norm2(h + layer.linear2(torch.relu(layer.linear1(h))))
    xin = x if batch_first else x.transpose(0, 1)
    got = layer(xin, src_key_padding_mask=pad)
    got = got if batch_first else got.transpose(0, 1)
    valid = ~pad
    # float64 end to end; same operations in another grouping: a few ulps
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-12)

    # padded batch: each sequence gets the result it gets alone (both layers)
    full = model(xin, src_key_padding_mask=pad)
    full = full if batch_first else full.transpose(0, 1)
    alone = model(x[1:2, :5] if batch_first else x[1:2, :5].transpose(0, 1))
    alone = alone if batch_first else alone.transpose(0, 1)
    torch.testing.assert_close(full[1, :5], alone[0], rtol=1e-10, atol=1e-12)

    # gradients reach every parameter
    model.train()
    model(xin, src_key_padding_mask=pad).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def before_layer_state(state, i):
    prefix = f"layers.{i}.self_attn."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_convert_kdim_vdim_shared_and_root():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, bias=False, batch_first=True).double()
    holder = nn.ModuleDict({"a": mha, "b": mha})         # one module under two names
    convert(holder, num_samples=2)
    assert isinstance(holder["a"], LaraAttention) and holder["a"] is holder["b"]
    for k, v in mha.state_dict().items():
        torch.testing.assert_close(holder["a"].state_dict()[k], v, rtol=0, atol=0)
    assert holder["a"].kdim == 6 and holder["a"].vdim == 5 and holder["a"].in_proj_bias is None
    root = convert(nn.MultiheadAttention(8, 2), num_samples=2)
    assert isinstance(root, LaraAttention) and root.batch_first is False


def test_convert_learned_landmarks_adds_only_landmark_parameters():
    model = _encoder(True)
    keys = set(model.state_dict())
    convert(model, num_samples=4, landmarks="learned")
    new = set(model.state_dict()) - keys
    assert new and all("landmark_proj" in k for k in new)
    assert keys <= set(model.state_dict())


def test_convert_refuses_what_lara_cannot_do_and_leaves_model_unchanged():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(NotImplementedError, match="add_bias_kv=True"):
        convert(model)
    assert all(isinstance(m, nn.MultiheadAttention) for m in model)
    with pytest.raises(ValueError, match="num_samples"):
        convert(nn.Sequential(nn.MultiheadAttention(8, 2)), num_samples=0)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        convert("model")
    # a causal call on a converted model raises instead of running bidirectionally
    model = convert(_encoder(True), num_samples=4)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        model(x, mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64), is_causal=True)
