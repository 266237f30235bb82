"""PEFT layers: base keys kept, the disabled switch, targets by name pattern, NaN-safe merges, BitFit,
bottleneck adapters, the trainable-parameter report, and adapter files round-tripping."""

import json

import pytest
import torch

import llmkit
from llmkit import peft
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.peft.core import target_names

LAYER_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, alpha=8, dropout=0.1),
    "dora": lambda: peft.LoraConfig(method="dora", dora=True, r=4),
    "ia3": lambda: peft.IA3Config(),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10),
    "adapter": lambda: peft.BottleneckConfig(size=8),
    "bitfit": lambda: peft.BitFitConfig(),
}


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=128, d_model=64, d_ff=128, **overrides)).eval()


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("method", list(LAYER_CONFIGS))
def test_base_keys_are_kept_and_adapters_start_at_the_base(method):
    model = tiny()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(IDS)
    peft.apply(model, LAYER_CONFIGS[method]())
    sd = model.state_dict()
    for key, value in base_sd.items():  # `q_proj.weight` stays `q_proj.weight`, same tensor
        assert key in sd and torch.equal(sd[key], value), key
    missing, _ = model.load_state_dict(base_sd, strict=False)
    assert not missing or all(("lora_" in k or "ia3_" in k or "adapter_" in k or k.endswith(".bias")) for k in missing)
    with torch.no_grad():
        assert torch.allclose(model(IDS), base_logits, atol=1e-6)  # identity init
    report = peft.trainable_report(model)
    assert 0 < report["trainable"] < report["total"]
    saved = set(peft.adapter_state_dict(model))
    for name, p in model.named_parameters():  # exactly the saved adapter tensors are trained
        assert p.requires_grad == (peft.core.PEFT_PREFIX + name in saved or
                                   peft.core.PEFT_PREFIX + name.removesuffix(".weight") in saved), name


@pytest.mark.parametrize("method", list(LAYER_CONFIGS))
def test_disabled_gives_the_base_model(method):
    model = tiny()
    with torch.no_grad():
        base_logits = model(IDS)
    peft.apply(model, LAYER_CONFIGS[method]())
    perturb(model)
    with torch.no_grad():
        tuned = model(IDS)
        with peft.disabled(model):
            off = model(IDS)
        again = model(IDS)
    if method != "bitfit":  # BitFit trains the model's own biases: there is nothing separate to switch off
        assert torch.allclose(off, base_logits, atol=1e-6)
        assert not torch.allclose(tuned, base_logits, atol=1e-4)
    assert torch.equal(again, tuned)


@pytest.mark.parametrize("method", list(LAYER_CONFIGS))
def test_adapter_files_round_trip(method, tmp_path):
    model = peft.apply(tiny(), LAYER_CONFIGS[method]())
    perturb(model)
    with torch.no_grad():
        expected = model(IDS)
    peft.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] in peft.PEFT_TYPES
    reloaded = peft.load_adapter(tiny(), tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS), expected, atol=1e-6)


def test_targets_by_name_pattern():
    model = tiny()
    assert target_names(model, "q_proj,v_proj") == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                    for p in ("q_proj", "v_proj")]
    assert len(target_names(model, "all-linear")) == 2 * 7  # lm_head is never a target
    assert target_names(model, r"re:model\.layers\.1\.mlp\..*") == [f"model.layers.1.mlp.{p}" for p in
                                                                     ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(peft.PeftError, match="match no layer.*model.layers.0.self_attn.q_proj"):
        target_names(model, ["qkv"])


def test_merge_refuses_nan_naming_the_layer():
    model = peft.apply(tiny(), peft.LoraConfig(r=2, target_modules="v_proj"))
    layer = model.model.layers[1].self_attn.v_proj
    before = layer.weight.clone()
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(peft.PeftError, match="model.layers.1.self_attn.v_proj gives NaN"):
        peft.merge_and_unload(model)
    assert torch.equal(layer.weight, before) and not layer.merged


def test_bottleneck_adapter_cannot_merge():
    model = peft.apply(tiny(), peft.BottleneckConfig(size=4))
    with pytest.raises(peft.PeftError, match="cannot be merged"):
        peft.merge_and_unload(model)


def test_bitfit_on_a_model_without_biases_saves_a_hf_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = peft.apply(tiny(), peft.BitFitConfig())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") for n in names)
    assert len(names) == 2 * 7  # every block projection got a (zero) bias
    perturb(model)
    with torch.no_grad():
        expected = model(IDS)
    peft.merge_and_unload(model)
    llmkit.save(model, None, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["attention_bias"] and config["mlp_bias"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, expected, atol=1e-4)


def test_adapter_load_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = peft.apply(tiny(), peft.LoraConfig(r=2, target_modules="q_proj"))
    peft.save_adapter(model, tmp_path / "a")
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != key}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(peft.PeftError, match=f"tensor {key} is missing"):
        peft.load_adapter(tiny(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(peft.PeftError, match="peft_type 'LOHA' is not supported"):
        peft.load_adapter(tiny(), tmp_path / "a")
