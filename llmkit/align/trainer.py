"""What every alignment trainer shares, on top of the fine-tuning loop (llmkit/train/finetune.py).

The loop is the fine-tuner's: progress bar, metrics.jsonl and TensorBoard, eval/save cadence, spike guard,
checkpoint pruning, output-dir protection, exact resume. This class adds the alignment pieces:

  - the options (AlignConfig) and the method: full training or LoRA/DoRA adapters, with the reward and
    value heads kept trainable beside the adapters (`trainable_heads`);
  - the frozen reference policy: a second copy of the weights, or, with adapters, the same model with its
    adapters switched off (no second copy);
  - preference batches (reward models and DPO) and their train/validation steps;
  - checkpoints: OUT/checkpoints/step-N holds every trainable tensor (trainable.safetensors), the optimiser,
    schedule, RNG and counters (trainer_state-rank0.pt) and the data position (data_state.json);
  - the result: OUT/model (a checkpoint directory) or OUT/adapter (PEFT's layout), with a README card.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit import peft
from llmkit.align.config import AlignConfig
from llmkit.align.data import RankedExample, collate_prompts, collate_ranked, load_preferences, load_prompts
from llmkit.card import model_card, write_card
from llmkit.data.sft import SFTBatches, split_val
from llmkit.train import distributed as dist_utils
from llmkit.train.finetune import TRAINABLE_FILE, FineTuner
from llmkit.train.trainer import TrainError


class AlignTrainer(FineTuner):
    """The fine-tuning loop with alignment's model set, data, checkpoints and result (one process)."""

    algorithm = ""  # rm, dpo, ppo or grpo
    trainable_heads: tuple[str, ...] = ()  # parameter-name prefixes trained beside the adapters (score, value head)

    def __init__(self, cfg: AlignConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        cfg.validate(self.algorithm)
        self.align = cfg
        self.stage = f"align {self.algorithm}"
        super().__init__(cfg.finetune_config(self.algorithm), out, resume, overwrite, on_step)

    # -- setup

    def _load_model(self):
        """(policy, tokenizer) from --model: a decoder-only checkpoint (llmkit or Hugging Face)."""
        from llmkit.checkpoint import load

        model, tok = load(self.align.model)
        if model.config.architecture != "decoder":
            raise TrainError(f"{self.align.model}: align {self.algorithm} trains decoder-only models, got "
                             f"{model.config.architecture}")
        self.task = "lm"
        return model, tok

    def _apply_method(self, model: nn.Module) -> nn.Module:
        return self.unfreeze_heads(super()._apply_method(model))

    def unfreeze_heads(self, model: nn.Module) -> nn.Module:
        """The reward or value head trains beside the adapters (a fresh head is no use frozen)."""
        for name, p in model.named_parameters():
            if name.startswith(self.trainable_heads):
                p.requires_grad_(True)
        return model

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)

    def _load_data(self):
        """Preference examples (reward models, DPO): shuffled micro-batches and a validation list."""
        cfg = self.align
        examples, self.data_stats = load_preferences(cfg.data, self.tokenizer, cfg.max_seq_len, cfg.prompt_budget)
        if cfg.val_data:
            train, (val, _) = examples, load_preferences(cfg.val_data, self.tokenizer, cfg.max_seq_len,
                                                         cfg.prompt_budget)
        else:
            train, val = split_val(examples, cfg.val_fraction, cfg.seed)
        print(f"llmkit {self.stage}: {len(train)} training and {len(val)} validation examples "
              f"({', '.join(f'{k}: {v}' for k, v in self.data_stats.formats.items())}; "
              f"{self.data_stats.truncated} truncated)", file=sys.stderr)
        batches = SFTBatches(self._prepare_examples(train), cfg.micro_batch_size, cfg.max_seq_len, self.pad_id,
                             seed=cfg.seed, collate_fn=collate_ranked)
        return batches, self._prepare_examples(val)

    def _prepare_examples(self, examples: list[RankedExample]) -> list[RankedExample]:
        """The examples as this trainer learns from them (DPO splits ranked lists into pairs)."""
        return examples

    def _load_reference(self) -> nn.Module | None:
        """The frozen reference policy: --reference or --model loaded again; None when adapters are on, as the
        model with its adapters switched off is the reference (no second copy of the weights)."""
        from llmkit.checkpoint import load_model

        cfg = self.align
        if self.peft_config is not None and not cfg.reference:
            return None
        ref = load_model(cfg.reference or cfg.model, self.device).float()
        ref.requires_grad_(False)
        return ref.eval()

    @contextlib.contextmanager
    def reference_mode(self, policy: nn.Module, reference: nn.Module | None):
        """Yields the model to run as the reference: `reference`, or `policy` with adapters off and in eval mode."""
        if reference is not None:
            with torch.no_grad():
                yield reference
            return
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), peft.disabled(policy):
                yield policy
        finally:
            policy.train(was_training)

    # -- preference steps (reward models, DPO)

    def _preference_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """Mean loss over the batch's examples and float statistics (accuracy, margins); set by subclasses."""
        raise TrainError(f"{type(self).__name__} has no preference loss")

    def _train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        self.model.train()
        micro = [self._next_batch() for _ in range(cfg.grad_accum)]
        totals: dict[str, float] = {}
        for batch in micro:
            with self._autocast():
                loss, stats = self._preference_loss(batch)
            self.scaler.scale(loss / len(micro)).backward()
            for key, value in {"loss": float(loss.detach()), **stats}.items():
                totals[key] = totals.get(key, 0.0) + value / len(micro)
        record = {"step": self.step + 1, **totals}
        self.scaler.unscale_(self.optimizer)
        grad_norm = dist_utils.clip_grad_norm(self.raw_model, cfg.grad_clip, self.env)
        record.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm)
        self._apply_update(record, grad_norm)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        self.tokens_seen += tokens
        record.update(tokens=self.tokens_seen, tokens_per_s=round(tokens / (time.perf_counter() - start), 1))
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss, accuracy and margin over up to eval_batches micro-batches of held-out examples."""
        if not self.val_examples:
            return {}
        cfg = self.cfg
        self.model.eval()
        n = min(len(self.val_examples), cfg.eval_batches * cfg.micro_batch_size)
        totals: dict[str, float] = {}
        for i in range(0, n, cfg.micro_batch_size):
            chunk = self.val_examples[i: min(n, i + cfg.micro_batch_size)]
            with self._autocast():
                loss, stats = self._preference_loss(collate_ranked([[e] for e in chunk], None, self.pad_id))
            for key, value in {"loss": float(loss), **stats}.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk) / n
        return {f"val_{k}": v for k, v in totals.items()}

    # -- RL steps (PPO, GRPO)

    def _load_prompt_data(self):
        """Prompt examples: batches of --rollout-batch-size prompts, and held-out prompts for validation."""
        cfg = self.align
        examples = load_prompts(cfg.data, self.tokenizer, cfg.prompt_budget)
        if cfg.val_data:
            train, val = examples, load_prompts(cfg.val_data, self.tokenizer, cfg.prompt_budget)
        else:
            train, val = split_val(examples, cfg.val_fraction, cfg.seed)
        print(f"llmkit {self.stage}: {len(train)} training and {len(val)} validation prompts", file=sys.stderr)
        return SFTBatches(train, cfg.rollout_batch_size, cfg.max_seq_len, self.pad_id, seed=cfg.seed,
                          collate_fn=collate_prompts), val

    def _step_seed(self, salt: int) -> int:
        """A seed for this step's sampling or shuffling: a resumed run draws exactly what the original did."""
        return (self.align.seed * 1_000_003 + self.step * 7919 + salt) % 2**31

    def _rl_updates(self, n: int, loss_fn: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]) -> dict[str, float]:
        """--ppo-epochs passes over a step's n samples in shuffled mini-batches, one optimiser update per
        mini-batch, gradients accumulated over micro-batches of it; loss_fn(rows) gives a micro-batch's mean
        loss and statistics. Returns the statistics' means, the last gradient norm and skipped updates."""
        cfg = self.align
        order = torch.Generator().manual_seed(self._step_seed(1))
        totals: dict[str, float] = {}
        updates = skipped = 0
        grad_norm = 0.0
        for _ in range(cfg.ppo_epochs):
            for mini in torch.randperm(n, generator=order).split(cfg.mini_batch_size):
                for micro in mini.split(cfg.micro_batch_size):
                    with self._autocast():
                        loss, stats = loss_fn(micro.to(self.device))
                    self.scaler.scale(loss * len(micro) / len(mini)).backward()
                    for key, value in {"loss": loss.detach(), **stats}.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * len(micro) / len(mini)
                auxiliary = self._auxiliary_loss()
                if auxiliary is not None:
                    self.scaler.scale(auxiliary).backward()
                self.scaler.unscale_(self.optimizer)
                grad_norm = dist_utils.clip_grad_norm(self.raw_model, self.cfg.grad_clip, self.env)
                if math.isfinite(grad_norm):
                    self.scaler.step(self.optimizer)
                else:  # a non-finite gradient moves nothing (and lowers the fp16 loss scale)
                    skipped += 1
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1
        self.scheduler.step()
        out = {k: v / updates for k, v in totals.items()}
        out.update(grad_norm=grad_norm, updates=updates)
        if skipped:
            out["skipped_updates"] = skipped
        return out

    def _auxiliary_loss(self) -> Tensor | None:
        """A loss added to every mini-batch update (PPO-ptx's pretraining loss), already weighted."""
        return None

    @torch.no_grad()
    def _evaluate_policy(self, policy: nn.Module, need_reference: bool) -> dict:
        """Mean reward, KL to the reference and reply length of the policy's samples on held-out prompts, drawn
        with one fixed seed so evaluations compare like with like."""
        if not self.val_examples:
            return {}
        cfg = self.align
        examples = self.val_examples[: cfg.eval_batches * cfg.rollout_batch_size]
        rollout = self.sampler.collect(policy, examples, cfg.seed + 99_991, need_reference)
        out = {"val_reward": float(rollout.scores.mean()),
               "val_reward_std": float(rollout.scores.std()) if len(examples) > 1 else 0.0,
               "val_response_len": float(rollout.response_mask.sum(1).mean())}
        if need_reference:
            out["val_kl"] = float(rollout.kl_per_sequence().mean())
        return out

    def _finish_record(self, record: dict, rollout, start: float, rollout_s: float) -> dict:
        """Token counts and speeds of an RL step: replies sampled per second of the step and of sampling alone."""
        elapsed = time.perf_counter() - start
        tokens = int(rollout.response_mask.sum())
        self.tokens_seen += tokens
        record.update(tokens=self.tokens_seen, tokens_per_s=round(tokens / elapsed, 1),
                      rollout_tokens_per_s=round(tokens / rollout_s, 1), step_time_s=round(elapsed, 4))
        return record

    @staticmethod
    def rollout_stats(rollout) -> dict[str, float]:
        """Reward mean/std, reply length and, with a reference, the mean KL of a reply (nats)."""
        scores = rollout.scores
        out = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
               "response_len": float(rollout.response_mask.sum(1).mean())}
        if rollout.ref_logprobs is not None:
            out["kl"] = float(rollout.kl_per_sequence().mean())
        return out

    # -- checkpoints: every trainable tensor, whatever the method

    def _write_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file(self._trainable_state(), str(directory / TRAINABLE_FILE), metadata={"format": "pt"})

    def _load_weights(self, path: Path) -> None:
        self._load_trainable(path)

    # -- the result

    def _write_result(self, directory: Path) -> None:
        """The trained model's files into `directory`; subclasses write a policy or a reward model."""
        raise TrainError(f"{type(self).__name__} has no result to write")

    def write_policy(self, policy: nn.Module, directory: Path) -> None:
        """A whole checkpoint directory (full training) or the policy's adapter in PEFT's layout + tokenizer."""
        from llmkit.checkpoint import write_checkpoint_files

        if self.peft_config is None:
            write_checkpoint_files(policy, self.tokenizer, directory, "5GB")
        else:
            peft.save_adapter(policy, directory, base_model=str(Path(self.align.model).resolve()))
            self.tokenizer.save(directory)

    @property
    def result_name(self) -> str:
        """OUT/model after full training, OUT/adapter with adapters."""
        return "model" if self.peft_config is None else "adapter"

    def save_final(self) -> Path:
        target = self.out / self.result_name
        with atomic_directory(target) as tmp:
            self._write_result(tmp)
            write_card(tmp, model_card(self._base_model_config(), self.tokenizer, {"Alignment": self._card_body()}))
        return target

    def _base_model_config(self):
        return self.raw_model.config

    def _card_body(self) -> str:
        cfg = self.align
        lines = [f"- algorithm: {self.algorithm}, method: {cfg.method}; {peft.format_report(self.report)}",
                 f"- start: `{cfg.model}`; data: {cfg.data}",
                 f"- steps: {self.step} of {cfg.max_steps}, lr {self.cfg.peak_lr:g} ({cfg.schedule})"]
        last = self._last_record()
        if last:
            shown = {k: v for k, v in last.items() if k.startswith("val_") and isinstance(v, (int, float))}
            lines += [f"- {k}: {v:.4f}" for k, v in shown.items()]
        if self.initial_val:
            lines += [f"- before training, {k}: {v:.4f}" for k, v in self.initial_val.items()
                      if isinstance(v, (int, float))]
        return "\n".join(lines)

    def _last_record(self) -> dict:
        import json

        path = self.out / "metrics.jsonl"
        found: dict = {}
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if any(k.startswith("val_") for k in record):
                    found = record
        return found


def sequence_logps(model: nn.Module, batch: dict, device, average: bool = False) -> Tensor:
    """Sum (or mean) of log p(response tokens | prefix) per row of a collate_ranked batch: [N]."""
    from llmkit.align.losses import sequence_logprobs

    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    logits = model(ids, mask)[:, :-1]
    logps = sequence_logprobs(logits, ids[:, 1:])
    target_mask = batch["response_mask"][:, 1:].to(device).to(logps.dtype)
    total = (logps * target_mask).sum(-1)
    return total / target_mask.sum(-1).clamp(min=1) if average else total


@contextlib.contextmanager
def atomic_directory(path: Path):
    """Yields a temporary directory beside `path` that replaces `path` whole once the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
