"""`llmkit distill` and its options (kept here: --help must not import torch)."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

from jsonargparse import Namespace

from llmkit.cli import Parser, _flag, _parser, add_dataclass_options
from llmkit.train.finetune_commands import FinetuneConfig, shared
from llmkit.train.recipe import opt

METHODS = ("kd", "reverse-kl", "gkd", "seq-kd", "cot")
# options passed through unchanged to the fine-tuning loop that trains the student
_LOOP_FIELDS = ("data", "val_data", "val_fraction", "format", "chat_template", "max_seq_len", "micro_batch_size",
                "grad_accum", "optimizer", "min_lr_ratio", "weight_decay", "grad_clip", "schedule", "warmup_steps",
                "max_steps", "precision", "save_every", "keep_last", "eval_every", "eval_batches", "log_every", "seed",
                "device")


@dataclass
class DistillConfig:
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
    micro_batch_size: int = opt(8, "sequences per micro-batch")
    grad_accum: int = shared("grad_accum")
    optimizer: str = shared("optimizer")
    min_lr_ratio: float = shared("min_lr_ratio")
    weight_decay: float = shared("weight_decay", 0.0)
    grad_clip: float = shared("grad_clip")
    schedule: str = shared("schedule")
    warmup_steps: int = shared("warmup_steps", 10)
    max_steps: int = shared("max_steps", 200)
    precision: str = shared("precision")
    save_every: int = shared("save_every", 100)
    keep_last: int = shared("keep_last", 2)
    eval_every: int = shared("eval_every", 50)
    eval_batches: int = shared("eval_batches")
    log_every: int = shared("log_every")
    seed: int = opt(0, "seed for the student's init, data order and sampling")
    device: str = shared("device")

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def distill_parser() -> Parser:
    p = _parser("llmkit distill", "Knowledge distillation from a teacher into a student: word-level KD, reverse KL "
                "(MiniLLM), on-policy GKD, sequence-level KD or chain-of-thought distillation.")
    add_dataclass_options(p, DistillConfig)
    p.add_argument("--out", type=str, default="runs/distill", help="run directory (checkpoints, logs, model)")
    _flag(p, "--resume", help="continue the run in --out from its last checkpoint")
    _flag(p, "--overwrite", help="delete an existing --out first")
    _flag(p, "--json", help="print one JSON summary object on stdout")
    return p


def run_distill(args: Namespace) -> None:
    import yaml

    from llmkit.train.distill import Distiller

    cfg = DistillConfig(**{f.name: args[f.name] for f in dataclasses.fields(DistillConfig)})
    distiller = Distiller(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    (distiller.out / "distill.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    final = distiller.fit()
    summary = {"out": str(distiller.out), "method": cfg.method, "steps": distiller.step, "loss": final.get("loss"),
               "val_loss_start": distiller.initial_val.get("val_loss"), "val_loss": final.get("val_loss")}
    print(json.dumps(summary), file=sys.stdout if args.json else sys.stderr)


COMMANDS = {
    "distill": (distill_parser, run_distill, "distil a teacher into a smaller student"),
}
