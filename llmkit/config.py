"""Model configuration: one flat dataclass where every architecture variant is a field.

Class choices are strings so a config is plain JSON (saved inside `config.json`).
Presets are dicts of overrides; `ModelConfig.from_preset("llama-2-7b")` builds one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post", "deepnorm")
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "gelu", "gelu_tanh", "relu", "silu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
# "relative": T5's bucketed relative position bias, one table per stack
POSITIONS = ("rope", "alibi", "learned", "relative", "none")
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")
MASKS = ("causal", "prefix", "bidirectional")
# decoder: causal LM (Transformer); encoder: BERT family (Encoder); encoder-decoder: T5 family (EncoderDecoder)
ARCHITECTURES = ("decoder", "encoder", "encoder-decoder")


class ConfigError(ValueError):
    """A config field holds a value the model cannot be built from."""


@dataclass
class ModelConfig:
    name: str = "custom"
    architecture: str = "decoder"
    vocab_size: int = 32000
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None -> n_head (MHA); 1 < n < n_head -> GQA; 1 -> MQA
    d_model: int = 768
    d_ff: int | None = None  # None -> 4*d_model, or 8/3*d_model rounded up to 256 for gated MLPs
    head_dim: int | None = None  # None -> d_model // n_head
    max_seq_len: int = 2048

    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    # pre-LN (GPT-2, Llama), post-LN (original Transformer, BERT), DeepNorm (post-LN with the
    # residual scaled by alpha and sublayer init scaled by beta; Wang et al. 2022)
    norm_placement: str = "pre"
    deepnorm_alpha: float | None = None  # None -> (2N)^(1/4) for a decoder-only stack of N layers
    deepnorm_beta: float | None = None  # None -> (8N)^(-1/4)
    parallel_block: bool = False  # attention and MLP read the same input (GPT-J, PaLM)

    activation: str = "swiglu"

    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int | None = None  # context the model was trained with (YaRN, Llama 3)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    rope_partial_factor: float = 1.0  # fraction of head_dim that is rotated (GPT-NeoX, Phi)
    relative_buckets: int = 32  # position="relative": buckets of the T5 bias (half per direction in the encoder)
    relative_max_distance: int = 128  # distances beyond this share the last bucket

    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm only; RMSNorm has no bias
    tie_embeddings: bool = False

    dropout: float = 0.0  # embedding and residual dropout
    attn_dropout: float = 0.0
    mask: str = "causal"  # "prefix": bidirectional over a prefix (prefix_len given to forward), causal after
    attn_scale: float | None = None  # score scale; None -> 1/sqrt(head_dim); T5 uses 1.0 (folded into its init)
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings added to the input (BERT); 0 = none
    embed_norm: bool = False  # a norm right after the embeddings (BERT)
    n_decoder_layer: int | None = None  # encoder-decoder: decoder depth; None -> n_layer
    n_labels: int = 0  # encoder: a sequence-classification head with this many classes; 0 = none
    decoder_start_token_id: int | None = None  # encoder-decoder: first decoder input (T5: the pad id)
    scale_decoder_output: bool = False  # encoder-decoder: decoder output x d_model^-0.5 before the head (original T5)
    sliding_window: int | None = None  # each token sees at most this many previous tokens (itself included)

    # mixture of experts (decoder only): the MLP of every moe_layer_step-th block becomes a router over
    # n_experts MLPs of width moe_d_ff, each token sent to its top-k (Switch: top-1, Mixtral: top-2)
    n_experts: int = 0  # 0 = dense MLPs
    moe_top_k: int = 2
    moe_renormalize: bool = True  # top-k weights rescaled to sum to 1 (Mixtral; Qwen2-MoE's norm_topk_prob)
    moe_d_ff: int | None = None  # width of each routed expert; None -> d_ff
    moe_layer_step: int = 1  # block i is MoE when (i + 1) % step == 0 (HF's decoder_sparse_step; 2 in Switch)
    shared_expert_d_ff: int = 0  # an always-on shared expert MLP of this width (DeepSeekMoE, Qwen2-MoE); 0 = none
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(linear(x)) (Qwen2-MoE)
    # training only: each expert takes at most ceil(factor * tokens * k / n_experts) assignments, the rest
    # are dropped (their MoE output is 0, the residual carries them); None or 0 = dropless
    moe_capacity_factor: float | None = None
    moe_aux_loss_coef: float = 0.01  # Switch load-balancing loss n_experts * sum_i f_i * P_i (1 when balanced)
    moe_z_loss_coef: float = 0.0  # router z-loss mean(logsumexp(logits)^2) (ST-MoE uses 1e-3)

    init_std: float = 0.02
    scaled_residual_init: bool = True  # output projections get std/sqrt(2*n_layer) (GPT-2)

    # special-token ids stored for generation_config.json and HF interop
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept through save/load

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None and self.n_head > 0:
            if self.d_model % self.n_head:
                raise ConfigError(f"config field 'n_head' ({self.n_head}) must divide 'd_model' ({self.d_model})")
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            if self.activation in GATED_ACTIVATIONS:
                self.d_ff = 256 * math.ceil(int(8 * self.d_model / 3) / 256)
            else:
                self.d_ff = 4 * self.d_model
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.norm_placement == "deepnorm":
            if self.deepnorm_alpha is None:
                self.deepnorm_alpha = (2 * self.n_layer) ** 0.25
            if self.deepnorm_beta is None:
                self.deepnorm_beta = (8 * self.n_layer) ** -0.25
        self.validate()

    def validate(self) -> None:
        """Reject invalid combinations with a message naming the field."""
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        _check_choice("mask", self.mask, MASKS)
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        if self.architecture != "decoder" and self.mask != "bidirectional":
            raise ConfigError(f"architecture {self.architecture!r} needs mask='bidirectional' "
                              "(its encoder sees all tokens)")
        if self.architecture == "encoder-decoder" and (self.norm_placement != "pre" or self.position != "relative"):
            raise ConfigError("architecture 'encoder-decoder' is T5's: needs norm_placement='pre' and "
                              "position='relative'")
        if self.position == "relative" and self.architecture != "encoder-decoder":
            raise ConfigError("position 'relative' (T5 bias) is built for architecture 'encoder-decoder' only")
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"config field 'n_kv_head' ({self.n_kv_head}) must divide 'n_head' ({self.n_head})")
        if self.position == "rope":
            if self.rope_dim % 2:
                raise ConfigError(f"rotary dimension {self.rope_dim} (head_dim * rope_partial_factor) must be even")
            if self.rope_theta <= 0:
                raise ConfigError(f"config field 'rope_theta' must be positive, got {self.rope_theta}")
        if self.rope_scaling != "none":
            if self.position != "rope":
                raise ConfigError(f"config field 'rope_scaling' ({self.rope_scaling!r}) needs position='rope'")
            if self.rope_factor < 1:
                raise ConfigError(f"config field 'rope_factor' must be >= 1, got {self.rope_factor}")
            if self.rope_scaling in ("yarn", "llama3") and not self.rope_original_max_seq_len:
                raise ConfigError(f"rope_scaling={self.rope_scaling!r} needs 'rope_original_max_seq_len'")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError("config fields 'dropout' and 'attn_dropout' must be in [0, 1)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config field 'sliding_window' must be positive or null, got {self.sliding_window}")
        if self.norm_eps <= 0:
            raise ConfigError(f"config field 'norm_eps' must be positive, got {self.norm_eps}")
        if self.n_experts:
            self._validate_moe()

    def _validate_moe(self) -> None:
        if self.architecture != "decoder":
            raise ConfigError(f"config field 'n_experts' needs architecture 'decoder', got {self.architecture!r}")
        for name in ("n_experts", "moe_top_k", "moe_d_ff", "moe_layer_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.moe_top_k > self.n_experts:
            raise ConfigError(f"config field 'moe_top_k' ({self.moe_top_k}) must be <= 'n_experts' ({self.n_experts})")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor < 0:
            raise ConfigError(f"config field 'moe_capacity_factor' must be >= 0 or null, got {self.moe_capacity_factor}")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "shared_expert_d_ff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field {name!r} must be >= 0, got {getattr(self, name)}")
        if self.shared_expert_gate and not self.shared_expert_d_ff:
            raise ConfigError("config field 'shared_expert_gate' needs 'shared_expert_d_ff' > 0")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.rope_partial_factor)

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and (i + 1) % self.moe_layer_step == 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layer // self.moe_layer_step if self.n_experts else 0

    def mlp_params(self, width: int) -> int:
        """One MLP of hidden width `width` (an expert, the shared expert or the dense MLP)."""
        C = self.d_model
        return (3 if self.gated else 2) * C * width + (((2 if self.gated else 1) * width + C) if self.mlp_bias else 0)

    def moe_layer_params(self, active: bool = False) -> int:
        """A MoE feed-forward layer: router, routed experts (all, or the top-k a token uses) and shared expert."""
        experts = (self.moe_top_k if active else self.n_experts) * self.mlp_params(self.moe_d_ff)
        shared = self.mlp_params(self.shared_expert_d_ff) if self.shared_expert_d_ff else 0
        return self.d_model * self.n_experts + experts + shared + (self.d_model if self.shared_expert_gate else 0)

    @property
    def n_active_params(self) -> int:
        """Parameters one token passes through (n_params less the experts it is not routed to)."""
        return self.n_params - self.n_moe_layers * (self.moe_layer_params() - self.moe_layer_params(active=True))

    @property
    def n_params(self) -> int:
        """Parameter count of the model this config builds (tied embeddings counted once)."""
        C, F, H, K, D = self.d_model, self.d_ff, self.n_head, self.n_kv_head, self.head_dim
        attn = C * H * D + 2 * C * K * D + H * D * C
        if self.qkv_bias:
            attn += H * D + 2 * K * D
        if self.attn_out_bias:
            attn += C
        mlp = (3 if self.gated else 2) * C * F
        if self.mlp_bias:
            mlp += (2 * F if self.gated else F) + C
        norm = C * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        per_layer = attn + mlp + 2 * norm
        if self.architecture == "encoder":
            return self._encoder_params(per_layer, norm)
        if self.architecture == "encoder-decoder":  # decoder blocks add cross-attention and its norm
            tables = 2 * self.relative_buckets * H
            total = self.n_layer * per_layer + self.n_decoder_layer * (per_layer + attn + norm) + 2 * norm + tables
            return total + self.vocab_size * C * (1 if self.tie_embeddings else 2)
        total = self.n_layer * per_layer + norm + self.vocab_size * C
        total += self.n_moe_layers * (self.moe_layer_params() - mlp)
        if not self.tie_embeddings:
            total += self.vocab_size * C
        if self.position == "learned":
            total += self.max_seq_len * C
        return total

    def _encoder_params(self, per_layer: int, norm: int) -> int:
        C, V = self.d_model, self.vocab_size
        total = self.n_layer * per_layer + (V + self.max_seq_len + self.type_vocab_size) * C
        total += norm if self.embed_norm else 0
        if self.n_labels:  # pooler and classifier
            return total + C * C + C + C * self.n_labels + self.n_labels
        return total + C * C + C + norm + V + (0 if self.tie_embeddings else V * C)  # MLM head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{"name": name, **PRESETS[name], **overrides})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config field {name!r} must be one of {list(choices)}, got {value!r}")


_LLAMA = dict(norm="rmsnorm", activation="swiglu", position="rope", tie_embeddings=False)
_BERT = dict(
    architecture="encoder", mask="bidirectional", norm="layernorm", norm_placement="post", norm_eps=1e-12,
    activation="gelu", position="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
    type_vocab_size=2, embed_norm=True,
)
# T5 v1.1: RMS norm without mean or bias, gated GELU, unscaled scores, relative position bias
_T5 = dict(
    architecture="encoder-decoder", mask="bidirectional", norm="rmsnorm", norm_eps=1e-6, activation="geglu_tanh",
    position="relative", attn_scale=1.0, tie_embeddings=True,
)
_GPT2 = dict(
    norm="layernorm", activation="gelu_tanh", position="learned", qkv_bias=True, attn_out_bias=True,
    mlp_bias=True, tie_embeddings=True, norm_eps=1e-5,
)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny shapes for tests and CPU runs
    "tiny": dict(_LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=256),
    "tiny-gpt2": dict(_GPT2, vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=256),
    "shakespeare": dict(_LLAMA, vocab_size=2048, n_layer=4, n_head=4, n_kv_head=4, d_model=192, d_ff=512,
                        max_seq_len=256, tie_embeddings=True),
    "tiny-bert": dict(_BERT, vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=256),
    "tiny-t5": dict(_T5, vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=256),
    # real shapes
    "bert-base": dict(_BERT, vocab_size=30522, n_layer=12, n_head=12, d_model=768, d_ff=3072, max_seq_len=512),
    "t5-v1_1-small": dict(_T5, vocab_size=32128, n_layer=8, n_head=6, head_dim=64, d_model=512, d_ff=1024,
                          max_seq_len=512),
    "gpt2-124m": dict(_GPT2, vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "llama-134m": dict(_LLAMA, vocab_size=32000, n_layer=12, n_head=12, d_model=768, d_ff=2048, max_seq_len=2048,
                       norm_eps=1e-5),
    "tinyllama-1.1b": dict(_LLAMA, vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, d_model=2048, d_ff=5632,
                           max_seq_len=2048, norm_eps=1e-5),
    "llama-2-7b": dict(_LLAMA, vocab_size=32000, n_layer=32, n_head=32, d_model=4096, d_ff=11008, max_seq_len=4096,
                       norm_eps=1e-5),
    "mistral-7b": dict(_LLAMA, vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, d_model=4096, d_ff=14336,
                       max_seq_len=32768, norm_eps=1e-5, sliding_window=4096, rope_theta=10000.0),
    # GPT-3 175B (Brown et al. 2020, table 2.1) with the vocabulary padded to 51200 as in Megatron-LM
    "gpt3-175b": dict(_GPT2, vocab_size=51200, n_layer=96, n_head=96, d_model=12288, max_seq_len=2048),
    # mixtures of experts: Switch (top-1, capacity 1.25, MoE every other block; Fedus et al. 2021) and Mixtral
    # (top-2 of 8, dropless, renormalised weights), tiny shapes and Mixtral 8x7B's
    "tiny-switch": dict(_LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                        max_seq_len=256, n_experts=8, moe_top_k=1, moe_renormalize=False, moe_capacity_factor=1.25,
                        moe_layer_step=2, moe_aux_loss_coef=0.01),
    "tiny-mixtral": dict(_LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                         max_seq_len=256, n_experts=8, moe_top_k=2, moe_aux_loss_coef=0.01),
    "mixtral-8x7b": dict(_LLAMA, vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, d_model=4096, d_ff=14336,
                         max_seq_len=32768, norm_eps=1e-5, rope_theta=1e6, n_experts=8, moe_top_k=2,
                         moe_aux_loss_coef=0.02),
    "qwen2-0.5b": dict(_LLAMA, vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896, d_ff=4864,
                       max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True),
}
