"""`llmkit align rm|dpo|ppo|grpo` (kept light: --help must not import torch)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys

from jsonargparse import Namespace

from llmkit.align.config import AlignConfig
from llmkit.cli import Parser, _flag, _parser, add_dataclass_options

TRAINERS = {"rm": "llmkit.align.reward:RewardTrainer", "dpo": "llmkit.align.dpo:DPOTrainer",
            "ppo": "llmkit.align.ppo:PPOTrainer", "grpo": "llmkit.align.grpo:GRPOTrainer"}
DESCRIPTIONS = {
    "rm": "Train a reward model (the LM with a scalar head) on preference pairs, hh-rlhf conversations or "
          "K-wise ranked lists; saved so PPO/GRPO (--reward-model) and transformers' "
          "AutoModelForSequenceClassification load it.",
    "dpo": "Direct preference optimisation of a policy against a frozen reference: DPO, cDPO "
           "(--label-smoothing) or IPO (--loss-type ipo).",
    "ppo": "RLHF with PPO: actor, critic, frozen reference and a reward model or function; GAE, clipped "
           "policy and value losses, KL penalty (fixed or adaptive), PPO-ptx; --method lora shares one frozen base.",
    "grpo": "GRPO: groups of samples per prompt, group-normalised rewards, the clipped objective and a k3 KL "
            "to the reference; rewards from a Python function or a reward model.",
}
# the final record's fields worth a summary line, per algorithm
SUMMARY = {"rm": ("loss", "accuracy", "val_loss", "val_accuracy"),
           "dpo": ("loss", "accuracy", "margin", "val_loss", "val_accuracy", "val_margin"),
           "ppo": ("reward_mean", "kl", "val_reward", "val_kl"),
           "grpo": ("reward_mean", "kl", "val_reward", "val_kl")}


def trainer_class(algorithm: str):
    module, _, name = TRAINERS[algorithm].partition(":")
    return getattr(importlib.import_module(module), name)


def align_parser(algorithm: str):
    def make() -> Parser:
        p = _parser(f"llmkit align {algorithm}", DESCRIPTIONS[algorithm])
        add_dataclass_options(p, AlignConfig)
        p.add_argument("--out", type=str, default=f"runs/{algorithm}", help="run directory (checkpoints, logs, "
                       "result: OUT/model or OUT/adapter)")
        _flag(p, "--resume", help="continue the run in --out from its last checkpoint")
        _flag(p, "--overwrite", help="delete an existing --out first")
        _flag(p, "--json", help="print one JSON summary object on stdout")
        return p

    return make


def run_align(algorithm: str):
    def handler(args: Namespace) -> None:
        import yaml

        cfg = AlignConfig(**{f.name: args[f.name] for f in dataclasses.fields(AlignConfig)})
        trainer = trainer_class(algorithm)(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
        (trainer.out / "align.yaml").write_text(yaml.safe_dump({"algorithm": algorithm, **cfg.to_dict()},
                                                               sort_keys=False))
        final = trainer.fit()
        summary = {"out": str(trainer.out), "algorithm": algorithm, "method": cfg.method, "steps": trainer.step,
                   "result": str(trainer.out / trainer.result_name),
                   **{k: final[k] for k in SUMMARY[algorithm] if k in final},
                   "before": {k: v for k, v in trainer.initial_val.items() if isinstance(v, (int, float))}}
        print(json.dumps(summary), file=sys.stdout if args.json else sys.stderr)

    return handler


HELP = {"rm": "train a reward model", "dpo": "direct preference optimisation (DPO, cDPO, IPO)",
        "ppo": "RLHF with PPO", "grpo": "group relative policy optimisation"}
COMMANDS = {f"align {a}": (align_parser(a), run_align(a), HELP[a]) for a in TRAINERS}
