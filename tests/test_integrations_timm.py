"""lara_kernels.integrations.timm: LARA as timm's attention layer, and convert().

timm needs torchvision, and the torchvision wheels the package index serves are built
against torch's CUDA build: with the CPU torch this project pins, ``import torchvision``
fails. CI therefore runs this file in a second venv with torch's CUDA build (it runs on
a CPU), made by .ci/integrations.sh; in the main venv the file skips, naming the error.
"""

import math

import pytest
import torch

try:
    import timm
    from timm.models.vision_transformer import VisionTransformer
except Exception as exc:  # noqa: BLE001  (ImportError, or torchvision's RuntimeError on a CPU torch)
    pytest.skip(f"timm cannot be imported here ({type(exc).__name__}: {exc}); CI runs this file in the "
                ".venv-timm made by .ci/integrations.sh", allow_module_level=True)


from lara_kernels import lara_attention  # noqa: E402
from lara_kernels.integrations.timm import LaraTimmAttention, convert, lara_attn_layer  # noqa: E402


def _vit(attn_layer=None, reg_tokens=0, class_token=True, seed=0, **kw):
    torch.manual_seed(seed)
    extra = {} if attn_layer is None else {"attn_layer": attn_layer}
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                             reg_tokens=reg_tokens, class_token=class_token, global_pool="token" if class_token
                             else "avg", **extra, **kw).double()


def _img(B=2, seed=0):
    return torch.randn(B, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_tiny_vit_with_the_layer_forward_backward_and_softmax_checkpoint_strict():
    model = _vit(lara_attn_layer(num_samples=4, landmarks="pool2d"), reg_tokens=2)
    assert all(isinstance(b.attn, LaraTimmAttention) for b in model.blocks)
    assert model.blocks[0].attn.num_prefix_tokens == 1          # default; convert() reads the model's
    for b in model.blocks:
        b.attn.num_prefix_tokens = model.num_prefix_tokens
    model.train()
    out = model(_img())
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # a softmax checkpoint loads with strict=True (same parameter names)
    softmax = _vit(reg_tokens=2, seed=1)
    model.load_state_dict(softmax.state_dict(), strict=True)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), softmax.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def _hand_written_attention(attn_module, x, C, P, grid, side):
    """timm Attention's projections + lara_attention with prefix + 2-D pooled landmarks, by hand."""
    B, N, E = x.shape
    H = attn_module.num_heads
    D = E // H
    q, k, v = attn_module.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    h, w = grid

    def lm(t):
        patches = t[:, :, P:].reshape(B, H, h, w, D)
        s = h // side
        pooled = patches.reshape(B, H, side, s, side, s, D).mean(dim=(3, 5)).reshape(B, H, side * side, D)
        return torch.cat([t[:, :, :P], pooled], 2)

    y = lara_attention(q, k, v, num_samples=C + P, q_landmarks=lm(q), k_landmarks=lm(k), scale=D ** -0.5)
    return attn_module.proj(y.transpose(1, 2).reshape(B, N, E))


@pytest.mark.parametrize("class_token,reg_tokens", [(True, 0), (True, 4), (False, 0)])
def test_convert_keeps_state_dict_and_prefix_tokens_get_their_own_landmarks(class_token, reg_tokens):
    model = _vit(reg_tokens=reg_tokens, class_token=class_token).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _img()
    softmax_out = model(x)
    assert convert(model, num_samples=4, landmarks="pool2d") is model
    P = model.num_prefix_tokens
    assert P == int(class_token) + reg_tokens
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    for b in model.blocks:
        assert isinstance(b.attn, LaraTimmAttention)
        assert b.attn.num_prefix_tokens == P and b.attn.grid == (4, 4) and not b.attn.training
    # each block's attention equals the hand-written LARA call (float64, eval)
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for b in model.blocks:
        xin = b.norm1(tokens)
        # same float64 operations, possibly grouped differently: a few ulps
        torch.testing.assert_close(b.attn(xin), _hand_written_attention(b.attn, xin, 4, P, (4, 4), 2),
                                   rtol=1e-10, atol=1e-12)
        tokens = b(tokens)
    out = model(x)
    assert torch.isfinite(out).all() and (out - softmax_out).abs().max() > 1e-6   # LARA, not softmax


def test_prefix_landmarks_are_the_prefix_tokens_and_pooled_patches():
    layer = LaraTimmAttention(16, 2, num_samples=4, landmarks="pool2d", num_prefix_tokens=3).double()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 3 + 16, 8, generator=g, dtype=torch.float64)
    ql, kl, C = layer.compute_landmarks(q, q)
    assert C == 4 + 3 and ql.shape == (2, 2, 7, 8)
    torch.testing.assert_close(ql[:, :, :3], q[:, :, :3], rtol=0, atol=0)
    grid = q[:, :, 3:].reshape(2, 2, 4, 4, 8)
    top_left = grid[:, :, :2, :2].mean(dim=(2, 3))
    torch.testing.assert_close(ql[:, :, 3], top_left, rtol=1e-12, atol=1e-12)
    # a non-square grid needs grid=(h, w)
    with pytest.raises(ValueError, match="square number of patch tokens"):
        layer.compute_landmarks(q[:, :, :3 + 12], q[:, :, :3 + 12])
    rect = LaraTimmAttention(16, 2, num_samples=4, landmarks="pool2d", num_prefix_tokens=3, grid=(3, 4)).double()
    ql, _, _ = rect.compute_landmarks(q[:, :, :15], q[:, :, :15])
    assert ql.shape == (2, 2, 7, 8)


def test_other_landmarks_and_errors():
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    for lm in ("mean", "learned"):
        layer = LaraTimmAttention(16, 2, qkv_bias=True, num_samples=4, landmarks=lm).double().train()
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and all(p.grad is not None for p in layer.parameters())
    layer = LaraTimmAttention(16, 2, num_samples=4).double().eval()
    with pytest.raises(NotImplementedError, match="attn_mask"):
        layer(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="non-causal"):
        layer(x, is_causal=True)
    with pytest.raises(ValueError, match="perfect square"):
        LaraTimmAttention(16, 2, num_samples=5, landmarks="pool2d")
    with pytest.raises(TypeError, match="unknown argument"):
        lara_attn_layer(num_sample=4)
    with pytest.raises(ValueError, match="no timm.layers.Attention"):
        convert(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_samples"):
        convert(_vit(), num_samples=0)
    # eval is deterministic, training draws
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert (layer(x) - layer(x)).abs().max() > 0
    assert math.isqrt(4) == 2 and timm.__version__
