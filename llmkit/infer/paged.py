"""Paged KV cache: fixed-size blocks in one pool per layer, a block table per request.

Memory is handed out a block at a time as a request grows and returned when it ends, so a
batch of requests of mixed lengths uses what it holds, not batch x longest (vLLM's idea,
Kwon et al. 2023). The attention kernel stays SDPA: each step gathers every row's keys and
values, in order, into a [B,K,S,D] view and masks the padding; on a GPU a paged kernel
(FlashInfer, vLLM's) would read the blocks in place, which pure PyTorch cannot express.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch
from torch import Tensor, nn


class BlockAllocator:
    """Block numbers with reference counts, and a cache of full blocks by content (automatic prefix caching).

    A full block is registered under (the key of the block before it, its tokens): the key names the whole
    prefix it ends, so a later request whose tokens begin the same way `match`es those blocks and skips
    recomputing them (vLLM's automatic prefix caching). Keys are compared exactly (a dict of token tuples),
    never by a hash alone. A cached block nobody holds stays cached while free blocks remain; an allocation that
    needs it evicts the least recently used. All-or-nothing allocation, so a failed request takes nothing.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low numbers first
        self._refs = [0] * num_blocks
        self._by_key: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent uid, tokens) -> block
        self._entry: dict[int, tuple[tuple[int, tuple[int, ...]], int]] = {}  # cached block -> (its key, its uid)
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recently used first
        # uids name cached prefixes and are never reused, so an evicted block's children can never match again
        self._uids = itertools.count(1)

    @property
    def free(self) -> int:
        """Blocks an allocation can take: the free ones and the cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def cached(self) -> int:
        """Cached blocks nobody holds (kept for later requests; counted as free)."""
        return len(self._idle)

    def allocate(self, n: int) -> list[int] | None:
        if n > self.free:
            return None
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                key, _ = self._entry.pop(block)
                del self._by_key[key]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._entry:
                    self._idle[block] = None  # most recently used last
                else:
                    self._free.append(block)

    def match(self, tokens: list[int], block_size: int, max_blocks: int, root: int = 0) -> tuple[list[int], int]:
        """The cached blocks holding the longest run of whole blocks `tokens` begins with (at most `max_blocks`),
        each now held once more, and the uid of the prefix they end (`root` when none). Sequences computed
        differently (another adapter) start from their own `root` (<= 0, never a uid), so they never share."""
        blocks, parent = [], root
        for i in range(max_blocks):
            block = self._by_key.get((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
            if block is None:
                break
            blocks.append(block)
            parent = self._entry[block][1]
        for block in blocks:
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
        return blocks, parent

    def register(self, blocks: list[int], tokens: list[int], first: int, block_size: int, parent: int) -> int:
        """Cache `blocks`, blocks first, first+1, ... of a sequence whose `tokens` fill them, after the prefix
        `parent` names; returns the uid of the prefix the last one ends. A block whose content another block
        already caches (the same prompt prefilled twice at once) stays private."""
        for i, block in enumerate(blocks, start=first):
            key = (parent, tuple(tokens[i * block_size:(i + 1) * block_size]))
            if key in self._by_key:
                parent = self._entry[self._by_key[key]][1]
                continue
            parent = next(self._uids)
            self._by_key[key] = block
            self._entry[block] = (key, parent)
        return parent


class PagedLayout:
    """Where this step's tokens are read from, shared by every layer's cache (set by the engine each step)."""

    def __init__(self) -> None:
        self.read_index: Tensor | None = None  # [B, S] flat pool slots of each row's keys, in order


class PagedKVCache(nn.Module):
    """One layer's pool of keys/values, [num_blocks * block_size, K, D], as `Attention` uses a cache:
    `update(slots, k, v)` writes the new tokens at flat pool slots [B,T] and returns every row's keys
    and values [B,K,S,D] gathered by the layout's read index.

    int8=True stores each token's key and value per head as int8 with one fp32 absmax scale (vLLM's int8/fp8
    KV cache idea): (D + 4) / 4D of fp32's bytes and (D + 4) / 2D of bf16's (0.26 and 0.52 at head_dim 128), so
    the same memory holds about 2-4x the tokens; attention reads them dequantized to the model's dtype."""

    def __init__(self, layout: PagedLayout, num_slots: int, n_kv_head: int, head_dim: int, dtype, device,
                 int8: bool = False):
        super().__init__()
        self.layout, self.dtype = layout, dtype
        shape = (num_slots, n_kv_head, head_dim)
        store = torch.int8 if int8 else dtype
        self.register_buffer("k", torch.zeros(shape, dtype=store, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=store, device=device), persistent=False)
        scales = (num_slots, n_kv_head, 1)  # one scale per slot and head
        for name in ("k_scale", "v_scale"):
            self.register_buffer(name, torch.zeros(scales, device=device) if int8 else None, persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, K, T, D = k.shape
        flat = slots.reshape(-1)
        index = self.layout.read_index
        out = []
        for pool, scale, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            rows = new.transpose(1, 2).reshape(B * T, K, D)
            if scale is None:
                pool.index_copy_(0, flat, rows)
                out.append(pool[index].transpose(1, 2))
                continue
            step = rows.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
            pool.index_copy_(0, flat, (rows.float() / step).round().clamp(-127, 127).to(torch.int8))
            scale.index_copy_(0, flat, step)
            out.append((pool[index].to(self.dtype) * scale[index].to(self.dtype)).transpose(1, 2))
        return out[0], out[1]

    def bytes(self) -> int:
        """Memory the pool holds."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)
