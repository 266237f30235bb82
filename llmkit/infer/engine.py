"""Continuous batching over a paged KV cache: requests join and leave the batch between steps.

One scheduler iteration (`Engine.step`):
1. apply cancellations; 2. admit waiting requests while the batch, the KV blocks and the prefill
budget allow; 3. prefill: one right-padded forward over at most `max_prefill_tokens` prompt tokens
of the requests still prefilling, oldest first (chunked prefill: a long prompt takes several steps,
so it never stalls the requests already decoding for more than one chunk; a prefix-LM's prompt,
read bidirectionally, goes in one piece); 4. run one decode step for every request whose prompt
is in the cache, each row at its own length, and sample each row with its own parameters. A row that needs a new block when none is free preempts the newest
request, which frees its blocks and later resumes by recomputing its tokens (vLLM's
recompute preemption), so a burst never deadlocks and no request is lost.

Prefix caching (`prefix_caching=True`, the default): every full block of a request, prompt or reply,
is registered by content, and a new request whose tokens begin with cached blocks shares them and
prefills only the rest (vLLM's automatic prefix caching). A shared system prompt, tool list or
conversation history is computed once; a block nobody holds stays cached until the pool needs it.

A request's greedy output does not depend on what it is batched with: rows never see each
other (their keys come from their own blocks; padding is masked), and every row of a batched
matmul is the same dot products as alone.

`Engine.start` runs the loop in a background thread; `submit`/`cancel`/`stats` are thread-safe
and callbacks fire on the engine thread. `generate` is the synchronous convenience.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmkit.infer.paged import BlockAllocator, PagedKVCache, PagedLayout
from llmkit.infer.sampling import SamplingParams, make_generator, sample
from llmkit.model import Transformer

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs


@dataclass
class RequestOptions:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    eos_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; 0: the chosen token's; k > 0: also the top k (id, logprob)
    # proc(generated ids [1, n], logits [1, V]) -> logits: GenerationConfig.logits_processors' protocol
    logits_processor: Callable[[Tensor, Tensor], Tensor] | None = None
    adapter: int = 0  # 0: the base model; i: the i-th LoRA adapter llmkit.infer.multi_lora put on the model

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.adapter, int) or self.adapter < 0:
            raise ValueError(f"adapter must be an integer >= 0, got {self.adapter!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        self.sampling.validate()


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None on a final event without a token (cancelled, error)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while running; "stop" (EOS), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int


class QueueFull(RuntimeError):
    """Raised by `submit` when `max_waiting` requests already wait; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    requests_total: int
    tokens_generated_total: int
    preemptions_total: int
    kv_blocks_cached: int = 0  # full blocks kept for prefix reuse that no request holds (counted as free)
    prefix_cache_queries_total: int = 0  # prompt tokens admitted (looked up in the prefix cache)
    prefix_cache_hits_total: int = 0  # of those, tokens whose keys and values were reused, not recomputed


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    options: RequestOptions
    on_event: Callable[[TokenEvent], None]
    generator: torch.Generator | None
    arrival: int
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache; the last generated token is not yet
    registered: int = 0  # leading blocks registered in (or taken from) the prefix cache
    prefix_uid: int = 0  # the prefix cache's name for the prefix those blocks hold

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def plain_greedy(self) -> bool:
        sp, o = self.options.sampling, self.options
        return (sp.greedy and sp.repetition_penalty == 1.0 and not sp.presence_penalty and not sp.frequency_penalty
                and o.logits_processor is None and o.logprobs is None)


class Engine:
    def __init__(self, model: Transformer, *, max_batch_size: int = 32, block_size: int = 16,
                 num_blocks: int | None = None, max_waiting: int = 256, max_prefill_tokens: int = 4096,
                 prefix_caching: bool = True, kv_cache_dtype: str = "auto"):
        if max_batch_size < 1 or block_size < 1 or max_waiting < 0 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size, block_size and max_prefill_tokens must be >= 1 and max_waiting >= 0")
        if kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be auto (the model's dtype) or int8, got {kv_cache_dtype!r}")
        cfg = model.config
        self.model = model.eval()
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        if num_blocks is None:  # room for a full batch at full context
            num_blocks = max_batch_size * math.ceil(cfg.max_seq_len / block_size)
        self.max_context = min(cfg.max_seq_len, num_blocks * block_size)
        self.allocator = BlockAllocator(num_blocks)
        # a prefix-LM's prompt keys depend on the tokens after them (bidirectional): its blocks are not reusable
        self.prefix_caching = prefix_caching and cfg.mask != "prefix"
        self._adapters = getattr(model, "adapter_rows", None)  # LoRA adapters served per request (multi_lora)
        # one spare block past the allocator's range takes the writes of prefill padding
        self._scratch = num_blocks
        self._layout = PagedLayout()
        p = model.model.embed_tokens.weight  # not lm_head: a quantised head has no .weight
        self._device = p.device
        model.attach_caches([
            PagedKVCache(self._layout, (num_blocks + 1) * block_size, cfg.n_kv_head, cfg.head_dim, p.dtype, p.device,
                         int8=kv_cache_dtype == "int8")
            for _ in model.model.layers
        ])
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cancelled: set[str] = set()
        self._by_id: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._requests_total = self._tokens_total = self._preemptions = 0
        self._prefix_queries = self._prefix_hits = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API

    def submit(self, prompt_ids: list[int], options: RequestOptions,
               on_event: Callable[[TokenEvent], None]) -> str:
        options.validate()
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) + options.max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({options.max_new_tokens}) "
                             f"exceeds the context of {self.max_context} tokens")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        adapters = len(self._adapters.names) if self._adapters is not None else 0
        if options.adapter > adapters:
            raise ValueError(f"adapter {options.adapter} does not exist: the model has {adapters} LoRA adapter(s)")
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max_waiting={self.max_waiting})",
                                retry_after=self._retry_after())
            n = next(self._ids)
            req = _Request(f"req-{n}", list(prompt_ids), options, on_event,
                           make_generator(options.sampling, self._device), arrival=n)
            self._waiting.append(req)
            self._by_id[req.id] = req
            self._requests_total += 1
            self._lock.notify_all()
        return req.id

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._by_id:
                self._cancelled.add(request_id)
                self._lock.notify_all()

    def stats(self) -> EngineStats:
        with self._lock:
            total = self.allocator.num_blocks
            return EngineStats(len(self._running), len(self._waiting), total - self.allocator.free, total,
                               self._requests_total, self._tokens_total, self._preemptions,
                               self.allocator.cached, self._prefix_queries, self._prefix_hits)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler iteration; True while requests remain."""
        self._apply_cancellations()
        self._admit()
        self._prefill()
        self._decode()
        with self._lock:
            return bool(self._running or self._waiting)

    def start(self) -> None:
        """Run `step` in a background thread whenever there is work."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llmkit-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.model.clear_cache()

    def generate(self, prompts: list[list[int]], options: RequestOptions) -> list[list[int]]:
        """Token ids per prompt (an EOS included), all requests batched together."""
        if not prompts:
            return []
        results: dict[str, list[int]] = {}
        finished = threading.Event()
        remaining = [len(prompts)]

        def collect(event: TokenEvent) -> None:
            if event.token_id is not None:
                results.setdefault(event.request_id, []).append(event.token_id)
            if event.finish_reason is not None:
                remaining[0] -= 1
                if remaining[0] == 0:
                    finished.set()

        ids = [self.submit(p, options, collect) for p in prompts]
        if self._thread is None:
            while self.step():
                pass
        finished.wait()
        return [results.get(i, []) for i in ids]

    # ------------------------------------------------------------------ scheduling

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._running or self._waiting):
                    self._lock.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # a failing step must not kill the server: fail what ran, keep serving
                log.exception("engine step failed; failing its running requests")
                for req in list(self._running):
                    self._finish(req, "error", emit_token=False)

    def _retry_after(self) -> float:
        return max(1.0, len(self._waiting) / max(self.max_batch_size, 1))

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            waiting = [r for r in self._waiting if r.id in cancelled]
            for req in waiting:
                self._waiting.remove(req)
        for req in waiting + [r for r in self._running if r.id in cancelled]:
            self._finish(req, "cancelled", emit_token=False)

    @staticmethod
    def _prefill_target(req: _Request) -> int:
        """Tokens whose keys/values must be cached before decoding: the prompt, or a resumed request's all but
        its last token (which the next decode step feeds)."""
        return len(req.tokens) - (1 if req.generated else 0)

    def _admit(self) -> None:
        """Move waiting requests into the batch, oldest first, while slots, blocks and this step's prefill budget
        (what the requests still prefilling leave of it) allow. Each takes the cached blocks its tokens begin with
        and new blocks for the rest."""
        budget = self.max_prefill_tokens - sum(self._prefill_target(r) - r.cached for r in self._running)
        with self._lock:
            while self._waiting and budget > 0 and len(self._running) < self.max_batch_size:
                req = self._waiting[0]
                n = self._prefill_target(req)
                # at least one token is computed: the prefill's last position gives the next token's logits
                reuse = (n - 1) // self.block_size if self.prefix_caching else 0
                # keys/values depend on the adapter: each adapter's blocks live under its own root
                shared, uid = self.allocator.match(req.tokens, self.block_size, reuse, root=-req.options.adapter)
                if len(shared) < reuse and self._sibling_prefilling(req, len(shared)):
                    # the n choices of one prompt, or a burst sharing a system prompt: wait for the sibling's
                    # blocks instead of computing the same keys and values again (they are cached once it is done)
                    self.allocator.release(shared)
                    break
                blocks = self.allocator.allocate(math.ceil(n / self.block_size) - len(shared))
                if blocks is None:
                    self.allocator.release(shared)
                    break
                self._waiting.popleft()
                req.blocks, req.cached = shared + blocks, len(shared) * self.block_size
                req.registered, req.prefix_uid = len(shared), uid
                if not req.generated:  # a resumed request's recompute is not a new prompt
                    self._prefix_queries += n
                    self._prefix_hits += req.cached
                self._running.append(req)
                budget -= n - req.cached

    def _sibling_prefilling(self, req: _Request, block: int) -> bool:
        """Whether a running request, still prefilling, holds the same tokens as `req` through block `block` under
        the same adapter: its blocks will be in the prefix cache when its prefill is done."""
        end = (block + 1) * self.block_size
        return any(r.cached < self._prefill_target(r) and r.options.adapter == req.options.adapter
                   and len(r.tokens) >= end and r.tokens[:end] == req.tokens[:end] for r in self._running)

    def _register_full_blocks(self, req: _Request) -> None:
        """Offer the request's newly filled blocks to the prefix cache."""
        full = req.cached // self.block_size
        if self.prefix_caching and full > req.registered:
            with self._lock:
                req.prefix_uid = self.allocator.register(req.blocks[req.registered:full], req.tokens,
                                                         req.registered, self.block_size, req.prefix_uid)
            req.registered = full

    def _grow(self, req: _Request) -> bool:
        """A block for the request's next token if it needs one; False when the pool is empty."""
        if req.cached < len(req.blocks) * self.block_size:
            return True
        with self._lock:
            block = self.allocator.allocate(1)
        if block is None:
            return False
        req.blocks += block
        return True

    def _preempt(self, req: _Request) -> None:
        """Free the request's blocks and queue it first; it resumes by recomputing its tokens."""
        self._running.remove(req)
        with self._lock:
            self.allocator.release(req.blocks)
            req.blocks, req.cached, req.registered, req.prefix_uid = [], 0, 0, 0
            self._waiting.appendleft(req)
            self._preemptions += 1

    # ------------------------------------------------------------------ forward passes

    def _slots(self, rows: list[_Request], positions: Tensor) -> Tensor:
        """Flat pool slots [B, S] of each row's positions [B, S] through its block table (-1: scratch)."""
        width = max(len(r.blocks) for r in rows)
        table = torch.full((len(rows), width + 1), self._scratch, dtype=torch.long)
        for i, r in enumerate(rows):
            table[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.long)
        safe = torch.where(positions < 0, width * self.block_size, positions)
        slots = table.gather(1, safe // self.block_size) * self.block_size + safe % self.block_size
        return slots.to(self._device)

    def _mask(self, q_pos: Tensor, k_len: Tensor, prefix: Tensor, S: int) -> Tensor:
        """Bool [B,1,T,S]: key j is visible to the query at position i when j < k_len and (j <= i or j < prefix)."""
        cfg = self.model.config
        j = torch.arange(S)
        i = q_pos[:, :, None]  # [B,T,1]
        allowed = ((j <= i) | (j < prefix[:, None, None])) & (j < k_len[:, None, None])
        if cfg.sliding_window is not None:
            allowed &= i - j < cfg.sliding_window
        return (allowed | (j == i.clamp(min=0))).unsqueeze(1).to(self._device)  # padding queries see themselves

    def _prefix(self, rows: list[_Request]) -> Tensor:
        prefix_lm = self.model.config.mask == "prefix"  # a prefix-LM reads its prompt bidirectionally
        return torch.tensor([len(r.prompt) if prefix_lm else 0 for r in rows])

    def _forward(self, rows: list[_Request], ids: Tensor, q_pos: Tensor, k_len: Tensor, S: int) -> Tensor:
        self._layout.read_index = self._slots(rows, torch.arange(S).expand(len(rows), S))
        write = self._slots(rows, q_pos)
        mask = self._mask(q_pos, k_len, self._prefix(rows), S)
        if self._adapters is not None and any(r.options.adapter for r in rows):  # else the base alone: no deltas
            self._adapters.index = torch.tensor([r.options.adapter for r in rows], device=self._device)
        try:
            return self.model(ids.to(self._device), position_ids=q_pos.clamp(min=0).to(self._device),
                              slots=write, attn_mask=mask)
        finally:
            self._layout.read_index = None
            if self._adapters is not None:
                self._adapters.index = None

    def _prefill(self) -> None:
        """One forward over the next chunk of each prefilling row (positions cached..end-1, at most
        `max_prefill_tokens` in all, oldest rows first), reading the cached positions before it; a fresh row
        whose prompt is complete samples its first token."""
        rows, ends, budget = [], [], self.max_prefill_tokens
        # a prefix-LM reads its prompt bidirectionally: an early chunk would miss the tokens after it
        whole = self.model.config.mask == "prefix"
        for r in sorted(self._running, key=lambda r: r.arrival):
            todo = self._prefill_target(r) - r.cached
            if todo > 0 and budget > 0:
                rows.append(r)
                ends.append(r.cached + (todo if whole else min(todo, budget)))
                budget -= ends[-1] - r.cached
        if not rows:
            return
        starts = [r.cached for r in rows]
        T = max(end - start for end, start in zip(ends, starts))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        q_pos = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: right padding, written to scratch
        for i, (r, start, end) in enumerate(zip(rows, starts, ends)):
            ids[i, :end - start] = torch.tensor(r.tokens[start:end])
            q_pos[i, :end - start] = torch.arange(start, end)
        logits = self._forward(rows, ids, q_pos, torch.tensor(ends), max(ends))
        for r, end in zip(rows, ends):
            r.cached = end
            self._register_full_blocks(r)
        done = [(r, logits[i, end - start - 1]) for i, (r, start, end) in enumerate(zip(rows, starts, ends))
                if not r.generated and end == self._prefill_target(r)]
        self._sample_and_emit([r for r, _ in done], [row for _, row in done])

    def _decoding(self) -> list[_Request]:
        """The running requests past their prefill: every token but the last generated one is cached."""
        return [r for r in self._running if r.generated and r.cached == len(r.tokens) - 1]

    def _decode(self) -> None:
        """One token for every row whose prompt is in the cache (its last token is the one fed now)."""
        for req in self._decoding():  # preempting the newest until every row has a slot for its token
            while req in self._running and not self._grow(req):
                self._preempt(max(self._running, key=lambda r: r.arrival))
        rows = self._decoding()
        if not rows:
            return
        q_pos = torch.tensor([[r.cached] for r in rows])
        ids = torch.tensor([[r.generated[-1]] for r in rows])
        S = int(q_pos.max()) + 1
        logits = self._forward(rows, ids, q_pos, q_pos[:, 0] + 1, S)[:, -1]
        for r in rows:
            r.cached += 1
            self._register_full_blocks(r)
        self._sample_and_emit(rows, list(logits))

    # ------------------------------------------------------------------ sampling and events

    def _sample_and_emit(self, rows: list[_Request], logits: list[Tensor]) -> None:
        if not rows:
            return
        greedy = [i for i, r in enumerate(rows) if r.plain_greedy]
        tokens: list[int] = [0] * len(rows)
        if greedy:  # one argmax for every plain-greedy row
            for i, t in zip(greedy, torch.stack([logits[i] for i in greedy]).argmax(-1).tolist()):
                tokens[i] = t
        for i, r in enumerate(rows):
            lp = top = None
            if not r.plain_greedy:
                try:
                    tokens[i], lp, top = self._sample_one(r, logits[i][None])
                except Exception:  # its own logits processor failed (a grammar it cannot follow): end only it
                    log.exception("sampling %s failed; ending it", r.id)
                    self._finish(r, "error", emit_token=False)
                    continue
            self._accept(r, tokens[i], lp, top)

    def _sample_one(self, req: _Request, logits: Tensor) -> tuple[int, float | None, list | None]:
        o = req.options
        device = logits.device
        generated = torch.tensor([req.generated], dtype=torch.long, device=device)
        if o.logits_processor is not None:
            logits = o.logits_processor(generated, logits)
        context = torch.tensor([req.tokens], device=device) if o.sampling.repetition_penalty != 1.0 else None
        token = int(sample(logits.float(), o.sampling, context, req.generator, generated)[0])
        if o.logprobs is None:
            return token, None, None
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        top = None
        if o.logprobs > 0:
            values, ids = logprobs.topk(o.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return token, float(logprobs[token]), top

    def _accept(self, req: _Request, token: int, logprob: float | None, top: list | None) -> None:
        req.generated.append(token)
        self._tokens_total += 1
        finish = None
        if token in req.options.eos_token_ids:
            finish = "stop"
        elif len(req.generated) >= req.options.max_new_tokens or len(req.tokens) >= self.max_context:
            finish = "length"
        self._emit(req, TokenEvent(req.id, token, logprob, top, finish, len(req.prompt), len(req.generated)))
        if finish is not None:
            self._finish(req, finish, emit_token=True)

    def _finish(self, req: _Request, reason: str, emit_token: bool) -> None:
        if req in self._running:
            self._running.remove(req)
        with self._lock:
            self.allocator.release(req.blocks)
            req.blocks = []
            self._by_id.pop(req.id, None)
            self._cancelled.discard(req.id)
        if not emit_token:
            self._emit(req, TokenEvent(req.id, None, None, None, reason, len(req.prompt), len(req.generated)))

    def _emit(self, req: _Request, event: TokenEvent) -> None:
        try:
            req.on_event(event)
        except Exception:  # a broken callback (a client gone) ends its own request, nothing else
            log.exception("on_event of %s raised; cancelling it", req.id)
            if event.finish_reason is None:
                self.cancel(req.id)

