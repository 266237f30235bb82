"""`llmkit medusa train` and `llmkit medusa generate`, and their options (kept here: --help must not import torch).

    llmkit medusa train --model runs/base/model --data ../shared/data/tinyshakespeare.txt --out runs/medusa
    llmkit medusa generate --model runs/base/model --heads runs/medusa --prompt "ROMEO:" --json
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from jsonargparse import Namespace

from llmkit.cli import Parser, _add_model_options, _add_sampling_options, _flag, _parser, add_dataclass_options
from llmkit.train.finetune_commands import (FinetuneConfig, LoopOptions, add_run_options, fit_from_args,
                                            print_summary)
from llmkit.train.recipe import opt

# options passed through unchanged to the fine-tuning loop that trains the heads
_LOOP_FIELDS = ("data", "val_data", "val_fraction", "format", "chat_template", "max_seq_len", "pack",
                "train_on_prompt", "micro_batch_size", "grad_accum", "optimizer", "min_lr_ratio", "weight_decay",
                "grad_clip", "schedule", "warmup_steps", "max_steps", "precision", "save_every", "keep_last",
                "eval_every", "eval_batches", "log_every", "seed", "device")


@dataclass
class MedusaTrainConfig(LoopOptions):
    model: str = opt("", "base checkpoint directory (llmkit or Hugging Face, decoder-only); it stays frozen")
    data: str = opt("", "training data: JSONL (alpaca / messages / sharegpt / text records) or .txt; "
                        "several files comma-separated")
    val_data: str = opt("", "validation data (default: a --val-fraction split of --data)")
    val_fraction: float = opt(0.05, "fraction of --data held out for validation when --val-data is not given")
    format: str = opt("auto", "record format", choices=["auto", "alpaca", "messages", "sharegpt", "text"])
    chat_template: str = opt("", "chat template when the tokenizer has none: chatml, llama or a Jinja string")
    max_seq_len: int = opt(256, "tokens per example")
    pack: bool = opt(False, "pack several examples per sequence (no attention or head target across them)")
    train_on_prompt: bool = opt(False, "chat records: train the heads on every token, not only the assistant's")
    num_heads: int = opt(4, "extra heads: head k predicts the token k+2 places ahead")
    num_layers: int = opt(1, "residual blocks (Linear + SiLU) per head before its vocabulary projection")
    decay: float = opt(0.8, "loss weight of head k is decay**k (far heads are less accurate and matter less)")
    eval_topk: int = opt(10, "validation: top-k accuracies per head measured (saved; they shape the token tree)")
    self_distill: int = opt(0, "train on the base's own greedy continuations, this many tokens after each "
                               "example's prompt (chat: the reply; text: its first --distill-prompt-tokens), as "
                               "the Medusa paper does when the data is not the model's own output; 0 = off")
    distill_prompt_tokens: int = opt(16, "--self-distill on text records: tokens of each example kept as prompt")
    lr: float = opt(1e-3, "peak learning rate")
    seed: int = opt(0, "seed for head init and data order")

    def validate(self) -> None:
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"option {name!r} is required")
        for name in ("num_heads", "num_layers", "eval_topk", "distill_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name!r} must be >= 1, got {getattr(self, name)}")
        if self.self_distill < 0:
            raise ValueError(f"option 'self_distill' must be >= 0 (0 = off), got {self.self_distill}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"option 'decay' must be in (0, 1], got {self.decay}")

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tuning loop's options (method full: every parameter the loop sees, the heads, trains)."""
        loop = {name: getattr(self, name) for name in _LOOP_FIELDS}
        return FinetuneConfig(**loop, model=self.model, method="full", lr=self.lr)


def train_parser() -> Parser:
    p = _parser("llmkit medusa train", "Train Medusa heads (residual block + vocabulary head per offset) on a frozen "
                "base model, for tree-verified decoding with `llmkit medusa generate`.")
    add_dataclass_options(p, MedusaTrainConfig)
    add_run_options(p, "runs/medusa", "run directory: the heads (medusa_heads.safetensors + medusa_config.json), "
                    "checkpoints, metrics.jsonl", json_summary=True)
    return p


def run_train(args: Namespace) -> None:
    from llmkit.infer.medusa import MedusaTrainer

    cfg, trainer, final = fit_from_args(args, MedusaTrainConfig, MedusaTrainer, "medusa.yaml")
    print_summary({"out": str(trainer.out), "steps": trainer.step, "loss": final.get("loss"),
                   "val_loss_start": trainer.initial_val.get("val_loss"), "val_loss": final.get("val_loss"),
                   "val_head_acc_start": [trainer.initial_val.get(f"val_head{k}_acc") for k in range(cfg.num_heads)],
                   "val_head_acc": [final.get(f"val_head{k}_acc") for k in range(cfg.num_heads)]}, args)


def generate_parser() -> Parser:
    p = _parser("llmkit medusa generate", "Continue a prompt with Medusa decoding: the heads propose a token tree, "
                "one forward pass verifies it; greedy output equals plain greedy decoding.")
    _add_model_options(p)
    p.add_argument("--heads", type=str, required=True, help="directory with medusa_heads.safetensors and "
                   "medusa_config.json (the --out of `llmkit medusa train`)")
    p.add_argument("--prompt", type=str, required=True, help="text to continue (use - to read stdin)")
    _add_sampling_options(p, temperature=0.0)
    p.add_argument("--tree-size", type=int, default=64, help="tree nodes verified per step, root included (built "
                   "from the heads' measured top-k accuracies)")
    p.add_argument("--tree", type=str | None, default=None, help="explicit tree as JSON: a list of paths of top-k "
                   "ranks, e.g. [[0], [1], [0, 0]] (overrides --tree-size)")
    p.add_argument("--epsilon", type=float, default=0.09, help="typical acceptance (sampling): hard threshold")
    p.add_argument("--delta", type=float, default=0.3, help="typical acceptance (sampling): entropy-scaled "
                   "threshold; a token is accepted when p > min(epsilon, delta * exp(-entropy))")
    _flag(p, "--json", help="print one JSON object: text, token counts and acceptance statistics")
    return p


def run_generate(args: Namespace) -> None:
    from llmkit.cli import _generation_config, _load
    from llmkit.infer.medusa import TokenTree, load_heads, medusa_generate_text

    model, tokenizer = _load(args)
    heads = load_heads(args.heads, model)
    tree = None
    if args.tree is not None:
        try:
            tree = TokenTree.from_paths([tuple(p) for p in json.loads(args.tree)])
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--tree: expected a JSON list of lists of ranks, got {args.tree!r} ({e})") from None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    gen = _generation_config(args, tokenizer)
    text, stats = medusa_generate_text(model, heads, tokenizer, prompt, gen, tree=tree, tree_size=args.tree_size,
                                       epsilon=args.epsilon, delta=args.delta)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": text, **stats.to_dict()}))
    else:
        print(text)
        print(f"llmkit medusa: {stats.summary()}", file=sys.stderr)


COMMANDS = {
    "medusa train": (train_parser, run_train, "train Medusa heads on a frozen base model"),
    "medusa generate": (generate_parser, run_generate, "generate with Medusa tree decoding"),
}
