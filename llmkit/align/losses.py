"""The objectives of preference learning and RLHF, on plain tensors (no models, no loops).

Reward models:  pairwise_loss, ranking_loss        (InstructGPT, Ouyang et al. 2022; margin as Llama 2)
DPO family:     dpo_loss (sigmoid, cDPO label smoothing, IPO)   (Rafailov et al. 2023; Mitchell 2023; Azar et al. 2023)
PPO:            gae, whiten, ppo_policy_loss, ppo_value_loss, KL controllers
                (Schulman et al. 2017; Ziegler et al. 2019)
GRPO:           group_advantages, grpo_loss with the k3 KL estimator       (Shao et al. 2024)

Per-token tensors are [B, T] over response tokens with a 0/1 `mask` marking the real ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- helpers


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); padding comes back as 0."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def sequence_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(target) per position: logits [B,T,V] predicting targets [B,T] -> [B,T] (fp32)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of the next-token distribution per position: [B,T,V] -> [B,T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- reward models


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs [B]."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def ranking_loss(scores: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """InstructGPT's K-wise loss: scores [B,K] of each list's responses, best first. Every one of the C(K,2)
    pairs (i < j, i ranked above j) contributes -log sigmoid(s_i - s_j - margin); the mean over a list's pairs,
    then over lists, so a prompt with many responses counts as one example (the paper's remedy for overfitting)."""
    K = scores.shape[1]
    i, j = torch.triu_indices(K, K, 1, device=scores.device)
    return -F.logsigmoid(scores[:, i] - scores[:, j] - margin).mean()


def ranking_accuracy(scores: Tensor) -> Tensor:
    """Fraction of a batch's ranked pairs [B,K] (best first) the scores order correctly."""
    K = scores.shape[1]
    i, j = torch.triu_indices(K, K, 1, device=scores.device)
    return (scores[:, i] > scores[:, j]).float().mean()


# ----------------------------------------------------------------------------- DPO, cDPO, IPO

DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected.

    sigmoid: -log sigmoid(beta h), h = (log pi_c - log pi_ref_c) - (log pi_r - log pi_ref_r); with
        label_smoothing eps it is cDPO: the labels are taken as flipped with probability eps,
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    ipo: (h - 1 / (2 beta))^2, a squared loss that keeps h near its target instead of pushing it to infinity
        (callers pass length-averaged log-probs, as TRL does for IPO).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss_type must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- PPO


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens: (advantages, returns), both [B,T].

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; the value after a row's last real
    token is 0 (the episode ends there). Returns are A + V, the critic's regression targets.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate: (loss, clip fraction, approx KL(old || new)), token means over `mask`.

    loss = mean(max(-A r, -A clip(r, 1 - clip, 1 + clip))), r = exp(log pi - log pi_old).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip: float) -> tuple[Tensor, Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (clip(V, V_old +- clip) - R)^2)) and its clip fraction."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def kl_penalty_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                       kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards [B,T]: -kl_coef (log pi - log pi_ref) on every response token, plus the sequence's
    score on its last real token (InstructGPT). Also returns the per-token KL estimate (k1) [B,T]."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.long().cumsum(1).argmax(1, keepdim=True))  # index of each row's last real token
    rewards = rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): nudge beta so the observed KL tracks `target` over `horizon` samples.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta (1 + e n / horizon), n = samples in the batch.
    """

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- GRPO


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's outcome advantages: each reward minus its group's mean, divided by the group's std (unbiased, as
    the paper and TRL) when `scale`; rewards [B*G] come grouped, G consecutive samples per prompt."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's unbiased, non-negative estimator of KL(pi || pi_ref) per token: exp(d) - d - 1,
    d = log pi_ref - log pi."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


GRPO_LOSS_NORMS = ("sequence", "token")


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor,
              mask: Tensor, clip: float, beta: float, norm: str = "sequence") -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's objective: the clipped surrogate with one advantage [B] per sequence, plus beta * k3 KL per token.

    norm "sequence" averages each sequence's tokens, then the sequences (the paper); "token" averages all tokens
    of the batch (DAPO), so long answers are not down-weighted per token.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(logprobs)
    if beta:
        per_token = per_token + beta * kl
    if norm == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif norm == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"GRPO loss norm must be one of {', '.join(GRPO_LOSS_NORMS)}, got {norm!r}")
    clipped = ((ratio < 1 - clip) & (adv < 0)) | ((ratio > 1 + clip) & (adv > 0))
    stats = {"kl": masked_mean(kl, mask).detach(), "clip_fraction": masked_mean(clipped.float(), mask).detach()}
    return loss, stats

