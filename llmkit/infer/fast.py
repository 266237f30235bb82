"""The fast decode path: a static KV cache and one `torch.compile`d decode step (CUDA graphs on GPU).

A decode step at batch 1 is hundreds of small ops; compiled, it is a handful of fused kernels
and the weight matmuls. On a CPU the step is compiled with inductor's freezing, which folds the
weights into the graph as constants and repacks them for oneDNN: a bandwidth-bound step then
reads its weights faster than a loop of plain `W @ x` does (benchmarks/generate_cpu.py). On CUDA
the step is captured as a CUDA graph (mode="reduce-overhead"), which removes the launch cost of
every kernel (as gpt-fast does).

Shapes stay fixed so the step compiles once: the cache is sized to a power-of-two bucket, every
step reads all of it and masks the slots not yet written (the model's static-cache form), and the
caches and stacked projections of each (batch, length) bucket are kept and re-attached, so the
compiled graph finds the very tensors it was traced with. Frozen weights are constants: when a
parameter changes (an optimizer step, a load), the compiled steps are dropped and rebuilt. On a
CPU each compiled bucket holds its own packed copy of the weights: memory for speed.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from llmkit.model import Transformer

MIN_BUCKET = 64


def bucket_length(n: int) -> int:
    """Cache length for n tokens: the next power of two (at least MIN_BUCKET), so few shapes compile."""
    return max(MIN_BUCKET, 1 << math.ceil(math.log2(max(n, 1))))


class CompiledDecoder:
    """Compiled decode steps of one model: `attach(B, n)` before a generation, `step(...)` each token."""

    def __init__(self, model: Transformer):
        self.model = model
        self._fingerprint = self._weights_fingerprint()
        self._buckets: dict[tuple[int, int], list] = {}  # (B, L) -> per layer (cache, qkv_stacked, gate_up_stacked)
        self._compile()

    def _weights_fingerprint(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _compile(self) -> None:
        model = self.model
        mode = "reduce-overhead" if model.model.embed_tokens.weight.is_cuda else None

        def step_logits(token: Tensor, slot: Tensor, mask: Tensor | None, prefix_len: Tensor | None) -> Tensor:
            return model(token, mask, prefix_len=prefix_len, slots=slot)[:, -1]

        def step_token(token: Tensor, slot: Tensor, mask: Tensor | None, prefix_len: Tensor | None) -> Tensor:
            return model(token, mask, prefix_len=prefix_len, slots=slot)[:, -1].argmax(dim=-1)

        self._step_logits = torch.compile(step_logits, fullgraph=True, dynamic=False, mode=mode)
        self._step_token = torch.compile(step_token, fullgraph=True, dynamic=False, mode=mode)
        self._traced: set[tuple] = set()

    def attach(self, batch_size: int, n_tokens: int) -> int:
        """Install the bucket's cache for a generation of up to n_tokens; returns the cache length."""
        fingerprint = self._weights_fingerprint()
        if fingerprint != self._fingerprint:  # frozen constants are stale: start over
            # reset is process-wide, but a new compile of the same code would otherwise find the old graphs
            torch.compiler.reset()
            self._buckets.clear()
            self._fingerprint = fingerprint
            self._compile()
        L = bucket_length(n_tokens)
        key = (batch_size, L)
        model = self.model
        if key not in self._buckets:
            model.setup_cache(batch_size, L)
            self._buckets[key] = [(layer.self_attn.kv_cache, layer.self_attn.qkv_stacked, layer.mlp.gate_up_stacked)
                                  for layer in model.model.layers]
        for layer, (cache, qkv, gate_up) in zip(model.model.layers, self._buckets[key]):
            layer.self_attn.kv_cache, layer.self_attn.qkv_stacked, layer.mlp.gate_up_stacked = cache, qkv, gate_up
        return L

    def step(self, token: Tensor, slot: Tensor, mask: Tensor | None, prefix_len: Tensor | None,
             greedy: bool) -> Tensor:
        """Next-token logits [B, V], or with greedy=True the argmax tokens [B], for token [B,1] at cache slot [1]."""
        fn = self._step_token if greedy else self._step_logits
        key = (greedy, tuple(token.shape), self.model.model.layers[0].self_attn.kv_cache.k.shape[2],
               mask is None, prefix_len is None)
        if key in self._traced:
            out = fn(token, slot, mask, prefix_len)
        else:  # this call traces and compiles; freezing is read then (per-compile options do not reach it)
            with torch._inductor.config.patch(freezing=not token.is_cuda):
                out = fn(token, slot, mask, prefix_len)
            self._traced.add(key)
        # CUDA graphs reuse their output buffers on the next replay: keep a copy
        return out.clone() if out.is_cuda else out


_decoders: weakref.WeakKeyDictionary[Transformer, CompiledDecoder] = weakref.WeakKeyDictionary()


def compiled_decoder(model: Transformer) -> CompiledDecoder:
    """The model's compiled decoder, built on first use and kept as long as the model lives."""
    if model not in _decoders:
        _decoders[model] = CompiledDecoder(model)
    return _decoders[model]
