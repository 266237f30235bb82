"""A chat client for a running OpenAI-compatible server (`llmkit chat --url`), on the official openai package."""

from __future__ import annotations

import os
from collections.abc import Iterator


class ChatClient:
    """Streams chat replies from `url` (with or without the /v1 suffix) for the model it serves."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0):
        import openai

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {url!r}")
        base = url.rstrip("/")
        key = api_key or os.environ.get("LLMKIT_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key=key,
                                    timeout=timeout, max_retries=0)
        self._model = model
        self._errors = (openai.APIError,)

    @property
    def model(self) -> str:
        if self._model is None:  # the first model the server lists
            self._model = self._call(lambda: self.client.models.list().data[0].id)
        return self._model

    def stream(self, messages: list[dict], **sampling) -> Iterator[str]:
        """Text deltas of one reply; `sampling` holds OpenAI request fields (None values are left out)."""
        fields = {k: v for k, v in sampling.items() if v is not None and v != []}
        stream = self._call(lambda: self.client.chat.completions.create(model=self.model, messages=messages,
                                                                        stream=True, **fields))
        try:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            stream.close()  # Ctrl-C mid-reply closes the connection: the server cancels the generation

    def _call(self, fn):
        try:
            return fn()
        except self._errors as e:  # one line for the CLI, not the client's traceback
            raise ValueError(f"{self.client.base_url}: {e}") from None
