"""Streaming detokenization: text deltas that never split a character."""

from __future__ import annotations

from collections.abc import Callable


class StreamDecoder:
    """Incremental detokenizer: feed token ids one at a time, get text deltas that never split a
    multi-byte UTF-8 character (or a tokenizer's multi-token glyph).

    Prefix-offset / read-offset technique (vLLM, TGI): each step decodes only a short window,
    the last emitted chunk (the "prefix") plus the tokens not yet emitted, and emits what the
    window adds beyond the prefix. Decoding from the prefix rather than from the new tokens alone
    keeps context-dependent text right, such as the space a Metaspace decoder strips from a
    sequence's first token. The window is cut at every emit, so each push costs O(window), not
    O(sequence). All pushes plus `flush()` concatenate to `decode(all ids)`.

    `decode` is called as `decode(ids, skip_special_tokens=...)`, the signature of
    `tokenizers.Tokenizer.decode` and of transformers' tokenizers; the flag is always passed
    because their defaults differ.
    """

    def __init__(self, decode: Callable[..., str], skip_special_tokens: bool = False):
        self._decode = decode
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: prefix tokens, then tokens not yet emitted
        self._read = 0  # window[:_read] is the prefix, already emitted
        self._prefix_text = ""  # decode(window[:_read])

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while the tail is an incomplete character)."""
        self._ids.append(token_id)
        text = self._decode_ids(self._ids)
        # A trailing U+FFFD means the last character's bytes have not all arrived yet.
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a truncated character) at the end of the stream."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode_ids(self._ids))

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        # The tokens just emitted become the next prefix; everything before them is dropped.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode_ids(self._ids)
        return delta

    def _decode_ids(self, ids: list[int]) -> str:
        return self._decode(ids, skip_special_tokens=self.skip_special_tokens)
