"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after attention and after the FFN.

    y = o(x);  y + up(act(down(y)))       on the attention output projection (o_proj) and FFN's down_proj

`up` starts at zero, so training starts from the base model. The adapter sits after the output
projection, before the residual add: exactly "after attention" and "after the FFN" of the paper.
Saved in the adapter layout with llmkit's own peft_type "BOTTLENECK_ADAPTER" (PEFT has none):
`<module>.adapter_down.{weight,bias}`, `<module>.adapter_up.{weight,bias}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.peft.core import AdapterConfig, PeftError, PeftLayer, freeze_all_but, suffixes, swap, target_names

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass
class BottleneckConfig(AdapterConfig):
    method: str = "adapter"
    size: int = 16  # bottleneck width
    activation: str = "relu"
    target_modules: str | list[str] = "o_proj,down_proj"
    targets: list[str] = field(default_factory=list)
    mergeable = False  # a nonlinearity: nothing to fold into a weight

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise PeftError(f"adapter activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.size < 1:
            raise PeftError(f"adapter size must be >= 1, got {self.size}")

    def to_peft(self, model: nn.Module) -> dict:
        return {"peft_type": "BOTTLENECK_ADAPTER", "task_type": "CAUSAL_LM", "adapter_size": self.size,
                "activation": self.activation, "target_modules": suffixes(self.targets)}

    @classmethod
    def from_peft(cls, d: dict) -> "BottleneckConfig":
        return cls(size=d["adapter_size"], activation=d.get("activation", "relu"),
                   target_modules=list(d["target_modules"]))


class AdapterLinear(PeftLayer):
    adapter_names = ("adapter_down", "adapter_up")

    def __init__(self, base: nn.Linear, size: int, activation: str):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.activation = activation
        device = base.weight.device
        self.adapter_down = nn.Linear(self.out_features, size, device=device, dtype=torch.float32)
        self.adapter_up = nn.Linear(size, self.out_features, device=device, dtype=torch.float32)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        h = y.to(self.adapter_down.weight.dtype)
        return y + self.adapter_up(ACTIVATIONS[self.activation](self.adapter_down(h))).to(y.dtype)

    def merged_weight(self) -> tuple[Tensor, Tensor | None]:
        raise PeftError("bottleneck adapters are nonlinear and cannot be merged into the base weights")

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bottleneck {self.adapter_down.out_features}"


def inject(model: nn.Module, cfg: BottleneckConfig) -> nn.Module:
    names = target_names(model, cfg.target_modules)
    for name in names:
        swap(model, name, AdapterLinear(model.get_submodule(name), cfg.size, cfg.activation))
    cfg.targets = names
    freeze_all_but(model, lambda n: ".adapter_" in n)
    model.peft_config = cfg
    return model
