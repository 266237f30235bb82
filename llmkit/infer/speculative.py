"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) and prompt-lookup decoding.

A proposer drafts k tokens; the target scores all of them in ONE forward pass over its KV cache;
drafted token i is accepted with probability min(1, p_i/q_i), the first rejection is replaced by a
sample from norm(max(0, p - q)), and when all k pass a bonus token comes from the target's k+1-th
distribution. p and q are the *processed* distributions (`sampling.probs`: temperature, top-k,
top-p, penalties), so the output is distributed exactly as plain sampling from the target.
Rollback is free: the static cache is addressed by slot and read up to `kv_len`, so rejected
slots are simply overwritten by the next pass.

Prompt lookup (Saxena 2023) drafts without a model: the tokens that followed the latest earlier
occurrence of the context's last n-gram; its q is one-hot, so the same rule stays exact.
Batch 1 per sequence: a batch of prompts is decoded one prompt after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.infer.sampling import SamplingParams, make_generator, probs
from llmkit.model import Transformer


@dataclass
class SpeculativeStats:
    drafted: int = 0  # tokens proposed by the draft (or the n-gram lookup)
    accepted: int = 0  # of those, tokens the target accepted
    target_forwards: int = 0  # target forward passes, the prefill included
    emitted: int = 0  # tokens returned

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.target_forwards if self.target_forwards else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "target_forwards": self.target_forwards, "tokens_per_forward": self.tokens_per_forward}


class CachedModel:
    """A model over its own static KV cache that holds the first `filled` tokens of a sequence."""

    def __init__(self, model: Transformer, max_len: int):
        if model.config.architecture != "decoder" or model.config.mask != "causal":
            raise ValueError("speculative decoding needs causal decoder-only models, got "
                             f"architecture={model.config.architecture!r} mask={model.config.mask!r}")
        self.model, self.filled = model, 0
        self.device = model.model.embed_tokens.weight.device
        self.slots = torch.arange(max_len, device=self.device)
        model.setup_cache(1, max_len)

    def feed(self, seq: list[int], upto: int) -> Tensor:
        """Write seq[filled:upto] into the cache; logits [n, V] after each fed token.

        Slots past `upto` may hold stale keys of rejected tokens: kv_len hides them, and the
        next feed overwrites them (that is the rollback)."""
        ids = torch.tensor([seq[self.filled:upto]], dtype=torch.long, device=self.device)
        logits = self.model(ids, slots=self.slots[self.filled:upto], kv_len=upto)[0]
        self.filled = upto
        return logits.float()

    def close(self) -> None:
        self.model.clear_cache()


def _processed(logits: Tensor, seq: list[int], n_prompt: int, sp: SamplingParams, gen) -> Tensor:
    """The distribution [V] plain generation would sample from after context `seq`."""
    context = torch.tensor([seq], device=logits.device)
    row = logits[None]
    for proc in gen.logits_processors:
        row = proc(context[:, n_prompt:], row)
    return probs(row, sp, context, context[:, n_prompt:])[0]


def _draw(p: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


def _draft_with_model(draft: CachedModel, seq: list[int], k: int, n_prompt: int, gen,
                      generator) -> tuple[list[int], list[Tensor]]:
    """k tokens sampled autoregressively from the draft and their distributions q."""
    tokens, qs, ctx = [], [], list(seq)
    for _ in range(k):
        logits = draft.feed(ctx, len(ctx))[-1]
        q = _processed(logits, ctx, n_prompt, gen.sampling, gen)
        token = int(q.argmax()) if gen.sampling.greedy else _draw(q, generator)
        tokens.append(token)
        qs.append(q)
        ctx.append(token)
    return tokens, qs


def lookup_ngram(seq: list[int], ngram: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of seq's last n-gram (n = ngram..1)."""
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


def _verify(p: Tensor, q: Tensor, token: int, generator) -> int | None:
    """None when `token` is accepted (probability min(1, p/q)); else a sample from norm(max(0, p - q))."""
    ratio = p[token] / q[token].clamp_min(torch.finfo(q.dtype).tiny)
    u = torch.rand((), generator=generator, device=p.device)
    if u < ratio:
        return None
    residual = (p - q).clamp_min(0)
    # p == q leaves no residual mass; then the rejection had probability 0 and p itself is exact
    return _draw(residual if residual.sum() > 0 else p, generator)


def _round(target: CachedModel, seq: list[int], drafted: list[int], qs: list[Tensor], n_prompt: int, gen,
           generator, stats: SpeculativeStats) -> list[int]:
    """Score `drafted` in one target pass; the tokens this round emits (accepted + one more)."""
    n = len(seq)
    logits = target.feed(seq + drafted, n + len(drafted))[-(len(drafted) + 1):]
    stats.target_forwards += 1
    stats.drafted += len(drafted)
    out: list[int] = []
    for i, token in enumerate(drafted):
        p = _processed(logits[i], seq + out, n_prompt, gen.sampling, gen)
        correction = _verify(p, qs[i], token, generator)
        if correction is not None:
            out.append(correction)
            break
        out.append(token)
        stats.accepted += 1
    else:  # all k accepted: the bonus token from the target's last distribution
        p = _processed(logits[-1], seq + out, n_prompt, gen.sampling, gen)
        out.append(int(p.argmax()) if gen.sampling.greedy else _draw(p, generator))
    target.filled = n + len(out) - 1  # the last emitted token is not in the cache yet: rollback
    return out


def _one_hot(tokens: list[int], V: int, device) -> list[Tensor]:
    return [torch.nn.functional.one_hot(torch.tensor(t, device=device), V).float() for t in tokens]


def _decode_one(target: Transformer, draft: Transformer | None, prompt: Sequence[int], gen, k: int, ngram: int,
                generator: torch.Generator | None, stats: SpeculativeStats) -> list[int]:
    seq, n_prompt = list(prompt), len(prompt)
    if not seq:
        raise ValueError("every prompt needs at least one token")
    cfg = target.config
    if cfg.position == "learned" and n_prompt + gen.max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({gen.max_new_tokens}) exceeds the model's "
                         f"context of {cfg.max_seq_len} tokens")
    # k shrinks near the end, so no slot past n_prompt + max_new_tokens - 1 is ever written
    max_len = n_prompt + gen.max_new_tokens
    eos = set(gen.eos_token_ids)
    tcache = CachedModel(target, max_len)
    dcache = CachedModel(draft, max_len) if draft is not None else None
    try:
        # prefill all but the last prompt token: every round feeds from the target's `filled` on
        if n_prompt > 1:
            tcache.feed(seq, n_prompt - 1)
            stats.target_forwards += 1
        while len(seq) - n_prompt < gen.max_new_tokens:
            # never draft past max_new_tokens: a round emits at most k_round + 1 tokens
            k_round = min(k, gen.max_new_tokens - (len(seq) - n_prompt) - 1)
            if dcache is not None:
                dcache.filled = min(dcache.filled, len(seq) - 1)
                drafted, qs = _draft_with_model(dcache, seq, k_round, n_prompt, gen, generator)
            else:
                drafted = lookup_ngram(seq, ngram, k_round)
                qs = _one_hot(drafted, target.config.vocab_size, tcache.device)
            new = _round(tcache, seq, drafted, qs, n_prompt, gen, generator, stats)
            hit = next((i for i, t in enumerate(new) if t in eos), None)
            seq += new if hit is None else new[:hit + 1]
            if hit is not None:
                break
    finally:
        tcache.close()
        if dcache is not None:
            dcache.close()
    out = seq[n_prompt:]
    stats.emitted += len(out)
    return out


def check_compatible(target: Transformer, draft: Transformer) -> None:
    """Raise ValueError when draft and target cannot share token ids."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"draft and target must share a tokenizer: draft vocab_size {dv} != target vocab_size {tv}")
    # each model's KV cache lives in its attention modules: a shared layer would hold one cache for both
    target_attn = {id(layer.self_attn) for layer in target.model.layers}
    if any(id(layer.self_attn) in target_attn for layer in draft.model.layers):
        raise ValueError("the draft shares transformer layers with the target, so their KV caches would collide: "
                         "give the draft its own copy of those layers (copy.deepcopy)")


@torch.inference_mode()
def speculative_generate(target: Transformer, draft: Transformer, prompts: Sequence[Sequence[int]], gen,
                         k: int = 4) -> tuple[list[list[int]], SpeculativeStats]:
    """New token ids per prompt (up to and including the first EOS) and the run's statistics."""
    gen.validate()
    check_compatible(target, draft)
    if k < 1:
        raise ValueError(f"num_draft_tokens (k) must be >= 1, got {k}")
    stats = SpeculativeStats()
    # one generator for the whole batch, so equal prompts get independent samples
    generator = make_generator(gen.sampling, target.model.embed_tokens.weight.device)
    return [_decode_one(target, draft, p, gen, k, 0, generator, stats) for p in prompts], stats


@torch.inference_mode()
def prompt_lookup_generate(target: Transformer, prompts: Sequence[Sequence[int]], gen, ngram: int = 3,
                           k: int = 4) -> tuple[list[list[int]], SpeculativeStats]:
    """Draft-free speculative decoding: drafts are copied from the context by n-gram lookup."""
    gen.validate()
    if ngram < 1 or k < 1:
        raise ValueError(f"prompt lookup needs ngram >= 1 and k >= 1, got ngram={ngram} k={k}")
    stats = SpeculativeStats()
    generator = make_generator(gen.sampling, target.model.embed_tokens.weight.device)
    return [_decode_one(target, None, p, gen, k, ngram, generator, stats) for p in prompts], stats
