"""Optimisers and learning-rate schedules for pretraining and fine-tuning.

AdamW with decay only on matrices (not norms, biases or embeddings), a block-wise 8-bit AdamW,
Adafactor and SGD; schedules as multipliers of the peak learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D weights of linear layers only: norms, biases and embeddings are not shrunk."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    eps: float = 1e-8, momentum: float = 0.9) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    cuda = any(p.is_cuda for p in model.parameters())
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=cuda or None)
    if name == "adamw8bit":
        return _adamw8bit(groups, lr, betas, eps, cuda)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr, eps=(None, 1e-3))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _adamw8bit(groups, lr, betas, eps, cuda: bool) -> torch.optim.Optimizer:
    if cuda:
        try:  # bitsandbytes' fused CUDA kernels when they are installed
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
        except ImportError:
            pass
    return AdamW8bit(groups, lr=lr, betas=betas, eps=eps)


# ----------------------------------------------------------------------------- 8-bit AdamW

BLOCK = 256


def quantize_blockwise(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """int8/uint8 codes and one fp32 absmax per block of 256 values (Dettmers et al. 2022, linear codes).

    The second moment is non-negative and spans orders of magnitude, so it is stored as the
    square root on an unsigned scale; the first moment on a signed one.
    """
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
    if signed:
        codes = torch.round(blocks / absmax * 127).to(torch.int8)
    else:
        codes = torch.round(blocks / absmax * 255).to(torch.uint8)
    return codes, absmax.squeeze(1)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, shape: torch.Size, signed: bool) -> Tensor:
    scale = 127.0 if signed else 255.0
    values = codes.float() / scale * absmax[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments live in 8 bits per value (+4 bytes per 256-value block): ~4x less state memory.

    The PyTorch implementation runs anywhere; each step dequantises, updates in fp32, requantises.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["m_codes"], state["m_absmax"] = quantize_blockwise(torch.zeros_like(p, dtype=torch.float32), True)
                    state["v_codes"], state["v_absmax"] = quantize_blockwise(torch.zeros_like(p, dtype=torch.float32), False)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = dequantize_blockwise(state["m_codes"], state["m_absmax"], p.shape, True)
                v = dequantize_blockwise(state["v_codes"], state["v_absmax"], p.shape, False).square()
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                state["m_codes"], state["m_absmax"] = quantize_blockwise(m, True)
                state["v_codes"], state["v_absmax"] = quantize_blockwise(v.sqrt(), False)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m_hat = m / (1 - b1**t)
                v_hat = v / (1 - b2**t)
                p.add_((m_hat / (v_hat.sqrt() + group["eps"])).to(p.dtype), alpha=-group["lr"])
        return loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (for the planner and the 8-bit saving)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, Tensor) and v.dim() > 0)


# ----------------------------------------------------------------------------- schedules


def lr_multiplier(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then the schedule's decay."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * progress
    # warmup-stable-decay (MiniCPM): flat at the peak, then linear decay over the last decay_fraction
    decay_start = total - int(decay_fraction * total)
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - min_ratio) * min(1.0, (step - decay_start) / max(1, total - decay_start))
