"""A parallel layout (degrees of tp, pp, dp_replicate, dp_shard, cp) and the DeviceMesh it names.

The mesh dims follow torchtitan's order, outermost first: pp, dp_replicate, dp_shard, cp, tp, so
tensor-parallel peers are neighbouring ranks (one node) and pipeline stages are the farthest apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llmkit.config import ModelConfig
from llmkit.plan import PlanError, validate_layout

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    cp: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int = 1
    pp_virtual_stages: int = 2  # stages per rank under interleaved-1f1b

    @classmethod
    def from_recipe(cls, cfg) -> "Layout":
        return cls(cfg.tp, cfg.pp, cfg.dp_shard, cfg.dp_replicate, cfg.cp, cfg.pp_schedule, cfg.microbatches,
                   cfg.pp_virtual_stages)

    @property
    def active(self) -> bool:
        """True when any degree is above 1: the run goes through the DeviceMesh path."""
        return self.world_size > 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp_shard * self.dp_replicate * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different windows of the global batch."""
        return self.dp_shard * self.dp_replicate

    @property
    def stages_per_rank(self) -> int:
        return self.pp_virtual_stages if self.pp_schedule == "interleaved-1f1b" else 1

    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}

    def describe(self) -> str:
        return " x ".join(f"{k} {v}" for k, v in self.degrees().items() if v > 1) or "single process"

    def validate_counts(self, world_size: int, micro_batch_size: int) -> None:
        """Checks that need no model: the degrees multiply to the world size, micro-batches divide the batch."""
        if self.world_size != world_size:
            raise PlanError(f"bad parallel layout: tp {self.tp} x pp {self.pp} x dp_shard {self.dp_shard} x "
                            f"dp_replicate {self.dp_replicate} x cp {self.cp} = {self.world_size}, but the world "
                            f"size is {world_size}")
        if self.pp > 1 and micro_batch_size % self.microbatches:
            raise PlanError(f"bad parallel layout: microbatches {self.microbatches} does not divide "
                            f"micro_batch_size {micro_batch_size} (the pipeline splits each micro-batch)")

    def validate(self, config: ModelConfig, world_size: int, seq_len: int) -> None:
        """Every check of llmkit.plan.validate_layout plus the model features the split supports."""
        validate_layout(config, world_size, self.tp, self.pp, self.dp_shard, self.dp_replicate, self.cp,
                        self.microbatches, schedule=self.pp_schedule, virtual_stages=self.stages_per_rank,
                        seq_len=seq_len)
        unsupported = unsupported_features(config)
        if config.tie_embeddings and self.pp > 1:
            unsupported.append("tied embeddings (embedding and head sit on different pipeline stages)")
        if (self.tp > 1 or self.pp > 1 or self.cp > 1) and unsupported:
            raise PlanError(f"bad parallel layout: {self.describe()} splits only pre-norm rotary decoders "
                            f"(untied embeddings under pp); this model has {', '.join(unsupported)}")
        if self.cp > 1 and self.pp > 1:
            raise PlanError(f"bad parallel layout: cp {self.cp} with pp {self.pp}: pipeline stages build their "
                            "rotary positions locally, unsharded; combine cp with tp and dp only")
        if self.tp > 1 and seq_len % self.tp:
            raise PlanError(f"bad parallel layout: sequence parallelism splits seq_len {seq_len} over tp "
                            f"{self.tp}, which does not divide it")


def unsupported_features(config: ModelConfig) -> list[str]:
    """Model features the tensor/pipeline split does not handle (each would need its own sharding plan)."""
    found = []
    if config.architecture != "decoder":
        found.append(f"architecture {config.architecture!r}")
    if config.norm_placement != "pre" or config.parallel_block:
        found.append(f"norm_placement {config.norm_placement!r}" + (" with parallel blocks" * config.parallel_block))
    if config.position != "rope":
        found.append(f"position {config.position!r}")
    if config.embed_norm or config.type_vocab_size:
        found.append("embedding norm / token types")
    if getattr(config, "n_experts", 0):
        found.append("mixture-of-experts layers")
    return found


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """One mesh with every named dim (degree 1 included, so mesh["tp"] always exists)."""
    return init_device_mesh(device.type, tuple(layout.degrees().values()), mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh: DeviceMesh, layout: Layout) -> DeviceMesh | None:
    """The mesh FSDP2 shards over: dp_shard (x cp, whose ranks hold the same weights), 2D with dp_replicate
    for HSDP; None when no data or context parallelism is asked for."""
    if layout.dp * layout.cp == 1:
        return None
    shard = "dp_shard"
    if layout.cp > 1:
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        shard = "dp_shard_cp"
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", shard]
    return mesh[shard]


def data_shard(mesh: DeviceMesh, layout: Layout) -> tuple[int, int]:
    """(rank, world) for the data loader: only the data-parallel coordinates pick different windows."""
    rank = mesh.get_local_rank("dp_replicate") * layout.dp_shard + mesh.get_local_rank("dp_shard")
    return rank, layout.dp
