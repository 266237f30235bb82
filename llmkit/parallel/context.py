"""Context parallelism: PyTorch's ring attention (`context_parallel`) over the cp mesh dim.

The batch's sequence dimension is split into 2·cp chunks, each rank taking a head and a tail chunk
(load balance under the causal mask), and SDPA is replaced by a ring of key/value exchanges.
PyTorch implements the ring only for the CUDA SDPA kernels (aten._scaled_dot_product_flash_attention,
_efficient_attention and _cudnn_attention, see torch/distributed/tensor/experimental/_context_parallel/
_attention.py); the CPU kernel has no ring version. Tried on 2 gloo processes (torch 2.13, CPU), SDPA inside
`context_parallel` raises "NotImplementedError: Operator aten._scaled_dot_product_flash_attention_for_cpu.default
does not have a sharding strategy registered". So cp > 1 runs on CUDA devices only (NCCL) and is refused on
CPU with one line before any process group starts.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from llmkit.plan import PlanError


def check_context_parallel(cp: int, device: torch.device) -> None:
    if cp > 1 and device.type != "cuda":
        raise PlanError(f"bad parallel layout: cp {cp} needs CUDA: PyTorch's ring attention (context_parallel) "
                        f"replaces only the CUDA SDPA kernels, not the {device.type} one")


def positions_for(inputs: Tensor) -> Tensor:
    """Position ids [B,T]: under context parallelism they are sharded with the tokens, so rotary stays right."""
    B, T = inputs.shape
    return torch.arange(T, device=inputs.device).expand(B, -1).contiguous()


def sequence_shards(cp_mesh: DeviceMesh | None, buffers: list[Tensor]):
    """Shard `buffers` (each [B,T,...]) over the sequence and run SDPA as ring attention inside the block.

    A no-op context without a cp mesh. The buffers are resized in place to this rank's T/cp tokens.
    """
    if cp_mesh is None:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import context_parallel

    return context_parallel(cp_mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                            no_restore_buffers=set(buffers))
