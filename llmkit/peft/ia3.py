"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, initialised to ones.

Attention targets rescale their output, y = l * (W x + b) (l saved with shape (out, 1)); feed-forward
targets rescale their input, y = W (l * x) + b (shape (1, in)). PEFT's "IA3", key `<module>.ia3_l`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.peft.core import AdapterConfig, PeftError, PeftLayer, freeze_all_but, resolve_targets, suffixes, swap, \
    target_names


@dataclass
class IA3Config(AdapterConfig):
    method: str = "ia3"
    target_modules: str | list[str] = "k_proj,v_proj,down_proj"
    feedforward_modules: str | list[str] = "down_proj"  # of the targets, those whose input is rescaled
    targets: list[str] = field(default_factory=list)

    def to_peft(self, model: nn.Module) -> dict:
        ff = [t for t in suffixes(self.targets) if t in resolve_targets(self.feedforward_modules)]
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": suffixes(self.targets),
                "feedforward_modules": ff, "fan_in_fan_out": False, "init_ia3_weights": True,
                "modules_to_save": None, "inference_mode": True,
                "peft_version": "0.21.2"}

    @classmethod
    def from_peft(cls, d: dict) -> "IA3Config":
        if d.get("fan_in_fan_out") or d.get("modules_to_save"):
            raise PeftError("adapter_config.json: IA3 fan_in_fan_out / modules_to_save are not supported by llmkit")
        targets, ff = d.get("target_modules"), d.get("feedforward_modules") or []
        if isinstance(targets, str) or isinstance(ff, str):
            raise PeftError("adapter_config.json: IA3 regex target_modules / feedforward_modules are not supported; "
                            "list the module names")
        return cls(target_modules=list(targets), feedforward_modules=list(ff))


class IA3Linear(PeftLayer):
    adapter_names = ("ia3_l",)

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled or self.merged:
            return F.linear(x, self.weight, self.bias)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return F.linear((x * scale).to(x.dtype), self.weight, self.bias)
        return (F.linear(x, self.weight, self.bias) * scale).to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> tuple[Tensor, Tensor | None]:
        # (out, 1) scales rows (and the bias with them); (1, in) scales columns
        bias = None
        if self.bias is not None and not self.feedforward:
            bias = self.bias.float() * self.ia3_l.flatten()
        return self.weight.float() * self.ia3_l, bias

    @torch.no_grad()
    def delta_unmerge(self) -> None:
        self.weight.data = (self.weight.float() / self.ia3_l).to(self.weight.dtype)
        if self.bias is not None and not self.feedforward:
            self.bias.data = (self.bias.float() / self.ia3_l.flatten()).to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, scales {'input' if self.feedforward else 'output'}"


def inject(model: nn.Module, cfg: IA3Config) -> nn.Module:
    names = target_names(model, cfg.target_modules)
    ff = resolve_targets(cfg.feedforward_modules)
    for name in names:
        is_ff = any(name == t or name.endswith("." + t) for t in ff)
        swap(model, name, IA3Linear(model.get_submodule(name), is_ff))
    cfg.targets = names
    freeze_all_but(model, lambda n: n.endswith(".ia3_l"))
    model.peft_config = cfg
    return model
