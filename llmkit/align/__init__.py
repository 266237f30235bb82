"""Alignment with human preferences: reward models, PPO (RLHF), DPO (+ cDPO, IPO) and GRPO.

    llmkit align rm   --model sft/ --data prefs.jsonl --out runs/rm
    llmkit align dpo  --model sft/ --data prefs.jsonl --out runs/dpo
    llmkit align ppo  --model sft/ --data prompts.jsonl --reward-model runs/rm/model --out runs/ppo
    llmkit align grpo --model sft/ --data math.jsonl --reward-fn llmkit.align.rewards:exact_answer --out runs/grpo

Modules: losses.py (the objectives on tensors), data.py (preference and prompt records), reward.py (reward
models: train, save, load), dpo.py, rollout.py (sampling and scoring), ppo.py, grpo.py, rewards.py
(reward functions), trainer.py (what they share on top of the fine-tuning loop), commands.py (the CLI).
"""
