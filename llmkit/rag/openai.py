"""A minimal client for OpenAI-compatible endpoints (embeddings and chat completions, streaming included).

Standard library only (urllib), so any server that speaks the OpenAI wire format works: vLLM, llama.cpp,
Ollama, text-generation-inference, llmkit serve, the OpenAI API itself.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from llmkit.rag.errors import RagError


class OpenAIClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0):
        if not base_url.startswith(("http://", "https://")):
            raise RagError(f"--base-url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, path: str, body: dict):
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise RagError(f"{url}: HTTP {e.code} {e.reason}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RagError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None

    def _json(self, path: str, body: dict) -> dict:
        with self._request(path, body) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise RagError(f"{self.base_url}{path}: the answer is not JSON: {raw[:200]!r}") from None

    def embeddings(self, model: str, texts: list[str]) -> list[list[float]]:
        data = self._json("/embeddings", {"model": model, "input": texts})
        try:
            rows = sorted(data["data"], key=lambda d: d.get("index", 0))
            vectors = [r["embedding"] for r in rows]
        except (KeyError, TypeError):
            raise RagError(f"{self.base_url}/embeddings: unexpected answer (no data[].embedding)") from None
        if len(vectors) != len(texts):
            raise RagError(f"{self.base_url}/embeddings: asked for {len(texts)} embeddings, got {len(vectors)}")
        return vectors

    def chat(self, model: str, messages: list[dict], **params) -> str:
        data = self._json("/chat/completions", {"model": model, "messages": messages, **params})
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RagError(f"{self.base_url}/chat/completions: unexpected answer (no choices[0].message)") from None

    def chat_stream(self, model: str, messages: list[dict], **params) -> Iterator[str]:
        """Content deltas from a server-sent-event stream."""
        with self._request("/chat/completions", {"model": model, "messages": messages, "stream": True,
                                                  **params}) as resp:
            for raw in resp:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    delta = json.loads(payload)["choices"][0].get("delta", {}).get("content")
                except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                    continue
                if delta:
                    yield delta
