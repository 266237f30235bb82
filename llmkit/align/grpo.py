"""Group relative policy optimisation (Shao et al. 2024, DeepSeekMath): PPO without a critic.

    llmkit align grpo --model sft/ --data gsm8k.jsonl --reward-fn llmkit.align.rewards:exact_answer \\
        --group-size 8 --out runs/grpo
    llmkit align grpo ... --reward-model runs/rm/model      # or a learned reward
    llmkit align grpo ... --method lora                     # the reference is the base, adapters off

A step samples --group-size replies to each of --rollout-batch-size prompts, rewards them, and gives every
reply the advantage (r - mean of its group) / std of its group. The loss is PPO's clipped surrogate with
that advantage on every token of the reply, plus kl_coef times the k3 estimate of KL(pi || pi_ref) per
token, averaged per sequence then over sequences (--loss-norm sequence) or over all tokens (token);
--ppo-epochs passes (the paper's mu) over the samples in mini-batches.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from llmkit.align.losses import group_advantages, grpo_loss, masked_mean
from llmkit.align.rollout import RewardSource, Sampler, reply_logprobs
from llmkit.align.trainer import AlignTrainer


class GRPOTrainer(AlignTrainer):
    """GRPO: group-normalised outcome rewards, the clipped objective and a k3 KL to the reference."""

    algorithm = "grpo"

    def __init__(self, cfg, out, resume: bool = False, overwrite: bool = False, on_step=None):
        super().__init__(cfg, out, resume, overwrite, on_step)
        # a reference is needed for the KL term; with adapters it costs nothing, so it is kept for the logs too
        self.has_reference = cfg.kl_coef > 0 or self.peft_config is not None
        self.reference = self._load_reference() if self.has_reference else None
        self.reward = RewardSource(cfg.reward_model, cfg.reward_fn, self.tokenizer, self.device)
        self.sampler = Sampler(cfg, self.tokenizer, self.reward,
                               lambda policy: self.reference_mode(policy, self.reference), self._autocast)

    def _load_data(self):
        return self._load_prompt_data()

    def _train_step(self) -> dict:
        cfg, start = self.align, time.perf_counter()
        policy, G = self.raw_model, cfg.group_size
        prompts = self.train_data.next_batch()
        examples = [e for e in prompts for _ in range(G)]  # each prompt's group, consecutive
        rollout = self.sampler.collect(policy, examples, self._step_seed(0), self.has_reference)
        rollout_s = time.perf_counter() - start
        advantages = group_advantages(rollout.scores, G, cfg.scale_rewards)
        P, mask = rollout.prompt_len, rollout.response_mask

        def loss_fn(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            seq, attn, m = rollout.sequences[rows], rollout.attention_mask[rows], mask[rows]
            logp, entropy = reply_logprobs(policy, seq, attn, P, cfg.temperature, with_entropy=True)
            ref = rollout.ref_logprobs[rows] if rollout.ref_logprobs is not None else None
            loss, stats = grpo_loss(logp, rollout.logprobs[rows], ref, advantages[rows], m, cfg.clip_range,
                                    cfg.kl_coef, cfg.loss_norm)
            return loss, {"kl_k3": stats["kl"], "clip_fraction": stats["clip_fraction"],
                          "entropy": masked_mean(entropy, m)}

        lr = self.scheduler.get_last_lr()[0]
        self.model.train()
        stats = self._rl_updates(len(examples), loss_fn)
        flat = rollout.scores.view(-1, G).std(1) == 0  # groups whose replies all scored alike teach nothing
        record = {"step": self.step + 1, "loss": stats.pop("loss"), **self.rollout_stats(rollout), **stats,
                  "flat_groups": float(flat.float().mean()), "lr": lr}
        return self._finish_record(record, rollout, start, rollout_s)

    @torch.no_grad()
    def evaluate(self) -> dict:
        return self._evaluate_policy(self.raw_model, self.has_reference)

    def _write_result(self, directory: Path) -> None:
        self.write_policy(self.raw_model, directory)
