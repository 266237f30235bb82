"""torchrun glue: process groups, DDP / FSDP2 wrapping, reductions and sharded checkpoints.

Everything here degrades to a no-op in a single process, so the trainer has one code path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# dense bf16 peak FLOP/s by device name, for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local, dev)


def teardown() -> None:
    """Destroy the process group, if one was joined. Left to interpreter exit, gloo's threads can outlive their
    owners and abort the process ("terminate called without an active exception") after a clean run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sharded(env: DistEnv, cfg) -> bool:
    return env.distributed and cfg.parallel == "fsdp"


def wrap(model: nn.Module, env: DistEnv, cfg) -> nn.Module:
    if not env.distributed:
        return model
    expert_params = expert_parallel(model, env, cfg)
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # each rank holds other experts: DDP must neither broadcast nor average them
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_params)
        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard}
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # shard block by block so only one block's full parameters exist at a time
    for block in model.model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def expert_parallel(model: nn.Module, env: DistEnv, cfg) -> list[str]:
    """With recipe field ep > 1: split every MoE layer's experts over groups of ep ranks; the expert parameters'
    names."""
    ep = getattr(cfg, "ep", 1)
    if ep == 1:
        return []
    if env.world_size % ep or cfg.parallel != "ddp":
        raise ValueError(f"recipe field 'ep' ({ep}) needs parallel 'ddp' and must divide the number of processes "
                         f"({env.world_size})")
    from llmkit.train.expert_parallel import shard_experts

    return shard_experts(model, ep)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t)


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def no_sync(model: nn.Module, env: DistEnv, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if not env.distributed or last:
        if env.distributed and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    model.set_requires_gradient_sync(False)  # FSDP2
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float, env: DistEnv) -> float:
    from llmkit.train.expert_parallel import expert_parallel_group, sync_and_clip_grad_norm

    if env.distributed and expert_parallel_group(model) is not None:  # other ranks hold other experts
        return sync_and_clip_grad_norm(model, max_norm)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor norm
        norm = norm.full_tensor()
    return float(norm)


def mfu(cfg, seq_len: int, tokens_per_s: float, device: torch.device, world_size: int) -> float | None:
    """Model FLOPs utilisation: (6N + 12·L·H·D·T) FLOPs per token (PaLM appendix B) over the peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    flops_per_token = 6 * cfg.n_active_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return flops_per_token * tokens_per_s / (peak * world_size)


def model_state_for_save(model: nn.Module, raw_model: nn.Module, env: DistEnv) -> dict | None:
    """A full (unsharded) state dict on rank 0 for safetensors; None means use the raw model's."""
    from llmkit.train.expert_parallel import expert_parallel_group, full_state_dict

    group = expert_parallel_group(raw_model) if env.distributed else None
    if group is not None:
        return full_state_dict(raw_model, group)
    if not env.distributed or isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # optimizer state keyed by parameter name, not by position in a param group: a checkpoint written
    # under one layout (FSDP, TP x PP, one process) then loads under any other
    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_sharded(model: nn.Module, optimizer, path: Path) -> None:
    """Each rank writes its shards of model and optimiser with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer, path: Path) -> None:
    """Load a DCP checkpoint written at any layout into this rank's (possibly sharded) model and optimiser."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_dcp_options())
