"""The options of `llmkit align rm|dpo|ppo|grpo` (kept free of torch: --help must not import it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmkit.train.finetune_commands import FinetuneConfig, shared
from llmkit.train.recipe import opt

ALGORITHMS = ("rm", "dpo", "ppo", "grpo")
METHODS = ("full", "lora", "dora")
# peak learning rates that work at small scale: full-model rates from InstructGPT/TRL examples, adapters higher
DEFAULT_LR = {"rm": 1e-5, "dpo": 5e-7, "ppo": 1e-6, "grpo": 1e-6}
ADAPTER_LR = 1e-4
# options handed unchanged to the fine-tuning loop
_LOOP_FIELDS = ("model", "data", "val_data", "val_fraction", "max_seq_len", "micro_batch_size", "grad_accum",
                "optimizer", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "schedule",
                "warmup_steps", "max_steps", "precision", "save_every", "keep_last", "eval_every", "eval_batches",
                "log_every", "seed", "device", "lora_r", "lora_alpha", "lora_dropout", "target_modules")


@dataclass
class AlignConfig:
    """Every option of the four commands; an option names the algorithms it applies to (others ignore it)."""

    # model and method
    model: str = opt("", "checkpoint to start from: the SFT policy (dpo/ppo/grpo) or the reward model's base (rm)")
    method: str = opt("full", "full: train every weight; lora/dora: adapters on a frozen base (ppo: actor and "
                              "critic get their own adapters on one shared frozen base, which is also the "
                              "reference)", choices=list(METHODS))
    # data
    data: str = opt("", "JSONL: preference records (rm, dpo: pair / hh-rlhf / ranked) or prompt records "
                        "(ppo, grpo); several files comma-separated")
    val_data: str = opt("", "validation records (default: a --val-fraction split of --data)")
    val_fraction: float = opt(0.05, "fraction of --data held out for validation when --val-data is not given")
    max_seq_len: int = opt(512, "tokens of prompt + response")
    max_prompt_len: int = opt(0, "prompt tokens kept (the last ones); 0 = half of --max-seq-len")
    # reward model
    margin: float = opt(0.0, "rm: margin m in -log sigmoid(r_chosen - r_rejected - m), added to a record's 'margin'")
    # DPO
    beta: float = opt(0.1, "dpo: temperature beta of the implicit reward beta (log pi - log pi_ref)")
    loss_type: str = opt("sigmoid", "dpo: sigmoid (DPO; cDPO with --label-smoothing) or ipo",
                         choices=["sigmoid", "ipo"])
    label_smoothing: float = opt(0.0, "dpo: cDPO's probability eps that a preference label is flipped")
    reference: str = opt("", "dpo/ppo/grpo: frozen reference checkpoint (default: --model itself)")
    precompute_ref: bool = opt(False, "dpo: compute the reference log-probs once before training and free the "
                                      "reference model")
    # rewards for RL
    reward_model: str = opt("", "ppo/grpo: reward model directory (written by `llmkit align rm`)")
    reward_fn: str = opt("", "ppo/grpo: Python reward function MODULE:NAME or FILE.py:NAME called as "
                             "fn(prompts, completions, **columns) -> list of floats (built in: "
                             "llmkit.align.rewards:exact_answer)")
    # rollouts
    rollout_batch_size: int = opt(16, "ppo/grpo: prompts sampled per step")
    group_size: int = opt(8, "grpo: samples per prompt (G)")
    mini_batch_size: int = opt(8, "ppo/grpo: samples per optimiser update within a step")
    ppo_epochs: int = opt(4, "ppo: passes over each step's samples; grpo: its mu (iterations per batch)")
    max_new_tokens: int = opt(32, "ppo/grpo: response tokens sampled per prompt")
    temperature: float = opt(1.0, "ppo/grpo: sampling temperature (log-probs are taken at it too)")
    top_k: int = opt(0, "ppo/grpo: sample from the k most likely tokens (0 = off)")
    top_p: float = opt(1.0, "ppo/grpo: nucleus sampling mass (1 = off)")
    # PPO
    clip_range: float = opt(0.2, "ppo/grpo: clip of the probability ratio")
    value_clip: float = opt(0.2, "ppo: clip of the value update around the rollout's values")
    vf_coef: float = opt(0.1, "ppo: weight of the value loss")
    entropy_coef: float = opt(0.0, "ppo: weight of the entropy bonus")
    gamma: float = opt(1.0, "ppo: discount")
    lam: float = opt(0.95, "ppo: GAE lambda")
    whiten_advantages: bool = opt(True, "ppo: normalise advantages to mean 0, std 1 per step")
    kl_coef: float = opt(0.05, "ppo: (initial) beta of the per-token KL penalty beta (log pi - log pi_ref); "
                               "grpo: weight of the k3 KL to the reference in the loss (0 = no reference)")
    adaptive_kl: bool = opt(False, "ppo: adapt beta toward --target-kl (Ziegler et al. 2019) instead of fixing it")
    target_kl: float = opt(6.0, "ppo: target KL per sequence (nats) for --adaptive-kl")
    kl_horizon: int = opt(10000, "ppo: horizon (samples) of the adaptive KL controller")
    ptx_data: str = opt("", "ppo: pretraining/SFT data (as `llmkit finetune` reads it) mixed in: PPO-ptx")
    ptx_coef: float = opt(0.0, "ppo: weight gamma of the pretraining loss in PPO-ptx")
    # GRPO
    loss_norm: str = opt("sequence", "grpo: average each sequence's tokens then the sequences (sequence, the "
                                     "paper) or all tokens at once (token, DAPO)", choices=["sequence", "token"])
    scale_rewards: bool = opt(True, "grpo: divide advantages by the group's reward std")
    # the loop, as `llmkit finetune` declares it
    micro_batch_size: int = opt(4, "rm/dpo: preference examples per micro-batch; ppo/grpo: sequences per "
                                   "forward pass")
    grad_accum: int = shared("grad_accum")
    optimizer: str = shared("optimizer")
    lr: float | None = opt(None, "peak learning rate (default: rm 1e-5, dpo 5e-7, ppo/grpo 1e-6 for full "
                                 f"training; {ADAPTER_LR:g} with adapters)")
    min_lr_ratio: float = shared("min_lr_ratio")
    weight_decay: float = shared("weight_decay", 0.0)
    beta1: float = shared("beta1")
    beta2: float = shared("beta2", 0.999)
    eps: float = shared("eps")
    grad_clip: float = shared("grad_clip")
    schedule: str = shared("schedule")
    warmup_steps: int = shared("warmup_steps", 0)
    max_steps: int = shared("max_steps", 100)
    precision: str = shared("precision")
    save_every: int = shared("save_every", 50)
    keep_last: int = shared("keep_last", 2)
    eval_every: int = shared("eval_every", 50)
    eval_batches: int = shared("eval_batches")
    log_every: int = shared("log_every")
    seed: int = opt(0, "seed for data order, heads and adapters, and sampling")
    device: str = shared("device")
    lora_r: int = opt(8, "lora/dora: rank")
    lora_alpha: float = opt(16.0, "lora/dora: alpha")
    lora_dropout: float = opt(0.0, "lora/dora: dropout on the adapter input")
    target_modules: str = opt("all-linear", "lora/dora: layers to adapt (as `llmkit finetune --target-modules`)")

    def validate(self, algorithm: str) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"option {name!r} is required")
        rl = algorithm in ("ppo", "grpo")
        if rl and bool(self.reward_model) == bool(self.reward_fn):
            raise ValueError(f"{algorithm} needs exactly one reward source: --reward-model DIR or "
                             "--reward-fn MODULE:NAME")
        positive = ("rollout_batch_size", "group_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                    "kl_horizon", "max_seq_len", "micro_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} must be >= 1, got {getattr(self, name)}")
        if algorithm == "grpo" and self.group_size < 2:
            raise ValueError("grpo: --group-size must be >= 2 (advantages compare samples of one prompt)")
        if rl and (self.rollout_batch_size * (self.group_size if algorithm == "grpo" else 1)) % self.mini_batch_size:
            raise ValueError("--mini-batch-size must divide the samples of a step (--rollout-batch-size, times "
                             "--group-size for grpo)")
        checks = (("beta", self.beta > 0), ("label_smoothing", 0 <= self.label_smoothing < 0.5),
                  ("temperature", self.temperature > 0), ("clip_range", self.clip_range > 0),
                  ("gamma", 0 < self.gamma <= 1), ("lam", 0 <= self.lam <= 1), ("target_kl", self.target_kl > 0),
                  ("max_prompt_len", 0 <= self.max_prompt_len < self.max_seq_len or self.max_prompt_len == 0))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"option {name!r} is out of range: {getattr(self, name)!r}")
        if self.ptx_coef and not self.ptx_data:
            raise ValueError("--ptx-coef needs --ptx-data (the pretraining text to mix in)")

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_len or self.max_seq_len // 2

    def peak_lr(self, algorithm: str) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[algorithm] if self.method == "full" else ADAPTER_LR

    def finetune_config(self, algorithm: str) -> FinetuneConfig:
        """The fine-tuning loop's options (method, schedule, checkpoints, logging) for this run."""
        loop = {name: getattr(self, name) for name in _LOOP_FIELDS}
        return FinetuneConfig(**loop, method=self.method, lr=self.peak_lr(algorithm))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
