"""Checkpoint directories that Hugging Face `transformers` loads unchanged, and that load here.

A checkpoint is `config.json`, `model.safetensors` (or shards + `model.safetensors.index.json`),
`generation_config.json` and the tokenizer files. When the config maps onto an HF
architecture (Llama, Mistral, Qwen2, GPT-2), config.json is HF's own, with llmkit-only
fields kept under the key "llmkit"; otherwise model_type is "llmkit" and only llmkit reads it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.config import ConfigError, ModelConfig
from llmkit.model import Transformer, build_model

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
# fields HF configs have no place for; they ride along under config.json["llmkit"]
LLMKIT_ONLY_FIELDS = ("name", "init_std", "scaled_residual_init", "extra")
# training-only MoE settings HF's MoE configs have no field for (written for MoE checkpoints only)
MOE_ONLY_FIELDS = ("moe_capacity_factor", "moe_z_loss_coef")
MOE_TYPES = ("mixtral", "qwen2_moe")
# tensors some HF checkpoints carry that are derived, not learned
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias", "embeddings.position_ids")


class CheckpointError(ValueError):
    """A checkpoint directory is missing something or holds something unexpected."""


# ----------------------------------------------------------------------------- configs


def hf_model_type(cfg: ModelConfig) -> str | None:
    """The HF architecture that expresses `cfg` exactly, or None when only llmkit can."""
    if cfg.architecture != "decoder":
        return seq2seq_or_encoder_type(cfg)
    common = cfg.norm_placement == "pre" and not cfg.parallel_block and cfg.mask == "causal"
    if not common or cfg.rope_partial_factor != 1.0:
        return None
    if (
        cfg.norm == "layernorm" and cfg.norm_bias and cfg.activation == "gelu_tanh" and cfg.position == "learned"
        and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias and cfg.tie_embeddings
        and cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.d_model and cfg.sliding_window is None
    ):
        return "gpt2"
    if cfg.norm != "rmsnorm" or cfg.activation != "swiglu" or cfg.position != "rope":
        return None
    if cfg.n_experts:
        return moe_model_type(cfg)
    if cfg.sliding_window is not None:
        return "mistral" if not (cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias) else None
    if cfg.qkv_bias and not cfg.attn_out_bias and not cfg.mlp_bias:
        return "qwen2"
    if cfg.qkv_bias == cfg.attn_out_bias:
        return "llama"
    return None


def moe_model_type(cfg: ModelConfig) -> str | None:
    """'mixtral' (top-k renormalised, no shared expert, every block MoE) or 'qwen2_moe' (gated shared expert,
    q/k/v biases, no window), or None for other mixtures."""
    if cfg.attn_out_bias or cfg.mlp_bias:
        return None
    if cfg.shared_expert_d_ff and cfg.shared_expert_gate and cfg.qkv_bias and cfg.sliding_window is None:
        return "qwen2_moe"
    if not cfg.shared_expert_d_ff and not cfg.qkv_bias and cfg.moe_renormalize and cfg.moe_layer_step == 1:
        return "mixtral"
    return None


def moe_config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    out = {"num_experts_per_tok": cfg.moe_top_k, "router_aux_loss_coef": cfg.moe_aux_loss_coef,
           "output_router_logits": False}
    if model_type == "mixtral":  # every block is MoE: intermediate_size is the experts' width
        return {**out, "num_local_experts": cfg.n_experts, "intermediate_size": cfg.moe_d_ff,
                "sliding_window": cfg.sliding_window, "router_jitter_noise": 0.0}
    return {**out, "num_experts": cfg.n_experts, "moe_intermediate_size": cfg.moe_d_ff,
            "shared_expert_intermediate_size": cfg.shared_expert_d_ff, "norm_topk_prob": cfg.moe_renormalize,
            "decoder_sparse_step": cfg.moe_layer_step, "mlp_only_layers": [], "qkv_bias": True,
            "use_sliding_window": False, "sliding_window": None}


def moe_config_from_hf(d: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """ModelConfig fields of a Mixtral or Qwen2-MoE config.json."""
    common = {"moe_top_k": d.get("num_experts_per_tok", 2), "moe_aux_loss_coef": d.get("router_aux_loss_coef", 0.01)}
    if model_type == "mixtral":
        return {**common, "n_experts": d["num_local_experts"], "moe_d_ff": d["intermediate_size"]}
    if d.get("mlp_only_layers"):
        raise ConfigError(f"{source}: Qwen2-MoE field 'mlp_only_layers' is not supported (use decoder_sparse_step)")
    return {**common, "n_experts": d["num_experts"], "moe_d_ff": d["moe_intermediate_size"],
            "shared_expert_d_ff": d["shared_expert_intermediate_size"], "shared_expert_gate": True,
            "moe_renormalize": bool(d.get("norm_topk_prob", False)), "moe_layer_step": d.get("decoder_sparse_step", 1)}


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    tokens = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    if model_type in ("bert", "t5"):
        return {**(bert_config_to_hf(cfg) if model_type == "bert" else t5_config_to_hf(cfg)), **tokens}
    if model_type == "gpt2":
        return {
            "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attn_dropout, "initializer_range": cfg.init_std,
            "tie_word_embeddings": True, **tokens,
        }
    out = {
        "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "attention_dropout": cfg.attn_dropout, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, **_rope_to_hf(cfg), **tokens,
    }
    if model_type == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    elif model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    elif model_type in MOE_TYPES:
        out.update(moe_config_to_hf(cfg, model_type))
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    theta = cfg.rope_theta
    params: dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling == "ntk":
        # static NTK-aware scaling is exactly a larger base, which every HF version understands
        theta = theta * cfg.rope_factor ** (cfg.rope_dim / (cfg.rope_dim - 2))
    elif cfg.rope_scaling == "linear":
        params = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "yarn":
        params = {
            "rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.yarn_beta_fast,
            "beta_slow": cfg.yarn_beta_slow, "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }
    elif cfg.rope_scaling == "llama3":
        params = {
            "rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.llama3_low_freq_factor,
            "high_freq_factor": cfg.llama3_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }
    # transformers >= 5 reads rope_parameters; 4.x reads rope_theta + rope_scaling
    legacy = None if params["rope_type"] == "default" else dict(params, type=params["rope_type"])
    return {"rope_parameters": {**params, "rope_theta": theta}, "rope_theta": theta, "rope_scaling": legacy}


def config_from_hf(d: dict[str, Any], source: str) -> ModelConfig:
    """Map an HF config.json onto ModelConfig; unsupported settings fail naming the field."""
    model_type = d.get("model_type")
    tokens = {k: _first_id(d.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    extra = {k: v for k, v in (d.get("llmkit") or {}).items() if k in LLMKIT_ONLY_FIELDS}
    if model_type == "gpt2":
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{source}: field 'activation_function' = {act!r} is not supported (expected gelu_new)")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ConfigError(f"{source}: GPT-2 attention variants 'scale_attn_by_inverse_layer_idx' and "
                              "'reorder_and_upcast_attn' are not supported")
        return ModelConfig(
            norm="layernorm", activation="gelu_tanh", position="learned", qkv_bias=True, attn_out_bias=True,
            mlp_bias=True, tie_embeddings=bool(d.get("tie_word_embeddings", True)), vocab_size=d["vocab_size"],
            d_model=d["n_embd"], n_layer=d["n_layer"], n_head=d["n_head"], d_ff=d.get("n_inner"),
            max_seq_len=d.get("n_positions", 1024), norm_eps=d.get("layer_norm_epsilon", 1e-5),
            dropout=d.get("resid_pdrop", 0.0), attn_dropout=d.get("attn_pdrop", 0.0),
            **tokens, **extra,
        )
    if model_type in ("bert", "t5"):
        return (bert_config_from_hf if model_type == "bert" else t5_config_from_hf)(d, source, {**tokens, **extra})
    if model_type not in ("llama", "mistral", "qwen2", *MOE_TYPES):
        raise ConfigError(
            f"{source}: unknown model_type {model_type!r}; llmkit reads llama, mistral, qwen2, mixtral, qwen2_moe, "
            "gpt2, bert, t5 and llmkit"
        )
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "gelu"):
        raise ConfigError(f"{source}: field 'hidden_act' = {act!r} is not supported (expected silu or gelu)")
    qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
    if model_type == "qwen2_moe":
        qkv_bias = bool(d.get("qkv_bias", True))
    sliding = d.get("sliding_window") if model_type in ("mistral", "mixtral") else None
    if model_type in ("qwen2", "qwen2_moe") and d.get("use_sliding_window"):
        raise ConfigError(f"{source}: Qwen2 'use_sliding_window' (per-layer windows) is not supported")
    moe = moe_config_from_hf(d, model_type, source) if model_type in MOE_TYPES else {}
    moe.update({k: v for k, v in (d.get("llmkit") or {}).items() if k in MOE_ONLY_FIELDS and moe})
    n_head = d["num_attention_heads"]
    return ModelConfig(
        norm="rmsnorm", activation="swiglu" if act == "silu" else "geglu", position="rope",
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], d_ff=d["intermediate_size"],
        n_layer=d["num_hidden_layers"], n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head,
        head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
        max_seq_len=d.get("max_position_embeddings", 2048), norm_eps=d.get("rms_norm_eps", 1e-6),
        qkv_bias=qkv_bias, attn_out_bias=model_type == "llama" and qkv_bias,
        mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), sliding_window=sliding,
        attn_dropout=d.get("attention_dropout", 0.0), **_rope_from_hf(d, source), **moe, **tokens, **extra,
    )


def _rope_from_hf(d: dict[str, Any], source: str) -> dict[str, Any]:
    params = d.get("rope_parameters") or {}
    scaling = params if "rope_type" in params or "type" in params else (d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": theta, "rope_partial_factor": params.get("partial_rotary_factor", 1.0)}
    if kind == "default":
        return out
    if kind not in ("linear", "yarn", "llama3"):
        raise ConfigError(f"{source}: rope_type {kind!r} is not supported (expected default, linear, yarn or llama3)")
    if kind == "yarn" and (scaling.get("attention_factor") or scaling.get("mscale") or scaling.get("truncate") is False):
        raise ConfigError(f"{source}: YaRN 'attention_factor', 'mscale' and 'truncate' overrides are not supported")
    out.update(rope_scaling=kind, rope_factor=float(scaling["factor"]))
    if kind in ("yarn", "llama3"):
        out["rope_original_max_seq_len"] = scaling["original_max_position_embeddings"]
    if kind == "yarn":
        out.update(yarn_beta_fast=scaling.get("beta_fast") or 32.0, yarn_beta_slow=scaling.get("beta_slow") or 1.0)
    if kind == "llama3":
        out.update(llama3_low_freq_factor=scaling["low_freq_factor"],
                   llama3_high_freq_factor=scaling["high_freq_factor"])
    return out


def _first_id(value: Any) -> int | None:
    # HF allows a list of eos ids; llmkit's config keeps the first (generation_config keeps all)
    return value[0] if isinstance(value, list) and value else value


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a checkpoint directory needs config.json")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if d.get("model_type") == "llmkit":
        return ModelConfig.from_dict(d["llmkit"], source=str(file))
    return config_from_hf(d, str(file))


# ----------------------------------------------------------------------------- weights


def to_hf_state_dict(sd: dict[str, Tensor], cfg: ModelConfig, model_type: str | None) -> dict[str, Tensor]:
    """llmkit names -> the checkpoint's names (identical except for GPT-2, BERT and T5); tied head dropped."""
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == tied_head_key(cfg))}
    if model_type in RENAMES:
        return rename_tensors(sd, model_type, to_hf=True)
    if model_type == "mixtral":
        return {mixtral_key(k, to_hf=True): v for k, v in sd.items()}
    if model_type != "gpt2":
        return sd
    out = {
        "transformer.wte.weight": sd["model.embed_tokens.weight"],
        "transformer.wpe.weight": sd["model.embed_positions.weight"],
        "transformer.ln_f.weight": sd["model.norm.weight"],
        "transformer.ln_f.bias": sd["model.norm.bias"],
    }
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
        qkv = [f"{src}self_attn.{p}_proj" for p in "qkv"]
        # GPT-2's Conv1D stores weights as [in, out]: transpose every projection
        out[f"{dst}attn.c_attn.weight"] = torch.cat([sd[f"{n}.weight"] for n in qkv]).t()
        out[f"{dst}attn.c_attn.bias"] = torch.cat([sd[f"{n}.bias"] for n in qkv])
        for a, b in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
            out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"].t()
            out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
    return out


def from_hf_state_dict(sd: dict[str, Tensor], cfg: ModelConfig, model_type: str | None) -> dict[str, Tensor]:
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_TENSOR_SUFFIXES)}
    if model_type in RENAMES:
        return rename_tensors(sd, model_type, to_hf=False)
    if model_type in MOE_TYPES:
        sd = unfuse_experts(sd)
        return {mixtral_key(k, to_hf=False): v for k, v in sd.items()} if model_type == "mixtral" else sd
    if model_type != "gpt2":
        return sd
    # the original GPT-2 checkpoints have no "transformer." prefix
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] in ("wte", "wpe", "ln_f"):
            name = {"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm"}[parts[0]]
            out[f"{name}.{parts[1]}"] = value
            continue
        if parts[0] != "h":
            out[key] = value  # reported as unexpected by the caller
            continue
        i, module, kind = parts[1], ".".join(parts[2:-1]), parts[-1]
        dst = f"model.layers.{i}."
        if module == "attn.c_attn":
            tensor = value.t() if kind == "weight" else value
            for p, chunk in zip("qkv", tensor.chunk(3, dim=0)):
                out[f"{dst}self_attn.{p}_proj.{kind}"] = chunk
            continue
        name = {
            "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
            "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj",
        }.get(module)
        if name is None:
            out[key] = value
            continue
        transpose = kind == "weight" and module != "ln_1" and module != "ln_2"
        out[f"{dst}{name}.{kind}"] = value.t() if transpose else value
    return out


def _read_tensors(path: Path, device: str | torch.device) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a checkpoint dir, and for each the file it came from (for error messages)."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        index = path / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        if (path / "model.safetensors").is_file():
            files, loader = ["model.safetensors"], "st"
        elif (path / "pytorch_model.bin").is_file():
            files, loader = ["pytorch_model.bin"], "bin"
        else:
            raise CheckpointError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")
    tensors, origin = {}, {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in the checkpoint's index)")
        if loader == "st":
            part = load_file(str(file), device=str(device))
        else:
            # weights_only refuses pickled code: a .bin checkpoint can never run anything on load
            part = torch.load(file, map_location=device, weights_only=True, mmap=True)
        tensors.update(part)
        origin.update(dict.fromkeys(part, name))
    return tensors, origin


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg = load_config(path)
    if cfg.architecture == "decoder":
        from llmkit.align.reward import is_reward_model, load_reward_model

        if is_reward_model(path):  # a decoder with a score head: `model(ids, mask)` gives one reward a row
            return load_reward_model(path, device, dtype)[0]
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    device = torch.device(device or "cpu")
    raw, origin = _read_tensors(path, device)
    sd = from_hf_state_dict(raw, cfg, model_type)
    with torch.device("meta"):
        model = build_model(cfg)
    quantization = json.loads((path / "config.json").read_text()).get("quantization_config")
    if quantization is not None:  # quantised linears rebuilt from the saved tensors' shapes
        from llmkit.infer.quantize import convert_for_loading

        convert_for_loading(model, quantization, sd)
        model.quantization_config = quantization
    tied = tied_head_key(cfg) if cfg.tie_embeddings else None
    expected = {k: v for k, v in model.state_dict().items() if k != tied}
    _check_tensors(path, sd, expected, origin)
    sd.pop(tied, None)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    return model.to(device).eval()  # as transformers' from_pretrained: dropout off until a trainer turns it on


def _check_tensors(path: Path, sd: dict[str, Tensor], expected: dict[str, Tensor], origin: dict[str, str]) -> None:
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(sd) - set(expected) - {"lm_head.weight", "mlm_head.decoder.weight"})
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} in {origin.get(unexpected[0], 'checkpoint')}")
    for name, ref in expected.items():
        if sd[name].shape != ref.shape:
            raise CheckpointError(
                f"{path / origin.get(name, '?')}: tensor {name!r} has shape {tuple(sd[name].shape)}, "
                f"expected {tuple(ref.shape)} from config.json"
            )


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Read an llmkit or Hugging Face checkpoint directory -> (model, tokenizer or None)."""
    model = load_model(path, device, dtype)
    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()):
        return model, None
    from llmkit.tokenizer import Tokenizer

    return model, Tokenizer.load(path)


# ----------------------------------------------------------------------------- saving


def save(model: Transformer, tokenizer=None, path: str | Path = "checkpoint", max_shard_size: str | int = "5GB") -> Path:
    """Write a checkpoint directory atomically (temp dir in the same parent, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_checkpoint_files(model, tokenizer, tmp, max_shard_size)
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_checkpoint_files(model: Transformer, tokenizer, out: Path, max_shard_size: str | int,
                           state_dict: dict[str, Tensor] | None = None) -> None:
    """The checkpoint files into `out`; `state_dict` overrides the model's own (e.g. one gathered from FSDP shards)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    cfg = model.config
    model_type = hf_model_type(cfg)
    sd = to_hf_state_dict(model.state_dict() if state_dict is None else state_dict, cfg, model_type)
    # safetensors refuses shared storage: give every tensor its own contiguous memory
    sd = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared_ptrs(sd) else v.detach().contiguous()
          for k, v in sd.items()}
    dtype = next(iter(sd.values())).dtype
    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": split.tensor_to_filename}
        _write_json(out / "model.safetensors.index.json", index)
    _write_json(out / "config.json", checkpoint_config(cfg, model_type, dtype))
    _write_json(out / "generation_config.json", {
        k: v for k, v in {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                          "pad_token_id": cfg.pad_token_id}.items() if v is not None
    })
    if tokenizer is not None:
        tokenizer.save(out)


def _shared_ptrs(sd: dict[str, Tensor]) -> set[int]:
    seen, shared = set(), set()
    for v in sd.values():
        ptr = v.data_ptr()
        (shared if ptr in seen else seen).add(ptr)
    return shared


def checkpoint_config(cfg: ModelConfig, model_type: str | None, dtype: torch.dtype) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    if model_type is None:
        return {"model_type": "llmkit", "architectures": ["LlmkitForCausalLM"], "dtype": dtype_name,
                "llmkit": cfg.to_dict()}
    hf = config_to_hf(cfg, model_type)
    kept = LLMKIT_ONLY_FIELDS + (MOE_ONLY_FIELDS if model_type in MOE_TYPES else ())
    llmkit_only = {k: v for k, v in cfg.to_dict().items() if k in kept}
    architecture = HF_ARCHITECTURES[model_type]
    if model_type == "bert" and cfg.n_labels:
        architecture = "BertForSequenceClassification"
    return {"architectures": [architecture], **hf, "dtype": dtype_name, "llmkit": llmkit_only}


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _move_into_place(tmp: Path, path: Path) -> None:
    """A new dir is renamed whole; into an existing dir each file is replaced atomically, stale shards removed."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    for stale in path.glob("model*.safetensors*"):
        if not (tmp / stale.name).exists():
            stale.unlink()
    for file in tmp.iterdir():
        os.replace(file, path / file.name)


# ----------------------------------------------------------------------------- BERT and T5


def tied_head_key(cfg: ModelConfig) -> str:
    """The output projection that shares the embedding matrix when cfg.tie_embeddings."""
    return "mlm_head.decoder.weight" if cfg.architecture == "encoder" else "lm_head.weight"


def tie_state_dict(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A state dict read from a file that stores a tied matrix once, with the head's name filled in again."""
    if cfg.tie_embeddings:
        embedding = "shared.weight" if cfg.architecture == "encoder-decoder" else "model.embed_tokens.weight"
        sd[tied_head_key(cfg)] = sd[embedding]
    return sd


def seq2seq_or_encoder_type(cfg: ModelConfig) -> str | None:
    """'bert' or 't5' when transformers' BERT / T5 express `cfg` exactly, else None."""
    if cfg.architecture == "encoder":
        bert = dict(norm="layernorm", norm_placement="post", activation="gelu", position="learned", qkv_bias=True,
                    attn_out_bias=True, mlp_bias=True, tie_embeddings=True, embed_norm=True, norm_bias=True,
                    attn_scale=None, n_kv_head=cfg.n_head, head_dim=cfg.d_model // cfg.n_head)
        return "bert" if all(getattr(cfg, k) == v for k, v in bert.items()) and cfg.type_vocab_size else None
    t5 = dict(norm="rmsnorm", qkv_bias=False, attn_out_bias=False, mlp_bias=False, attn_scale=1.0, n_kv_head=cfg.n_head)
    ok = all(getattr(cfg, k) == v for k, v in t5.items()) and cfg.activation in T5_ACTIVATIONS.values()
    return "t5" if ok and cfg.type_vocab_size == 0 and not cfg.embed_norm else None


# T5's feed_forward_proj -> llmkit activation ("gated-gelu" is the tanh GELU, gelu_new, in transformers)
T5_ACTIVATIONS = {"gated-gelu": "geglu_tanh", "relu": "relu", "gated-silu": "swiglu", "gelu": "gelu"}


def bert_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = {
        "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu", "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout, "position_embedding_type": "absolute",
        "initializer_range": cfg.init_std, "tie_word_embeddings": True,
    }
    if cfg.n_labels:
        names = cfg.extra.get("labels") or [f"LABEL_{i}" for i in range(cfg.n_labels)]
        out["id2label"] = dict(enumerate(names))
    return out


def bert_config_from_hf(d: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    if d.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{source}: BERT field 'hidden_act' = {d['hidden_act']!r} is not supported (expected gelu)")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{source}: BERT field 'position_embedding_type' must be 'absolute'")
    classifier = any(a.endswith("ForSequenceClassification") for a in d.get("architectures") or [])
    return ModelConfig(
        architecture="encoder", mask="bidirectional", norm="layernorm", norm_placement="post", activation="gelu",
        position="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, embed_norm=True,
        vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layer=d["num_hidden_layers"],
        n_head=d["num_attention_heads"], d_ff=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2), norm_eps=d.get("layer_norm_eps", 1e-12),
        dropout=d.get("hidden_dropout_prob", 0.0), attn_dropout=d.get("attention_probs_dropout_prob", 0.0),
        n_labels=len(d.get("id2label") or {0: 0, 1: 1}) if classifier else 0, **common,
    )


def t5_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    proj = {v: k for k, v in T5_ACTIVATIONS.items()}[cfg.activation]
    return {
        "model_type": "t5", "is_encoder_decoder": True, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
        "d_kv": cfg.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.n_layer, "num_decoder_layers": cfg.n_decoder_layer,
        "num_heads": cfg.n_head, "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance, "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": proj, "initializer_factor": 1.0,
        "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.scale_decoder_output,
        "decoder_start_token_id": cfg.decoder_start_token_id,
    }


def t5_config_from_hf(d: dict[str, Any], source: str, common: dict[str, Any]) -> ModelConfig:
    proj = d.get("feed_forward_proj", "relu")
    if proj not in T5_ACTIVATIONS:
        raise ConfigError(f"{source}: T5 field 'feed_forward_proj' = {proj!r} is not supported "
                          f"(expected one of {sorted(T5_ACTIVATIONS)})")
    tied = d.get("tie_word_embeddings", True)
    common = {"pad_token_id": 0, "eos_token_id": 1, **{k: v for k, v in common.items() if v is not None}}
    return ModelConfig(
        architecture="encoder-decoder", mask="bidirectional", norm="rmsnorm", position="relative", attn_scale=1.0,
        activation=T5_ACTIVATIONS[proj], vocab_size=d["vocab_size"], d_model=d["d_model"], head_dim=d["d_kv"],
        d_ff=d["d_ff"], n_layer=d["num_layers"], n_decoder_layer=d.get("num_decoder_layers") or d["num_layers"],
        n_head=d["num_heads"], relative_buckets=d.get("relative_attention_num_buckets", 32),
        relative_max_distance=d.get("relative_attention_max_distance", 128), norm_eps=d.get("layer_norm_epsilon", 1e-6),
        dropout=d.get("dropout_rate", 0.0), max_seq_len=d.get("n_positions", 512), tie_embeddings=tied,
        # transformers 5 writes scale_decoder_outputs; older files mean "scaled" by a tied head
        scale_decoder_output=d.get("scale_decoder_outputs", tied),
        decoder_start_token_id=d.get("decoder_start_token_id", 0), **common,
    )


def _t5_stack_renames(stack: str, decoder: bool) -> list[tuple[str, str]]:
    h, m = f"{stack}.block.{{i}}.layer.", f"{stack}.layers.{{i}}."
    ff = 2 if decoder else 1
    pairs = [(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias", f"{stack}.relative_attention_bias"),
             (f"{stack}.final_layer_norm", f"{stack}.norm"),
             (f"{h}0.layer_norm", f"{m}input_layernorm"),
             (f"{h}{ff}.layer_norm", f"{m}post_attention_layernorm"),
             (f"{h}{ff}.DenseReluDense.wi_0", f"{m}mlp.gate_proj"), (f"{h}{ff}.DenseReluDense.wi_1", f"{m}mlp.up_proj"),
             (f"{h}{ff}.DenseReluDense.wi", f"{m}mlp.up_proj"), (f"{h}{ff}.DenseReluDense.wo", f"{m}mlp.down_proj")]
    pairs += [(f"{h}0.SelfAttention.{p}", f"{m}self_attn.{p}_proj") for p in "qkvo"]
    if decoder:
        pairs += [(f"{h}1.layer_norm", f"{m}cross_attn_layernorm")]
        pairs += [(f"{h}1.EncDecAttention.{p}", f"{m}cross_attn.{p}_proj") for p in "qkvo"]
    return pairs


_BERT_LAYER = [("attention.self.query", "self_attn.q_proj"), ("attention.self.key", "self_attn.k_proj"),
               ("attention.self.value", "self_attn.v_proj"), ("attention.output.dense", "self_attn.o_proj"),
               ("attention.output.LayerNorm", "input_layernorm"), ("intermediate.dense", "mlp.up_proj"),
               ("output.dense", "mlp.down_proj"), ("output.LayerNorm", "post_attention_layernorm")]
# (HF module, llmkit module) pairs; {i} is a layer number
RENAMES: dict[str, list[tuple[str, str]]] = {
    "bert": [
        ("bert.embeddings.word_embeddings", "model.embed_tokens"),
        ("bert.embeddings.position_embeddings", "model.embed_positions"),
        ("bert.embeddings.token_type_embeddings", "model.embed_token_types"),
        ("bert.embeddings.LayerNorm", "model.embed_norm"),
        *[(f"bert.encoder.layer.{{i}}.{a}", f"model.layers.{{i}}.{b}") for a, b in _BERT_LAYER],
        ("cls.predictions.transform.dense", "mlm_head.dense"), ("cls.predictions.transform.LayerNorm", "mlm_head.norm"),
        ("cls.predictions.decoder", "mlm_head.decoder"), ("bert.pooler.dense", "pooler"), ("classifier", "classifier"),
    ],
    "t5": [("shared", "shared"), ("lm_head", "lm_head"),
           *_t5_stack_renames("encoder", False), *_t5_stack_renames("decoder", True)],
}
# tensors the HF checkpoints carry twice (tied copies); the first name is the one kept
_HF_ALIASES = {"bert": {"cls.predictions.bias": "cls.predictions.decoder.bias"},
               "t5": {"encoder.embed_tokens.weight": None, "decoder.embed_tokens.weight": None}}


def rename_tensors(sd: dict[str, Tensor], model_type: str, to_hf: bool) -> dict[str, Tensor]:
    """Map module prefixes between HF and llmkit names; an unmatched key passes through (the loader reports it)."""
    if not to_hf:
        for alias, canonical in _HF_ALIASES[model_type].items():
            value = sd.pop(alias, None)
            if canonical is not None and value is not None:
                sd.setdefault(canonical, value)
    compiled = [(re.compile(re.escape(src if not to_hf else dst).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"),
                 (dst if not to_hf else src)) for src, dst in RENAMES[model_type]]
    out = {}
    for key, value in sd.items():
        for pattern, target in compiled:
            match = pattern.match(key)
            if match:
                *layer, kind = match.groups()
                key = (target.replace("{i}", layer[0]) if layer else target) + "." + kind
                break
        out[key] = value
    if to_hf and "cls.predictions.decoder.bias" in out:  # HF reads BERT's output bias under its tied alias
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    if to_hf and model_type == "t5" and not any(".wi_0." in k for k in out):  # ungated: T5 names it wi
        out = {k.replace(".DenseReluDense.wi_1.", ".DenseReluDense.wi."): v for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- Mixtral and Qwen2-MoE

# Qwen2-MoE's files use llmkit's names; Mixtral's call the MoE block `block_sparse_moe` and an expert's
# gate/down/up projections w1/w2/w3
_MIXTRAL_NAMES = ((".mlp.", ".block_sparse_moe."), (".gate_proj.", ".w1."), (".up_proj.", ".w3."),
                  (".down_proj.", ".w2."))


def mixtral_key(key: str, to_hf: bool) -> str:
    for ours, theirs in _MIXTRAL_NAMES:  # every Mixtral block is MoE: each .mlp. is an expert block
        key = key.replace(ours, theirs) if to_hf else key.replace(theirs, ours)
    return key


def unfuse_experts(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Experts stored fused, as transformers 5 holds them in memory (`experts.gate_up_proj` [E,2F,C] and
    `experts.down_proj` [E,C,F]), split into one gate/up/down weight per expert; other keys pass through."""
    sd = dict(sd)
    for key in [k for k in sd if k.endswith(".experts.gate_up_proj")]:
        prefix = key.removesuffix("gate_up_proj")
        gate_up, down = sd.pop(key), sd.pop(prefix + "down_proj")
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2, dim=0)
            sd[f"{prefix}{e}.gate_proj.weight"], sd[f"{prefix}{e}.up_proj.weight"] = gate, up
            sd[f"{prefix}{e}.down_proj.weight"] = down[e]
    return sd
