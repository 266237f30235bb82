"""Megatron-style tensor parallelism with sequence parallelism, through DTensor's `parallelize_module`.

Per block (Shoeybi et al. 2019; Korthikanti et al. 2022 for the sequence-parallel regions):
  norms                 SequenceParallel: each rank normalises T/tp tokens (the norm+dropout region)
  attention / mlp input all-gather the sequence (PrepareModuleInput Shard(1) -> Replicate)
  q, k, v, gate, up     ColwiseParallel: each rank computes n_head/tp heads, d_ff/tp hidden units
  o, down               RowwiseParallel: partial sums reduce-scattered back onto the sequence shards
The embedding is vocabulary-parallel (RowwiseParallel over the vocabulary rows, output sharded over
the sequence); the head is column-parallel with logits left sharded over the vocabulary, and the
loss is computed under `loss_parallel`, so the full [B, T, V] logits never exist on one rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def block_plan() -> dict:
    return {
        "input_layernorm": SequenceParallel(),
        # (hidden states, ForwardContext): only the tensor is redistributed
        "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "post_attention_layernorm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def outer_plan(model: nn.Module) -> dict:
    """Embedding, final norm and head, for whichever of them this module (a whole model or a stage) holds."""
    plan = {}
    if getattr(model.model, "embed_tokens", None) is not None:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model.model, "norm", None) is not None:
        plan["model.norm"] = SequenceParallel()
    if getattr(model, "lm_head", None) is not None:
        # logits stay a DTensor sharded over the vocabulary: the loss runs under loss_parallel
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a Transformer (or a pipeline stage of one) over `tp_mesh` in place."""
    tp = tp_mesh.size()
    head, embed = getattr(model, "lm_head", None), getattr(model.model, "embed_tokens", None)
    tied = head is not None and embed is not None and head.weight is embed.weight
    for block in model.model.layers.children():
        attn = block.self_attn
        assert attn.n_head % tp == 0 and attn.n_kv_head % tp == 0, "validate the layout first"
        parallelize_module(block, tp_mesh, block_plan())
        # attention reshapes q/k/v by its head counts: after the column split each rank holds 1/tp of them
        attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp
    parallelize_module(model, tp_mesh, outer_plan(model))
    if tied:
        # both plans shard the [V, C] matrix by vocabulary rows (Shard(0)), but each made its own DTensor
        model.lm_head.weight = model.model.embed_tokens.weight
    if hasattr(model, "seq_shards"):  # a pipeline stage receives T/tp tokens and rebuilds the rotary tables for T
        model.seq_shards = tp
