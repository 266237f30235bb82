"""OpenAI-compatible serving: `create_app(model, tokenizer, ServerConfig(...))`, `llmkit serve --model DIR`.

app.py (routes over the continuous-batching engine), generation.py (engine thread -> asyncio), schemas.py
(request bodies), security.py (API keys, body cap, rate limits, headers), metrics.py (Prometheus text),
static/ (the web chat page, no build step, no CDN).
"""

from llmkit.serve.app import ServerConfig, ServerThread, create_app

__all__ = ["ServerConfig", "ServerThread", "create_app"]
