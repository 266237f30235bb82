"""Prompt-learning methods: virtual tokens the base model never had, learned while it stays frozen.

  prompt       prompt tuning (Lester et al. 2021): P soft-prompt embeddings before the input
  p-tuning     P-tuning (Liu et al. 2021): the soft prompt comes out of an MLP prompt encoder
  prefix       prefix tuning (Li & Liang 2021): P keys and values at every layer, produced by an MLP
               from P small embeddings (the reparameterisation that keeps training stable)
  p-tuning-v2  P-tuning v2 (Liu et al. 2022): deep prompts, i.e. the per-layer keys/values learned directly

The model is wrapped, not edited: `PromptTuned(model)` prepends the prompt (through `inputs_embeds`) or
hands the prefixes to every attention layer (`prefix_kv`), and returns the logits of the real tokens only.
As in transformers with a cache of P entries, the real tokens of a prefix method sit at positions P, P+1, ...

Saved as PEFT saves them: one tensor `prompt_embeddings`, the encoder's output table ([P, C] for prompts;
[P, layers * 2 * kv_heads * head_dim] for prefixes). A table loaded from a file is used as is (PEFT's
inference mode); training keeps the encoder and checkpoints it whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmkit.peft.core import AdapterConfig, PeftError

PREFIX_METHODS = ("prefix", "p-tuning-v2")
PEFT_TYPE = {"prompt": "PROMPT_TUNING", "p-tuning": "P_TUNING", "prefix": "PREFIX_TUNING",
             "p-tuning-v2": "PREFIX_TUNING"}


@dataclass
class PromptConfig(AdapterConfig):
    method: str = "prompt"  # prompt | p-tuning | prefix | p-tuning-v2
    num_virtual_tokens: int = 20
    init_text: str | None = None  # prompt: start from this text's token embeddings (repeated or cut to P)
    encoder_hidden_size: int = 128  # p-tuning / prefix: width of the reparameterisation MLP
    table_only: bool = False  # loaded from an adapter file: the saved table is the parameter
    mergeable = False  # virtual tokens are inputs, not weights

    def __post_init__(self):
        if self.method not in PEFT_TYPE:
            raise PeftError(f"prompt method must be one of {sorted(PEFT_TYPE)}, got {self.method!r}")
        if self.num_virtual_tokens < 1:
            raise PeftError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")

    @property
    def prefix(self) -> bool:
        return self.method in PREFIX_METHODS

    def to_peft(self, model: nn.Module) -> dict:
        cfg = model.config
        d = {"peft_type": PEFT_TYPE[self.method], "task_type": "CAUSAL_LM",
             "num_virtual_tokens": self.num_virtual_tokens, "num_transformer_submodules": 1,
             "num_layers": cfg.n_layer, "inference_mode": True,
             "modules_to_save": None, "peft_version": "0.21.2"}
        if self.method == "prompt":
            d.update(token_dim=cfg.d_model, num_attention_heads=cfg.n_head, tokenizer_kwargs=None,
                     prompt_tuning_init="TEXT" if self.init_text else "RANDOM",
                     prompt_tuning_init_text=self.init_text, tokenizer_name_or_path=None)
        elif self.method == "p-tuning":
            d.update(token_dim=cfg.d_model, num_attention_heads=cfg.n_head, encoder_reparameterization_type="MLP",
                     encoder_hidden_size=self.encoder_hidden_size, encoder_num_layers=2, encoder_dropout=0.0)
        else:  # PEFT sizes prefixes by the key/value heads (GQA)
            d.update(token_dim=cfg.n_kv_head * cfg.head_dim, num_attention_heads=cfg.n_kv_head,
                     encoder_hidden_size=self.encoder_hidden_size, prefix_projection=self.method == "prefix",
                     init_weights=None)
        return d

    @classmethod
    def from_peft(cls, d: dict) -> "PromptConfig":
        kind = {"PROMPT_TUNING": "prompt", "P_TUNING": "p-tuning"}.get(d["peft_type"])
        if kind is None:
            kind = "prefix" if d.get("prefix_projection") else "p-tuning-v2"
        if d.get("num_transformer_submodules", 1) != 1:
            raise PeftError("num_transformer_submodules must be 1 (decoder-only models)")
        return cls(method=kind, num_virtual_tokens=d["num_virtual_tokens"],
                   encoder_hidden_size=d.get("encoder_hidden_size") or 128, table_only=True)


class PromptEncoder(nn.Module):
    """The learned table of one prompt method: `forward()` -> [P, width]."""

    def __init__(self, cfg: PromptConfig, model: nn.Module, tokenizer=None):
        super().__init__()
        mc, P = model.config, cfg.num_virtual_tokens
        width = mc.n_layer * 2 * mc.n_kv_head * mc.head_dim if cfg.prefix else mc.d_model
        device = model.model.embed_tokens.weight.device  # a quantised lm_head has no .weight
        self.method, self.width = cfg.method, width
        self.embedding = self.transform = None
        if cfg.table_only:
            self.embedding = nn.Embedding(P, width, device=device)
        elif cfg.method == "prompt":
            self.embedding = nn.Embedding(P, width, device=device)
            self.embedding.weight.data.copy_(_initial_prompt(cfg, model, tokenizer))
        elif cfg.method == "p-tuning":  # PEFT's MLP prompt encoder
            H = cfg.encoder_hidden_size
            self.embedding = nn.Embedding(P, width, device=device)
            self.transform = nn.Sequential(nn.Linear(width, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(),
                                           nn.Linear(H, width)).to(device)
        elif cfg.method == "prefix":  # PEFT's PrefixEncoder with prefix_projection
            H, C = cfg.encoder_hidden_size, mc.n_kv_head * mc.head_dim
            self.embedding = nn.Embedding(P, C, device=device)
            self.transform = nn.Sequential(nn.Linear(C, H), nn.Tanh(), nn.Linear(H, width)).to(device)
        else:  # p-tuning v2: the deep prompts themselves
            self.embedding = nn.Embedding(P, width, device=device)

    def forward(self) -> Tensor:
        table = self.embedding.weight
        return table if self.transform is None else self.transform(table)


def _initial_prompt(cfg: PromptConfig, model: nn.Module, tokenizer) -> Tensor:
    """Embeddings of the init text (repeated or cut to P), else of P random vocabulary tokens (Lester et al.)."""
    embed, P = model.model.embed_tokens.weight, cfg.num_virtual_tokens
    if cfg.init_text:
        if tokenizer is None:
            raise PeftError("prompt tuning initialised from text needs the tokenizer")
        ids = tokenizer.encode(cfg.init_text)
        if not ids:
            raise PeftError(f"prompt init text {cfg.init_text!r} encodes to no token")
        ids = (ids * math.ceil(P / len(ids)))[:P]
    else:
        ids = torch.randint(0, embed.shape[0], (P,)).tolist()
    return embed.detach()[torch.tensor(ids, device=embed.device)].float().clone()


class PromptTuned(nn.Module):
    """A frozen model plus virtual tokens: `forward(input_ids, ...)` -> logits [B, T, V] of the real tokens."""

    def __init__(self, model: nn.Module, cfg: PromptConfig, tokenizer=None):
        super().__init__()
        self.base = model
        self.config = model.config
        self.peft_config = cfg
        self.prompt_encoder = PromptEncoder(cfg, model, tokenizer)
        self.disabled = False
        self.train(model.training)
        for p in model.parameters():
            p.requires_grad_(False)

    def prefix_kv(self, B: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Per layer (keys, values) [B, K, P, D], laid out as PEFT lays out its past_key_values."""
        mc, P = self.config, self.peft_config.num_virtual_tokens
        table = self.prompt_encoder().to(dtype).view(P, mc.n_layer, 2, mc.n_kv_head, mc.head_dim)
        table = table.permute(1, 2, 3, 0, 4)  # [L, 2, K, P, D]
        return [(table[i, 0].expand(B, -1, -1, -1), table[i, 1].expand(B, -1, -1, -1)) for i in range(mc.n_layer)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                segment_ids: Tensor | None = None, **kwargs) -> Tensor:
        if self.disabled:
            return self.base(input_ids, attention_mask, position_ids, segment_ids=segment_ids, **kwargs)
        if kwargs:
            raise PeftError(f"{self.peft_config.method}: {sorted(kwargs)} are not supported with virtual tokens")
        B, T = input_ids.shape
        P = self.peft_config.num_virtual_tokens
        embed = self.base.model.embed_tokens
        if self.peft_config.prefix:
            if position_ids is None:  # transformers: the real tokens follow P cached positions
                position_ids = torch.arange(T, device=input_ids.device).expand(B, -1)
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return self.base(input_ids, attention_mask, position_ids + P, segment_ids=segment_ids,
                             prefix_kv=self.prefix_kv(B, embed.weight.dtype))
        if segment_ids is not None:
            raise PeftError(f"{self.peft_config.method}: packed sequences are not supported (every example needs its "
                            "own virtual tokens); train without --pack")
        prompts = self.prompt_encoder().to(embed.weight.dtype).expand(B, -1, -1)
        x = torch.cat([prompts, embed(input_ids)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        if position_ids is not None:
            virtual = torch.arange(P, device=input_ids.device).expand(B, -1)
            position_ids = torch.cat([virtual, position_ids + P], dim=1)
        hidden = self.base.model(None, attention_mask, position_ids, inputs_embeds=x)
        return self.base.lm_head(hidden[:, P:])  # the head only over the real tokens

    # -- PEFT's file layout: one table

    def prompt_state(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self.prompt_encoder().detach().float()}

    def load_prompt_state(self, state: dict[str, Tensor], source: str) -> None:
        if set(state) != {"prompt_embeddings"}:
            raise PeftError(f"{source}: expected exactly one tensor 'prompt_embeddings', got {sorted(state)[:3]}")
        table = state["prompt_embeddings"]
        enc = self.prompt_encoder
        if enc.transform is not None:
            raise PeftError(f"{source}: a saved table can only be loaded into an inference-mode (table_only) encoder")
        if tuple(table.shape) != tuple(enc.embedding.weight.shape):
            raise PeftError(f"{source}: prompt_embeddings has shape {tuple(table.shape)}, expected "
                            f"{tuple(enc.embedding.weight.shape)} for this model and config")
        with torch.no_grad():
            enc.embedding.weight.copy_(table)


def inject(model: nn.Module, cfg: PromptConfig, tokenizer=None) -> PromptTuned:
    if not hasattr(model, "model") or not hasattr(model.model, "embed_tokens"):
        raise PeftError("prompt methods need an llmkit Transformer")
    return PromptTuned(model, cfg, tokenizer)
