"""`llmkit distill` and its options (kept here: --help must not import torch)."""

from __future__ import annotations

from dataclasses import dataclass

from jsonargparse import Namespace

from llmkit.cli import Parser, _parser, add_dataclass_options
from llmkit.train.finetune_commands import (FinetuneConfig, LoopOptions, add_run_options, fit_from_args,
                                            print_summary)
from llmkit.train.recipe import opt

METHODS = ("kd", "reverse-kl", "gkd", "seq-kd", "cot")
# options passed through unchanged to the fine-tuning loop that trains the student
_LOOP_FIELDS = ("data", "val_data", "val_fraction", "format", "chat_template", "max_seq_len", "micro_batch_size",
                "grad_accum", "optimizer", "min_lr_ratio", "weight_decay", "grad_clip", "schedule", "warmup_steps",
                "max_steps", "precision", "save_every", "keep_last", "eval_every", "eval_batches", "log_every", "seed",
                "device")


@dataclass
class DistillConfig(LoopOptions):
    teacher: str = opt("", "teacher checkpoint directory (llmkit or Hugging Face, decoder-only)")
    student: str = opt("", "student checkpoint directory, or a preset name (built with the teacher's tokenizer)")
    method: str = opt("kd", "kd: forward KL on temperature-softened teacher distributions mixed with CE; "
                            "reverse-kl: KL(student||teacher) on student samples (MiniLLM); gkd: generalised JSD "
                            "on student samples (on-policy GKD); seq-kd: train on teacher generations; "
                            "cot: train on teacher rationales (Fine-tune-CoT)", choices=list(METHODS))
    data: str = opt("", "training data: JSONL (alpaca / messages / sharegpt / text records) or .txt")
    val_data: str = opt("", "validation data (default: a --val-fraction split of --data)")
    val_fraction: float = opt(0.05, "fraction of --data held out for validation when --val-data is not given")
    format: str = opt("auto", "record format", choices=["auto", "alpaca", "messages", "sharegpt", "text"])
    chat_template: str = opt("", "chat template when the tokenizer has none: chatml, llama or a Jinja string")
    temperature: float = opt(2.0, "kd/reverse-kl/gkd: softmax temperature of both distributions")
    alpha: float = opt(0.5, "kd: weight of the distillation term; 1 - alpha goes to cross-entropy on the data")
    beta: float = opt(0.5, "gkd: JSD interpolation (0 = forward KL, 1 = reverse KL)")
    on_policy_fraction: float = opt(1.0, "reverse-kl/gkd: fraction of batches whose sequences the student "
                                         "samples (GKD's lambda); the rest use the data")
    prompt_tokens: int = opt(16, "reverse-kl/gkd/seq-kd on text records: tokens of each example kept as prompt")
    gen_tokens: int = opt(32, "tokens generated per prompt (student samples, or teacher outputs for seq-kd/cot)")
    gen_temperature: float = opt(0.0, "seq-kd/cot: teacher sampling temperature (0 = greedy)")
    cot_trigger: str = opt("Let's think step by step.", "cot: text after the question that elicits a rationale")
    cot_filter: bool = opt(True, "cot: keep only rationales that contain the record's answer (Fine-tune-CoT)")
    topk: int = opt(0, "kd: keep only the teacher's top-k logits per token (0 = the whole vocabulary)")
    teacher_cache: str = opt("", "kd with --topk: safetensors file of precomputed teacher top-k logits "
                                 "(written when missing, reused when present)")
    lr: float = opt(3e-4, "peak learning rate")
    max_seq_len: int = opt(256, "tokens per example")
    seed: int = opt(0, "seed for the student's init, data order and sampling")

    def validate(self) -> None:
        for name in ("teacher", "student", "data"):
            if not getattr(self, name):
                raise ValueError(f"option {name!r} is required")
        if self.temperature <= 0:
            raise ValueError(f"option 'temperature' must be positive, got {self.temperature}")
        for name in ("alpha", "beta", "on_policy_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"option {name!r} must be in [0, 1], got {getattr(self, name)}")
        if self.topk < 0 or self.gen_tokens < 1 or self.prompt_tokens < 1:
            raise ValueError("options 'topk' (>= 0), 'gen_tokens' and 'prompt_tokens' (>= 1) are out of range")
        if self.teacher_cache and (self.method != "kd" or not self.topk):
            raise ValueError("--teacher-cache holds top-k teacher logits for --method kd: give --topk K with it "
                             "(on-policy methods need the teacher on fresh student samples)")

    def finetune_config(self, student: str, data: str | None = None) -> FinetuneConfig:
        """The fine-tuning loop's options for training `student` (fully) on `data` (default: --data)."""
        loop = {name: getattr(self, name) for name in _LOOP_FIELDS}
        return FinetuneConfig(**{**loop, "model": student, "method": "full", "lr": self.lr,
                                 "data": data or self.data})


def distill_parser() -> Parser:
    p = _parser("llmkit distill", "Knowledge distillation from a teacher into a student: word-level KD, reverse KL "
                "(MiniLLM), on-policy GKD, sequence-level KD or chain-of-thought distillation.")
    add_dataclass_options(p, DistillConfig)
    add_run_options(p, "runs/distill", "run directory (checkpoints, logs, model)", json_summary=True)
    return p


def run_distill(args: Namespace) -> None:
    from llmkit.train.distill import Distiller

    cfg, distiller, final = fit_from_args(args, DistillConfig, Distiller, "distill.yaml")
    print_summary({"out": str(distiller.out), "method": cfg.method, "steps": distiller.step,
                   "loss": final.get("loss"), "val_loss_start": distiller.initial_val.get("val_loss"),
                   "val_loss": final.get("val_loss")}, args)


COMMANDS = {
    "distill": (distill_parser, run_distill, "distil a teacher into a smaller student"),
}
