"""LoRA (Hu et al. 2021), rsLoRA scaling (Kalajdzievski 2023), DoRA (Liu et al. 2024) and QLoRA (Dettmers et al. 2023).

    y = W x + (alpha / r) * B A dropout(x)             LoRA; rsLoRA scales by alpha / sqrt(r)
    y = m * (W + s B A) x / ||W + s B A||_row           DoRA: learned magnitude m, norm detached (as PEFT)
    QLoRA: W is stored in NF4 (nf4.py) and computed in bf16; every other block projection is NF4 too.

A is Kaiming-uniform, B zero, so training starts from the base model exactly. Saved as PEFT's "LORA":
`<module>.lora_A.weight`, `.lora_B.weight` and, for DoRA, `.lora_magnitude_vector`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.peft.core import AdapterConfig, PeftError, PeftLayer, freeze_all_but, suffixes, swap, target_names
from llmkit.peft.nf4 import NF4Linear, NF4Weight, quantize_model


@dataclass
class LoraConfig(AdapterConfig):
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False  # scale by alpha / sqrt(r): the update's size stays put as r grows
    dora: bool = False
    quantize: bool = False  # QLoRA: NF4 base weights
    compute_dtype: str = "bfloat16"  # QLoRA: dtype the 4-bit base is computed in
    targets: list[str] = field(default_factory=list)  # filled by inject: the module names adapted

    def __post_init__(self):
        if self.r < 1:
            raise PeftError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise PeftError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def to_peft(self, model: nn.Module) -> dict:
        return peft_lora_fields(self, {"peft_type": "LORA", "r": self.r, "use_dora": self.dora,
                                       "use_rslora": self.rslora, "lora_dropout": self.dropout,
                                       "lora_alpha": self.alpha})

    @classmethod
    def from_peft(cls, d: dict) -> "LoraConfig":
        _refuse(d, {"rank_pattern": {}, "alpha_pattern": {}, **UNSUPPORTED})
        return cls(method="dora" if d.get("use_dora") else "lora", r=d["r"], alpha=d.get("lora_alpha", 8),
                   dropout=d.get("lora_dropout", 0.0), target_modules=_targets_from_peft(d.get("target_modules")),
                   rslora=bool(d.get("use_rslora")), dora=bool(d.get("use_dora")))


# PEFT LoRA options llmkit does not implement: an adapter using one is refused, not silently misread
UNSUPPORTED = {"fan_in_fan_out": False, "lora_bias": False, "bias": "none", "layers_to_transform": None,
               "modules_to_save": None, "exclude_modules": None, "use_qalora": False, "layer_replication": None,
               "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
               "use_bdlora": None}


def peft_lora_fields(cfg, fields: dict) -> dict:
    """The adapter_config.json fields LoRA and AdaLoRA share."""
    return {"task_type": "CAUSAL_LM", "target_modules": suffixes(cfg.targets),
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
            "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
            "peft_version": "0.21.2", **fields}


def _refuse(d: dict, defaults: dict) -> None:
    """PEFT options llmkit does not implement must be at their defaults; otherwise fail naming the field."""
    for key, default in defaults.items():
        if d.get(key, default) not in (default, None, {}, False):
            raise PeftError(f"adapter_config.json: {key}={d[key]!r} is not supported by llmkit")


def _targets_from_peft(targets) -> str | list[str]:
    if isinstance(targets, str):  # PEFT: a string is a regex over the full module name
        return targets if targets == "all-linear" else "re:" + targets
    return list(targets or ["q_proj", "v_proj"])


class LoRALinear(PeftLayer):
    adapter_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base: nn.Linear | NF4Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qweight: NF4Weight | None = base.qweight if isinstance(base, NF4Linear) else None
        if self.qweight is None:
            self.weight = base.weight  # the base's own parameter: `q_proj.weight` keeps its key
        self.bias = base.bias
        self.r, self.scaling = r, alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = (self.qweight.packed if self.qweight is not None else base.weight).device
        # adapter weights in fp32 whatever the base dtype: tiny, and bf16 updates of a zero-init B underflow
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_magnitude_vector = None
        if dora:
            with torch.no_grad():
                norm = self.base_weight(torch.float32).norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)
        self._dora_factor: Tensor | None = None  # kept while merged, to unmerge exactly

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        if self.qweight is not None:
            return self.qweight.dequantize(dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def base_forward(self, x: Tensor) -> Tensor:
        if self.qweight is not None:
            return self.qweight.linear(x, self.bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_forward(x)
        if self.disabled or self.merged:
            return result
        h = x.to(self.lora_A.weight.dtype)
        dropped = self.lora_dropout(h)
        lora = self.lora_B(self.lora_A(dropped))
        if self.lora_magnitude_vector is None:
            return result + (lora * self.scaling).to(result.dtype)
        # DoRA, as PEFT computes it: the column norm is a constant for the gradient (paper, section 4.3)
        weight = self.base_weight(h.dtype)
        norm = (weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight).detach()).norm(dim=1).detach()
        scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result.to(h.dtype) - (self.bias.to(h.dtype) if self.bias is not None else 0)
        else:
            base = F.linear(dropped, weight)
        return result + ((scale - 1) * base + scale * lora * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> tuple[Tensor, Tensor | None]:
        if self.qweight is not None:
            raise PeftError("a 4-bit base cannot hold a merged adapter: load the base in full precision and "
                            "merge there")
        merged = self.weight.float() + self.delta_weight()
        if self.lora_magnitude_vector is not None:  # DoRA: W' = m / ||W + s B A|| * (W + s B A); bias unchanged
            self._dora_factor = (self.lora_magnitude_vector / merged.norm(dim=1)).view(-1, 1)
            merged = merged * self._dora_factor
        return merged, None

    @torch.no_grad()
    def delta_unmerge(self) -> None:
        w = self.weight.float()
        if self._dora_factor is not None:
            w, self._dora_factor = w / self._dora_factor, None
        self.weight.data = (w - self.delta_weight()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        kind = "dora" if self.lora_magnitude_vector is not None else "lora"
        return f"{self.in_features} -> {self.out_features}, {kind} r={self.r}, scaling={self.scaling:g}" + (
            ", nf4 base" if self.qweight is not None else "")


def inject(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Swap LoRALinear in for every targeted linear layer; freeze everything but the adapters."""
    names = target_names(model, cfg.target_modules)
    if cfg.quantize:
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        compute = dtypes.get(cfg.compute_dtype)
        if compute is None:
            raise PeftError(f"compute_dtype must be bfloat16, float16 or float32, got {cfg.compute_dtype!r}")
        quantize_model(model.model if hasattr(model, "model") else model, compute)
    for name in names:
        layer = LoRALinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora)
        swap(model, name, layer)
    cfg.targets = names
    freeze_all_but(model, lambda n: ".lora_" in n)
    model.peft_config = cfg
    return model
