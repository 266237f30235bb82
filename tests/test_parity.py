"""Parity with Hugging Face transformers: same weights -> same logits and same greedy tokens."""

import json

import pytest
import torch
import transformers

import llmkit
from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.model import Transformer

ATOL = 1e-4
VOCAB = 256


def hf_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    if arch == "llama-gqa":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "llama-mqa":
        return transformers.LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=True)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=6)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                       pad_token_id=0)
    raise ValueError(arch)


ARCHS = ["llama-gqa", "llama-mqa", "qwen2", "mistral", "gpt2"]


def make_hf(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(arch), attn_implementation="sdpa")
    with torch.no_grad():  # HF zero-inits biases; random ones make the bias mapping observable
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def llmkit_config(arch: str) -> ModelConfig:
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=128)
    if arch == "gpt2":
        return ModelConfig.from_preset("tiny-gpt2", **dict(base, d_ff=256))
    extra = {"llama-gqa": dict(n_kv_head=2), "llama-mqa": dict(n_kv_head=1, tie_embeddings=True),
             "qwen2": dict(n_kv_head=2, qkv_bias=True), "mistral": dict(n_kv_head=2, sliding_window=6)}[arch]
    return ModelConfig.from_preset("tiny", **base, **extra)


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    ids[mask == 0] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def assert_logits_match(ours: Transformer, hf) -> None:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= ATOL, f"logits differ by {diff}"
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(ids, attention_mask=mask, position_ids=pos).logits
    valid = mask.bool()
    diff = (a[valid] - b[valid]).abs().max().item()
    assert diff <= ATOL, f"left-padded logits differ by {diff}"


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_to_llmkit_logits(arch, tmp_path):
    hf = make_hf(arch)
    hf.save_pretrained(tmp_path)
    ours, tok = llmkit.load(tmp_path)
    assert tok is None
    assert_logits_match(ours.eval(), hf)


@pytest.mark.parametrize("arch", ARCHS)
def test_llmkit_to_hf_logits(arch, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(llmkit_config(arch)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    llmkit.save(ours, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    expected_class = {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM",
                      "mistral": "MistralForCausalLM"}.get(arch, "LlamaForCausalLM")
    assert type(hf).__name__ == expected_class
    assert_logits_match(ours, hf)


def hf_greedy(hf, ids, mask, n, use_cache):
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      use_cache=use_cache, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_hf(arch, use_cache, tmp_path):
    hf = make_hf(arch, seed=3)
    hf.save_pretrained(tmp_path)
    ours, _ = llmkit.load(tmp_path)
    gen = GenerationConfig(max_new_tokens=32, use_cache=use_cache)
    prompt = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    expected = hf_greedy(hf, prompt, torch.ones_like(prompt), 32, use_cache)
    assert generate(ours, prompt.tolist(), gen) == expected
    # a left-padded batch: every row as HF generates it with the same attention mask
    ids, mask, _ = padded_batch(seed=7)
    ids, mask = ids[:, :12], mask[:, :12]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert generate(ours, prompts, GenerationConfig(max_new_tokens=12, use_cache=use_cache)) == \
        hf_greedy(hf, ids, mask, 12, use_cache)


@pytest.mark.parametrize("scaling", [
    dict(rope_type="linear", factor=2.0),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=32),
])
def test_rope_scaling_matches_hf(scaling, tmp_path):
    cfg = hf_config("llama-gqa")
    cfg.rope_parameters = dict(scaling, rope_theta=10000.0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours, _ = llmkit.load(tmp_path)
    assert ours.config.rope_scaling == scaling["rope_type"]
    assert_logits_match(ours, hf)
    # and back: our save of the scaled model reloads in HF with the same logits
    llmkit.save(ours, None, tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert_logits_match(ours, again)


def test_ntk_scaling_saves_as_larger_base(tmp_path):
    ours = Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, rope_scaling="ntk", rope_factor=4.0)).eval()
    llmkit.save(ours, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_logits_match(ours, hf)


def test_sharded_checkpoint_loads_in_both(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(llmkit_config("llama-gqa")).eval()
    llmkit.save(ours, None, tmp_path, max_shard_size=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_logits_match(ours, transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    again, _ = llmkit.load(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_pytorch_bin_checkpoint_loads(tmp_path):
    hf = make_hf("llama-gqa")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours, _ = llmkit.load(tmp_path)
    assert_logits_match(ours, hf)


def test_load_dtype_and_device(tmp_path):
    llmkit.save(Transformer(llmkit_config("qwen2")), None, tmp_path)
    model, _ = llmkit.load(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(torch.randint(0, VOCAB, (1, 5)))
    assert logits.shape == (1, 5, VOCAB) and torch.isfinite(logits.float()).all()
