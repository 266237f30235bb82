"""Direct preference optimisation (Rafailov et al. 2023), with cDPO label smoothing and IPO.

    llmkit align dpo --model sft/ --data ../shared/data/hh_rlhf_2k.jsonl --out runs/dpo --beta 0.1
    llmkit align dpo ... --label-smoothing 0.1          # cDPO: labels flipped with probability 0.1
    llmkit align dpo ... --loss-type ipo                # IPO on length-averaged log-probs
    llmkit align dpo ... --method lora                  # the reference is the same model, adapters off
    llmkit align dpo ... --precompute-ref               # reference log-probs computed once, then freed

The policy learns from pairs (ranked lists are split into their C(K,2) pairs) through the fine-tuning
loop; each step logs the loss, the implicit rewards beta (log pi - log pi_ref) of chosen and rejected
replies, their margin and the accuracy (how often chosen's implicit reward is higher), and validation
steps log the same on held-out pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from llmkit.align.data import RankedExample, collate_ranked, pairs_of
from llmkit.align.losses import dpo_loss
from llmkit.align.trainer import AlignTrainer, sequence_logps


class DPOTrainer(AlignTrainer):
    """DPO / cDPO / IPO on preference pairs, against a frozen reference policy."""

    algorithm = "dpo"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = self._load_reference()
        if self.align.precompute_ref:
            self._precompute_reference()

    def _prepare_examples(self, examples: list[RankedExample]) -> list[RankedExample]:
        return pairs_of(examples)

    @property
    def _average_logps(self) -> bool:
        return self.align.loss_type == "ipo"  # IPO's target 1/(2 beta) is set for per-token log-ratios

    @torch.no_grad()
    def _precompute_reference(self) -> None:
        """Every training and validation pair's reference log-probs, once; the reference model is then freed."""
        examples = self.train_data.examples + self.val_examples
        size = self.cfg.micro_batch_size
        print(f"llmkit {self.stage}: reference log-probs of {len(examples)} pairs", file=sys.stderr)
        with self.reference_mode(self.raw_model, self.reference) as ref:
            for i in range(0, len(examples), size):
                chunk = examples[i: i + size]
                batch = collate_ranked([[e] for e in chunk], None, self.pad_id)
                with self._autocast():
                    logps = sequence_logps(ref, batch, self.device, self._average_logps).float().cpu()
                for j, e in enumerate(chunk):
                    e.ref_logps = logps[2 * j: 2 * j + 2].tolist()
        self.reference = None

    def _preference_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        cfg = self.align
        logps = sequence_logps(self.raw_model, batch, self.device, self._average_logps)  # chosen, rejected, ...
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(self.device)
        else:
            with self.reference_mode(self.raw_model, self.reference) as model:
                ref = sequence_logps(model, batch, self.device, self._average_logps)
        losses, chosen, rejected = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], cfg.beta,
                                            cfg.label_smoothing, cfg.loss_type)
        return losses.mean(), {"accuracy": float((chosen > rejected).float().mean()),
                               "margin": float((chosen - rejected).mean()),
                               "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
                               "logps_chosen": float(logps[0::2].detach().mean()),
                               "logps_rejected": float(logps[1::2].detach().mean())}

    def _write_result(self, directory: Path) -> None:
        self.write_policy(self.raw_model, directory)
