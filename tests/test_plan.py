"""The planner: ZeRO paper's table, parameter counts of every preset, measured memory of a real step, CLI."""

import json

import pytest
import torch

from llmkit.config import PRESETS, ModelConfig
from llmkit.model import build_model
from llmkit.plan import (GB, PlanConfig, PlanError, activation_bytes, kv_cache_bytes, measure_training_memory,
                         param_breakdown, plan)


@pytest.mark.parametrize("zero,expected", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_paper_table(zero, expected):
    # Rajbhandari et al. 2020, figure 1 / table 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)
    p = plan(PlanConfig(params=7.5e9, gpus=64, zero=zero, dtype="fp16"))
    m = p["memory_gb"]
    states = m["weights"] + m["gradients"] + m["optimizer"]
    assert round(states, 2 if zero == 3 else 1) == expected
    assert m["total"] == pytest.approx(states)  # no architecture given: model states only


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_built_model(name):
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert param_breakdown(cfg)["total"] == built == cfg.n_params
    assert plan(PlanConfig(model=name, tokens=1e9))["model"]["n_params"] == built


@pytest.mark.parametrize("preset,overrides,batch,seq,ckpt", [
    ("tiny", dict(vocab_size=512, d_model=128, d_ff=256), 2, 64, False),
    ("tiny", dict(vocab_size=512, d_model=128, d_ff=256), 2, 64, True),
    ("tiny-gpt2", dict(vocab_size=512), 2, 64, False),
])
def test_predicted_memory_within_15_percent_of_measured(tmp_path, preset, overrides, batch, seq, ckpt):
    """Prediction vs the peak of a real fp32 AdamW step on CPU, measured by torch's memory profiler."""
    cfg = ModelConfig.from_preset(preset, **overrides)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    measured = measure_training_memory(cfg, batch, seq, checkpointing=ckpt)
    p = plan(PlanConfig(model=str(tmp_path / "config.json"), dtype="fp32", micro_batch=batch, seq_len=seq,
                        activation_checkpointing=ckpt))
    assert measured["weights"] == p["memory_gb"]["weights"] * GB
    predicted = p["memory_gb"]["total"] * GB
    assert abs(predicted - measured["total"]) / measured["total"] < 0.15, (predicted, measured)


def test_recomputation_saves_activation_memory_and_costs_a_forward():
    a = plan(PlanConfig(model="llama-2-7b", seq_len=4096, micro_batch=1, tokens=1e9))
    b = plan(PlanConfig(model="llama-2-7b", seq_len=4096, micro_batch=1, tokens=1e9, activation_checkpointing=True))
    assert b["memory_gb"]["activations"] < a["memory_gb"]["activations"] / 5
    assert a["memory_gb"]["activations_no_recompute"] == b["memory_gb"]["activations_no_recompute"]
    assert b["compute"]["flops"] == pytest.approx(a["compute"]["flops"] * 8 / 6)
    assert a["compute"]["flops"] == pytest.approx(6 * a["model"]["n_params"] * 1e9)


def test_kv_cache_and_inference_flops():
    cfg = ModelConfig.from_preset("llama-2-7b")
    # 2 (k,v) * 32 layers * 32 heads * 128 dims * 2 bytes = 0.5 MiB per token
    assert kv_cache_bytes(cfg, 1, 1, 2) == 2 * 32 * 32 * 128 * 2
    p = plan(PlanConfig(model="llama-2-7b", infer_batch=4, context=2048, tokens=1e9))
    inf = p["inference"]
    assert inf["kv_cache_gb"] == pytest.approx(4 * 2048 * 2 * 32 * 32 * 128 * 2 / GB)
    lookup = cfg.vocab_size * cfg.d_model  # untied input embedding is not a matmul
    assert inf["flops_per_token"] == 2 * (cfg.n_params - lookup) + 4 * 32 * 2048 * 32 * 128


def test_time_cost_energy_co2():
    p = plan(PlanConfig(params=1e9, tokens=1e10, gpus=8, gpu="a100-80gb", mfu=0.5, usd_per_gpu_hour=2.0,
                        pue=1.5, carbon_intensity=300))
    c = p["compute"]
    seconds = 6 * 1e9 * 1e10 / (8 * 312e12 * 0.5)
    assert c["hours"] == pytest.approx(seconds / 3600)
    assert c["usd"] == pytest.approx(seconds / 3600 * 8 * 2.0)
    assert c["energy_kwh"] == pytest.approx(8 * 400 * seconds / 3600 * 1.5 / 1000)
    assert c["co2_kg"] == pytest.approx(c["energy_kwh"] * 0.3)


def test_does_not_fit_suggests_what_would():
    p = plan(PlanConfig(model="llama-2-7b", gpus=1, gpu="a100-40gb", seq_len=2048, tokens=1e9))
    assert not p["memory_gb"]["fits"]
    changes = " | ".join(s["change"] for s in p["suggestions"])
    assert "qlora" in changes and "--gpus" in changes
    for s in p["suggestions"]:
        assert s["memory_gb"] <= 40 * 2**30 / GB
    lora = plan(PlanConfig(model="llama-2-7b", method="qlora", gpu="a100-40gb", seq_len=2048, tokens=1e9,
                           activation_checkpointing=True))
    assert lora["memory_gb"]["fits"] and lora["model"]["trainable_params"] < 0.01 * lora["model"]["n_params"]
    sharded = plan(PlanConfig(model="llama-2-7b", gpus=8, zero=3, offload="optimizer", tokens=1e9))
    assert sharded["memory_gb"]["optimizer"] == 0 and sharded["memory_gb"]["cpu_offload_per_gpu"] > 0


def test_bad_options_name_the_field(tmp_path):
    with pytest.raises(PlanError, match="--zero"):
        plan(PlanConfig(model="tiny", zero=4))
    with pytest.raises(PlanError, match="--offload optimizer\\+params needs --zero 3"):
        plan(PlanConfig(model="tiny", zero=2, offload="optimizer+params"))
    with pytest.raises(PlanError, match="neither a preset"):
        plan(PlanConfig(model="no-such-model"))
    bad = tmp_path / "config.json"
    bad.write_text('{"n_layer": 2, "colour": 1}')
    with pytest.raises(ValueError, match="colour"):
        plan(PlanConfig(model=str(bad)))


def test_activation_formula_is_linear_in_batch():
    cfg = ModelConfig.from_preset("tiny")
    assert activation_bytes(cfg, 4, 64, "fp32") == 4 * activation_bytes(cfg, 1, 64, "fp32")


def test_cli_json_and_table(capsys):
    from llmkit.cli import main

    assert main(["plan", "--model", "tinyllama-1.1b", "--gpus", "2", "--zero", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["zero"] == 2 and out["model"]["n_params"] == ModelConfig.from_preset("tinyllama-1.1b").n_params
    assert main(["plan", "--model", "llama-2-7b", "--gpu", "a100-40gb"]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "would fit" in text
    assert main(["plan", "--model", "tiny", "--zero", "7"]) == 2
    assert "--zero" in capsys.readouterr().err


def test_eight_bit_adamw_states_counted_as_measured():
    """The planner's 8-bit AdamW state bytes equal those AdamW8bit really holds (within block padding)."""
    import torch

    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.plan import GB, PlanConfig, plan
    from llmkit.train.optim import AdamW8bit, optimizer_state_bytes

    model = Transformer(ModelConfig.from_preset("shakespeare"))
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    model(torch.randint(0, 100, (1, 8))).sum().backward()
    opt.step()
    measured = optimizer_state_bytes(opt)
    p8 = plan(PlanConfig(model="shakespeare", dtype="fp32", optimizer="adamw8bit"), suggestions=False)
    p32 = plan(PlanConfig(model="shakespeare", dtype="fp32", optimizer="adamw"), suggestions=False)
    predicted = p8["memory_gb"]["optimizer"] * GB
    assert abs(predicted - measured) / measured < 0.02
    assert p8["memory_gb"]["optimizer"] < 0.26 * p32["memory_gb"]["optimizer"]
