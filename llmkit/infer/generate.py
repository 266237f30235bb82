"""Generation: prefill, then incremental decode against the static KV cache.

`generate` works on token ids (batched, left-padded); `generate_text` and `stream_text`
work on strings, stop at EOS or a stop string, and never split a UTF-8 character.
`GenerationConfig(compile=True)` runs the decode steps compiled (infer/fast.py); the
continuous-batching engine for many concurrent requests lives in infer/engine.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmkit.infer.detokenize import StreamDecoder
from llmkit.infer.fast import compiled_decoder
from llmkit.infer.sampling import SamplingParams, make_generator, sample
from llmkit.model import Transformer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))  # greedy, as HF
    eos_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the first one
    use_cache: bool = True
    # each called as proc(generated [B, n] ids so far, logits [B, V]) -> logits before sampling, in order:
    # constrained decoding masks tokens here (llmkit.prompting), so the sampler never sees a banned one
    logits_processors: tuple[Callable[[Tensor, Tensor], Tensor], ...] = ()
    # decode steps through torch.compile (a CUDA graph on GPU): infer/fast.py; the first call compiles
    compile: bool = False
    # speculative decoding (infer/speculative.py): a draft model sharing the tokenizer, k drafted tokens
    # a round; or, with prompt_lookup_ngram > 0 and no draft, drafts copied from the context by n-gram
    draft_model: Transformer | None = None
    num_draft_tokens: int = 4
    prompt_lookup_ngram: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        self.sampling.validate()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """[B,T] ids and attention mask, padded on the left so every row's last token is at T-1."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, T - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode_tokens(model: Transformer, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                  pad_id: int = 0) -> Iterator[Tensor]:
    """Yield the next token of every row ([B] long) each step; finished rows repeat `pad_id`.

    Stops after max_new_tokens or when every row has produced an EOS token.
    """
    gen.validate()
    if model.config.architecture == "encoder":
        raise ValueError("an encoder-only model (BERT) does not generate text: use it for embeddings, masked-token "
                         "prediction or classification")
    device = model.model.embed_tokens.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    B, T0 = ids.shape
    total = T0 + gen.max_new_tokens
    cfg = model.config
    if cfg.position == "learned" and total > cfg.max_seq_len:
        raise ValueError(f"prompt ({T0} tokens) + max_new_tokens ({gen.max_new_tokens}) exceeds the model's "
                         f"context of {cfg.max_seq_len} tokens")
    padded = bool((mask == 0).any())
    all_ids = torch.cat([ids, torch.full((B, gen.max_new_tokens), pad_id, dtype=torch.long, device=device)], 1)
    full_mask = torch.cat([mask, torch.ones((B, gen.max_new_tokens), dtype=torch.long, device=device)], 1)
    eos = torch.tensor(gen.eos_token_ids or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    generator = make_generator(gen.sampling, device)
    prefix_len = T0 if cfg.mask == "prefix" else None  # a prefix-LM reads its prompt bidirectionally
    # At batch 1 on a CPU a decode step is a few hundred small ops, so every op saved below shows:
    # plain greedy is one argmax (sample() takes 5 ops to return the same token), EOS bookkeeping
    # (3 ops and a host sync) runs only when there is an EOS, the token history is written only
    # when something reads it, and slot ids are views of one arange instead of new tensors.
    sp = gen.sampling
    penalised = sp.repetition_penalty != 1.0 or bool(sp.presence_penalty or sp.frequency_penalty)
    plain_greedy = sp.greedy and not penalised
    track_eos = bool(gen.eos_token_ids)
    keep_history = not gen.use_cache or penalised or bool(gen.logits_processors)
    slots = torch.arange(total, device=device)
    compiled = gen.compile and gen.use_cache
    # compiled plain greedy takes the argmax inside the compiled step: its steps return tokens
    fused = compiled and plain_greedy and not gen.logits_processors
    if compiled:
        decoder = compiled_decoder(model)
        L = decoder.attach(B, total)
        step_mask = torch.cat([full_mask, full_mask.new_ones(B, L - total)], 1) if padded else None
        step_prefix = torch.full((B,), T0, device=device) if prefix_len is not None else None
    elif gen.use_cache:
        model.setup_cache(B, total)

    def advance(token: Tensor, t: int) -> Tensor:
        """Feed the token at position t - 1: the next logits [B, V] (or, fused, the next token [B])."""
        if compiled:
            return decoder.step(token[:, None], slots[t - 1:t], step_mask, step_prefix, greedy=fused)
        return model(token[:, None], full_mask[:, :t] if padded else None, prefix_len=prefix_len,
                     slots=slots[t - 1:t], kv_len=t)[:, -1]

    try:
        t = T0
        if gen.use_cache:
            out = model(ids, mask if padded else None, prefix_len=prefix_len, slots=slots[:T0], kv_len=T0)[:, -1]
        for step in range(gen.max_new_tokens):
            if not gen.use_cache:
                out = model(all_ids[:, :t], full_mask[:, :t] if padded else None, prefix_len=prefix_len)[:, -1]
            if fused and step > 0:
                token = out
            else:
                logits = out
                for proc in gen.logits_processors:
                    logits = proc(all_ids[:, T0:t], logits)
                if plain_greedy:
                    token = logits.argmax(dim=-1)
                else:
                    token = sample(logits.float(), sp, all_ids[:, :t], generator, all_ids[:, T0:t])
            if track_eos:
                token = torch.where(done, torch.full_like(token, pad_id), token)
                done |= torch.isin(token, eos)
            if keep_history:
                all_ids[:, t] = token
            yield token
            t += 1
            if step == gen.max_new_tokens - 1 or (track_eos and bool(done.all())):
                break
            if gen.use_cache:
                out = advance(token, t)
    finally:
        if gen.use_cache:
            model.clear_cache()


def generate(model: Transformer, prompts: Sequence[Sequence[int]], gen: GenerationConfig | None = None,
             pad_id: int = 0) -> list[list[int]]:
    """New token ids per prompt, up to and including the first EOS."""
    gen = gen or GenerationConfig()
    if gen.draft_model is not None or gen.prompt_lookup_ngram:
        return _generate_speculative(model, prompts, gen)
    # an encoder-decoder (T5) reads the prompt with its encoder
    decode = decode_seq2seq if model.config.architecture == "encoder-decoder" else decode_tokens
    steps = list(decode(model, prompts, gen, pad_id))
    if not steps:
        return [[] for _ in prompts]
    out = torch.stack(steps, 1).tolist()
    eos = set(gen.eos_token_ids)
    return [_cut_at_eos(row, eos) for row in out]


def _generate_speculative(model: Transformer, prompts: Sequence[Sequence[int]],
                          gen: GenerationConfig) -> list[list[int]]:
    from llmkit.infer.speculative import prompt_lookup_generate, speculative_generate  # it imports this module
    if gen.draft_model is not None:
        return speculative_generate(model, gen.draft_model, prompts, gen, gen.num_draft_tokens)[0]
    return prompt_lookup_generate(model, prompts, gen, gen.prompt_lookup_ngram, gen.num_draft_tokens)[0]


@torch.inference_mode()
def decode_seq2seq(model, prompts: Sequence[Sequence[int]], gen: GenerationConfig, pad_id: int = 0) -> Iterator[Tensor]:
    """`decode_tokens` for an encoder-decoder: the encoder runs once and each decoder layer's cross-attention
    keys/values are projected once; the decoder steps over its own static KV cache."""
    gen.validate()
    model_cfg, device = model.config, model.shared.weight.device  # a quantised lm_head has no .weight
    ids, mask = left_pad(prompts, pad_id, device)  # relative positions: left or right padding is the same
    B = ids.shape[0]
    memory = model.memory(model.encode(ids, mask))
    start = model_cfg.decoder_start_token_id if model_cfg.decoder_start_token_id is not None else pad_id
    history = torch.full((B, gen.max_new_tokens + 1), start, dtype=torch.long, device=device)
    eos = torch.tensor(gen.eos_token_ids or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    generator = make_generator(gen.sampling, device)
    slots = torch.arange(gen.max_new_tokens + 1, device=device)
    model.setup_cache(B, gen.max_new_tokens + 1)
    try:
        for t in range(gen.max_new_tokens):
            logits = model.decode(history[:, t:t + 1], memory, mask, slots=slots[t:t + 1], kv_len=t + 1)[:, -1]
            for proc in gen.logits_processors:
                logits = proc(history[:, 1:t + 1], logits)
            token = sample(logits.float(), gen.sampling, history[:, 1:t + 1], generator, history[:, 1:t + 1])
            token = torch.where(done, torch.full_like(token, pad_id), token)
            done |= torch.isin(token, eos)
            history[:, t + 1] = token
            yield token
            if bool(done.all()):
                break
    finally:
        model.clear_cache()


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1]
    return row


class StopMatcher:
    """Holds back streamed text that might be the start of a stop string."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop string appears (text before it is emitted)."""
        self.pending += delta
        hits = [self.pending.find(s) for s in self.stop if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_text(model: Transformer, tokenizer, prompt: str | Sequence[int], gen: GenerationConfig | None = None,
                add_special_tokens: bool = False) -> Iterator[str]:
    """Text deltas of one completion; concatenated they equal `generate_text` of the same prompt."""
    gen = gen or GenerationConfig()
    if not gen.eos_token_ids and tokenizer.eos_id is not None:
        gen = dataclasses.replace(gen, eos_token_ids=(tokenizer.eos_id,))
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if isinstance(prompt, str) else list(prompt)
    decoder = StreamDecoder(tokenizer.decode, skip_special_tokens=True)
    stops = StopMatcher(gen.stop)
    eos = set(gen.eos_token_ids)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    decode = decode_seq2seq if model.config.architecture == "encoder-decoder" else decode_tokens
    for token in decode(model, [ids], gen, pad):
        tok = int(token[0])
        if tok in eos:
            break
        text = stops.push(decoder.push(tok))
        if text:
            yield text
        if stops.stopped:
            return
    tail = stops.push(decoder.flush())
    if not stops.stopped:
        tail += stops.flush()
    if tail:
        yield tail


def generate_text(model: Transformer, tokenizer, prompts: Sequence[str], gen: GenerationConfig | None = None,
                  add_special_tokens: bool = False) -> list[str]:
    """Completions of a batch of prompts (decoded, cut at EOS and at the first stop string)."""
    gen = gen or GenerationConfig()
    eos_ids = gen.eos_token_ids or ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
    gen = dataclasses.replace(gen, eos_token_ids=eos_ids)
    encoded = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    texts = []
    for row in generate(model, encoded, gen, pad):
        text = tokenizer.decode([t for t in row if t not in set(eos_ids)], skip_special_tokens=True)
        cuts = [text.find(s) for s in gen.stop if s and s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts
