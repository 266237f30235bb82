"""`llmkit serve`: the OpenAI-compatible server and web chat page for one checkpoint.

Only jsonargparse is imported at the top (so `llmkit --help` stays fast); the handler imports the server.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jsonargparse import ActionYesNo, Namespace

from llmkit.cli import Parser, _add_model_options, _parser

API_KEY_ENV = "LLMKIT_API_KEY"


def serve_parser() -> Parser:
    p = _parser("llmkit serve", "Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions, "
                                "/v1/chat/completions, /v1/embeddings, /v1/models, /health, /metrics) with a "
                                "web chat page at /.")
    _add_model_options(p)
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", type=str | None, default=None,
                   help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--api-key", type=str | None, default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}; unset: no auth)")
    p.add_argument("--api-key-file", type=str | None, default=None,
                   help="file with one accepted API key a line (each key gets its own rate limit)")
    p.add_argument("--rate-limit", type=float, default=0.0, help="requests a minute per API key (0 = no limit)")
    p.add_argument("--rate-burst", type=int | None, default=None, help="burst size (default: one minute's worth)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request bodies larger than this get 413")
    p.add_argument("--max-tokens", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int | None, default=None,
                   help="longest prompt accepted, in tokens (default: the context length)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    p.add_argument("--lora", type=str, nargs="*", default=[],
                   help="LoRA adapters (PEFT or llmkit directories) served beside the base model, NAME=DIR each; a "
                        "request picks one with its `model` field, and one batch mixes them")
    p.add_argument("--kv-cache-dtype", type=str, default="auto", choices=["auto", "int8"],
                   help="auto: keys/values in the model's dtype; int8: per-token, per-head int8 with a scale (about "
                        "a quarter of fp32's bytes, half of bf16's)")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens prefilled per engine step; a longer prompt is prefilled in chunks between "
                        "decode steps, so it does not stall the replies already streaming")
    p.add_argument("--prefix-caching", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="reuse the KV blocks of a prompt prefix another request already computed (a shared system "
                        "prompt, tool list or conversation); --no-prefix-caching recomputes every prompt")
    p.add_argument("--rag", type=str | None, default=None,
                   help="a llmkit rag index (Milvus Lite .db file) that grounds chat completions; replies carry "
                        "`passages` and `citations`")
    p.add_argument("--rag-uri", type=str | None, default=None, help="Milvus server for --rag (as rag --uri)")
    p.add_argument("--rag-k", type=int, default=5, help="passages retrieved per chat request")
    p.add_argument("--rag-budget", type=int, default=1024, help="passage tokens at most")
    p.add_argument("--rag-min-score", type=float, default=0.3, help="no passages below this cosine similarity")
    p.add_argument("--log-level", type=str, default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    return p


def lora_dirs(specs: list[str]) -> dict[str, str]:
    """NAME=DIR pairs of --lora, checked: a name once, a directory that exists."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora {spec!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"--lora: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--lora {spec!r}: {path}: no such adapter directory")
        out[name] = path
    return out


def api_keys(args: Namespace) -> tuple[str, ...]:
    keys = [args.api_key or os.environ.get(API_KEY_ENV, "")]
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: API key file not found")
        keys += [line.strip() for line in path.read_text().splitlines()]
    return tuple(k for k in keys if k)


def run_serve(args: Namespace) -> None:
    import uvicorn

    from llmkit.cli import _load
    from llmkit.serve.app import ServerConfig, create_app

    keys = api_keys(args)
    model, tokenizer = _load(args)
    adapters: list[str] = []
    if args.lora:
        from llmkit.infer.multi_lora import attach_adapters

        model, adapters = attach_adapters(model, lora_dirs(args.lora))
    config = ServerConfig(model_name=args.model_name or Path(args.model).resolve().name, api_keys=keys,
                          max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                          max_prompt_tokens=args.max_prompt_tokens, rate_limit=args.rate_limit,
                          rate_burst=args.rate_burst, max_batch_size=args.max_batch_size,
                          max_waiting=args.max_waiting, prefix_caching=args.prefix_caching,
                          max_prefill_tokens=args.max_prefill_tokens, kv_cache_dtype=args.kv_cache_dtype, rag_k=args.rag_k, rag_budget=args.rag_budget,
                          rag_min_score=args.rag_min_score)
    index = _open_index(args) if args.rag else None
    app = create_app(model, tokenizer, config, index=index)
    auth = f"{len(keys)} API key(s)" if keys else "no authentication"
    print(f"llmkit serve: {config.model_name} on http://{args.host}:{args.port} ({auth}"
          f"{', grounded in ' + args.rag if index else ''}"
          f"{', LoRA adapters ' + ', '.join(adapters) if adapters else ''})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if index is not None:
            index.close()


def _open_index(args: Namespace):
    from llmkit.rag.index import Index

    return Index.open(args.rag, uri=args.rag_uri)


COMMANDS = {"serve": (serve_parser, run_serve, "OpenAI-compatible HTTP server and web chat page")}
