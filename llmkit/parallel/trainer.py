"""The pretraining loop under a tp / pp / cp / dp layout: llmkit.train's Trainer with the model split on a DeviceMesh.

    torchrun --nproc-per-node 4 -m llmkit pretrain --config RECIPE.yaml --tp 2 --pp 2 --microbatches 4
    torchrun --nproc-per-node 4 -m llmkit pretrain --config RECIPE.yaml --dp-replicate 2 --dp-shard 2

Everything else (data order, schedule, clipping, spike guard, checkpoints, exact resume) is the
Trainer's: the layout changes only how a step's forward and backward run and who holds which weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit.config import PRESETS, ModelConfig
from llmkit.parallel.context import check_context_parallel
from llmkit.parallel.engine import ParallelModel
from llmkit.parallel.layout import Layout
from llmkit.parallel.pipeline import keep_local_stages
from llmkit.plan_parallel import bubble_fraction
from llmkit.train import distributed as dist_utils
from llmkit.train.recipe import TrainConfig
from llmkit.train.trainer import TrainError, Trainer


def recipe_model_config(cfg: TrainConfig) -> ModelConfig | None:
    """The model's shape as the recipe names it, read without building it (None: the Trainer reports it)."""
    if Path(cfg.model).is_dir():
        from llmkit.checkpoint import load_config

        return load_config(cfg.model)
    if cfg.model in PRESETS:
        return ModelConfig.from_preset(cfg.model, **cfg.model_overrides)
    return None


def check_before_start(cfg: TrainConfig, layout: Layout) -> None:
    """Refuse a layout that cannot run before any process group, model or data exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout.validate_counts(world, cfg.micro_batch_size)
    config = recipe_model_config(cfg)
    if config is not None:
        layout.validate(config, world, cfg.seq_len)
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
    check_context_parallel(layout.cp, torch.device("cuda" if cuda else "cpu"))
    if (layout.tp > 1 or layout.pp > 1 or layout.cp > 1) and cfg.objective != "causal":
        raise TrainError(f"objective {cfg.objective!r} passes prefix lengths or masks the {layout.describe()} split "
                         "does not carry; use objective 'causal'")
    if cfg.cpu_offload:
        raise TrainError(f"cpu_offload: FSDP's CPU offload is not applied under the {layout.describe()} layout; "
                         "set cpu_offload: false")
    if cfg.compile:
        raise TrainError(f"compile: torch.compile is not applied under the {layout.describe()} layout; "
                         "set compile: false")


class ParallelTrainer(Trainer):
    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 on_step=None):
        cfg.validate()
        self.layout = Layout.from_recipe(cfg)
        check_before_start(cfg, self.layout)
        cfg.dcp_checkpoint = True  # a split model's optimiser state exists only as DCP shards
        super().__init__(cfg, out, resume, overwrite, on_step)
        if self.scaler.is_enabled():
            # fp16: every rank must skip the same steps, so the inf/NaN flag is all-reduced over the ranks
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(self.device.type, init_scale=cfg.fp16_init_scale)
            scaler.load_state_dict(self.scaler.state_dict())  # a resumed run's scale
            self.scaler = scaler

    # -- the split

    def _build_model(self):
        """The one-process model (same seeded weights), with other pipeline stages' blocks already freed so
        that only this rank's stages reach the device."""
        model = super()._build_model()
        if self.layout.pp > 1:
            # pp is the outermost mesh dim: ranks [r * world/pp, (r + 1) * world/pp) form stage group r
            keep_local_stages(model, self.env.rank // (self.env.world_size // self.layout.pp), self.layout.pp,
                              self.layout.stages_per_rank)
        return model

    def _wrap_model(self) -> nn.Module:
        self.engine = ParallelModel(self.raw_model, self.layout, self.device, self.cfg.fsdp_reshard)
        layout = self.layout
        event = {"event": "parallel_layout", "layout": layout.degrees(), "world_size": self.env.world_size}
        if layout.pp > 1:
            event.update(schedule=layout.pp_schedule, microbatches=layout.microbatches,
                         stages_per_rank=layout.stages_per_rank,
                         bubble_fraction=bubble_fraction(layout.pp, layout.microbatches, layout.stages_per_rank))
        self._event(event)
        return self.engine.holder

    def _param_owner(self) -> nn.Module:
        return self.engine.holder

    def _data_shard(self) -> tuple[int, int]:
        return self.engine.data_rank, self.engine.data_world

    # -- a step

    def _forward_backward(self, micro: list) -> float:
        eng, env = self.engine, self.env
        # every rank of one data shard sees the same labels: count them once, on one rank of the shard
        n_local = sum(int((labels != -100).sum()) for _, labels, _ in micro) if eng.counts_tokens else 0
        n_global = dist_utils.all_reduce_sum(float(n_local), env)
        # FSDP averages gradients over its ranks; undo that so the gradient is the global-batch mean's
        factor = eng.grad_average / n_global

        def scale(loss: Tensor) -> Tensor:
            return self.scaler.scale(loss * factor)

        # earlier pipeline stages never scale a loss, but they unscale gradients: create the scale here too
        self.scaler.scale(torch.zeros((), device=self.device))
        loss_sum = 0.0
        for i, (inputs, labels, _) in enumerate(micro):
            with self._autocast():
                loss_sum += eng.forward_backward(inputs.to(self.device), labels.to(self.device), scale,
                                                 sync=i == len(micro) - 1)
        return dist_utils.all_reduce_sum(loss_sum if eng.reports_loss else 0.0, env) / n_global

    def _clip_grad_norm(self) -> float:
        return self.engine.clip_grad_norm(self.cfg.grad_clip)

    def _eval_loss_sum(self, x: Tensor, y: Tensor, extra: dict) -> tuple[float, int]:
        eng = self.engine
        count = int((y != -100).sum()) if eng.counts_tokens else 0  # before cp shards y in place
        with self._autocast():
            loss = eng.eval_loss_sum(x, y)
        return (loss if eng.reports_loss else 0.0), count

    def sample(self) -> str:
        return "(no sample: generation runs on an unsplit model; load OUT/model to generate)"

    # -- checkpoints: weights consolidated on rank 0, model and optimiser through DCP (reshardable)

    def _full_state_dict(self) -> dict | None:
        return self.engine.full_state_dict()

    def _restore(self, path: Path) -> None:
        if not (path / "dcp").is_dir():
            raise TrainError(f"{path}: no dcp/ folder, so it cannot be resharded onto {self.layout.describe()}; "
                             "write checkpoints with --dcp-checkpoint (one process, DDP) or --parallel fsdp")
        super()._restore(path)

    def _trainer_state(self) -> dict:
        state = super()._trainer_state()
        state.pop("optimizer", None)
        return state


def trainer_class(cfg: TrainConfig) -> type[Trainer]:
    """ParallelTrainer when the recipe asks for any tp / pp / cp / dp degree above 1, else the plain Trainer."""
    return ParallelTrainer if Layout.from_recipe(cfg).active else Trainer
