"""The transformer's variants: each config field builds, caches consistently and round-trips."""

import math

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit.config import PRESETS, ConfigError, ModelConfig
from llmkit.model import Transformer, alibi_slopes, build_model

BASE = dict(vocab_size=128, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)
VARIANTS = {
    "llama": dict(),
    "mqa": dict(n_kv_head=1),
    "layernorm-gelu": dict(norm="layernorm", activation="gelu", qkv_bias=True, mlp_bias=True),
    "geglu": dict(activation="geglu"),
    "relu-learned": dict(activation="relu", position="learned"),
    "alibi": dict(position="alibi"),
    "alibi-6-heads": dict(position="alibi", n_head=6, d_model=48),
    "no-positions": dict(position="none"),
    "post-ln": dict(norm_placement="post", norm="layernorm"),
    "deepnorm": dict(norm_placement="deepnorm", norm="layernorm"),
    "parallel": dict(parallel_block=True),
    "sliding-window": dict(sliding_window=5),
    "partial-rope": dict(rope_partial_factor=0.5),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16),
    "prefix-lm": dict(mask="prefix"),
    "tied": dict(tie_embeddings=True),
}


def build(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**BASE, **VARIANTS[name]})).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decode_equals_full_forward(name):
    model = build(name)
    ids = torch.randint(0, 128, (2, 20))
    prefix = 6 if name == "prefix-lm" else None
    with torch.no_grad():
        full = model(ids, prefix_len=prefix)
        model.setup_cache(2, 20)
        step = [model(ids[:, :8], prefix_len=prefix, slots=torch.arange(8), kv_len=8)]
        for t in range(8, 20):
            step.append(model(ids[:, t:t + 1], prefix_len=prefix, slots=torch.tensor([t]), kv_len=t + 1))
        cached = torch.cat(step, 1)
        # the static (compilable) form reads every slot of the cache and masks the unfilled ones
        model.setup_cache(2, 20)
        static = [model(ids[:, :8], prefix_len=prefix, slots=torch.arange(8))]
        for t in range(8, 20):
            static.append(model(ids[:, t:t + 1], prefix_len=prefix, slots=torch.tensor([t])))
        model.clear_cache()
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(static, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padding_does_not_change_a_row(name):
    model = build(name)
    ids = torch.randint(1, 128, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    prefix_alone = 3 if name == "prefix-lm" else None
    prefix_padded = 7 if name == "prefix-lm" else None
    with torch.no_grad():
        alone = model(ids, prefix_len=prefix_alone)
        batched = model(padded, attention_mask=mask, prefix_len=prefix_padded)[:, 4:]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "alibi", "relu-learned", "mqa"])
def test_given_mask_with_cache_equals_full_forward(name):
    """A caller's own bool mask and positions (as a token tree or a paged cache passes) give the built mask's logits."""
    model = build(name)
    ids = torch.randint(0, 128, (2, 12))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 16)
        head = model(ids[:, :9], slots=torch.arange(9), position_ids=torch.arange(9).expand(2, -1),
                     attn_mask=causal[:9, :9].expand(2, 1, 9, 9).contiguous(), kv_len=9)
        # three new tokens over all 16 slots: the unwritten ones masked out by the caller
        allowed = torch.zeros(2, 1, 3, 16, dtype=torch.bool)
        allowed[..., :12] = causal[9:12]
        tail = model(ids[:, 9:], slots=torch.arange(9, 12), position_ids=torch.arange(9, 12).expand(2, -1),
                     attn_mask=allowed)
        model.clear_cache()
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-5, rtol=1e-5)


def test_given_mask_needs_positions_and_its_shape():
    model = build("llama")
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), attn_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be"):
        model(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.arange(3)[None],
              attn_mask=torch.ones(1, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip(name, tmp_path):
    model = build(name)
    llmkit.save(model, None, tmp_path / "ckpt")
    again, _ = llmkit.load(tmp_path / "ckpt")
    assert again.config == model.config
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def naive_attention(q, k, v, allowed, bias=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return F.softmax(scores, -1) @ v


def test_prefix_lm_is_bidirectional_inside_the_prefix_only():
    model = build("prefix-lm")
    ids = torch.randint(0, 128, (1, 12))
    changed = ids.clone()
    changed[0, 4] = (ids[0, 4] + 1) % 128
    with torch.no_grad():
        a, b = model(ids, prefix_len=6), model(changed, prefix_len=6)
        c, d = model(ids), model(changed)
    assert not torch.allclose(a[0, 2], b[0, 2])  # position 2 sees position 4 inside the prefix
    torch.testing.assert_close(c[0, :4], d[0, :4])  # causal: earlier positions never see it


def test_sliding_window_limits_what_a_token_sees():
    model = build("sliding-window")
    ids = torch.randint(0, 128, (1, 16))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 128
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # two layers of window 5: token 0 can reach at most positions 0..8
    assert not torch.allclose(a[0, 8], b[0, 8])
    torch.testing.assert_close(a[0, 9:], b[0, 9:])


def test_alibi_bias_equals_naive_attention():
    model = build("alibi")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 7, 32)
    out = attn(x, _context(model, 7))
    q = attn.q_proj(x).view(1, 7, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 7, 4, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 7, 4, 8).transpose(1, 2)
    i = torch.arange(7)
    bias = -alibi_slopes(4).view(1, 4, 1, 1) * (i[:, None] - i[None, :]).float()
    y = naive_attention(q, k, v, torch.tril(torch.ones(7, 7, dtype=torch.bool)), bias)
    expected = attn.o_proj(y.transpose(1, 2).reshape(1, 7, 32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert alibi_slopes(8).tolist() == [2 ** -(i + 1) for i in range(8)]


def _context(model, T):
    from llmkit.model import ForwardContext, build_mask

    mask = build_mask(model.config, torch.arange(T), T, None, None, model.model._alibi, torch.float32)
    return ForwardContext(None, None, mask, False, None, None)


def test_deepnorm_residual_scale_and_init():
    model = build("deepnorm")
    cfg = model.config
    assert cfg.deepnorm_alpha == pytest.approx((2 * 2) ** 0.25)
    assert cfg.deepnorm_beta == pytest.approx((8 * 2) ** -0.25)
    v = model.model.layers[0].self_attn.v_proj.weight
    xavier_std = math.sqrt(2.0 / (v.shape[0] + v.shape[1]))
    assert v.std().item() == pytest.approx(xavier_std * cfg.deepnorm_beta, rel=0.2)


def test_scaled_residual_init():
    model = Transformer(ModelConfig(**dict(BASE, d_model=256, d_ff=512, n_layer=8)))
    o = model.model.layers[0].self_attn.o_proj.weight.std().item()
    q = model.model.layers[0].self_attn.q_proj.weight.std().item()
    assert o == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert q == pytest.approx(0.02, rel=0.1)


def test_activation_checkpointing_gives_same_gradients():
    model = build("llama").train()
    ids = torch.randint(0, 128, (2, 10))
    model(ids).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_activation_checkpointing(True)
    model(ids).sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count(preset):
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() == cfg.n_params


@pytest.mark.parametrize("fields, message", [
    (dict(n_head=5), "'n_head' (5) must divide 'd_model'"),
    (dict(n_kv_head=3), "'n_kv_head' (3) must divide 'n_head'"),
    (dict(norm="batchnorm"), "'norm' must be one of"),
    (dict(activation="tanh"), "'activation' must be one of"),
    (dict(position="sinusoid"), "'position' must be one of"),
    (dict(rope_scaling="yarn", rope_factor=2.0), "needs 'rope_original_max_seq_len'"),
    (dict(position="alibi", rope_scaling="linear", rope_factor=2.0), "needs position='rope'"),
    (dict(vocab_size=0), "'vocab_size' must be a positive integer"),
    (dict(dropout=1.5), "'dropout'"),
    (dict(sliding_window=0), "'sliding_window'"),
])
def test_invalid_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**dict(BASE, **fields))


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['n_layers'\]"):
        ModelConfig.from_dict({"n_layers": 2}, source="x.json")
