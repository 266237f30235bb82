"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget is moved to where it matters.

    y = W x + alpha / r0 * B (A * E) x        P = B (out, r), Λ = E (r, 1) singular values, Q = A (r, in)

Training adds an orthogonality regulariser (||A A^T - I||_F + ||B^T B - I||_F, averaged) to the loss, and
after every optimiser step `RankAllocator.step` scores each singular triplet by the smoothed sensitivity
|w * grad| times its uncertainty, and zeroes the lowest-scoring E entries so the total rank follows a
cubic schedule from init_r per layer down to target_r per layer between tinit and total_step - tfinal.

Saved as PEFT's "ADALORA": `<module>.lora_A`, `.lora_B`, `.lora_E` (no `.weight`); once ranks were pruned,
`rank_pattern` in adapter_config.json and the kept rows/columns only, as PEFT writes it. The scale keeps
the initial rank r0 after pruning (PEFT's `ranknum`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.peft.core import AdapterConfig, PeftError, PeftLayer, freeze_all_but, peft_layers, swap, target_names
from llmkit.peft.lora import UNSUPPORTED, _refuse, _targets_from_peft, peft_lora_fields


@dataclass
class AdaLoraConfig(AdapterConfig):
    method: str = "adalora"
    init_r: int = 12
    target_r: int = 8  # average rank per layer at the end
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    tinit: int = 0  # steps of warm-up before pruning starts
    tfinal: int = 0  # steps of fine-tuning at the final budget
    delta_t: int = 1  # prune every delta_t steps
    beta1: float = 0.85  # smoothing of the sensitivity
    beta2: float = 0.85  # smoothing of its uncertainty
    orth_reg_weight: float = 0.5
    total_step: int = 1000
    rank_pattern: dict[str, list[bool]] | None = None  # kept triplets per layer, once pruned
    targets: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not 0 < self.target_r <= self.init_r:
            raise PeftError(f"AdaLoRA needs 0 < target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise PeftError(f"AdaLoRA needs tinit < total_step - tfinal (tinit={self.tinit}, tfinal={self.tfinal}, "
                            f"total_step={self.total_step}): no step would prune")

    def to_peft(self, model: nn.Module) -> dict:
        # a pattern found by pruning here, else the one the adapter was loaded with (its layers are already cut)
        self.rank_pattern = current_rank_pattern(model) or self.rank_pattern
        return peft_lora_fields(self, {
            "peft_type": "ADALORA", "r": 8, "init_r": self.init_r, "target_r": self.target_r,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout, "tinit": self.tinit, "tfinal": self.tfinal,
            "deltaT": self.delta_t, "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
            "total_step": self.total_step, "rank_pattern": self.rank_pattern, "use_dora": False,
            "use_rslora": False})

    @classmethod
    def from_peft(cls, d: dict) -> "AdaLoraConfig":
        _refuse(d, {"alpha_pattern": {}, **UNSUPPORTED})
        return cls(init_r=d["init_r"], target_r=d["target_r"], alpha=d.get("lora_alpha", 8),
                   dropout=d.get("lora_dropout", 0.0), target_modules=_targets_from_peft(d.get("target_modules")),
                   tinit=d.get("tinit", 0), tfinal=d.get("tfinal", 0), delta_t=d.get("deltaT", 1),
                   beta1=d.get("beta1", 0.85), beta2=d.get("beta2", 0.85),
                   orth_reg_weight=d.get("orth_reg_weight", 0.5), total_step=d["total_step"],
                   rank_pattern=d.get("rank_pattern"))


class AdaLoRALinear(PeftLayer):
    adapter_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, ranknum: int | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, device=device) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, device=device) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))  # zero singular values: starts at the base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling, self.ranknum = alpha, float(ranknum or r)
        # which triplets survive pruning (None: all); masked E entries are held at zero
        self.register_buffer("rank_mask", None, persistent=False)

    def delta_weight(self) -> Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: Tensor) -> Tensor:
        result = F.linear(x, self.weight, self.bias)
        if self.disabled or self.merged:
            return result
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        update = h @ (self.lora_A * self.lora_E).T @ self.lora_B.T
        return result + (update * self.scaling / (self.ranknum + 1e-5)).to(result.dtype)

    def adapter_state(self) -> dict[str, Tensor]:
        state = super().adapter_state()
        if self.rank_mask is not None:  # PEFT saves the kept triplets only
            keep = self.rank_mask
            state = {"lora_A": state["lora_A"][keep], "lora_B": state["lora_B"][:, keep],
                     "lora_E": state["lora_E"][keep]}
        return state

    @torch.no_grad()
    def merged_weight(self) -> tuple[Tensor, Tensor | None]:
        return self.weight.float() + self.delta_weight(), None

    @torch.no_grad()
    def delta_unmerge(self) -> None:
        self.weight.data = (self.weight.float() - self.delta_weight()).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, adalora r={self.lora_E.shape[0]} (r0={self.ranknum:g})"


def inject(model: nn.Module, cfg: AdaLoraConfig) -> nn.Module:
    names = target_names(model, cfg.target_modules)
    pattern = cfg.rank_pattern or {}
    for name in names:
        kept = pattern.get(f"{name}.lora_E")
        r = sum(kept) if kept is not None else cfg.init_r
        swap(model, name, AdaLoRALinear(model.get_submodule(name), r, cfg.alpha, cfg.dropout, ranknum=cfg.init_r))
    cfg.targets = names
    freeze_all_but(model, lambda n: n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_E"))
    model.peft_config = cfg
    return model


def current_rank_pattern(model: nn.Module) -> dict[str, list[bool]] | None:
    layers = [(n, m) for n, m in peft_layers(model) if isinstance(m, AdaLoRALinear)]
    if not any(m.rank_mask is not None for _, m in layers):
        return None
    return {f"{n}.lora_E": (m.rank_mask if m.rank_mask is not None else torch.ones(m.lora_E.shape[0], dtype=torch.bool,
                                                                                  device=m.lora_E.device)).tolist()
            for n, m in layers}


def orthogonal_regularizer(model: nn.Module) -> Tensor:
    """Mean over A and B matrices of ||P P^T - I||_F (rows of A, columns of B should be orthonormal)."""
    terms = []
    for _, m in peft_layers(model):
        if isinstance(m, AdaLoRALinear) and m.lora_E.numel():  # a layer pruned to rank 0 has nothing to keep apart
            for p, gram in ((m.lora_A, m.lora_A @ m.lora_A.T), (m.lora_B, m.lora_B.T @ m.lora_B)):
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype)))
    return torch.stack(terms).mean()


class RankAllocator:
    """The importance-driven budget schedule; call `step(model, global_step)` after each optimiser step."""

    def __init__(self, model: nn.Module, cfg: AdaLoraConfig):
        self.cfg = cfg
        layers = [m for _, m in peft_layers(model) if isinstance(m, AdaLoRALinear)]
        self.init_budget = sum(m.lora_E.shape[0] for m in layers)
        self.target_budget = cfg.target_r * len(layers)
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to prune at this step)."""
        cfg = self.cfg
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget, True
        progress = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % cfg.delta_t == 0

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "lora_E") or p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.exp_avg_ipt.get(name, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(name, torch.zeros_like(p))
            self.exp_avg_ipt[name] = b1 * avg + (1 - b1) * ipt
            self.exp_avg_unc[name] = b2 * unc + (1 - b2) * (ipt - self.exp_avg_ipt[name]).abs()

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> None:
        layers = [(n, m) for n, m in peft_layers(model) if isinstance(m, AdaLoRALinear)]
        scores = {}
        for name, m in layers:
            s = lambda key: self.exp_avg_ipt[f"{name}.{key}"] * self.exp_avg_unc[f"{name}.{key}"]  # noqa: E731
            # a triplet's score: its singular value's, plus the mean of its row of A and column of B
            scores[name] = s("lora_E").view(-1) + s("lora_A").mean(1) + s("lora_B").mean(0)
        every = torch.cat(list(scores.values()))
        k = self.init_budget - budget
        threshold = torch.kthvalue(every, k).values.item() if k > 0 else -float("inf")
        for name, m in layers:
            keep = scores[name] > threshold
            m.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            m.rank_mask = keep

    @torch.no_grad()
    def step(self, model: nn.Module, global_step: int) -> int:
        """Update importance and prune to this step's budget; returns the budget."""
        cfg = self.cfg
        final = cfg.total_step - cfg.tfinal
        budget, prune = self.budget(global_step)
        if global_step < final:
            self.update_importance(model)
            if prune and self.exp_avg_ipt:
                self.mask_to_budget(model, budget)
        elif global_step == final and self.exp_avg_ipt:
            self.mask_to_budget(model, budget)
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        else:  # after the final pruning the pattern is fixed: keep the pruned singular values at zero
            for _, m in peft_layers(model):
                if isinstance(m, AdaLoRALinear) and m.rank_mask is not None:
                    m.lora_E.masked_fill_(~m.rank_mask.view(-1, 1), 0.0)
        return budget

    def state_dict(self) -> dict:
        return {"exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg_ipt, self.exp_avg_unc = state["exp_avg_ipt"], state["exp_avg_unc"]


def rank_masks(model: nn.Module) -> dict[str, Tensor]:
    """The rank masks to save beside a training checkpoint (they are not parameters)."""
    return {n: m.rank_mask for n, m in peft_layers(model) if isinstance(m, AdaLoRALinear) and m.rank_mask is not None}


def set_rank_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    layers = dict(peft_layers(model))
    for name, mask in masks.items():
        layers[name].rank_mask = mask.to(layers[name].lora_E.device)
