"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching engine.

    app = create_app(model, tokenizer, ServerConfig(model_name="tiny", api_keys=("secret",)))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: llmkit serve --model DIR

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (Server-Sent Events with
`stream: true`), POST /v1/embeddings, GET /health, GET /metrics (Prometheus text), GET / (the chat page).
Every request runs as engine requests (one per choice) batched with everything else in flight; a client that
goes away cancels them. Errors use OpenAI's schema; nothing but an ApiError's message reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.infer.engine import Engine, QueueFull, RequestOptions
from llmkit.infer.sampling import SamplingParams
from llmkit.serve.errors import ApiError, error_body
from llmkit.serve.generation import Generation, GenerationError, Piece
from llmkit.serve.metrics import Metrics, RecordRequests
from llmkit.serve.rendering import chat_logprobs, completion_logprobs, usage
from llmkit.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingRequest
from llmkit.serve.security import ApiKeys, Guard, RateLimiter
from llmkit.serve.tools import ToolCallStream, ToolUse, finish_reason, stream_calls, tool_use

log = logging.getLogger("llmkit.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model_name: str = "llmkit"
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_body_bytes: int = 1_000_000
    max_tokens: int = 2048  # max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # None: the context length
    max_n: int = 8  # choices per request
    max_embedding_inputs: int = 256
    rate_limit: float = 0.0  # requests a minute per API key (per client address without keys); 0 = off
    rate_burst: int | None = None  # bucket size; None: one minute's worth
    max_batch_size: int = 32  # engine: requests decoded together
    max_waiting: int = 256  # engine: queued requests before 429
    prefix_caching: bool = True  # engine: reuse the KV blocks of shared prompt prefixes
    max_prefill_tokens: int = 4096  # engine: prompt tokens prefilled per step (longer prompts go in chunks)
    kv_cache_dtype: str = "auto"  # engine: "int8" stores keys/values in int8 (about 2-4x the tokens per byte)
    rag_k: int = 5
    rag_budget: int = 1024  # passage tokens at most (shrunk to what the context leaves)
    rag_min_score: float = 0.3


@dataclass
class Grounding:
    """An opened llmkit.rag Index; searches are serialised (one Milvus Lite client) and run off the loop."""

    index: object
    k: int = 5
    budget: int = 1024
    min_score: float = 0.3
    lock: threading.Lock = field(default_factory=threading.Lock)


class Server:
    """What the routes share: model, tokenizer, engine, configuration, metrics, retrieval."""

    def __init__(self, model, tokenizer, config: ServerConfig, engine: Engine, grounding: Grounding | None):
        self.model, self.tokenizer, self.config, self.engine = model, tokenizer, config, engine
        self.grounding = grounding
        self.metrics = Metrics()
        self.context = engine.max_context
        self.eos = tuple(t for t in (tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>"),
                                     getattr(model.config, "eos_token_id", None)) if isinstance(t, int))
        self._embed_lock = threading.Lock()  # embeddings share the model with the engine: one batch at a time
        # LoRA adapters served beside the base (llmkit.infer.multi_lora): a request names one as its model
        self.adapters: list[str] = list(getattr(getattr(model, "adapter_rows", None), "names", []))
        if config.model_name in self.adapters:
            raise ValueError(f"the adapter name {config.model_name!r} is the served model's own name: rename one")
        self.created = int(time.time())

    # -- checks

    def check_model(self, name: str | None) -> int:
        """The adapter a request's model name picks: 0 for the base model (or no name), i for the i-th adapter."""
        if name is None or name == self.config.model_name:
            return 0
        if name in self.adapters:
            return self.adapters.index(name) + 1
        served = ", ".join(repr(n) for n in [self.config.model_name, *self.adapters])
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {served}", param="model",
                       code="model_not_found")

    def check_n(self, n: int) -> None:
        if n > self.config.max_n:
            raise ApiError(400, f"n must be <= {self.config.max_n}, got {n}", param="n")

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, f"{param}: the prompt encodes to no tokens", param=param)
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in ids):
            raise ApiError(400, f"{param}: token ids must be < {vocab}", param=param)
        return ids

    def completion_budget(self, prompt_len: int, requested: int | None, param: str) -> int:
        """max_tokens for a prompt of `prompt_len` tokens: the request's, checked, or what the context leaves."""
        cap = self.config.max_tokens
        if requested is not None and requested > cap:
            raise ApiError(400, f"max_tokens must be <= {cap} on this server, got {requested}", param="max_tokens")
        prompt_cap = min(self.config.max_prompt_tokens or self.context, self.context - 1)
        if prompt_len > prompt_cap:
            raise ApiError(400, f"{param}: the prompt has {prompt_len} tokens; this server accepts at most "
                                f"{prompt_cap} (context {self.context})", param=param, code="context_length_exceeded")
        if requested is None:
            return min(cap, self.context - prompt_len)
        if prompt_len + requested > self.context:
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens; you requested "
                                f"{prompt_len + requested} ({prompt_len} in the {param}, {requested} to complete)",
                           param=param, code="context_length_exceeded")
        return requested

    # -- engine requests

    def options(self, body: SamplingRequest, max_tokens: int, choice: int, logprobs: int | None,
                processor: Callable | None, adapter: int = 0) -> RequestOptions:
        # distinct choices, reproducible together; xor with a small number stays in the seed's int64 range
        seed = None if body.seed is None else body.seed ^ choice
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=seed,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
        return RequestOptions(max_new_tokens=max_tokens, sampling=sampling, eos_token_ids=self.eos,
                              logprobs=logprobs, logits_processor=processor, adapter=adapter)

    def submit(self, requests: list[tuple[list[int], RequestOptions]], stop: tuple[str, ...]) -> Generation:
        try:
            return Generation(self.engine, self.tokenizer, requests, stop, self.metrics.record_generation)
        except QueueFull as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry later", code="queue_full",
                           retry_after=e.retry_after) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def bias_processor(self, bias: dict[str, float] | None) -> Callable | None:
        if not bias:
            return None
        vocab = self.model.config.vocab_size
        ids = [int(k) for k in bias]
        if any(i >= vocab for i in ids):
            raise ApiError(400, f"logit_bias: token ids must be < {vocab}", param="logit_bias")
        index, values = torch.tensor(ids), torch.tensor(list(bias.values()))

        def add_bias(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            logits = logits.clone()
            logits[:, index.to(logits.device)] += values.to(logits.device, logits.dtype)
            return logits

        return add_bias

    # -- embeddings and retrieval (blocking: called through run_in_threadpool)

    def embed(self, texts: list[str]) -> np.ndarray:
        from llmkit.rag.embed import llmkit_embeddings

        with self._embed_lock:
            return llmkit_embeddings(self.model, self.tokenizer, texts).numpy()

    def ground(self, messages: list[dict], max_tokens: int | None) -> tuple[list[dict], list]:
        from llmkit.rag.answer import SYSTEM_PROMPT, ground_messages
        from llmkit.rag.errors import RagError

        g = self.grounding
        count = lambda text: len(self.tokenizer.encode(text))  # noqa: E731
        base = count(self.render(messages)) + count(SYSTEM_PROMPT + "\n\nPassages:\n\n") + 8
        room = self.context - base - (max_tokens or max(1, self.context // 4))
        room -= room // 10  # tokens of text pieces do not quite add up once joined: keep a margin
        try:
            with g.lock:
                return ground_messages(g.index, messages, k=g.k, budget=max(1, min(g.budget, room)),
                                       min_score=g.min_score, count_tokens=count)
        except RagError as e:  # e.g. no user message to retrieve for: the request's fault
            raise ApiError(400, f"messages: {e}", param="messages") from None

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        from llmkit.agents.tools import render_chat

        if self.tokenizer.chat_template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            return render_chat(self.tokenizer, messages, tools)
        except Exception as e:  # a template may reject a conversation (raise_exception): that is the client's
            raise ApiError(400, f"messages: the chat template rejected them: {e}", param="messages") from None


# ----------------------------------------------------------------------------- the app


def create_app(model, tokenizer, config: ServerConfig | None = None, *, engine: Engine | None = None,
               index=None) -> FastAPI:
    """The ASGI app. Pass an `engine` to share one; otherwise the app builds one and closes it at shutdown.
    `index` (an opened llmkit.rag Index) grounds chat completions in it and adds citations to replies."""
    config = config or ServerConfig()
    own_engine = engine is None
    engine = engine or Engine(model, max_batch_size=config.max_batch_size, max_waiting=config.max_waiting,
                              prefix_caching=config.prefix_caching, max_prefill_tokens=config.max_prefill_tokens,
                              kv_cache_dtype=config.kv_cache_dtype)
    grounding = None if index is None else Grounding(index, config.rag_k, config.rag_budget, config.rag_min_score)
    server = Server(model, tokenizer, config, engine, grounding)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        if own_engine:
            await run_in_threadpool(engine.close)

    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _add_error_handlers(app)
    _add_routes(app, server)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    limiter = RateLimiter(config.rate_limit, config.rate_burst) if config.rate_limit > 0 else None
    app.add_middleware(Guard, keys=ApiKeys(config.api_keys), max_body_bytes=config.max_body_bytes, limiter=limiter)
    app.add_middleware(RecordRequests, metrics=server.metrics)  # outermost: sees the Guard's answers too
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param, code = _describe(e.errors())
        return JSONResponse(error_body(400, message, param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)  # the trace stays here
        return JSONResponse(error_body(500, "internal server error"), status_code=500)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _describe(errors: list[dict]) -> tuple[str, str | None, str | None]:
    """(message, param, code) for pydantic's errors; param is the offending field's dotted path."""
    if not errors:
        return "invalid request", None, None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None, "invalid_json"
    param = _param(first)
    if param is None:
        return _body_problem(first)
    # a union (stop: string or list) reports one error per member: a range or length error says more than
    # "should be a string"
    same = [e for e in errors if _param(e) == param]
    best = next((e for e in same if not e.get("type", "").endswith("_type")), first)
    return f"{param}: {best.get('msg', 'invalid value')}", param, "invalid_value"


def _param(error: dict) -> str | None:
    loc = [p for p in error.get("loc", ())[1:]
           if isinstance(p, int) or (isinstance(p, str) and p.isidentifier() and p not in _TYPE_NAMES)]
    return ".".join(str(p) for p in loc) or None


def _body_problem(error: dict) -> tuple[str, None, str]:
    given = error.get("input")
    if error.get("type") == "missing" or given in (b"", ""):
        return "the request body is empty: send a JSON object", None, "invalid_json"
    if isinstance(given, (bytes, str)):  # sent without a JSON content type: FastAPI did not parse it
        try:
            json.loads(given)
        except ValueError as e:
            return f"malformed JSON body: {e}", None, "invalid_json"
    return "the request body must be a JSON object", None, "invalid_type"


def _add_routes(app: FastAPI, server: Server) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        s = server.engine.stats()
        return {"status": "ok", "model": server.config.model_name, "running": s.running, "waiting": s.waiting}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(server.engine.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(server, n) for n in [None, *server.adapters]]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        return _model_card(server, server.adapters[adapter - 1] if (adapter := server.check_model(name)) else None)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request):
        return await _completions(server, body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _chat(server, body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        return await _embeddings(server, body)


def _model_card(server: Server, adapter: str | None = None) -> dict:
    """The base model's card, or an adapter's (with the base as its parent, as vLLM lists LoRA modules)."""
    base = server.config.model_name
    card = {"id": adapter or base, "object": "model", "created": server.created, "owned_by": "llmkit",
            "max_model_len": server.context, "root": base}
    return card | ({"parent": base} if adapter else {})


# ----------------------------------------------------------------------------- completions


async def _completions(server: Server, body: CompletionRequest, request: Request):
    start = time.perf_counter()
    adapter = server.check_model(body.model)
    server.check_n(body.n)
    prompts = [server.encode(p, "prompt") for p in body.prompts()]
    budgets = [server.completion_budget(len(ids), body.max_tokens, "prompt") for ids in prompts]
    processors = iter(await _processors(server, body, len(prompts) * body.n, *_constraint(body)))
    requests = [(ids, server.options(body, budget, j, body.logprobs, next(processors), adapter))
                for ids, budget in zip(prompts, budgets) for j in range(body.n)]
    gen = server.submit(requests, body.stop_strings())
    reply = _Reply(server, "cmpl", "text_completion", sum(len(p) for p in prompts), start, model=body.model)
    echo = [server.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]
    if body.stream:
        return _sse(reply.completion_chunks(gen, echo, body.logprobs is not None, body.include_usage()))
    pieces = await _collect(gen, request)
    reply.first_token(gen.first_piece_at)
    choices = [{"index": i, "text": echo[i] + "".join(p.text for p in ps),
                "logprobs": completion_logprobs(server.tokenizer, ps) if body.logprobs is not None else None,
                "finish_reason": ps[-1].finish_reason} for i, ps in enumerate(pieces)]
    return {**reply.header(), "choices": choices, "usage": reply.usage(pieces)}


# ----------------------------------------------------------------------------- chat completions


async def _chat(server: Server, body: ChatCompletionRequest, request: Request):
    start = time.perf_counter()
    adapter = server.check_model(body.model)
    server.check_n(body.n)
    messages = [_message_dict(m) for m in body.messages]
    passages: list | None = None
    if server.grounding is not None:
        messages, passages = await run_in_threadpool(server.ground, messages, body.token_limit())
    tools = tool_use(body)
    constraint, param = _constraint(body)
    forced = tools.forced if tools else None
    if forced and constraint:
        raise ApiError(400, f"{param} and a forced tool_choice cannot both constrain the reply", param="tool_choice")
    ids = server.encode(server.render(messages, tools.specs if tools else None), "messages")
    budget = server.completion_budget(len(ids), body.token_limit(), "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    processors = await _processors(server, body, body.n, constraint, param, forced)
    requests = [(ids, server.options(body, budget, j, logprobs, processors[j], adapter)) for j in range(body.n)]
    gen = server.submit(requests, body.stop_strings())
    reply = _Reply(server, "chatcmpl", "chat.completion", len(ids), start, passages, model=body.model)
    if body.stream:
        return _sse(reply.chat_chunks(gen, body.n, body.logprobs, body.include_usage(), tools))
    pieces = await _collect(gen, request)
    reply.first_token(gen.first_piece_at)
    choices = [_chat_choice(server, i, ps, body.logprobs, tools) for i, ps in enumerate(pieces)]
    out = {**reply.header(), "choices": choices, "usage": reply.usage(pieces)}
    return out | reply.citations([c["message"]["content"] or "" for c in choices])


def _chat_choice(server: Server, index: int, pieces: list[Piece], logprobs: bool, tools: ToolUse | None) -> dict:
    text = "".join(p.text for p in pieces)
    content, calls = tools.split(text) if tools else (text, [])
    message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})
    return {"index": index, "message": message,
            "logprobs": {"content": chat_logprobs(server.tokenizer, pieces)} if logprobs else None,
            "finish_reason": finish_reason(pieces[-1].finish_reason, calls)}


def _message_dict(m) -> dict:
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out | ({"name": m.name} if m.name else {})


def _constraint(body: SamplingRequest) -> tuple[dict | None, str | None]:
    """grammar_processor arguments from chat's response_format or vLLM's guided_json / guided_regex /
    guided_choice (at most one), and the field they came from."""
    from llmkit.prompting.structured import constraint_from_response_format

    guided = body.guided()
    response_format = getattr(body, "response_format", None) or {}
    fields = [*guided] + (["response_format"] if response_format.get("type", "text") != "text" else [])
    if len(fields) > 1:
        raise ApiError(400, f"{fields[0]}: give one of {', '.join(fields)}, not several", param=fields[0])
    if "response_format" in fields:
        try:
            return constraint_from_response_format(body.response_format), "response_format"
        except ValueError as e:
            raise ApiError(400, f"response_format: {e}", param="response_format") from None
    if not guided:
        return None, None
    [(name, value)] = guided.items()
    return {{"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choices"}[name]: value}, name


async def _processors(server: Server, body: SamplingRequest, count: int, constraint: dict | None,
                      param: str | None, forced: list[dict] | None = None) -> list[Callable | None]:
    """One logits processor per engine request: logit_bias, then the grammar of the constraint or of a forced
    tool call (stateful: one each)."""
    bias = server.bias_processor(body.logit_bias)
    if constraint is None and not forced:
        return [bias] * count
    grammars = await run_in_threadpool(_grammar_processors, server, constraint, param, forced, count)
    return [_chain(bias, g) for g in grammars]


def _grammar_processors(server: Server, constraint: dict | None, param: str | None, forced: list[dict] | None,
                        n: int) -> list[Callable]:
    from llmkit.agents.tools import ToolError, tool_call_processor
    from llmkit.prompting.structured import grammar_processor

    try:
        if forced:
            return [tool_call_processor(server.tokenizer, forced, stop_token_ids=server.eos) for _ in range(n)]
        return [grammar_processor(server.tokenizer, **constraint, stop_token_ids=server.eos) for _ in range(n)]
    except ToolError as e:
        raise ApiError(400, f"tools: {e}", param="tools") from None
    except ValueError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None


def _chain(first: Callable | None, second: Callable) -> Callable:
    if first is None:
        return second
    return lambda generated, logits: second(generated, first(generated, logits))


# ----------------------------------------------------------------------------- replies


class _Reply:
    """The parts every response of one request shares: id, timestamps, usage, citations, metrics."""

    def __init__(self, server: Server, prefix: str, kind: str, prompt_tokens: int, start: float,
                 passages: list | None = None, model: str | None = None):
        self.server, self.kind, self.prompt_tokens, self.start = server, kind, prompt_tokens, start
        self.model = model or server.config.model_name  # the base or the adapter the request named
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.passages = passages
        self._first = False

    def header(self, chunk: bool = False) -> dict:
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def first_token(self, at: float | None = None) -> None:
        """Record the time to first token once: now, or `at` (a perf_counter reading)."""
        if not self._first:
            self._first = True
            self.server.metrics.ttft.observe((at or time.perf_counter()) - self.start)

    def usage(self, pieces: list[list[Piece]]) -> dict:
        return usage(self.prompt_tokens, pieces)

    def citations(self, texts: list[str]) -> dict:
        """`passages` (what the model was given) and `citations` (what each choice cites), when grounded."""
        if self.passages is None:
            return {}
        from llmkit.rag.answer import map_citations

        cited = [[c.to_dict() for c in map_citations(t, self.passages)[0]] for t in texts]
        return {"passages": [p.to_dict() for p in self.passages], "citations": cited[0] if len(cited) == 1 else cited}

    async def chat_chunks(self, gen: Generation, n: int, logprobs: bool, include_usage: bool,
                          tools: ToolUse | None = None) -> AsyncIterator[dict]:
        for i in range(n):
            yield self._chat_chunk(i, {"role": "assistant", "content": ""})
        texts, pieces = [""] * n, [[] for _ in range(n)]
        streams = [ToolCallStream(tools) for _ in range(n)] if tools else None
        async for p in gen:
            self.first_token()
            texts[p.index] += p.text
            pieces[p.index].append(p)
            text = streams[p.index].push(p.text) if streams else p.text
            lp = {"content": chat_logprobs(self.server.tokenizer, [p])} if logprobs else None
            if text or lp:
                yield self._chat_chunk(p.index, {"content": text}, lp)
            if p.finish_reason is not None:
                reason = p.finish_reason
                if streams:
                    content, calls = streams[p.index].finish()
                    if content or calls:
                        delta = {"content": content or None} | ({"tool_calls": stream_calls(calls)} if calls else {})
                        yield self._chat_chunk(p.index, delta)
                    reason = finish_reason(reason, calls)
                extra = self.citations([texts[p.index]]) if self.passages is not None else {}
                yield self._chat_chunk(p.index, {}, finish_reason=reason) | extra
        if include_usage:
            yield {**self.header(chunk=True), "choices": [], "usage": self.usage(pieces)}

    def _chat_chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None):
        return {**self.header(chunk=True),
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    async def completion_chunks(self, gen: Generation, echo: list[str], logprobs: bool,
                                include_usage: bool) -> AsyncIterator[dict]:
        pieces: list[list[Piece]] = [[] for _ in echo]
        async for p in gen:
            self.first_token()
            text = (echo[p.index] if not pieces[p.index] else "") + p.text
            pieces[p.index].append(p)
            lp = completion_logprobs(self.server.tokenizer, [p]) if logprobs else None
            if text or lp or p.finish_reason is not None:
                choice = {"index": p.index, "text": text, "logprobs": lp, "finish_reason": p.finish_reason}
                yield {**self.header(), "choices": [choice]}
        if include_usage:
            yield {**self.header(), "choices": [], "usage": self.usage(pieces)}


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """`data: {json}` per event, then `data: [DONE]`. An error mid-stream is sent as an event, not a trace."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except GenerationError as e:
            log.error("stream failed: %s", e)
            yield f"data: {json.dumps(error_body(500, 'the generation failed on the server'))}\n\n"
        except Exception:
            log.exception("stream failed")
            yield f"data: {json.dumps(error_body(500, 'internal server error'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _collect(gen: Generation, request: Request) -> list[list[Piece]]:
    """Every piece of a non-streamed request; when the client disconnects first, the generation is cancelled."""
    collecting = asyncio.ensure_future(gen.collect())
    disconnected = asyncio.ensure_future(_until_disconnect(request))
    await asyncio.wait({collecting, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if collecting.done():
        disconnected.cancel()
        try:
            return collecting.result()
        except GenerationError as e:
            raise ApiError(500, "the generation failed on the server") from e
    collecting.cancel()
    gen.cancel()
    raise ApiError(499, "the client closed the request", code="client_closed_request")


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----------------------------------------------------------------------------- embeddings


async def _embeddings(server: Server, body: EmbeddingRequest) -> dict:
    if server.check_model(body.model):
        raise ApiError(400, f"model: embeddings come from the base model {server.config.model_name!r}, not an adapter",
                       param="model")
    inputs = body.inputs()
    if len(inputs) > server.config.max_embedding_inputs:
        raise ApiError(400, f"input: at most {server.config.max_embedding_inputs} inputs per request, "
                            f"got {len(inputs)}", param="input")
    ids = [server.encode(x, "input") for x in inputs]
    for n, row in enumerate(ids):
        if len(row) > server.context:
            raise ApiError(400, f"input[{n}] has {len(row)} tokens; the model reads at most {server.context}",
                           param="input", code="context_length_exceeded")
    texts = [x if isinstance(x, str) else server.tokenizer.decode(x) for x in inputs]
    vectors = await run_in_threadpool(server.embed, texts)
    data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    tokens = sum(len(r) for r in ids)
    return {"object": "list", "data": data, "model": server.config.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode_vector(v: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    return v.tolist()


# ----------------------------------------------------------------------------- running in a thread


class ServerThread:
    """uvicorn in a background thread, for tests, notebooks and benchmarks: `url = ServerThread(app).start()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, name="llmkit-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
