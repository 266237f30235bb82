"""Expert parallelism: the experts of every MoE layer split over groups of ranks, tokens sent to their
expert's rank and back with all-to-all.

    torchrun --nproc-per-node 2 -m llmkit pretrain --config RECIPE.yaml --ep 2
    torchrun --nproc-per-node 8 -m llmkit pretrain --config RECIPE.yaml --ep 4   # 2 groups of 4

The W ranks form W/P expert-parallel groups of P consecutive ranks; rank j of a group keeps experts
[j*E/P, (j+1)*E/P) of every MoE layer, and every rank routes its own slice of the global batch (as
under DDP). Rows for expert e go to e's rank in the group with one all_to_all_single, come back with
another, and the autograd versions of both carry the gradients the same way; gloo and NCCL both
implement it. The other parameters are replicated and averaged by DDP. An expert's gradient sums its
group's tokens; summed again over the groups (the ranks holding the same experts) and divided by W,
it is DDP's mean of per-rank gradients.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from llmkit.model import Experts, MoE, run_experts


class RemoteExpert(nn.Module):
    """Stands in for an expert another rank holds: keeps the global numbering of the state-dict keys,
    and skips that expert's tensors when a full state dict is loaded (a resume reads the whole checkpoint)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        pass


class ExpertParallelExperts(Experts):
    """This rank's experts of one MoE layer; forward(xs, counts) as Experts, rows travelling by all-to-all."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup, replicas: dist.ProcessGroup):
        super().__init__()
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.replicas = replicas  # the ranks of the other groups holding these same experts
        if len(experts) % self.size:
            raise ValueError(f"n_experts ({len(experts)}) must be a multiple of the expert-parallel size ({self.size})")
        self.n_local = len(experts) // self.size
        self.first = self.rank * self.n_local
        for e, expert in enumerate(experts):
            self.append(expert if self.first <= e < self.first + self.n_local else RemoteExpert())

    def forward(self, xs: Tensor, counts: list[int]) -> Tensor:
        P, L = self.size, self.n_local
        mine = torch.tensor(counts, device=xs.device)
        table = [torch.empty_like(mine) for _ in range(P)]
        dist.all_gather(table, mine, group=self.group)
        table = torch.stack(table).view(P, P, L)  # [source rank, destination rank, its local expert]
        send = table[self.rank].sum(-1).tolist()  # rows are sorted by expert, so by destination rank too
        arriving = table[:, self.rank]  # [source, local expert]
        recv = arriving.sum(-1).tolist()
        arrived = all_to_all_single_autograd(xs, recv, send, self.group)
        # arrived rows are source-major; sort them expert-major to run each local expert once
        expert_of_row = torch.arange(L, device=xs.device).repeat(P).repeat_interleave(arriving.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        local = [self[self.first + i] for i in range(L)]
        ys = run_experts(local, arrived[order], arriving.sum(0).tolist())
        ys = ys[torch.argsort(order)]  # back to source-major
        return all_to_all_single_autograd(ys, send, recv, self.group)


def shard_experts(model: nn.Module, ep: int) -> list[str]:
    """Keep this rank's experts in every MoE layer, expert-parallel groups of `ep` consecutive ranks.

    Returns the names of the expert parameters, which DDP must leave alone.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("expert parallelism needs a mixture-of-experts model (config field n_experts > 0)")
    world, rank = dist.get_world_size(), dist.get_rank()
    # every rank creates every group, in the same order; groups of their own, so that no all-to-all
    # interleaves with DDP's bucket all-reduces
    groups = [dist.new_group(list(range(g * ep, (g + 1) * ep))) for g in range(world // ep)]
    replicas = [dist.new_group(list(range(j, world, ep))) for j in range(ep)]
    for layer in layers:
        layer.experts = ExpertParallelExperts(layer.experts, groups[rank // ep], replicas[rank % ep])
    names = []
    for name, p in model.named_parameters():
        if is_expert_param(name):
            p.register_hook(lambda g: g / world)  # summed over ranks (see the module docstring); DDP averages
            names.append(name)
    return names


def is_expert_param(name: str) -> bool:
    return ".experts." in f".{name}"


def expert_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    return next((m.group for m in model.modules() if isinstance(m, ExpertParallelExperts)), None)


def sync_and_clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """After the step's backward passes: sum each expert's gradient over the groups holding it, then clip
    by the norm of the whole model's gradient (replicated parameters once, each expert once)."""
    layer = next(m for m in model.modules() if isinstance(m, ExpertParallelExperts))
    if dist.get_world_size(layer.replicas) > 1:
        sum_over_replicas([p for name, p in model.named_parameters() if is_expert_param(name)], layer.replicas)
    shared, experts = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (experts if is_expert_param(name) else shared).append(p)
    expert_sq = sum((p.grad.float().pow(2).sum() for p in experts), torch.zeros((), device=shared[0].device))
    dist.all_reduce(expert_sq, group=layer.group)
    total = math.sqrt(float(torch.nn.utils.get_total_norm([p.grad for p in shared])) ** 2 + float(expert_sq))
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(shared + experts, max_norm, torch.tensor(total))
    return total


def sum_over_replicas(params: list[nn.Parameter], replicas: dist.ProcessGroup) -> None:
    """Sum gradients over the ranks holding the same parameters, in one all-reduce. A parameter no tokens
    reached on any of them keeps grad None, as in one process (the optimiser skips it)."""
    device = params[0].device
    reached = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(reached, group=replicas)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat, group=replicas)
    for p, grad, hit in zip(params, flat.split([p.numel() for p in params]), reached.tolist()):
        p.grad = grad.view_as(p).clone() if hit else None


def full_state_dict(model: nn.Module, group: dist.ProcessGroup) -> dict[str, Tensor] | None:
    """Every expert gathered from its rank of the first group: the whole model's state dict on rank 0,
    None elsewhere."""
    if dist.get_rank() >= dist.get_world_size(group):  # not in the first group: its experts are replicas
        return None
    sd = model.state_dict()
    mine = {k: v.detach().cpu() for k, v in sd.items() if is_expert_param(k)}
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(mine, gathered, dst=dist.get_global_rank(group, 0), group=group)
    if gathered is None:
        return None
    full = {k: v for k, v in sd.items() if not is_expert_param(k)}
    for part in gathered:
        full.update(part)
    return full
