"""Plan a run before it runs: memory per GPU, FLOPs, wall time, cost, energy and CO2.

    llmkit plan --model llama-2-7b --gpus 8 --zero 3 --micro-batch 2 --seq-len 4096 --activation-checkpointing
    llmkit plan --params 7.5e9 --gpus 64 --zero 1 --json          # model states only (ZeRO paper, table 1)
    llmkit plan --model gpt3-175b --gpus 1024 --tp 8 --pp 16 --microbatches 192 --recompute full --tflops 140
    llmkit plan --model llama-2-7b --gpus 8 --global-batch 64 --search

Parallel layouts (TP x PP x CP x DP): per-stage memory, communication, bubble, step time, MFU and the layout
search live in llmkit.plan_parallel; `validate_layout` here rejects a layout that cannot run.

Memory (bytes per GPU, GB = 1e9 bytes):
- model states, mixed-precision Adam (ZeRO paper, Rajbhandari et al. 2020): bf16/fp16 weights 2P, gradients 2P,
  optimiser 12P (fp32 master weights, momentum, variance); fp32 training: 4P + 4P + 8P. ZeRO-1 partitions the
  optimiser over the data-parallel GPUs, ZeRO-2 also the gradients, ZeRO-3 also the weights. CPU offload moves
  the optimiser (ZeRO-Offload) or also the weights (ZeRO-Infinity, stage 3) to host memory.
- activations: the tensors autograd saves for backward in llmkit's own model, counted op by op (see
  `activation_bytes`; exact for fp32 on CPU, where tests/test_plan.py checks it against torch's memory profiler),
  with flash attention (no T x T scores) unless `attention="eager"`. Activation checkpointing keeps each block's
  input and recomputes one block at a time in the backward pass.
- inference: weights plus the KV cache, 2 * n_layer * n_kv_head * head_dim * context * batch * bytes.
Compute: training FLOPs 6ND (8ND when activations are recomputed: one more forward), LoRA 4ND + 6·N_trainable·D
(no weight gradients for frozen weights); inference 2·N_matmul + 4·n_layer·context·n_head·head_dim FLOPs per token.
Wall time = FLOPs / (GPUs * peak FLOP/s * MFU), or FLOPs / (GPUs * --tflops) (Megatron-LM's 8TP/(nX));
energy = GPUs * board power * hours * PUE; CO2 = energy * grid carbon intensity.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import ModelConfig

GB = 1e9
GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("full", "lora", "qlora")
OFFLOADS = ("none", "optimizer", "optimizer+params")
# optimiser state bytes per trainable parameter, besides the fp32 master copy of mixed precision:
# AdamW keeps two fp32 moments; 8-bit AdamW (llmkit.train.optim.AdamW8bit, bitsandbytes) one byte each plus an
# fp32 absmax per 256-value block each; SGD one fp32 momentum; Adafactor factored second moments (rows + columns,
# a negligible fraction of a matrix) and no first moment
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2 + 2 * 4 / 256, "sgd": 4.0, "adafactor": 0.0}
# NF4 with double quantisation (QLoRA paper, section 3): 4 bits + 8-bit absmax per 64 + fp32 per 256 of those
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# CUDA context, allocator fragmentation and NCCL buffers never go to tensors
RESERVED_GB = 2.0


@dataclass(frozen=True)
class GPU:
    peak_tflops: float  # dense bf16/fp16 tensor-core peak
    peak_tflops_fp32: float  # fp32 without TF32 (what an fp32 run gets)
    memory_gib: float
    power_w: float  # board power (TDP)
    usd_per_hour: float  # a typical on-demand cloud price, for a first estimate


GPUS: dict[str, GPU] = {
    "h100": GPU(989, 67, 80, 700, 3.0),  # SXM
    "h100-pcie": GPU(756, 51, 80, 350, 2.5),
    "h200": GPU(989, 67, 141, 700, 3.5),
    "b200": GPU(2250, 80, 180, 1000, 5.0),
    "a100-80gb": GPU(312, 19.5, 80, 400, 1.8),
    "a100-40gb": GPU(312, 19.5, 40, 400, 1.3),
    "v100": GPU(125, 15.7, 32, 300, 0.9),  # fp16 only
    "a10": GPU(125, 31.2, 24, 150, 0.8),
    "l4": GPU(121, 30.3, 24, 72, 0.7),
    "l40s": GPU(362, 91.6, 48, 350, 1.2),
    "rtx4090": GPU(165, 82.6, 24, 450, 0.5),
    "mi300x": GPU(1307, 163, 192, 750, 3.0),
}


class PlanError(ValueError):
    """A planner option holds a value that cannot be planned for."""


@dataclass
class PlanConfig:
    model: str | None = field(default=None, metadata={"help": "preset name (llmkit.config.PRESETS), a config.json "
                                                               "or a checkpoint directory"})
    params: float | None = field(default=None, metadata={"help": "parameter count; alone, plans model states only "
                                                                  "(no architecture: no activations or KV cache)"})
    gpus: int = field(default=1, metadata={"help": "GPUs in all (= tp x pp x cp x dp; data-parallel GPUs when "
                                                     "those are 1)"})
    zero: int = field(default=0, metadata={"help": "ZeRO stage 0-3 (3 = FSDP full sharding)"})
    offload: str = field(default="none", metadata={"help": "CPU offload", "choices": list(OFFLOADS)})
    dtype: str = field(default="bf16", metadata={"help": "training precision: bf16/fp16 (mixed-precision Adam) or "
                                                          "fp32", "choices": list(DTYPE_BYTES)})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence (default: the model's "
                                                                 "max_seq_len)"})
    micro_batch: int = field(default=1, metadata={"help": "sequences per GPU per forward pass"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    optimizer: str = field(default="adamw", metadata={"help": "optimiser whose states are counted",
                                                      "choices": list(OPTIMIZER_STATE_BYTES)})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    attention: str = field(default="flash", metadata={"help": "flash (no T x T scores kept) or eager",
                                                      "choices": ["flash", "eager"]})
    method: str = field(default="full", metadata={"help": "full fine-tuning/pretraining, LoRA or QLoRA",
                                                  "choices": list(METHODS)})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_targets: str = field(default="all-linear", metadata={"help": "LoRA on every linear layer of the blocks or "
                                                                       "on attention only",
                                                               "choices": ["all-linear", "attention"]})
    tokens: float | None = field(default=None, metadata={"help": "training tokens (default: 20 per parameter, "
                                                                  "Chinchilla-optimal)"})
    gpu: str = field(default="h100", metadata={"help": "GPU type", "choices": list(GPUS)})
    peak_tflops: float | None = field(default=None, metadata={"help": "override the GPU's peak TFLOP/s"})
    gpu_memory_gb: float | None = field(default=None, metadata={"help": "override the GPU's memory (GB, 1e9 bytes)"})
    gpu_power_w: float | None = field(default=None, metadata={"help": "override the GPU's board power (W)"})
    mfu: float = field(default=0.4, metadata={"help": "assumed fraction of peak FLOP/s reached"})
    usd_per_gpu_hour: float | None = field(default=None, metadata={"help": "price (default: a typical cloud price "
                                                                            "for --gpu)"})
    pue: float = field(default=1.2, metadata={"help": "data-centre power usage effectiveness"})
    carbon_intensity: float = field(default=400.0, metadata={"help": "grid carbon intensity, gCO2e per kWh"})
    infer_batch: int = field(default=1, metadata={"help": "sequences decoded together (KV cache)"})
    context: int | None = field(default=None, metadata={"help": "inference context length (default: --seq-len)"})
    infer_dtype: str | None = field(default=None, metadata={"help": "inference weight/KV dtype: fp32, bf16, fp16, "
                                                                     "int8 or int4 (default: --dtype)"})
    # parallel layout (llmkit.plan_parallel)
    tp: int = field(default=1, metadata={"help": "tensor-parallel degree (Megatron column/row-parallel layers)"})
    pp: int = field(default=1, metadata={"help": "pipeline-parallel stages"})
    cp: int = field(default=1, metadata={"help": "context-parallel degree (ring attention over the sequence)"})
    dp: int | None = field(default=None, metadata={"help": "data-parallel degree (default: --gpus / (tp x pp x cp))"})
    dp_replicate: int = field(default=1, metadata={"help": "HSDP: replicas of each ZeRO/FSDP shard group "
                                                           "(dp = dp_replicate x dp_shard)"})
    microbatches: int | None = field(default=None, metadata={"help": "micro-batches per step through each "
                                                                      "pipeline, m (default: --grad-accum)"})
    pp_schedule: str = field(default="1f1b", metadata={"help": "pipeline schedule",
                                                       "choices": ["gpipe", "1f1b", "interleaved-1f1b"]})
    virtual_stages: int = field(default=1, metadata={"help": "interleaved-1f1b: model chunks per pipeline rank"})
    recompute: str | None = field(default=None, metadata={
        "help": "activation recomputation: none, selective (attention core) or full (default: full with "
                "--activation-checkpointing, else none)", "choices": ["none", "selective", "full"]})
    sequence_parallel: bool = field(default=True, metadata={"help": "split norm/dropout activations over the TP "
                                                                     "group (Korthikanti et al. 2022)"})
    activation_formula: str = field(default="llmkit", metadata={
        "help": "per-layer activations: llmkit (llmkit's model, op by op) or korthikanti (the paper's GPT formula, "
                "materialised softmax)", "choices": ["llmkit", "korthikanti"]})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per node (groups within a node use NVLink)"})
    intra_node_bandwidth: float | None = field(default=None, metadata={
        "help": "GB/s per GPU and direction within a node (default: --gpu's NVLink/PCIe)"})
    inter_node_bandwidth: float | None = field(default=None, metadata={
        "help": "GB/s per GPU and direction between nodes (default: --gpu's usual NIC)"})
    tflops: float | None = field(default=None, metadata={
        "help": "achieved TFLOP/s per GPU, recomputation counted (default: --mfu x peak); Megatron-LM's "
                "8TP/(nX) time uses it"})
    global_batch: int | None = field(default=None, metadata={
        "help": "--search: sequences per step (default: micro-batch x microbatches x dp)"})
    search: bool = field(default=False, metadata={"help": "rank the layouts of --gpus GPUs that fit, fastest "
                                                          "first"})
    top: int = field(default=10, metadata={"help": "--search: layouts listed"})

    def __post_init__(self) -> None:
        # --activation-checkpointing is full recomputation
        if self.recompute is None or self.activation_checkpointing:
            self.recompute = "full" if self.activation_checkpointing else "none"
        self.activation_checkpointing = self.recompute == "full"

    def validate(self) -> None:
        if self.model is None and self.params is None:
            raise PlanError("give --model (a preset or config.json) or --params")
        if self.params is not None and self.params <= 0:
            raise PlanError(f"--params must be positive, got {self.params}")
        for name in ("gpus", "micro_batch", "grad_accum", "lora_rank", "infer_batch", "tp", "pp", "cp",
                     "dp_replicate", "virtual_stages", "gpus_per_node", "top"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        _choice("offload", self.offload, OFFLOADS)
        _choice("dtype", self.dtype, tuple(DTYPE_BYTES))
        _choice("method", self.method, METHODS)
        _choice("optimizer", self.optimizer, tuple(OPTIMIZER_STATE_BYTES))
        _choice("gpu", self.gpu, tuple(GPUS))
        _choice("attention", self.attention, ("flash", "eager"))
        _choice("lora_targets", self.lora_targets, ("all-linear", "attention"))
        if self.infer_dtype is not None:
            _choice("infer_dtype", self.infer_dtype, ("fp32", "bf16", "fp16", "int8", "int4"))
        if self.offload == "optimizer+params" and self.zero != 3:
            raise PlanError("--offload optimizer+params needs --zero 3 (weights are offloaded only when sharded)")
        if self.offload != "none" and self.zero == 0:
            raise PlanError(f"--offload {self.offload} needs --zero 1, 2 or 3 (ZeRO-Offload)")
        if not 0 < self.mfu <= 1:
            raise PlanError(f"--mfu must be in (0, 1], got {self.mfu}")
        _choice("recompute", self.recompute, ("none", "selective", "full"))
        _choice("pp_schedule", self.pp_schedule, PP_SCHEDULES)
        _choice("activation_formula", self.activation_formula, ("llmkit", "korthikanti"))
        if self.method != "full" and (self.tp * self.pp * self.cp > 1 or self.search):
            raise PlanError(f"--tp/--pp/--cp/--search plan full training; --method {self.method} runs data-parallel")
        if self.pue < 1:
            raise PlanError(f"--pue must be >= 1, got {self.pue}")
        for name in ("seq_len", "context", "tokens", "peak_tflops", "gpu_memory_gb", "gpu_power_w",
                     "usd_per_gpu_hour", "dp", "microbatches", "intra_node_bandwidth", "inter_node_bandwidth",
                     "tflops", "global_batch"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PlanError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise PlanError(f"--{name.replace('_', '-')} must be one of {list(choices)}, got {value!r}")


# ----------------------------------------------------------------------------- model


def load_model_config(model: str) -> ModelConfig:
    """A preset name, a config.json (llmkit, llmkit-in-HF or Hugging Face) or a checkpoint directory."""
    from llmkit.config import PRESETS

    if model in PRESETS:
        return ModelConfig.from_preset(model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"--model {model!r}: neither a preset ({', '.join(sorted(PRESETS))}) nor a config.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object")
    if "model_type" in data:
        from llmkit.checkpoint import config_from_hf

        if data["model_type"] == "llmkit":
            return ModelConfig.from_dict(data["llmkit"], source=str(path))
        return config_from_hf(data, str(path))
    return ModelConfig.from_dict(data, source=str(path))


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind; `total` equals `sum(p.numel() for p in build_model(cfg).parameters())`."""
    C, F, H, K, D, L, V = cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_layer, cfg.vocab_size
    attn = C * H * D + 2 * C * K * D + H * D * C + (H * D + 2 * K * D if cfg.qkv_bias else 0) + (
        C if cfg.attn_out_bias else 0)
    mlp = (3 if cfg.gated else 2) * C * F + (((2 * F) if cfg.gated else F) + C if cfg.mlp_bias else 0)
    norm = C * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    # every block has two norms except a parallel pre-LN block (one shared input norm)
    block_norms = 1 if cfg.parallel_block and cfg.norm_placement == "pre" else 2
    final_norm = norm if cfg.norm_placement == "pre" else 0
    embed = V * C
    head = 0 if cfg.tie_embeddings else V * C
    positions = cfg.max_seq_len * C if cfg.position == "learned" else 0
    out = {"embedding": embed, "positions": positions, "attention": L * attn, "mlp": L * mlp,
           "norms": L * block_norms * norm + final_norm, "lm_head": head}
    attn_linear, mlp_linear = C * H * D + 2 * C * K * D + H * D * C, (3 if cfg.gated else 2) * C * F
    blocks_with_attn, blocks_with_mlp = L, L
    if cfg.architecture == "encoder":  # BERT: token types, embedding norm; MLM head or pooler + classifier
        n = cfg.n_labels
        out["embedding"] += cfg.type_vocab_size * C
        out["norms"] += norm if cfg.embed_norm else 0
        out["lm_head"] = C * C + C + (C * n + n if n else norm + V + head)
    elif cfg.architecture == "encoder-decoder":  # T5: decoder blocks add cross-attention and a third norm
        Ld = cfg.n_decoder_layer
        blocks_with_attn, blocks_with_mlp = L + 2 * Ld, L + Ld
        out.update(positions=2 * cfg.relative_buckets * H, attention=blocks_with_attn * attn, mlp=blocks_with_mlp * mlp,
                   norms=(2 * L + 3 * Ld + 2) * norm)
    moe_extra = cfg.n_moe_layers * (cfg.moe_layer_params() - mlp)  # MoE blocks: router and experts, not one MLP
    out["mlp"] += moe_extra
    out["total"] = sum(out.values())
    out["linear_in_blocks"] = blocks_with_attn * attn_linear + blocks_with_mlp * mlp_linear + moe_extra
    return out


def moe_counts(cfg: ModelConfig, seq_len: int) -> dict[str, Any] | None:
    """Total and active (per-token) parameters of a mixture of experts, and its FLOPs per token.

    Forward FLOPs per token: 2 per active matmul parameter (the embedding lookup is free) plus attention's
    4 * n_layer * seq_len * n_head * head_dim (PaLM appendix B); training is 3x that (forward + backward).
    A dense model of the same total size would cost the `dense_*` figures.
    """
    if not cfg.n_experts:
        return None
    lookup = cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0
    attention = 4 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_dim
    total, active = cfg.n_params, cfg.n_active_params
    forward, dense_forward = 2 * (active - lookup) + attention, 2 * (total - lookup) + attention
    return {"experts": cfg.n_experts, "top_k": cfg.moe_top_k, "moe_layers": cfg.n_moe_layers,
            "shared_expert_d_ff": cfg.shared_expert_d_ff, "total_params": total, "active_params": active,
            "active_fraction": active / total, "flops_per_token_forward": forward,
            "flops_per_token_train": 3 * forward, "dense_flops_per_token_train": 3 * dense_forward}


def lora_params(cfg: ModelConfig, rank: int, targets: str) -> int:
    """LoRA A (r x in) and B (out x r) per adapted linear layer of every block."""
    C, F, H, K, D = cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    shapes = [(C, H * D), (C, K * D), (C, K * D), (H * D, C)]
    if targets == "all-linear":
        shapes += [(C, F), (C, F), (F, C)] if cfg.gated else [(C, F), (F, C)]
    return cfg.n_layer * sum(rank * (i + o) for i, o in shapes)


# ----------------------------------------------------------------------------- activations


def activation_parts(cfg: ModelConfig, batch: int, seq_len: int, dtype: str = "bf16", attention: str = "flash",
                     lora_rank: int = 0) -> dict[str, int]:
    """Bytes autograd keeps for the backward pass of one micro-batch in llmkit's model, counted op by op.

    Per token (a = bytes per element of dtype, C d_model, F d_ff, H/K query/kv heads of size D, V vocab):
    - RMSNorm: input, normalised input and output (3aC; fp32 statistics when a = 2 make it 12C bytes either way);
      LayerNorm: input and output plus fp32 mean and rstd (2aC + 8).
    - attention: rotated q and k, v, the output and its fp32 log-sum-exp (flash); eager attention keeps the
      softmax (a*H*T) instead of the log-sum-exp.
    - MLP: gated: gate, act(gate), up, product (4aF); plain: pre- and post-activation (2aF).
    - dropout masks, one byte each; rotary cos/sin tables (2aR, shared by the layers); token ids and targets.
    - head: the final norm, the logits (aV) the loop holds and the fp32 log-softmax cross-entropy saves (4V);
      the backward pass starts by creating fp32 gradients of both (8V): `head_transient`.
    - `layer_transient`: gradients inside one block's backward (two F-wide and two C-wide tensors).
    """
    a = DTYPE_BYTES[dtype]
    C, F, H, K, D, V, L = cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size, cfg.n_layer
    tokens = batch * seq_len
    norm = 12 * C + 4 if cfg.norm == "rmsnorm" else 2 * a * C + 8
    n_norms = 1 if cfg.parallel_block and cfg.norm_placement == "pre" else 2
    attn = a * (2 * H * D + 2 * K * D)
    attn += a * H * seq_len if attention == "eager" else 4 * H
    mlp = (4 if cfg.gated else 2) * a * F
    drop = (2 * C if cfg.dropout > 0 else 0) + (H * seq_len if cfg.attn_dropout > 0 and attention == "eager" else 0)
    lora = a * lora_rank * 7  # each adapter's rank-r intermediate (LoRA reuses the base layer's saved input)
    shared = 16  # int64 token ids and targets
    if cfg.position == "rope":
        shared += 2 * a * cfg.rope_dim
    if cfg.position == "learned":
        shared += 8  # position ids
    if cfg.dropout > 0:
        shared += C  # embedding dropout mask
    final_norm = norm if cfg.norm_placement == "pre" else 0
    return {
        "per_layer": tokens * (n_norms * norm + attn + mlp + drop + lora),
        # d_model-wide part of per_layer (norms, residual dropout masks): replicated under tensor parallelism,
        # split only by sequence parallelism; the rest scales with heads or d_ff
        "per_layer_c_wide": tokens * (n_norms * norm + (2 * C if cfg.dropout > 0 else 0)),
        "head_c_wide": tokens * final_norm,
        "layer_input": tokens * a * C,
        "shared": tokens * shared,
        "head": tokens * (final_norm + a * V + 4 * V),
        "logits": tokens * a * V,
        "head_transient": tokens * 8 * V,
        "layer_transient": tokens * a * (2 * F + 2 * C),
        "n_layer": L,
    }


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: str = "bf16", checkpointing: bool = False,
                     attention: str = "flash", lora_rank: int = 0) -> int:
    """Peak activation bytes of one micro-batch (parameter gradients not included; see `peak_step_bytes`).

    Without checkpointing every block's saved tensors plus the head, at the start of backward (with the
    head's gradients); with checkpointing each block keeps only its input and one block is recomputed at a
    time, so the larger of the head phase and one block's recomputation (the loop still holds the logits).
    """
    p = activation_parts(cfg, batch, seq_len, dtype, attention, lora_rank)
    if not checkpointing:
        return p["n_layer"] * p["per_layer"] + p["shared"] + p["head"] + p["head_transient"]
    base = p["n_layer"] * p["layer_input"] + p["shared"]
    return base + max(p["head"] + p["head_transient"], p["per_layer"] + p["logits"] + p["layer_transient"])


def peak_step_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype: str, checkpointing: bool, gradients: float,
                    persistent_gradients: bool, attention: str = "flash", lora_rank: int = 0) -> float:
    """Activations and gradients at the step's peak.

    Autograd frees each block's saved tensors while it creates that block's gradients, and the trainer drops
    gradients after the optimizer step (`zero_grad(set_to_none=True)`): on one GPU the two do not peak
    together. Without checkpointing the peak is the start of backward (all activations, no gradients yet) or
    the end (all gradients); with checkpointing, the recomputation of the first block happens when nearly every
    gradient exists. Data-parallel runs keep gradient buffers (DDP buckets, ZeRO partitions) for the whole
    step, so there the two add up.
    """
    p = activation_parts(cfg, batch, seq_len, dtype, attention, lora_rank)
    act = activation_bytes(cfg, batch, seq_len, dtype, checkpointing, attention, lora_rank)
    if persistent_gradients:
        return act + gradients
    if not checkpointing:
        return max(act, gradients)
    base = p["n_layer"] * p["layer_input"] + p["shared"]
    return max(base + p["head"] + p["head_transient"],
               base + p["per_layer"] + p["logits"] + p["layer_transient"] + gradients)


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, bytes_per: float) -> float:
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * context * batch * bytes_per


# ----------------------------------------------------------------------------- parallel layouts

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def n_blocks(cfg: ModelConfig) -> int:
    """Transformer blocks a pipeline splits (an encoder-decoder's two stacks together)."""
    return cfg.n_layer + (cfg.n_decoder_layer if cfg.architecture == "encoder-decoder" else 0)


def stage_layers(n_layer: int, stages: int) -> list[int]:
    """Blocks per pipeline stage, balanced: the first `n_layer % stages` stages take one more."""
    base, extra = divmod(n_layer, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def validate_layout(cfg: ModelConfig, world_size: int, tp: int = 1, pp: int = 1, dp_shard: int = 1,
                    dp_replicate: int = 1, cp: int = 1, microbatches: int = 1, *, schedule: str = "1f1b",
                    virtual_stages: int = 1, seq_len: int | None = None) -> None:
    """Reject a parallel layout that cannot run, before anything starts: one ValueError naming every problem.

    Checks: each degree >= 1; tp * pp * dp_shard * dp_replicate * cp equals the world size; no more pipeline
    stages (pp * virtual_stages) than blocks; tp divides the attention heads and the KV heads (GQA); enough
    micro-batches for the schedule (torch.distributed.pipelining's 1F1B needs at least one per stage);
    the sequence splits into 2 * cp chunks (load-balanced ring attention).
    """
    degrees = {"tp": tp, "pp": pp, "dp_shard": dp_shard, "dp_replicate": dp_replicate, "cp": cp,
               "microbatches": microbatches, "virtual_stages": virtual_stages}
    bad = [f"{k} must be an integer >= 1, got {v!r}" for k, v in degrees.items() if not isinstance(v, int) or v < 1]
    if bad:
        raise PlanError("bad parallel layout: " + "; ".join(bad))
    problems = []
    product = tp * pp * dp_shard * dp_replicate * cp
    if product != world_size:
        problems.append(f"tp {tp} x pp {pp} x dp_shard {dp_shard} x dp_replicate {dp_replicate} x cp {cp} = "
                        f"{product}, but the world size is {world_size}")
    if schedule not in PP_SCHEDULES:
        problems.append(f"pipeline schedule must be one of {list(PP_SCHEDULES)}, got {schedule!r}")
    blocks, stages = n_blocks(cfg), pp * virtual_stages
    if stages > blocks:
        what = f"pp {pp}" + (f" x {virtual_stages} virtual stages" if virtual_stages > 1 else "")
        problems.append(f"{what} = {stages} pipeline stages, but the model has only {blocks} layers")
    if cfg.n_head % tp:
        problems.append(f"tp {tp} does not divide the {cfg.n_head} attention heads")
    elif cfg.n_kv_head % tp:
        problems.append(f"tp {tp} does not divide the {cfg.n_kv_head} KV heads (GQA shards whole KV heads)")
    if virtual_stages > 1 and schedule != "interleaved-1f1b":
        problems.append(f"virtual_stages {virtual_stages} needs the interleaved-1f1b schedule, not {schedule!r}")
    if pp > 1 and schedule != "gpipe" and microbatches < pp:
        problems.append(f"the {schedule} schedule needs at least one micro-batch per stage: microbatches "
                        f"{microbatches} < pp {pp}")
    if cp > 1 and seq_len is not None and seq_len % (2 * cp):
        problems.append(f"cp {cp} splits the sequence into {2 * cp} chunks, which seq_len {seq_len} does not divide")
    if problems:
        raise PlanError("bad parallel layout: " + "; ".join(problems))


# ----------------------------------------------------------------------------- plan


def plan(pc: PlanConfig, suggestions: bool = True) -> dict[str, Any]:
    """The whole estimate as a JSON-able dict (see the module docstring for every formula).

    When the run does not fit, `suggestions` lists nearby configurations that do (see `suggest`).
    """
    pc.validate()
    cfg = load_model_config(pc.model) if pc.model is not None else None
    if cfg is not None:
        breakdown = param_breakdown(cfg)
        n_params = breakdown["total"] if pc.params is None else int(pc.params)
    else:
        breakdown, n_params = None, int(pc.params)
    seq_len = pc.seq_len or (cfg.max_seq_len if cfg else 2048)
    layout = _layout(pc, cfg, seq_len)
    gpu = GPUS[pc.gpu]
    capacity = pc.gpu_memory_gb * GB if pc.gpu_memory_gb else gpu.memory_gib * GIB
    a = DTYPE_BYTES[pc.dtype]
    mixed = pc.dtype != "fp32"

    # -- model states (bytes per GPU, before and after ZeRO partitioning)
    if pc.method == "full":
        trainable = n_params
        weights = (2 if mixed else 4) * n_params
    else:
        if cfg is None:
            raise PlanError(f"--method {pc.method} needs --model (LoRA sizes come from the architecture)")
        trainable = lora_params(cfg, pc.lora_rank, pc.lora_targets)
        if pc.method == "qlora":  # NF4 blocks for the linear layers of the blocks, bf16 for the rest
            linear = breakdown["linear_in_blocks"]
            weights = linear * NF4_BITS / 8 + (n_params - linear) * 2 + trainable * a
        else:
            weights = (2 if mixed else 4) * n_params + trainable * a
    grads = (2 if mixed else 4) * trainable
    optimizer = ((4 if mixed else 0) + OPTIMIZER_STATE_BYTES[pc.optimizer]) * trainable
    N = layout.shard_group if layout else pc.gpus
    shard = {"weights": N if pc.zero >= 3 else 1, "gradients": N if pc.zero >= 2 else 1,
             "optimizer": N if pc.zero >= 1 else 1}
    if pc.method != "full":  # frozen base weights are replicated unless ZeRO-3 shards them too
        shard["weights"] = N if pc.zero >= 3 else 1
    per_gpu = {"weights": weights / shard["weights"], "gradients": grads / shard["gradients"],
               "optimizer": optimizer / shard["optimizer"]}
    cpu = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    if pc.offload in ("optimizer", "optimizer+params"):
        # ZeRO-Offload keeps fp32 optimiser states (and their gradient partition) in host memory
        cpu["optimizer"], per_gpu["optimizer"] = per_gpu["optimizer"], 0.0
    if pc.offload == "optimizer+params":
        cpu["weights"], per_gpu["weights"] = per_gpu["weights"], 0.0

    memory: dict[str, Any] = {k: v / GB for k, v in per_gpu.items()}
    if cfg is not None:
        lora_rank = pc.lora_rank if pc.method != "full" else 0
        act_full = activation_bytes(cfg, pc.micro_batch, seq_len, pc.dtype, False, pc.attention, lora_rank)
        act_ckpt = activation_bytes(cfg, pc.micro_batch, seq_len, pc.dtype, True, pc.attention, lora_rank)
        memory["activations"] = (act_ckpt if pc.activation_checkpointing else act_full) / GB
        memory["activations_no_recompute"] = act_full / GB
        memory["activations_recompute"] = act_ckpt / GB
        dynamic = peak_step_bytes(cfg, pc.micro_batch, seq_len, pc.dtype, pc.activation_checkpointing,
                                  per_gpu["gradients"], persistent_gradients=pc.gpus > 1, attention=pc.attention,
                                  lora_rank=lora_rank)
        memory["total"] = (per_gpu["weights"] + per_gpu["optimizer"] + dynamic) / GB
    else:
        memory["activations"] = None
        memory["total"] = sum(per_gpu.values()) / GB
    memory["capacity"] = capacity / GB
    memory["usable"] = capacity / GB - RESERVED_GB
    memory["fits"] = memory["total"] <= memory["usable"]
    memory["cpu_offload_per_gpu"] = sum(cpu.values()) / GB
    parallel = None
    if layout is not None:
        from llmkit.plan_parallel import layout_plan

        parallel = layout_plan(cfg, pc, layout, seq_len)
        if _beyond_data_parallel(layout):  # the most loaded pipeline stage's GPU
            worst = parallel["memory_gb"]["stages"][parallel["memory_gb"]["max_stage"]]
            memory.update({k: worst[k] for k in ("weights", "gradients", "optimizer", "activations", "total")},
                          fits=parallel["memory_gb"]["fits"], cpu_offload_per_gpu=worst["cpu_offload"])

    # -- compute
    tokens = pc.tokens if pc.tokens is not None else 20.0 * n_params
    moe = moe_counts(cfg, seq_len) if cfg is not None else None
    if pc.method == "full":  # a mixture of experts computes with its active parameters only
        flops = (8 if pc.activation_checkpointing else 6) * (moe["active_params"] if moe else n_params) * tokens
        formula = ("8ND" if pc.activation_checkpointing else "6ND") + (", N active" if moe else "")
    else:  # forward 2N, backward through frozen weights 2N (activation grads only), trainable weights 6N_t
        flops = ((6 if pc.activation_checkpointing else 4) * n_params + 6 * trainable) * tokens
        formula = ("6ND" if pc.activation_checkpointing else "4ND") + " + 6*N_trainable*D"
    peak = (pc.peak_tflops or (gpu.peak_tflops if mixed else gpu.peak_tflops_fp32)) * 1e12
    rate = pc.tflops * 1e12 if pc.tflops else peak * pc.mfu  # Megatron-LM's X (Narayanan et al. 2021, eq. 4)
    seconds = flops / (pc.gpus * rate)
    hours = seconds / 3600
    price = pc.usd_per_gpu_hour if pc.usd_per_gpu_hour is not None else gpu.usd_per_hour
    power = pc.gpu_power_w or gpu.power_w
    energy_kwh = pc.gpus * power * hours * pc.pue / 1000
    compute = {
        "tokens": tokens, "tokens_default": pc.tokens is None, "flops": flops, "flops_formula": formula,
        "peak_flops_per_gpu": peak, "mfu": rate / peak, "hours": hours, "days": hours / 24,
        "gpu_hours": hours * pc.gpus, "usd": hours * pc.gpus * price, "usd_per_gpu_hour": price,
        "energy_kwh": energy_kwh, "co2_kg": energy_kwh * pc.carbon_intensity / 1000,
        "global_batch_tokens": pc.micro_batch * (layout.microbatches if layout else pc.grad_accum) * (
            layout.dp if layout else pc.gpus) * seq_len,
    }
    compute["steps"] = math.ceil(tokens / compute["global_batch_tokens"])

    out: dict[str, Any] = {
        "model": {"name": cfg.name if cfg else None, "source": pc.model, "n_params": n_params,
                  "trainable_params": trainable, "breakdown": breakdown,
                  "shape": None if cfg is None else {k: getattr(cfg, k) for k in (
                      "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_ff", "vocab_size", "max_seq_len")}},
        "setup": {**dataclasses.asdict(pc), "seq_len": seq_len},
        "memory_gb": memory,
        "compute": compute,
    }
    if parallel is not None:
        parallel["train_steps"] = math.ceil(tokens / parallel["tokens_per_step"])
        parallel["train_days"] = parallel["train_steps"] * parallel["time_s"]["step"] / 86400
        out["parallel"] = parallel
    if moe is not None:
        out["moe"] = moe
    if cfg is not None:
        out["inference"] = _inference(cfg, pc, n_params, seq_len, capacity)
    out["suggestions"] = suggest(pc) if suggestions and not memory["fits"] else []
    return out


def _layout(pc: PlanConfig, cfg: ModelConfig | None, seq_len: int):
    """The parallel layout of a full-training plan with an architecture (llmkit.plan_parallel.Layout), else None."""
    beyond_dp = pc.tp * pc.pp * pc.cp > 1
    if cfg is None:
        if beyond_dp:
            raise PlanError("--tp/--pp/--cp need --model (stages and shards come from the architecture)")
        return None
    # encoders and mixture-of-experts models: the data-parallel count above, no stage split
    if pc.method != "full" or (not beyond_dp and (cfg.architecture != "decoder" or cfg.n_experts)):
        return None
    from llmkit.plan_parallel import layout_from

    return layout_from(pc, cfg, seq_len)


def _beyond_data_parallel(layout) -> bool:
    """Layouts the single-GPU memory count above does not describe."""
    return layout.tp * layout.pp * layout.cp > 1 or layout.dp_replicate > 1 or layout.recompute == "selective"


def _inference(cfg: ModelConfig, pc: PlanConfig, n_params: int, seq_len: int, capacity: float) -> dict:
    dtype = pc.infer_dtype or pc.dtype
    wbytes = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5}[dtype]
    kvbytes = {"int8": 2, "int4": 2}.get(dtype, wbytes)  # quantised weights, bf16 cache
    context = pc.context or seq_len
    kv = kv_cache_bytes(cfg, pc.infer_batch, context, kvbytes)
    # matmul parameters: an untied input embedding (and learned positions) is a lookup, not a matmul
    lookup = (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model) + (
        cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0)
    matmul = n_params - lookup - (cfg.n_params - cfg.n_active_params)  # a MoE token skips the unchosen experts
    flops_token = 2 * matmul + 4 * cfg.n_layer * context * cfg.n_head * cfg.head_dim
    total = n_params * wbytes + kv
    return {"dtype": dtype, "batch": pc.infer_batch, "context": context, "weights_gb": n_params * wbytes / GB,
            "kv_cache_gb": kv / GB, "kv_cache_per_token_mb": kv / (pc.infer_batch * context) / 1e6,
            "total_gb": total / GB, "fits_one_gpu": total / GB <= capacity / GB - RESERVED_GB,
            "flops_per_token": flops_token}


def suggest(pc: PlanConfig) -> list[dict[str, Any]]:
    """Configurations close to `pc` that fit: each one change (or a minimal GPU count), cheapest first."""
    tries: list[tuple[str, dict]] = []
    if pc.gpus > 1:
        for z in range(pc.zero + 1, 4):
            tries.append((f"--zero {z}", {"zero": z}))
    if not pc.activation_checkpointing:
        tries.append(("--activation-checkpointing", {"activation_checkpointing": True}))
    if pc.micro_batch > 1:
        tries.append(("--micro-batch 1 (raise --grad-accum to keep the batch)",
                      {"micro_batch": 1, "grad_accum": pc.grad_accum * pc.micro_batch}))
    if pc.offload == "none":
        z = max(pc.zero, 1)
        tries.append((f"--zero {z} --offload optimizer", {"zero": z, "offload": "optimizer"}))
    if pc.offload != "optimizer+params":
        tries.append(("--zero 3 --offload optimizer+params", {"zero": 3, "offload": "optimizer+params"}))
    if pc.method == "full" and pc.model is not None:
        tries.append(("--method lora", {"method": "lora"}))
        tries.append(("--method qlora", {"method": "qlora"}))
    if pc.method == "lora":
        tries.append(("--method qlora", {"method": "qlora"}))
    out = []
    for label, change in tries:
        for extra in ({}, {"activation_checkpointing": True}):
            trial = dataclasses.replace(pc, **{**change, **extra})
            if trial == pc:
                continue
            mem = _memory_only(trial)
            if mem is not None and mem <= _usable(trial):
                text = label + (" --activation-checkpointing" if extra and "activation" not in label else "")
                out.append({"change": text, "memory_gb": mem})
                break
    gpus = _min_gpus(pc)
    if gpus is not None:
        out.append({"change": f"--gpus {gpus} --zero 3 --activation-checkpointing", "memory_gb": _memory_only(
            dataclasses.replace(pc, gpus=gpus, zero=3, activation_checkpointing=True))})
    return out


def _usable(pc: PlanConfig) -> float:
    capacity = pc.gpu_memory_gb * GB if pc.gpu_memory_gb else GPUS[pc.gpu].memory_gib * GIB
    return capacity / GB - RESERVED_GB


def _memory_only(pc: PlanConfig) -> float | None:
    try:
        p = plan(dataclasses.replace(pc, tokens=pc.tokens or 1.0), suggestions=False) if _valid(pc) else None
    except PlanError:
        return None
    return None if p is None else p["memory_gb"]["total"]


def _valid(pc: PlanConfig) -> bool:
    try:
        pc.validate()
        return True
    except PlanError:
        return False


def _min_gpus(pc: PlanConfig) -> int | None:
    """The smallest power-of-two GPU count (up to 4096) at which ZeRO-3 + checkpointing fits."""
    n = 1
    while n <= 4096:
        trial = dataclasses.replace(pc, gpus=n, zero=3, activation_checkpointing=True, offload="none")
        if n > pc.gpus or (n == pc.gpus and trial != pc):
            mem = _memory_only(trial)
            if mem is not None and mem <= _usable(trial):
                return n
        n *= 2
    return None


# ----------------------------------------------------------------------------- report


def format_plan(p: dict[str, Any]) -> str:
    """A readable table of the plan."""
    s, m, c = p["setup"], p["memory_gb"], p["compute"]
    model = p["model"]
    lines = []
    name = model["name"] or "model"
    lines.append(f"{name}: {_count(model['n_params'])} parameters"
                 + (f", {_count(model['trainable_params'])} trainable ({s['method']})"
                    if s["method"] != "full" else ""))
    lines.append(f"training: {s['gpus']} x {s['gpu']}, ZeRO-{s['zero']}"
                 + (f", offload {s['offload']}" if s["offload"] != "none" else "")
                 + f", {s['dtype']}, micro-batch {s['micro_batch']} x {s['seq_len']} tokens"
                 + (", activation checkpointing" if s["activation_checkpointing"] else ""))
    lines.append("")
    lines.append("memory per GPU                     GB")
    rows = [("weights", m["weights"]), ("gradients", m["gradients"]), ("optimizer states", m["optimizer"])]
    if m["activations"] is not None:
        rows.append(("activations" + (" (recomputed)" if s["activation_checkpointing"] else ""), m["activations"]))
    for label, value in rows:
        lines.append(f"  {label:<30} {value:>10.3f}")
    lines.append(f"  {'total':<30} {m['total']:>10.3f}   of {m['usable']:.1f} usable ({m['capacity']:.1f} on the GPU)")
    if m["activations"] is not None and not (p.get("parallel") and _beyond_data_parallel_dict(p["parallel"]["layout"])):
        lines.append(f"  activations without / with recomputation: {m['activations_no_recompute']:.3f} / "
                     f"{m['activations_recompute']:.3f} GB")
    if m["cpu_offload_per_gpu"]:
        lines.append(f"  offloaded to CPU memory per GPU: {m['cpu_offload_per_gpu']:.3f} GB")
    lines.append("  FITS" if m["fits"] else f"  DOES NOT FIT: needs {m['total']:.1f} GB, {m['usable']:.1f} GB usable")
    if not m["fits"]:
        if p["suggestions"]:
            lines.append("  would fit:")
            for sug in p["suggestions"]:
                lines.append(f"    {sug['change']:<55} {sug['memory_gb']:.2f} GB/GPU")
        else:
            lines.append("  no single change makes it fit; a larger GPU or tensor/pipeline parallelism is needed")
        if model["shape"] is not None and s["method"] == "full":
            lines.append(f"  --search ranks the TP/PP/DP layouts of {s['gpus']} GPUs that fit")
    lines.append("")
    lines.append(f"compute: {c['tokens']:.3g} tokens{' (20 per parameter)' if c['tokens_default'] else ''}, "
                 f"{c['flops']:.3g} FLOPs ({c['flops_formula']}), {c['steps']} steps of {c['global_batch_tokens']} "
                 "tokens")
    lines.append(f"  at {c['mfu'] * c['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s per GPU ({c['mfu']:.0%} of "
                 f"{c['peak_flops_per_gpu'] / 1e12:.0f}), FLOPs / (GPUs x that): "
                 f"{_duration(c['hours'])}, {c['gpu_hours']:.4g} GPU-hours, ${c['usd']:,.0f} "
                 f"at ${c['usd_per_gpu_hour']}/GPU-hour")
    lines.append(f"  energy {c['energy_kwh']:.4g} kWh (PUE {s['pue']}), {c['co2_kg']:.4g} kg CO2e at "
                 f"{s['carbon_intensity']:g} g/kWh")
    if p.get("moe"):
        lines.append(_format_moe(p["moe"]))
    par = p.get("parallel")
    if par and (par["layout"]["world"] > 1 or _beyond_data_parallel_dict(par["layout"])):
        from llmkit.plan_parallel import format_layout

        lines.append("")
        lines.append(format_layout(par))
    inf = p.get("inference")
    if inf:
        lines.append("")
        lines.append(f"inference ({inf['dtype']}, batch {inf['batch']}, context {inf['context']}): weights "
                     f"{inf['weights_gb']:.3f} GB + KV cache {inf['kv_cache_gb']:.3f} GB = {inf['total_gb']:.3f} GB"
                     f" ({'fits' if inf['fits_one_gpu'] else 'does not fit'} on one GPU); "
                     f"{inf['flops_per_token']:.3g} FLOPs per token")
    return "\n".join(lines)


def _format_moe(moe: dict[str, Any]) -> str:
    shared = f" + a shared expert of width {moe['shared_expert_d_ff']}" if moe["shared_expert_d_ff"] else ""
    return (f"  mixture of experts: top-{moe['top_k']} of {moe['experts']} experts{shared} in {moe['moe_layers']} "
            f"blocks: {_count(moe['total_params'])} total, {_count(moe['active_params'])} active parameters "
            f"({moe['active_fraction']:.0%}); {moe['flops_per_token_forward']:.3g} forward / "
            f"{moe['flops_per_token_train']:.3g} training FLOPs per token "
            f"(a dense model of the total size: {moe['dense_flops_per_token_train']:.3g})")


def _beyond_data_parallel_dict(layout: dict[str, Any]) -> bool:
    return layout["tp"] * layout["pp"] * layout["cp"] > 1 or layout["dp_replicate"] > 1 or \
        layout["recompute"] == "selective"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


# ----------------------------------------------------------------------------- measurement


def measure_training_memory(cfg: ModelConfig, batch: int, seq_len: int, checkpointing: bool = False,
                            seed: int = 0) -> dict[str, int]:
    """Peak bytes of one real fp32 AdamW training step of llmkit's model on CPU, from torch's memory profiler.

    The step is the trainer's (forward, `lm_loss`, backward, optimizer step, `zero_grad(set_to_none=True)`).
    A first step creates the optimizer state; the second runs under `torch.profiler` with `profile_memory=True`,
    whose allocation events (+bytes on malloc, -bytes on free, in time order) give the peak of live bytes over
    what already existed (weights + optimizer state, counted from their tensors).
    """
    import torch

    from llmkit.model import Transformer
    from llmkit.train.objectives import lm_loss

    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    model.set_activation_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)

    def step() -> None:
        logits = model(x)
        lm_loss(logits, y, reduction="sum").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    peak = profiled_peak_bytes(step)
    return {"weights": weights, "optimizer": state, "step_peak": peak, "total": weights + state + peak}


def profiled_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU bytes `fn()` allocates beyond what existed before, from torch's memory profiler:
    its allocation events (+bytes on malloc, -bytes on free) summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag.name == "Allocation":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak
