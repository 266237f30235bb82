"""BitFit (Ben Zaken et al. 2022): train the bias terms only.

Models without biases (Llama) get zero biases on every block projection first, and the config says so
(`qkv_bias`, `attn_out_bias`, `mlp_bias`), so the trained model is still a Hugging Face Llama
(`attention_bias`, `mlp_bias`). The layers stay plain nn.Linear: "merging" is a no-op. Saved in the
adapter layout with llmkit's own peft_type "BITFIT" (PEFT has no BitFit): `<module>.bias` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmkit.peft.core import PEFT_PREFIX, AdapterConfig, PeftError, freeze_all_but

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class BitFitConfig(AdapterConfig):
    method: str = "bitfit"
    add_biases: bool = True  # a model with no bias at all gets zero biases on its block projections
    biases: list[str] = field(default_factory=list)  # filled by inject: names of the trained bias tensors

    def to_peft(self, model: nn.Module) -> dict:
        cfg = model.config
        return {"peft_type": "BITFIT", "task_type": "CAUSAL_LM", "biases": self.biases,
                "model_flags": {"qkv_bias": cfg.qkv_bias, "attn_out_bias": cfg.attn_out_bias,
                                "mlp_bias": cfg.mlp_bias}}

    @classmethod
    def from_peft(cls, d: dict) -> "BitFitConfig":
        return cls(add_biases=any(d.get("model_flags", {}).values()))

    def extra_state(self, model: nn.Module) -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        return {PEFT_PREFIX + name: params[name].detach() for name in self.biases}

    def load_extra_state(self, model: nn.Module, state: dict[str, Tensor], source: str) -> None:
        params = dict(model.named_parameters())
        for name in self.biases:
            if PEFT_PREFIX + name not in state:
                raise PeftError(f"{source}: tensor {PEFT_PREFIX + name} is missing")
        with torch.no_grad():
            for key, value in state.items():
                name = key.removeprefix(PEFT_PREFIX)
                if name not in params:
                    raise PeftError(f"{source}: unexpected tensor {key!r}")
                params[name].copy_(value)

    def on_unload(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)


def inject(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    has_bias = any(name.endswith(".bias") for name, _ in model.named_parameters())
    if not has_bias:
        if not cfg.add_biases:
            raise PeftError("the model has no bias parameters; BitFit needs add_biases=True")
        _add_biases(model)
    cfg.biases = [name for name, _ in model.named_parameters() if name.endswith(".bias")]
    freeze_all_but(model, lambda n: n.endswith(".bias"))
    model.peft_config = cfg
    return model


def _add_biases(model: nn.Module) -> None:
    config = model.config
    for block in model.model.layers:
        for group, names in ((block.self_attn, ATTENTION), (block.mlp, MLP)):
            for name in names:
                linear = getattr(group, name, None)
                if isinstance(linear, nn.Linear) and linear.bias is None:
                    linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                                           dtype=linear.weight.dtype))
    # the config describes the model it saves: a Llama with attention_bias and mlp_bias
    config.qkv_bias = config.attn_out_bias = config.mlp_bias = True
