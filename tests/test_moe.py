"""Mixture of experts: parity with transformers' Mixtral and Qwen2-MoE, routing, capacity, auxiliary losses."""

import json
import math

import pytest
import torch
import transformers
from test_parity import VOCAB, assert_logits_match, hf_greedy
from test_train import packed  # noqa: F401  (the same packed Tiny Shakespeare shard)

import llmkit
from llmkit.checkpoint import unfuse_experts
from llmkit.config import ConfigError, ModelConfig
from llmkit.model import MoE, Transformer
from llmkit.train.recipe import TrainConfig
from llmkit.train.trainer import Trainer


def hf_moe_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=False)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
    return transformers.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=48,
                                       shared_expert_intermediate_size=80, num_experts=4, num_experts_per_tok=2,
                                       norm_topk_prob=arch == "qwen2-moe-renorm",
                                       decoder_sparse_step=2 if arch == "qwen2-moe-step2" else 1)


# qwen2-moe-step2: block 0 is a dense MLP of intermediate_size, block 1 MoE
MOE_ARCHS = ["mixtral", "qwen2-moe", "qwen2-moe-renorm", "qwen2-moe-step2"]


def make_hf_moe(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_moe_config(arch), attn_implementation="sdpa")
    with torch.no_grad():  # a wide router init spreads tokens over all experts; random biases make them observable
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def llmkit_moe_config(arch: str) -> ModelConfig:
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128, n_experts=4)
    if arch == "mixtral":
        return ModelConfig.from_preset("tiny-mixtral", **base, d_ff=96)
    return ModelConfig.from_preset("tiny-mixtral", **base, d_ff=128, moe_d_ff=48, qkv_bias=True,
                                   shared_expert_d_ff=80, shared_expert_gate=True,
                                   moe_renormalize=arch == "qwen2-moe-renorm",
                                   moe_layer_step=2 if arch == "qwen2-moe-step2" else 1)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_hf_moe_checkpoint_loads_with_the_same_logits(arch, tmp_path):
    hf = make_hf_moe(arch)
    hf.save_pretrained(tmp_path)
    ours, _ = llmkit.load(tmp_path)
    assert ours.config.n_experts == 4 and ours.config.moe_renormalize == (arch in ("mixtral", "qwen2-moe-renorm"))
    assert isinstance(ours.model.layers[0].mlp, MoE) == (arch != "qwen2-moe-step2")
    assert isinstance(ours.model.layers[1].mlp, MoE)
    assert_logits_match(ours, hf)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_llmkit_moe_saves_as_hf_with_the_same_logits(arch, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(llmkit_moe_config(arch)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.5)
            elif name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    ours.config.moe_capacity_factor = 1.5  # training-only; kept under config.json["llmkit"]
    llmkit.save(ours, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    expected = "MixtralForCausalLM" if arch == "mixtral" else "Qwen2MoeForCausalLM"
    assert type(hf).__name__ == expected
    assert_logits_match(ours, hf)
    again, _ = llmkit.load(tmp_path)
    assert again.config.moe_capacity_factor == 1.5 and again.config.to_dict() == ours.config.to_dict()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_moe_greedy_generation_matches_hf(arch, use_cache, tmp_path):
    from llmkit.infer.generate import GenerationConfig, generate

    hf = make_hf_moe(arch, seed=3)
    hf.save_pretrained(tmp_path)
    ours, _ = llmkit.load(tmp_path)
    prompt = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    expected = hf_greedy(hf, prompt, torch.ones_like(prompt), 24, use_cache)
    assert generate(ours, prompt.tolist(), GenerationConfig(max_new_tokens=24, use_cache=use_cache)) == expected


def test_fused_expert_tensors_load(tmp_path):
    """transformers 5 holds experts as [E,2F,C] / [E,C,F] tensors; a file written that way loads too."""
    hf = make_hf_moe("qwen2-moe")
    fused = {k: v for k, v in hf.state_dict().items()}
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 64)
    split = unfuse_experts(fused)
    assert torch.equal(split["model.layers.0.mlp.experts.2.up_proj.weight"],
                       fused["model.layers.0.mlp.experts.gate_up_proj"][2, 48:])
    from safetensors.torch import save_file

    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in fused.items()}, str(tmp_path / "model.safetensors"))
    ours, _ = llmkit.load(tmp_path)
    assert_logits_match(ours, hf)


def test_moe_params_and_configs():
    cfg = ModelConfig.from_preset("tiny-mixtral")
    assert Transformer(cfg).num_params() == cfg.n_params
    # active: the top-2 of 8 experts in each of 2 MoE blocks
    expert = 3 * cfg.d_model * cfg.moe_d_ff
    assert cfg.n_params - cfg.n_active_params == 2 * 6 * expert
    switch = ModelConfig.from_preset("tiny-switch")
    assert Transformer(switch).num_params() == switch.n_params and switch.n_moe_layers == 1
    assert not isinstance(Transformer(switch).model.layers[0].mlp, MoE)  # every other block (Switch)
    qwen = llmkit_moe_config("qwen2-moe")
    assert Transformer(qwen).num_params() == qwen.n_params
    with pytest.raises(ConfigError, match="moe_top_k"):
        ModelConfig.from_preset("tiny-mixtral", moe_top_k=9)
    with pytest.raises(ConfigError, match="shared_expert_gate"):
        ModelConfig.from_preset("tiny-mixtral", shared_expert_gate=True)


def naive_moe(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
    """Token by token: output, per-expert routed counts and dropped assignments (first choices first)."""
    probs = torch.softmax(layer.gate(x).float(), -1)
    weights, chosen = probs.topk(layer.top_k, -1)
    if layer.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    N = x.shape[0]
    capacity = math.ceil(layer.capacity_factor * N * layer.top_k / layer.n_experts) if layer.capacity_factor else N * 9
    taken, dropped, out = [0] * layer.n_experts, 0, torch.zeros_like(x)
    for j in range(layer.top_k):
        for n in range(N):
            e = int(chosen[n, j])
            taken[e] += 1
            if taken[e] > capacity:
                dropped += 1
                continue
            out[n] += weights[n, j] * layer.experts[e](x[n:n + 1])[0]
    return out, taken, dropped


@pytest.mark.parametrize("preset,capacity", [("tiny-switch", 1.0), ("tiny-mixtral", 0.75), ("tiny-mixtral", None)])
def test_dispatch_and_dropped_tokens_equal_a_naive_count(preset, capacity):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(preset, moe_capacity_factor=capacity)).train()
    layer = next(m for m in model.modules() if isinstance(m, MoE))
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.3)  # uneven routing, so that capacity bites
        x = torch.randn(3, 20, 64)
        out = layer(x)
    expected, routed, dropped = naive_moe(layer, x.view(-1, 64))
    assert torch.allclose(out.view(-1, 64), expected, atol=1e-5)
    assert layer.stats["load"].tolist() == routed
    assert int(layer.stats["dropped"]) == dropped
    assert (dropped > 0) == (capacity is not None)
    layer.eval()  # inference is dropless: no token depends on the rest of the batch
    with torch.no_grad():
        full = layer(x)
        one = layer(x[:1, :5])
        every = layer.every_expert(x.view(-1, 64))  # the static-shape path compiled decoding takes
    assert torch.allclose(full[:1, :5], one, atol=1e-6)
    assert torch.allclose(every, full.view(-1, 64), atol=1e-6)


def test_balance_and_z_loss_equal_their_formulas():
    torch.manual_seed(0)
    layer = Transformer(ModelConfig.from_preset("tiny-mixtral")).train().model.layers[0].mlp
    with torch.no_grad():
        layer.gate.weight.zero_()  # uniform probabilities: P_i = 1/E; ties pick experts 0 and 1
    layer(torch.randn(2, 8, 64))
    f = torch.tensor([0.5, 0.5] + [0.0] * 6)
    stats = {k: float(v.detach()) for k, v in layer.stats.items() if v.dim() == 0}
    assert stats["balance_loss"] == pytest.approx(8 * float((f * (1 / 8)).sum()))  # 1: P is uniform
    assert stats["z_loss"] == pytest.approx(math.log(8) ** 2, rel=1e-5)  # logsumexp of 8 zeros


def test_hf_config_fields_round_trip(tmp_path):
    cfg = llmkit_moe_config("qwen2-moe")
    cfg.moe_layer_step = 2
    llmkit.save(Transformer(cfg), None, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["decoder_sparse_step"] == 2 and d["moe_intermediate_size"] == 48 and d["intermediate_size"] == 128
    again, _ = llmkit.load(tmp_path)
    assert again.config.to_dict() == cfg.to_dict()
    d["mlp_only_layers"] = [0]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        llmkit.load(tmp_path)


def moe_recipe(packed, **overrides) -> TrainConfig:
    base = dict(model="tiny-mixtral", data=str(packed), seq_len=32, micro_batch_size=8, max_steps=40, warmup_steps=3,
                lr=3e-3, eval_every=0, eval_batches=1, save_every=40, sample_tokens=0, log_every=10, device="cpu")
    return TrainConfig(**{**base, **overrides})


def test_balancing_loss_evens_the_expert_load(packed, tmp_path):
    """40 steps of tiny-mixtral (8 experts, top-2): the worst layer's busiest/idlest expert ratio over the last
    10 steps, without and with the Switch balancing loss (measured: 252 without, experts left idle; 5.5 with)."""
    ratios, dropped = {}, {}
    for coef in (0.0, 0.01):
        Trainer(moe_recipe(packed, model_overrides={"moe_aux_loss_coef": coef}), tmp_path / str(coef)).fit()
        rows = [json.loads(line) for line in (tmp_path / str(coef) / "metrics.jsonl").read_text().splitlines()]
        assert all(len(r["moe_load"]) == 2 and sum(r["moe_load"][0]) == 8 * 32 * 2 for r in rows)  # tokens x top-2
        ratios[coef] = sum(r["moe_load_max_min"] for r in rows[-10:]) / 10
        dropped[coef] = sum(r["moe_dropped"] for r in rows)
    assert ratios[0.01] < 10 < 50 < ratios[0.0], ratios
    assert dropped == {0.0: 0, 0.01: 0}  # tiny-mixtral is dropless


def test_capacity_drops_are_logged(packed, tmp_path):
    Trainer(moe_recipe(packed, model="tiny-switch", max_steps=3, save_every=3), tmp_path / "switch").fit()
    rows = [json.loads(line) for line in (tmp_path / "switch" / "metrics.jsonl").read_text().splitlines()]
    capacity = math.ceil(1.25 * 8 * 32 / 8)
    assert [r["moe_dropped"] for r in rows] == [sum(max(n - capacity, 0) for n in r["moe_load"][0]) for r in rows]
    assert any(r["moe_dropped"] for r in rows) and all(math.isfinite(r["moe_z_loss"]) for r in rows)


def test_plan_reports_total_and_active_parameters():
    from llmkit.plan import PlanConfig, param_breakdown, plan

    p = plan(PlanConfig(model="mixtral-8x7b", gpus=8, zero=3, tokens=1e9))
    moe = p["moe"]  # Mixtral 8x7B's published sizes: 46.7B total, 12.9B active
    assert round(moe["total_params"] / 1e9, 1) == 46.7 and round(moe["active_params"] / 1e9, 1) == 12.9
    assert p["model"]["n_params"] == moe["total_params"]
    assert p["compute"]["flops"] == 6 * moe["active_params"] * 1e9
    cfg = ModelConfig.from_preset("mixtral-8x7b")
    attention = 4 * 32 * 32768 * 32 * 128
    assert moe["flops_per_token_forward"] == 2 * (moe["active_params"] - 32000 * 4096) + attention
    tiny = ModelConfig.from_preset("tiny-switch")
    assert param_breakdown(tiny)["total"] == Transformer(tiny).num_params() == tiny.n_params
    assert cfg.n_active_params == moe["active_params"]


def test_lora_finetuning_of_a_moe_checkpoint_logs_the_router(tmp_path):
    """LoRA wraps every expert's projections; the fine-tuner adds the balancing loss and logs the load."""
    from test_finetune import ALPACA, run_config

    from llmkit.tokenizer import CHAT_TEMPLATES, train_tokenizer
    from llmkit.train.finetune import FineTuner

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(json.loads(line)["output"] for line in ALPACA.read_text().splitlines()[:200]))
    tok = train_tokenizer([corpus], "byte-bpe", 300, chat_template=CHAT_TEMPLATES["chatml"])
    cfg = ModelConfig.from_preset("tiny-mixtral", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                  eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    base = llmkit.save(Transformer(cfg), tok, tmp_path / "base")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(ALPACA.read_text().splitlines(keepends=True)[:16]))
    tuner = FineTuner(run_config(base, data, "lora", max_steps=3, save_every=3, target_modules="all-linear"),
                      tmp_path / "lora")
    assert any("experts.7.down_proj.lora_A" in name for name, _ in tuner.raw_model.named_parameters())
    tuner.fit()
    rows = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["moe_load"]) == 2 and r["moe_balance_loss"] > 0 for r in rows)
