"""Reward models: a decoder backbone with a scalar head, trained on preference pairs or K-wise ranked lists.

    llmkit align rm --model sft/ --data ../shared/data/hh_rlhf_2k.jsonl --out runs/rm --max-steps 500
    rm, tok = load_reward_model("runs/rm/model")        # what PPO/GRPO load with --reward-model
    scores = rm(input_ids, attention_mask)              # [B], read at each row's last real token

The score is read from the hidden state of each sequence's last real token (any padding side), as
transformers' `*ForSequenceClassification` reads it. A saved reward model is a checkpoint directory:
config.json (num_labels 1, architectures `LlamaForSequenceClassification` for Llama-family configs, also
Mistral, Qwen2 and GPT-2; `LlmkitRewardModel` otherwise), model.safetensors with the backbone's tensors
under their causal-LM names plus `score.weight`, and the tokenizer. For the HF families,
`transformers.AutoModelForSequenceClassification.from_pretrained(dir)` gives the same scores (it finds the
last token as the last one that is not `pad_token_id`, so the pad token must not occur inside a text).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit.align.losses import ranking_accuracy, ranking_loss
from llmkit.align.trainer import AlignTrainer, atomic_directory
from llmkit.config import ModelConfig
from llmkit.model import Backbone

SEQ_CLS_ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                         "qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
LLMKIT_ARCHITECTURE = "LlmkitRewardModel"


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index [B] of each row's last real token, for left, right or no padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


class RewardModel(nn.Module):
    """`model` (the LM's backbone, same tensor names) and `score`, a bias-free d_model -> 1 projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "decoder":
            raise ValueError(f"a reward model is built on a decoder-only model, got {config.architecture!r}")
        self.config = config
        self.model = Backbone(config)
        self.score = nn.Linear(config.d_model, 1, bias=False)

    @classmethod
    def from_backbone(cls, backbone: Backbone) -> "RewardModel":
        """`backbone` (taken over, not copied) with a fresh head, N(0, 1/(d_model + 1)) as in Stiennon et al.
        (2020), so initial rewards have about unit variance; draws from the global RNG."""
        config = backbone.config
        with torch.device("meta"):
            rm = cls(config)
        rm.model = backbone
        rm.score = nn.Linear(config.d_model, 1, bias=False, device=backbone.embed_tokens.weight.device)
        nn.init.normal_(rm.score.weight, std=1 / math.sqrt(config.d_model + 1))
        return rm

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Scores [B] of the sequences, each read at its last real token."""
        hidden = self.model(input_ids, attention_mask)
        if attention_mask is None:
            last = hidden[:, -1]
        else:
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.score(last).squeeze(-1).float()

    def values(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The head at every position [B,T]: a PPO critic's value estimates."""
        return self.score(self.model(input_ids, attention_mask)).squeeze(-1).float()

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled


# ----------------------------------------------------------------------------- saving and loading


def is_reward_model(path: str | Path) -> bool:
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    archs = json.loads(file.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") or a == LLMKIT_ARCHITECTURE for a in archs)


def write_reward_model(rm: RewardModel, tokenizer, directory: Path) -> None:
    """The checkpoint files of `rm` into `directory` (transformers' sequence-classification layout)."""
    from safetensors.torch import save_file

    from llmkit.checkpoint import _write_json, checkpoint_config, hf_model_type, to_hf_state_dict

    cfg = rm.config
    model_type = hf_model_type(cfg)
    backbone = {f"model.{k}": v for k, v in rm.model.state_dict().items()}
    sd = {**to_hf_state_dict(backbone, cfg, model_type), "score.weight": rm.score.weight}
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = checkpoint_config(cfg, model_type, sd["score.weight"].dtype)
    config["architectures"] = [SEQ_CLS_ARCHITECTURES.get(model_type, LLMKIT_ARCHITECTURE)]
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    _write_json(directory / "config.json", config)
    if tokenizer is not None:
        tokenizer.save(directory)


def save_reward_model(rm: RewardModel, tokenizer, path: str | Path) -> Path:
    """Write a reward-model directory atomically (a temp dir beside it, then a rename)."""
    with atomic_directory(Path(path)) as tmp:
        write_reward_model(rm, tokenizer, tmp)
    return Path(path)


def load_reward_model(path: str | Path, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[RewardModel, object]:
    """(reward model, tokenizer or None) from a directory written by `save_reward_model` or by transformers'
    `*ForSequenceClassification.save_pretrained` with num_labels 1."""
    from llmkit.checkpoint import CheckpointError, _read_tensors, from_hf_state_dict, load_config

    path = Path(path)
    if not is_reward_model(path):
        raise CheckpointError(f"{path}: not a reward model (config.json names no *ForSequenceClassification "
                              f"or {LLMKIT_ARCHITECTURE} architecture); train one with `llmkit align rm`")
    config_json = json.loads((path / "config.json").read_text())
    if len(config_json.get("id2label") or {"0": 0}) != 1:
        raise CheckpointError(f"{path / 'config.json'}: a reward model has one label (num_labels 1), got "
                              f"{len(config_json['id2label'])}")
    cfg = load_config(path)
    device = torch.device(device or "cpu")
    raw, origin = _read_tensors(path, device)
    sd = from_hf_state_dict(raw, cfg, config_json.get("model_type"))
    if "score.weight" not in sd:
        raise CheckpointError(f"{path}: tensor 'score.weight' is missing")
    with torch.device("meta"):
        rm = RewardModel(cfg)
    expected = set(rm.state_dict())
    unexpected = sorted(set(sd) - expected - {"lm_head.weight"})
    missing = sorted(expected - set(sd))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise CheckpointError(f"{path}: tensor {name!r} is {'missing' if missing else 'unexpected'}")
    sd.pop("lm_head.weight", None)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    rm.load_state_dict(sd, assign=True)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from llmkit.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path)
    return rm.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- training


class RewardTrainer(AlignTrainer):
    """Trains a reward model on preference pairs and ranked lists through the fine-tuning loop."""

    trainable_heads = ("score.",)
    algorithm = "rm"

    @property
    def result_name(self) -> str:
        return "model"  # a reward model is always a whole directory (adapters are merged in)

    def _load_model(self):
        cfg = self.align
        if is_reward_model(cfg.model):  # continue training a reward model
            self.task = "reward"
            return load_reward_model(cfg.model)
        lm, tok = super()._load_model()
        self.task = "reward"
        torch.manual_seed(cfg.seed)
        return RewardModel.from_backbone(lm.model), tok

    def _preference_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """InstructGPT's loss over every ranked pair; a pair is a list of two. Lists of one length are scored
        together; the loss is the mean over lists."""
        scores = self.raw_model(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        margins = batch["margins"].to(self.device) + self.align.margin
        by_size: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for b, K in enumerate(batch["group_sizes"]):
            by_size.setdefault(K, []).append((b, start))
            start += K
        n_lists = len(batch["group_sizes"])
        loss = torch.zeros((), device=self.device)
        accuracy = margin = 0.0
        for K, lists in by_size.items():
            rows = torch.tensor([[s + k for k in range(K)] for _, s in lists], device=self.device)
            grouped = scores[rows]  # [lists, K], best first
            weight = len(lists) / n_lists
            loss = loss + weight * ranking_loss(grouped, margins[[b for b, _ in lists]].unsqueeze(1))
            grouped = grouped.detach()
            accuracy += weight * float(ranking_accuracy(grouped))
            margin += weight * float((grouped[:, 0] - grouped[:, -1]).mean())
        scores = scores.detach()
        return loss, {"accuracy": accuracy, "margin": margin, "reward_mean": float(scores.mean()),
                      "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0}

    def _write_result(self, directory: Path) -> None:
        from llmkit import peft

        rm = self.raw_model
        if self.peft_config is not None:  # fold the adapters into a copy: the result loads without peft
            rm = peft.merge_and_unload(copy.deepcopy(rm))
        write_reward_model(rm, self.tokenizer, directory)
