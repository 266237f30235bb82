"""The pretraining recipe: one flat dataclass; a YAML file sets any field, the command line overrides it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, **kwargs) -> Any:
    """A recipe field with its help text (shown by `llmkit pretrain --help`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # model
    model: str = opt("tiny", "model preset name (see llmkit.config.PRESETS) or a checkpoint dir to start from")
    model_overrides: dict = opt({}, "model config fields to change, e.g. {n_layer: 4, dropout: 0.1}")
    # data
    data: str = opt("", "packed dataset directory written by `llmkit data pack`")
    tokenizer: str = opt("", "tokenizer directory saved with the checkpoints (the one the data was packed with)")
    seq_len: int = opt(256, "tokens per training window")
    # batch
    micro_batch_size: int = opt(8, "windows per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches accumulated per optimiser step")
    batch_ramp_tokens: int = opt(0, "ramp the batch up linearly over this many tokens (0 = off)")
    batch_ramp_start: float = opt(0.25, "fraction of the full batch at the start of the ramp")
    # optimisation
    optimizer: str = opt("adamw", "adamw, adamw8bit, adafactor or sgd", choices=["adamw", "adamw8bit", "adafactor", "sgd"])
    lr: float = opt(3e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    weight_decay: float = opt(0.1, "decoupled weight decay (matrices only; not norms, biases, embeddings)")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    momentum: float = opt(0.9, "SGD momentum")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    schedule: str = opt("cosine", "cosine, linear, wsd (warmup-stable-decay) or constant",
                        choices=["cosine", "linear", "wsd", "constant"])
    warmup_steps: int = opt(100, "linear warmup steps")
    decay_fraction: float = opt(0.2, "wsd: fraction of steps spent decaying at the end")
    max_steps: int = opt(1000, "optimiser steps to train")
    objective: str = opt("causal", "causal, prefix (bidirectional prefix) or ul2 (mixture of denoisers) for decoders; "
                         "mlm (masked LM) for encoders; span (T5 span corruption) for encoder-decoders",
                         choices=["causal", "prefix", "ul2", "mlm", "span"])
    # precision and memory
    precision: str = opt("fp32", "fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling)",
                         choices=["fp32", "bf16", "fp16"])
    fp16_init_scale: float = opt(65536.0, "fp16: initial loss scale")
    activation_checkpointing: bool = opt(False, "recompute block activations in the backward pass")
    compile: bool = opt(False, "torch.compile the model")
    # stability
    spike_factor: float = opt(0.0, "a loss above factor x its running mean is a spike (0 = off)")
    spike_window: int = opt(50, "steps in the running mean of the loss")
    spike_rollback: bool = opt(False, "on a spike, reload the last checkpoint and skip the batches since it")
    # checkpoints, evaluation and logging
    save_every: int = opt(500, "checkpoint every N steps (and at the end)")
    keep_last: int = opt(3, "checkpoints kept on disk")
    eval_every: int = opt(250, "validation every N steps (0 = only at the end)")
    eval_batches: int = opt(20, "validation micro-batches per evaluation")
    sample_prompt: str = opt("", "text to continue at each evaluation (empty = the tokenizer's bos or a newline)")
    sample_tokens: int = opt(64, "tokens sampled at each evaluation")
    log_every: int = opt(10, "progress-bar refresh every N steps (metrics.jsonl gets every step)")
    seed: int = opt(1337, "seed for initialisation, data order and dropout")
    device: str = opt("auto", "cpu, cuda or auto")
    # distributed (torchrun)
    parallel: str = opt("ddp", "with torchrun: ddp or fsdp", choices=["ddp", "fsdp"])
    fsdp_reshard: bool = opt(True, "fsdp: free gathered parameters after forward (ZeRO-3); false = ZeRO-2")
    cpu_offload: bool = opt(False, "fsdp: keep parameters, gradients and optimiser states on the CPU")
    ep: int = opt(1, "expert parallelism (ddp, MoE models): experts split over groups of this many processes (it "
                  "divides their number); tokens go to their experts' process and back by all-to-all")
    # parallel layout (torchrun; llmkit/parallel): the degrees multiply to the world size, any left out is 1
    tp: int = opt(1, "tensor-parallel degree (Megatron-style, with sequence parallelism and a vocabulary-parallel loss)")
    pp: int = opt(1, "pipeline-parallel stages (blocks split evenly; embedding first, norm and head last)")
    pp_schedule: str = opt("1f1b", "pipeline schedule", choices=["gpipe", "1f1b", "interleaved-1f1b"])
    microbatches: int = opt(1, "pipeline micro-batches each micro-batch is split into (must divide it)")
    pp_virtual_stages: int = opt(2, "interleaved-1f1b: pipeline stages per rank")
    dp_shard: int = opt(1, "FSDP2 degree inside a tp/pp/cp layout (parameters sharded over these ranks)")
    dp_replicate: int = opt(1, "replicas of the (dp_shard-sharded) model: HSDP when both are above 1")
    cp: int = opt(1, "context-parallel degree: ring attention over the sequence (CUDA only)")
    dcp_checkpoint: bool = opt(False, "also write model and optimiser through torch.distributed.checkpoint, so a "
                               "run can resume at another layout (always on with fsdp and tp/pp/cp layouts)")

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch_size", "grad_accum", "max_steps", "save_every", "keep_last",
                     "eval_batches", "log_every", "tp", "pp", "microbatches", "pp_virtual_stages", "dp_shard",
                     "dp_replicate", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.ep < 1:
            raise ValueError(f"recipe field 'ep' must be >= 1, got {self.ep}")
        if self.ep > 1 and self.tp * self.pp * self.cp * self.dp_shard * self.dp_replicate > 1:
            raise ValueError("recipe field 'ep' works under DDP only, not with tp, pp, cp, dp_shard or dp_replicate")
        if not self.data:
            raise ValueError("recipe field 'data' is required: a directory written by `llmkit data pack`")
        if self.lr <= 0:
            raise ValueError(f"recipe field 'lr' must be positive, got {self.lr}")
        if self.objective == "ul2" and self.seq_len < 32:
            raise ValueError("objective 'ul2' needs seq_len >= 32 to place its spans")
        if not 0 < self.batch_ramp_start <= 1:
            raise ValueError(f"recipe field 'batch_ramp_start' must be in (0, 1], got {self.batch_ramp_start}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))
