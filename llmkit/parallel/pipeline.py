"""Pipeline parallelism with torch.distributed.pipelining: balanced stages by layer, GPipe / 1F1B / interleaved 1F1B.

Stage s of S holds blocks stage_layers(n_layer, S)[s] (the first stages take one more when S does not
divide the depth); the embedding lives on the first stage, the final norm and the head on the last.
Interleaved 1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", sec. 2.2.2) gives each rank v stages: rank r holds r, r + p, r + 2p, ...
The bubble fraction the trainer logs is llmkit.plan_parallel.bubble_fraction: (p - 1) / (m + p - 1) for
GPipe and 1F1B (Huang et al. 2019; Narayanan et al. 2021 sec. 2.2.1), (p - 1) / (v m + p - 1) interleaved.
Parameter names inside a stage are those of the whole model (`model.layers.5.mlp.up_proj.weight`),
so DCP checkpoints of any layout load into any other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.utils.checkpoint import checkpoint

from llmkit.model import Backbone, ForwardContext, Transformer, build_mask
from llmkit.plan import stage_layers

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}


class StageModule(nn.Module):
    """Some consecutive blocks of a Transformer, with the embedding if first and the norm and head if last.

    forward: input ids [B,T] (first stage) or hidden states [B,T/seq_shards,C] -> hidden states, or
    logits [B,T,V] on the last stage.
    """

    def __init__(self, full: Transformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        backbone = full.model
        self.config = full.config
        self.model = nn.Module()
        self.model.embed_tokens = backbone.embed_tokens if first else None
        self.model.dropout = backbone.dropout
        # a ModuleDict keyed by the global index keeps the full model's parameter names
        self.model.layers = nn.ModuleDict({str(i): backbone.layers[i] for i in layer_ids})
        self.model.norm = backbone.norm if last else None
        self.lm_head = full.lm_head if last else None
        # rotary state read by Backbone._rope (plain attributes, fp32, as in the Backbone)
        self._inv_freq, self._rope_scale = backbone._inv_freq, backbone._rope_scale
        self.gradient_checkpointing = backbone.gradient_checkpointing
        self.seq_shards = 1  # tensor parallelism sets tp: the hidden states arrive sharded over the sequence

    def forward(self, x: Tensor) -> Tensor:
        if self.model.embed_tokens is not None:
            x = self.model.dropout(self.model.embed_tokens(x))
        B, T = x.shape[0], x.shape[1] * self.seq_shards
        slots = torch.arange(T, device=x.device)
        cos, sin = Backbone._rope(self, slots.expand(B, -1), x.dtype)
        # as the Backbone: SDPA's own causal kernel, or a mask [1,1,T,T] when a sliding window limits the keys
        mask = build_mask(self.config, slots, T, None, None, None, x.dtype) if self.config.sliding_window else None
        ctx = ForwardContext(cos, sin, mask, mask is None and T > 1, None, None)
        for layer in self.model.layers.values():
            # the holder module, not this stage, gets train()/eval(): read the mode off the shared block
            if self.gradient_checkpointing and layer.training:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        if self.lm_head is None:
            return x
        return self.lm_head(self.model.norm(x))


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The pipeline stages one rank runs: rank r holds r, r + p, ... (looped placement)."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def stage_blocks(n_layer: int, n_stages: int) -> list[list[int]]:
    """The block indices of each pipeline stage, balanced (see llmkit.plan.stage_layers)."""
    sizes = stage_layers(n_layer, n_stages)
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


def keep_local_stages(model: Transformer, pp_rank: int, pp: int, stages_per_rank: int) -> None:
    """Drop every module no stage of this rank runs, so it takes no memory here and moving the model to the
    device moves only this rank's part. Dropped modules become nn.Identity placeholders (not meta tensors,
    which cannot be moved), so the blocks keep their indices."""
    n_stages = pp * stages_per_rank
    mine = stage_ids(pp_rank, pp, stages_per_rank)
    blocks = stage_blocks(model.config.n_layer, n_stages)
    local = {i for s in mine for i in blocks[s]}
    for i in range(len(model.model.layers)):
        if i not in local:
            model.model.layers[i] = nn.Identity()
    if 0 not in mine:
        model.model.embed_tokens = nn.Identity()
    if n_stages - 1 not in mine:
        model.lm_head, model.model.norm = nn.Identity(), nn.Identity()


def split_model(model: Transformer, pp_rank: int, pp: int, stages_per_rank: int) -> tuple[list[StageModule], StageModule]:
    """(this rank's stage modules, one module holding all of them for optimizer and checkpoints)."""
    n_stages = pp * stages_per_rank
    blocks = stage_blocks(model.config.n_layer, n_stages)
    mine = stage_ids(pp_rank, pp, stages_per_rank)
    keep_local_stages(model, pp_rank, pp, stages_per_rank)
    stages = [StageModule(model, blocks[s], s == 0, s == n_stages - 1) for s in mine]
    holder = StageModule(model, sorted(i for s in mine for i in blocks[s]), 0 in mine, n_stages - 1 in mine)
    return stages, holder


def build_schedule(stages: list[StageModule], stage_index: list[int], n_stages: int, pp_mesh: DeviceMesh,
                   device: torch.device, schedule: str, microbatches: int, loss_fn):
    """The torch.distributed.pipelining schedule over this rank's stages.

    loss_fn(logits, labels) already carries the global-batch normalisation, so the schedule must not
    rescale gradients by the micro-batch count (scale_grads=False).
    """
    group = pp_mesh.get_group()
    pipe_stages = [PipelineStage(module, idx, n_stages, device, group=group)
                   for module, idx in zip(stages, stage_index, strict=True)]
    cls = SCHEDULES[schedule]
    if schedule == "interleaved-1f1b":
        return cls(pipe_stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(pipe_stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)

