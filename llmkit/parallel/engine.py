"""Compose TP, PP, CP and FSDP2/HSDP on one DeviceMesh, and run a training or evaluation step through them.

Order of application (as torchtitan): split into pipeline stages, shard each stage's matrices over
tp, then shard parameters over the data-parallel dims with FSDP2 (2D with dp_replicate: HSDP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from llmkit.model import Transformer
from llmkit.parallel.context import positions_for, sequence_shards
from llmkit.parallel.layout import Layout, build_mesh, data_shard, fsdp_mesh
from llmkit.parallel.pipeline import build_schedule, split_model, stage_ids
from llmkit.parallel.tensor import apply_tensor_parallel
from llmkit.train.objectives import lm_loss

LossFn = Callable[[Tensor, Tensor], Tensor]


def local_value(t: Tensor) -> float:
    """A scalar as a float; a DTensor loss (Replicate over tp after loss_parallel's lazy reduction) is gathered."""
    return float(t.full_tensor() if isinstance(t, DTensor) else t)


class ParallelModel:
    """This rank's part of the model under a layout, and the step functions that drive it.

    `holder` owns this rank's parameters under the full model's names (optimizer, checkpoints);
    `module` is what a forward pass calls when there is no pipeline.
    """

    def __init__(self, model: Transformer, layout: Layout, device: torch.device, fsdp_reshard: bool = True):
        self.layout, self.device = layout, device
        self.mesh: DeviceMesh = build_mesh(layout, device)
        self.data_rank, self.data_world = data_shard(self.mesh, layout)
        self.pp_rank = self.mesh.get_local_rank("pp")
        assert self.pp_rank == dist.get_rank() // (dist.get_world_size() // layout.pp), "pp must be the outer dim"
        self._losses: list[Tensor] = []  # raw (unscaled) micro-batch losses the pipeline's loss_fn saw
        self._loss_scale: Callable[[Tensor], Tensor] = lambda loss: loss
        roots = self._split(model)
        if layout.tp > 1:
            for root in roots:
                apply_tensor_parallel(root, self.mesh["tp"])
        self.fsdp_mesh = fsdp_mesh(self.mesh, layout)
        if self.fsdp_mesh is not None:
            _apply_fsdp(roots, self.fsdp_mesh, fsdp_reshard)
        self.module = roots[0]
        self.schedule = self._pipeline_schedule() if layout.pp > 1 else None

    def _split(self, model: Transformer) -> list[nn.Module]:
        """The modules this rank runs (its pipeline stages, or the whole model); sets `stages` and `holder`."""
        if self.layout.pp == 1:
            self.stages, self.holder = [], model
            return [model]
        self.stages, self.holder = split_model(model, self.pp_rank, self.layout.pp, self.layout.stages_per_rank)
        return list(self.stages)

    def _pipeline_schedule(self):
        layout = self.layout
        return build_schedule(self.stages, stage_ids(self.pp_rank, layout.pp, layout.stages_per_rank),
                              layout.pp * layout.stages_per_rank, self.mesh["pp"], self.device, layout.pp_schedule,
                              layout.microbatches, self._pipeline_loss)

    # -- facts about this rank

    @property
    def grad_average(self) -> int:
        """Ranks FSDP averages gradients over (the global-batch loss is scaled up by this)."""
        return self.fsdp_mesh.size() if self.fsdp_mesh is not None else 1

    @property
    def reports_loss(self) -> bool:
        """Whether this rank's loss sum enters the global one: one tp rank, the last pipeline stage, every
        data and context shard (each holds different tokens)."""
        last_stage = self.pp_rank == self.layout.pp - 1
        return last_stage and self.mesh.get_local_rank("tp") == 0

    @property
    def counts_tokens(self) -> bool:
        """One rank per data shard counts its labelled tokens (cp ranks share the shard's full labels)."""
        return self.reports_loss and self.mesh.get_local_rank("cp") == 0

    @property
    def is_representative(self) -> bool:
        """One rank per pipeline stage (tp, dp and cp coordinates 0) contributes the stage's full weights."""
        return all(self.mesh.get_local_rank(d) == 0 for d in ("dp_replicate", "dp_shard", "cp", "tp"))

    # -- steps

    def forward_backward(self, inputs: Tensor, labels: Tensor, scale: Callable[[Tensor], Tensor],
                         sync: bool) -> float:
        """One micro-batch's forward and backward; `scale` maps the summed loss to what is backpropagated.
        Returns this rank's loss sum (0 where it holds no loss)."""
        if self.schedule is not None:
            return self._pipeline_step(inputs, labels, scale, train=True)
        self._set_gradient_sync(sync)
        with self._loss_context(), self._sequence_shards(inputs, labels) as position_ids:
            logits = self.module(inputs, position_ids=position_ids)
            loss = lm_loss(logits, labels, reduction="sum")
            scale(loss).backward()
        return local_value(loss.detach())

    @torch.no_grad()
    def eval_loss_sum(self, inputs: Tensor, labels: Tensor) -> float:
        if self.schedule is not None:
            return self._pipeline_step(inputs, labels, lambda loss: loss, train=False)
        with self._loss_context(), self._sequence_shards(inputs, labels) as position_ids:
            return local_value(lm_loss(self.module(inputs, position_ids=position_ids), labels, reduction="sum"))

    def _pipeline_step(self, inputs: Tensor, labels: Tensor, scale: Callable[[Tensor], Tensor], train: bool) -> float:
        self._losses, self._loss_scale = [], scale
        with self._loss_context():
            run = self.schedule.step if train else self.schedule.eval
            run(inputs, target=labels)
        # the first step also calls loss_fn while it infers the stages' shapes: keep the last m calls
        return sum(local_value(loss) for loss in self._losses[len(self._losses) - self.layout.microbatches:])

    def _pipeline_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        loss = lm_loss(logits, labels, reduction="sum")
        self._losses.append(loss.detach())
        return self._loss_scale(loss)

    def _loss_context(self):
        # the head's logits are sharded over the vocabulary under tp: cross-entropy without gathering them
        return loss_parallel() if self.layout.tp > 1 else contextlib.nullcontext()

    @contextlib.contextmanager
    def _sequence_shards(self, inputs: Tensor, labels: Tensor):
        if self.layout.cp == 1:
            yield None
            return
        positions = positions_for(inputs)
        with sequence_shards(self.mesh["cp"], [inputs, labels, positions]):
            yield positions

    def _set_gradient_sync(self, sync: bool) -> None:
        if self.fsdp_mesh is not None:  # accumulate micro-batches locally; reduce-scatter on the last
            self.module.set_requires_gradient_sync(sync)

    # -- after the backward passes

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over every rank's shards and stages, then clip (max_norm 0: only measure)."""
        params = [p for p in self.holder.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.layout.pp > 1:  # each stage measured its own blocks: add the squares over the pipeline
            norm = norm.pow(2)
            dist.all_reduce(norm, group=self.mesh["pp"].get_group())
            norm = norm.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole model's unsharded weights on global rank 0 (None elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        local = get_model_state_dict(self.holder, options=StateDictOptions(full_state_dict=True))
        mine = {k: v.detach().cpu() for k, v in local.items()} if self.is_representative else {}
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        return {k: v for part in parts for k, v in part.items()}


def _apply_fsdp(roots: list[nn.Module], mesh: DeviceMesh, reshard: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    for root in roots:
        # block by block, so only one block's full parameters exist at a time
        for block in root.model.layers.children():
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(root, mesh=mesh, reshard_after_forward=reshard)
