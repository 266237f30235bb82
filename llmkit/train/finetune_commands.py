"""`llmkit finetune` and `llmkit merge`, and the fine-tuning options (kept here: --help must not import torch)."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

from jsonargparse import Namespace

from llmkit.cli import Parser, _flag, _parser, add_dataclass_options
from llmkit.peft import METHODS
from llmkit.train.recipe import TrainConfig, opt

_PRETRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def shared(name: str, default=dataclasses.MISSING):
    """A field declared like the pretraining recipe's `name` (its help and choices), optionally another default."""
    f = _PRETRAIN_FIELDS[name]
    return dataclasses.field(default=f.default if default is dataclasses.MISSING else default, metadata=f.metadata)

# peak learning rates that work for each method at small scale (the papers' and PEFT examples' choices)
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "adalora": 5e-4, "ia3": 3e-3,
              "bitfit": 1e-3, "adapter": 1e-3, "prompt": 3e-2, "p-tuning": 1e-3, "prefix": 1e-2,
              "p-tuning-v2": 1e-2}
DEFAULT_TARGETS = {"lora": "all-linear", "dora": "all-linear", "qlora": "all-linear", "adalora": "all-linear",
                   "ia3": "k_proj,v_proj,down_proj", "adapter": "o_proj,down_proj"}


@dataclass
class FinetuneConfig:
    # model and method
    model: str = opt("", "base checkpoint directory (llmkit or Hugging Face)")
    method: str = opt("lora", "how to fine-tune", choices=list(METHODS))
    # data
    data: str = opt("", "training data: JSONL (alpaca / messages / sharegpt / text records) or .txt; "
                        "several files comma-separated")
    val_data: str = opt("", "validation data (default: a --val-fraction split of --data)")
    val_fraction: float = opt(0.05, "fraction of --data held out for validation when --val-data is not given")
    format: str = opt("auto", "record format", choices=["auto", "alpaca", "messages", "sharegpt", "text"])
    chat_template: str = opt("", "chat template when the tokenizer has none: chatml, llama or a Jinja string")
    system_prompt: str = opt("", "system message added to conversations that have none")
    max_seq_len: int = opt(512, "tokens per example (longer ones are truncated, with a warning count)")
    pack: bool = opt(False, "pack several examples per sequence (no attention across them)")
    train_on_prompt: bool = opt(False, "take the loss on every token, not only the assistant's")
    pet_pattern: str = opt("", "PET: learn to classify {text, label} records by a cloze pattern, Jinja over the "
                               "record with ___ where the label word goes, e.g. 'Review: {{ text }} It was ___.'")
    pet_verbalizer: str = opt("", 'PET: label -> word, as JSON, e.g. \'{"pos": "great", "neg": "awful"}\'')
    # batch and optimisation
    micro_batch_size: int = opt(4, "sequences per micro-batch")
    # the loop's options, as `llmkit pretrain` declares them (same help), with fine-tuning defaults
    grad_accum: int = shared("grad_accum")
    optimizer: str = shared("optimizer")
    lr: float | None = opt(None, "peak learning rate (default per method: " +
                           ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    min_lr_ratio: float = shared("min_lr_ratio")
    weight_decay: float = shared("weight_decay", 0.0)
    beta1: float = shared("beta1")
    beta2: float = shared("beta2", 0.999)
    eps: float = shared("eps")
    momentum: float = shared("momentum")
    grad_clip: float = shared("grad_clip")
    schedule: str = shared("schedule")
    warmup_steps: int = shared("warmup_steps", 10)
    decay_fraction: float = shared("decay_fraction")
    max_steps: int = shared("max_steps", 100)
    precision: str = shared("precision")
    fp16_init_scale: float = shared("fp16_init_scale")
    activation_checkpointing: bool = shared("activation_checkpointing")
    spike_factor: float = shared("spike_factor")
    spike_window: int = shared("spike_window")
    spike_rollback: bool = shared("spike_rollback")
    save_every: int = shared("save_every", 50)
    keep_last: int = shared("keep_last", 2)
    eval_every: int = shared("eval_every", 50)
    eval_batches: int = shared("eval_batches")
    log_every: int = shared("log_every")
    seed: int = opt(0, "seed for adapter init, data order and dropout")
    device: str = shared("device")
    # LoRA family
    lora_r: int = opt(8, "lora/dora/qlora: rank")
    lora_alpha: float = opt(16.0, "lora/dora/qlora/adalora: alpha (the update is scaled by alpha/r)")
    lora_dropout: float = opt(0.05, "lora/dora/qlora/adalora: dropout on the adapter input")
    rslora: bool = opt(False, "lora/dora/qlora: scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    target_modules: str = opt("", "layers to adapt: comma-separated names (q_proj,v_proj), all-linear, or re:REGEX "
                                  "over the full name (default per method: " +
                              ", ".join(f"{k} {v}" for k, v in DEFAULT_TARGETS.items()) + ")")
    qlora_compute_dtype: str = opt("bfloat16", "qlora: dtype the 4-bit base is computed in",
                                   choices=["bfloat16", "float16", "float32"])
    adalora_init_r: int = opt(12, "adalora: initial rank per layer")
    adalora_target_r: int = opt(4, "adalora: average final rank per layer")
    adalora_tinit: int = opt(0, "adalora: steps before pruning starts")
    adalora_tfinal: int = opt(0, "adalora: steps at the final budget")
    adalora_delta_t: int = opt(1, "adalora: prune every N steps")
    adalora_orth_reg_weight: float = opt(0.5, "adalora: weight of the orthogonality regulariser")
    ia3_feedforward_modules: str = opt("down_proj", "ia3: targets whose input (not output) is rescaled")
    adapter_size: int = opt(16, "adapter: bottleneck width")
    num_virtual_tokens: int = opt(20, "prompt/p-tuning/prefix/p-tuning-v2: virtual tokens")
    prompt_init_text: str = opt("", "prompt: initialise the soft prompt from this text's embeddings")
    encoder_hidden_size: int = opt(128, "p-tuning/prefix: hidden width of the reparameterisation MLP")

    def validate(self) -> None:
        if not self.model:
            raise ValueError("option 'model' is required: a checkpoint directory")
        if not self.data:
            raise ValueError("option 'data' is required: a JSONL or text file")
        for name in ("max_seq_len", "micro_batch_size", "grad_accum", "max_steps", "save_every", "keep_last",
                     "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"option 'lr' must be positive, got {self.lr}")
        if bool(self.pet_pattern) != bool(self.pet_verbalizer):
            raise ValueError("--pet-pattern and --pet-verbalizer go together")
        if self.pet_pattern and self.pack:
            raise ValueError("--pack cannot be used with --pet-pattern: each record is scored at its own slot")
        if self.pack and self.method in ("prompt", "p-tuning"):
            raise ValueError(f"--pack cannot be used with --method {self.method}: every example needs its own "
                             "virtual tokens in front of it")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoopOptions:
    """The loop options of the commands that train through the fine-tuning loop (distill, medusa train): declared
    as `llmkit pretrain` declares them (same help), with these commands' defaults."""

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
    device: str = shared("device")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_run_options(p: Parser, default_out: str, out_help: str, json_summary: bool = False) -> None:
    """--out, --resume, --overwrite (and --json) of a command that trains into a run directory."""
    p.add_argument("--out", type=str, default=default_out, help=out_help)
    _flag(p, "--resume", help="continue the run in --out from its last checkpoint")
    _flag(p, "--overwrite", help="delete an existing --out first")
    if json_summary:
        _flag(p, "--json", help="print one JSON summary object on stdout")


def fit_from_args(args: Namespace, config_cls: type, runner_cls: type, config_file: str):
    """Build `config_cls` from the parsed options, train a `runner_cls` in --out (its options saved there as
    `config_file`); returns (config, runner, the last logged metrics)."""
    import yaml

    cfg = config_cls(**{f.name: args[f.name] for f in dataclasses.fields(config_cls)})
    runner = runner_cls(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    (runner.out / config_file).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, runner, runner.fit()


def print_summary(summary: dict, args: Namespace) -> None:
    """The run's JSON summary: on stdout with --json (for scripts), else on stderr beside the progress."""
    print(json.dumps(summary), file=sys.stdout if args.get("json") else sys.stderr)


def finetune_parser() -> Parser:
    p = _parser("llmkit finetune", "Supervised fine-tuning: full, or LoRA/DoRA/QLoRA/AdaLoRA/adapters/prefix/prompt/"
                "P-tuning/P-tuning v2/IA3/BitFit, on Alpaca, OpenAI-messages, ShareGPT or plain-text data.")
    add_dataclass_options(p, FinetuneConfig)
    add_run_options(p, "runs/finetune", "run directory (checkpoints, logs, result)")
    return p


def run_finetune(args: Namespace) -> None:
    from llmkit.train.finetune import FineTuner

    cfg, tuner, final = fit_from_args(args, FinetuneConfig, FineTuner, "finetune.yaml")
    print_summary({"out": str(tuner.out), "method": cfg.method, **tuner.report, "steps": tuner.step,
                   "loss": final.get("loss"), "val_loss_start": tuner.initial_val.get("val_loss"),
                   "val_loss": final.get("val_loss")}, args)


def merge_parser() -> Parser:
    p = _parser("llmkit merge", "Fold a LoRA/DoRA/AdaLoRA/IA3/BitFit adapter (llmkit's or PEFT's) into its base model.")
    p.add_argument("--model", type=str, required=True, help="base checkpoint directory")
    p.add_argument("--adapter", type=str, required=True, help="adapter directory (adapter_config.json + "
                   "adapter_model.safetensors)")
    p.add_argument("--out", type=str, required=True, help="where the merged model is written")
    return p


def run_merge(args: Namespace) -> None:
    from llmkit.train.finetune import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out)
    print(f"llmkit merge: wrote {out}", file=sys.stderr)


COMMANDS = {
    "finetune": (finetune_parser, run_finetune, "supervised fine-tuning, full or parameter-efficient"),
    "merge": (merge_parser, run_merge, "fold an adapter into its base model"),
}
