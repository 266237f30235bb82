"""Prometheus text exposition (format 0.0.4) of the server's counters, latency histograms and engine gauges.

Written by hand: three metric kinds are all the server needs. `RecordRequests` (ASGI middleware) counts
every response by endpoint and status and times it; handlers add token counts and time to first token;
`Metrics.render` reads the engine's gauges (queue, running, KV-cache blocks) at scrape time.
"""

from __future__ import annotations

import time
from collections import defaultdict

from llmkit.infer.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics", "/")


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.total:.6f}", f"{name}_count{braces} {self.n}"]


class Metrics:
    """Everything /metrics reports. Updated from the event loop only, so it needs no lock."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft = Histogram()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = defaultdict(int)  # finish reason -> generations

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency[endpoint].observe(seconds)

    def record_generation(self, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        self.finished[finish_reason] += 1

    def render(self, engine: EngineStats) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        family("llmkit_requests_total", "counter", "HTTP requests by endpoint and status",
               [f'llmkit_requests_total{{endpoint="{e}",status="{code}"}} {n}'
                for (e, code), n in sorted(self.requests.items())])
        family("llmkit_request_latency_seconds", "histogram", "time from request to the last byte of the response",
               [x for e, h in sorted(self.latency.items()) for x in h.lines("llmkit_request_latency_seconds",
                                                                            f'endpoint="{e}"')])
        family("llmkit_time_to_first_token_seconds", "histogram", "time from request to the first generated token",
               self.ttft.lines("llmkit_time_to_first_token_seconds", ""))
        family("llmkit_prompt_tokens_total", "counter", "prompt tokens of finished generations",
               [f"llmkit_prompt_tokens_total {self.prompt_tokens}"])
        family("llmkit_generation_tokens_total", "counter", "tokens generated (finished generations)",
               [f"llmkit_generation_tokens_total {self.generation_tokens}"])
        family("llmkit_generations_total", "counter", "generations by finish reason (stop, length, cancelled, error)",
               [f'llmkit_generations_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())])
        self._engine_lines(engine, family)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _engine_lines(stats: EngineStats, family) -> None:
        for name, kind, help_text, value in ENGINE_METRICS:
            family(name, kind, help_text, [f"{name} {value(stats)}"])


def _kv_usage(s: EngineStats) -> str:
    return f"{s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0:.6f}"


# read from the engine at scrape time: (name, type, help, value of EngineStats)
ENGINE_METRICS = (
    ("llmkit_queue_length", "gauge", "requests waiting for a batch slot", lambda s: s.waiting),
    ("llmkit_running_requests", "gauge", "requests in the running batch", lambda s: s.running),
    ("llmkit_kv_cache_blocks_used", "gauge", "KV-cache blocks in use", lambda s: s.kv_blocks_used),
    ("llmkit_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool", lambda s: s.kv_blocks_total),
    ("llmkit_kv_cache_usage_ratio", "gauge", "fraction of KV-cache blocks in use", _kv_usage),
    ("llmkit_engine_requests_total", "counter", "requests the engine accepted", lambda s: s.requests_total),
    ("llmkit_engine_preemptions_total", "counter", "requests preempted when KV blocks ran out",
     lambda s: s.preemptions_total),
    ("llmkit_kv_cache_blocks_cached", "gauge", "full KV-cache blocks kept for prefix reuse, held by no request",
     lambda s: s.kv_blocks_cached),
    ("llmkit_prefix_cache_queries_total", "counter", "prompt tokens looked up in the prefix cache",
     lambda s: s.prefix_cache_queries_total),
    ("llmkit_prefix_cache_hits_total", "counter", "prompt tokens whose keys and values the prefix cache supplied",
     lambda s: s.prefix_cache_hits_total),
)


class RecordRequests:
    """ASGI middleware: count and time every HTTP response by endpoint (unknown paths as "other") and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def recording_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.record_request(endpoint, status[0], time.perf_counter() - start)
