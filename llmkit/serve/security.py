"""What guards the API before a handler runs (OWASP Top 10 for LLM applications: LLM04/LLM10, model denial of
service and unbounded consumption; LLM02/LLM05, output handling, is the page's job).

`Guard`, one ASGI middleware, answers in this order: 401 for a missing or wrong API key on /v1 (keys compared
in constant time, never logged), 413 for a body over the size cap (counted as it arrives, so a chunked body
without Content-Length is capped too), 429 with Retry-After when the key's token bucket is empty. Every
response gets headers that stop content sniffing, framing and referrers; the page also gets a strict CSP.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence

from llmkit.serve.errors import ApiError

Scope = dict
Receive = Callable
Send = Callable

SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
# the page loads only its own script and style and talks only to this server: an injected <script> or
# inline handler would not run even if it reached the DOM
PAGE_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ApiKeys:
    """The accepted keys; `match` compares against every one in constant time."""

    def __init__(self, keys: Sequence[str]):
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def match(self, authorization: str | None) -> str | None:
        """The key a `Bearer KEY` header carries when it is one of ours, else None."""
        scheme, _, given = (authorization or "").partition(" ")
        given_bytes = given.strip().encode()
        found = None
        for key in self._keys:  # no early exit: the time taken does not say which key came close
            if hmac.compare_digest(key, given_bytes) and scheme.lower() == "bearer":
                found = key.decode()
        return found


class RateLimiter:
    """A token bucket per client: `per_minute` requests a minute on average, bursts up to `burst`."""

    def __init__(self, per_minute: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, round(per_minute)))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time of last update)

    def take(self, client: str) -> float | None:
        """None when the request may go ahead, else the seconds until one would."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget idle clients so the table cannot grow without bound
            self._buckets = {c: v for c, v in self._buckets.items() if now - v[1] < 3600}
        return None


class Guard:
    """ASGI middleware: auth, body cap and rate limit for /v1, security headers everywhere."""

    def __init__(self, app, keys: ApiKeys, max_body_bytes: int, limiter: RateLimiter | None):
        self.app, self.keys, self.max_body_bytes, self.limiter = app, keys, max_body_bytes, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send, page=scope["path"] in ("/", "/index.html"))
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        try:
            client = self._client(scope)
            receive = await self._capped_body(scope, receive)
            self._rate_limit(client)
        except ApiError as e:
            return await _answer(send, e)
        await self.app(scope, receive, send)

    def _client(self, scope: Scope) -> str:
        """The rate-limit identity: the API key when keys are on, else the peer address."""
        if not self.keys.enabled:
            return (scope.get("client") or ("unknown", 0))[0]
        key = self.keys.match(_header(scope, b"authorization"))
        if key is None:
            raise ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        return "key:" + key

    async def _capped_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body (up to the cap) and hand it on; later receives (disconnect) pass through."""
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay(b"", receive, message)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return _replay(b"".join(chunks), receive)

    def _rate_limit(self, client: str) -> None:
        if self.limiter is None:
            return
        wait = self.limiter.take(client)
        if wait is not None:
            raise ApiError(429, "rate limit reached for this API key; retry after the Retry-After header's "
                                "seconds", code="rate_limit_exceeded", retry_after=wait)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body larger than the server's limit of {limit} bytes",
                    code="request_too_large")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, receive: Receive, first: dict | None = None) -> Receive:
    pending = [first or {"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        return pending.pop() if pending else await receive()

    return replay


def _with_headers(send: Send, page: bool) -> Send:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            extra = SECURITY_HEADERS + ([(b"content-security-policy", PAGE_CSP)] if page else [])
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)

    return wrapped


async def _answer(send: Send, error: ApiError) -> None:
    status, headers, body = error.raw()
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
