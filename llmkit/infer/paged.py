"""Paged KV cache: fixed-size blocks in one pool per layer, a block table per request.

Memory is handed out a block at a time as a request grows and returned when it ends, so a
batch of requests of mixed lengths uses what it holds, not batch x longest (vLLM's idea,
Kwon et al. 2023). The attention kernel stays SDPA: each step gathers every row's keys and
values, in order, into a [B,K,S,D] view and masks the padding; on a GPU a paged kernel
(FlashInfer, vLLM's) would read the blocks in place, which pure PyTorch cannot express.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BlockAllocator:
    """Free list of block numbers; all-or-nothing allocation so a failed request takes nothing."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low numbers first

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedLayout:
    """Where this step's tokens are read from, shared by every layer's cache (set by the engine each step)."""

    def __init__(self) -> None:
        self.read_index: Tensor | None = None  # [B, S] flat pool slots of each row's keys, in order


class PagedKVCache(nn.Module):
    """One layer's pool of keys/values, [num_blocks * block_size, K, D], as `Attention` uses a cache:
    `update(slots, k, v)` writes the new tokens at flat pool slots [B,T] and returns every row's keys
    and values [B,K,S,D] gathered by the layout's read index."""

    def __init__(self, layout: PagedLayout, num_slots: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        self.layout = layout
        shape = (num_slots, n_kv_head, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, K, T, D = k.shape
        flat = slots.reshape(-1)
        self.k.index_copy_(0, flat, k.transpose(1, 2).reshape(B * T, K, D))
        self.v.index_copy_(0, flat, v.transpose(1, 2).reshape(B * T, K, D))
        index = self.layout.read_index
        return self.k[index].transpose(1, 2), self.v[index].transpose(1, 2)
