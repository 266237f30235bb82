"""`llmkit pretrain` and `llmkit quickstart`."""

from __future__ import annotations

import json
import sys

from jsonargparse import Namespace

from llmkit.cli import Parser, _flag, _parser, add_dataclass_options


def pretrain_parser() -> Parser:
    from llmkit.train.recipe import TrainConfig

    p = _parser("llmkit pretrain", "Pretrain a model on packed token shards (torchrun for many processes).")
    add_dataclass_options(p, TrainConfig)
    p.add_argument("--out", type=str, default="runs/pretrain", help="run directory (checkpoints, logs, model)")
    _flag(p, "--resume", help="continue the run in --out from its last checkpoint")
    _flag(p, "--overwrite", help="delete an existing --out first")
    return p


def run_pretrain(args: Namespace) -> None:
    from llmkit.parallel.trainer import trainer_class
    from llmkit.train.recipe import TrainConfig, recipe_fields

    cfg = TrainConfig(**{f.name: args[f.name] for f in recipe_fields()})
    trainer = trainer_class(cfg)(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    if trainer.env.is_main:
        (trainer.out / "recipe.yaml").write_text(_yaml(cfg.to_dict()))
    final = trainer.fit()
    if trainer.env.is_main:
        print(json.dumps({k: v for k, v in final.items() if k != "sample"}), file=sys.stderr)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def quickstart_parser() -> Parser:
    p = _parser("llmkit quickstart", "Train a tokenizer and a small model on Tiny Shakespeare (bundled), on CPU.")
    p.add_argument("--out", type=str, default="runs/quickstart", help="where everything is written")
    p.add_argument("--max-steps", type=int | None, default=None, help="override the recipe's training steps")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda or auto")
    return p


def run_quickstart(args: Namespace) -> None:
    from llmkit.train.quickstart import quickstart

    quickstart(args.out, max_steps=args.max_steps, device=args.device)


COMMANDS = {
    "pretrain": (pretrain_parser, run_pretrain, "pretrain a model on packed token shards"),
    "quickstart": (quickstart_parser, run_quickstart, "the whole pipeline on Tiny Shakespeare, on CPU"),
}
