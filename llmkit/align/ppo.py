"""RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

    llmkit align ppo --model sft/ --data prompts.jsonl --reward-model runs/rm/model --out runs/ppo
    llmkit align ppo ... --method lora          # actor and critic adapters on one shared frozen base
    llmkit align ppo ... --adaptive-kl --target-kl 6
    llmkit align ppo ... --ptx-data sft.jsonl --ptx-coef 0.5      # PPO-ptx
    llmkit align ppo ... --reward-fn llmkit.align.rewards:exact_answer   # a programmatic reward

Four models take part: the actor (the policy being trained), the critic (a value head on a backbone),
the frozen reference (the starting policy) and the reward (a reward model or a Python function). With
--method full the actor, critic and reference are separate copies and the critic starts as the reward
model (InstructGPT). With --method lora there is one frozen base: the actor and the critic are its two
sets of LoRA adapters (the critic with its own value head) and the reference is the base with the
adapters switched off, so the policy's weights are held once.

A step: sample replies to --rollout-batch-size prompts; record the actor's log-probs, the reference's,
the critic's values and the rewards: the reward model's score on the last token and -beta (log pi -
log pi_ref) on every token; GAE(gamma, lambda) advantages, whitened; then --ppo-epochs passes over the
samples in mini-batches, minimising the clipped policy loss + vf_coef * clipped value loss - entropy
bonus (+ ptx_coef * the pretraining loss). beta is fixed or follows the adaptive controller.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit import peft
from llmkit.align.losses import (AdaptiveKLController, FixedKLController, gae, kl_penalty_rewards, masked_mean,
                                 ppo_policy_loss, ppo_value_loss, whiten)
from llmkit.align.reward import RewardModel, load_reward_model
from llmkit.align.rollout import RewardSource, Sampler, chunked, reply_logprobs, shared_copy
from llmkit.align.trainer import AlignTrainer
from llmkit.train.objectives import lm_loss


class ActorCritic(nn.Module):
    """What PPO trains: `actor` (the policy, a Transformer) and `critic` (a RewardModel read at every position)."""

    def __init__(self, actor: nn.Module, critic: RewardModel):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.config = actor.config

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.actor.set_activation_checkpointing(enabled)
        self.critic.set_activation_checkpointing(enabled)


class PPOTrainer(AlignTrainer):
    """PPO with a learned critic, a KL penalty to the reference and optional PPO-ptx."""

    trainable_heads = ("critic.score.",)
    algorithm = "ppo"

    def __init__(self, cfg, out, resume: bool = False, overwrite: bool = False, on_step=None):
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.ptx = None
        super().__init__(cfg, out, resume, overwrite, on_step)
        self.reference = self._load_reference()
        self.reward = RewardSource(cfg.reward_model, cfg.reward_fn, self.tokenizer, self.device)
        self.sampler = Sampler(cfg, self.tokenizer, self.reward,
                               lambda policy: self.reference_mode(policy, self.reference), self._autocast)

    # -- setup

    def _load_model(self):
        cfg = self.align
        policy, tok = super()._load_model()
        torch.manual_seed(cfg.seed)  # the critic's fresh value head
        if cfg.method != "full":  # the critic's backbone is the actor's own frozen base
            critic = RewardModel.from_backbone(shared_copy(policy.model))
        elif cfg.reward_model:  # InstructGPT: the value function starts as the reward model
            critic = load_reward_model(cfg.reward_model)[0]
        else:
            critic = RewardModel.from_backbone(copy.deepcopy(policy.model))
        return ActorCritic(policy, critic), tok

    def _apply_method(self, model: ActorCritic) -> ActorCritic:
        """Adapters for the actor and, separately, the critic (each its own config and PEFT state)."""
        if self.peft_config is not None:
            model.actor = peft.apply(model.actor, self.peft_config, self.tokenizer)
            model.critic = peft.apply(model.critic, copy.deepcopy(self.peft_config), self.tokenizer)
        return self.unfreeze_heads(model)

    def _load_data(self):
        batches, val = self._load_prompt_data()
        cfg = self.align
        if cfg.ptx_data:
            from llmkit.data.sft import SFTBatches, load_sft

            examples, _ = load_sft([f.strip() for f in cfg.ptx_data.split(",")], self.tokenizer, cfg.max_seq_len,
                                   verbose=False)
            self.ptx = SFTBatches(examples, cfg.micro_batch_size, cfg.max_seq_len, self.pad_id, seed=cfg.seed + 1)
        return batches, val

    # -- a step

    def _train_step(self) -> dict:
        cfg, start = self.align, time.perf_counter()
        actor, critic = self.raw_model.actor, self.raw_model.critic
        examples = self.train_data.next_batch()
        rollout = self.sampler.collect(actor, examples, self._step_seed(0), need_reference=True)
        rollout_s = time.perf_counter() - start
        n, P, mask = len(examples), rollout.prompt_len, rollout.response_mask
        with torch.no_grad():
            critic.eval()
            old_values = chunked(lambda rows: critic.values(rollout.sequences[rows], rollout.attention_mask[rows])
                                 [:, P - 1: -1], n, cfg.micro_batch_size) * mask
        kl_coef = self.kl_ctl.value
        rewards, _ = kl_penalty_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        def loss_fn(rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            seq, attn, m = rollout.sequences[rows], rollout.attention_mask[rows], mask[rows]
            logp, entropy = reply_logprobs(actor, seq, attn, P, cfg.temperature, with_entropy=True)
            values = critic.values(seq, attn)[:, P - 1: -1]
            pg, clipfrac, approx_kl = ppo_policy_loss(logp, rollout.logprobs[rows], advantages[rows], m,
                                                      cfg.clip_range)
            vf, vf_clipfrac = ppo_value_loss(values, old_values[rows], returns[rows], m, cfg.value_clip)
            ent = masked_mean(entropy, m)
            loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * ent
            return loss, {"policy_loss": pg.detach(), "value_loss": vf.detach(), "entropy": ent,
                          "clip_fraction": clipfrac, "value_clip_fraction": vf_clipfrac, "approx_kl": approx_kl}

        lr = self.scheduler.get_last_lr()[0]
        self.model.train()
        self._ptx_losses: list[float] = []
        stats = self._rl_updates(n, loss_fn)
        record = {"step": self.step + 1, "loss": stats.pop("loss"), **self.rollout_stats(rollout), **stats,
                  "kl_coef": kl_coef, "value_mean": float(masked_mean(old_values, mask)), "lr": lr}
        if self._ptx_losses:
            record["ptx_loss"] = sum(self._ptx_losses) / len(self._ptx_losses)
        self.kl_ctl.update(record["kl"], n)
        return self._finish_record(record, rollout, start, rollout_s)

    def _auxiliary_loss(self) -> Tensor | None:
        """PPO-ptx: ptx_coef times the language-modelling loss on a batch of the pretraining data."""
        if self.ptx is None or not self.align.ptx_coef:
            return None
        batch = self.ptx.next_batch()
        logits = self.raw_model.actor(batch["input_ids"].to(self.device))
        loss = lm_loss(logits, batch["labels"].to(self.device))
        self._ptx_losses.append(float(loss.detach()))
        return self.align.ptx_coef * loss

    @torch.no_grad()
    def evaluate(self) -> dict:
        return self._evaluate_policy(self.raw_model.actor, need_reference=True)

    # -- checkpoints and result

    def _trainer_state(self) -> dict:
        state = super()._trainer_state()
        state["align"] = {"kl_coef": self.kl_ctl.value, "ptx": self.ptx.state_dict() if self.ptx else None}
        return state

    def _restore_loop(self, state: dict, path: Path) -> None:
        super()._restore_loop(state, path)
        self.kl_ctl.value = state["align"]["kl_coef"]
        if self.ptx is not None:
            self.ptx.load_state_dict(state["align"]["ptx"])

    def _write_result(self, directory: Path) -> None:
        self.write_policy(self.raw_model.actor, directory)  # the critic only serves training
