"""The bridge from the engine's thread to asyncio: a request's choices as a stream of text pieces.

The engine calls `on_event` on its own thread; each event is handed to the event loop with
`call_soon_threadsafe` and lands in one asyncio queue shared by all choices of the request, so one
consumer turns them into text: a StreamDecoder per choice (never splits a character), then a StopMatcher
(holds back text that may begin a stop string). A stop string, a cancelled consumer (client gone) or
`cancel()` cancels the engine requests that are still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llmkit.infer.detokenize import StreamDecoder
from llmkit.infer.engine import Engine, RequestOptions, TokenEvent
from llmkit.infer.generate import StopMatcher


class GenerationError(RuntimeError):
    """The engine failed a request (its step raised); the server logs the cause."""


@dataclass
class Token:
    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Piece:
    """New text of choice `index`, the tokens that produced it, and its finish reason on the last piece."""

    index: int
    text: str
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Choice:
    def __init__(self, index: int, tokenizer, stop: tuple[str, ...], eos: set[int]):
        self.index, self.eos = index, eos
        self.decoder = StreamDecoder(tokenizer.decode, skip_special_tokens=True)
        self.stops = StopMatcher(stop)
        self.done = False

    def advance(self, event: TokenEvent) -> Piece:
        """The piece one engine event adds; finish_reason "stop" when a stop string shows up."""
        piece = Piece(self.index, "", prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens)
        if event.token_id is not None:
            piece.tokens.append(Token(event.token_id, event.logprob, event.top_logprobs))
            if event.token_id not in self.eos:
                piece.text = self.stops.push(self.decoder.push(event.token_id))
        if self.stops.stopped:
            piece.finish_reason = "stop"
        elif event.finish_reason is not None:
            piece.finish_reason = event.finish_reason
            piece.text += self._tail()
        self.done = piece.finish_reason is not None
        return piece

    def _tail(self) -> str:
        text = self.stops.push(self.decoder.flush())
        return text if self.stops.stopped else text + self.stops.flush()


class Generation:
    """Submitted engine requests (one per choice); iterate for their pieces as they are generated.

    Submission happens in the constructor, so QueueFull and ValueError surface before any response starts.
    """

    def __init__(self, engine: Engine, tokenizer, requests: list[tuple[list[int], RequestOptions]],
                 stop: tuple[str, ...] = (), on_finish: Callable[[int, int, str], None] | None = None):
        self.engine = engine
        self._on_finish = on_finish  # (prompt tokens, completion tokens, finish reason), once per choice
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._choices: dict[str, _Choice] = {}
        self.first_piece_at: float | None = None  # perf_counter() when the first piece came out
        try:
            for i, (ids, options) in enumerate(requests):
                rid = engine.submit(ids, options, self._on_event)
                self._choices[rid] = _Choice(i, tokenizer, stop, set(options.eos_token_ids))
        except BaseException:
            self.cancel()
            raise

    def _on_event(self, event: TokenEvent) -> None:  # on the engine thread
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        if event.finish_reason is not None and self._on_finish is not None:
            self._loop.call_soon_threadsafe(self._finished, event)

    def _finished(self, event: TokenEvent) -> None:
        # a choice ended by a stop string is cancelled in the engine, but for the client it stopped
        reason = "stop" if self._choices[event.request_id].stops.stopped else event.finish_reason
        self._on_finish(event.prompt_tokens, event.completion_tokens, reason)

    async def __aiter__(self) -> AsyncIterator[Piece]:
        try:
            while not all(c.done for c in self._choices.values()):
                event = await self._events.get()
                choice = self._choices[event.request_id]
                if choice.done:
                    continue  # tokens already in flight when a stop string ended the choice
                if event.finish_reason == "error":
                    raise GenerationError(f"the engine failed {event.request_id}")
                piece = choice.advance(event)
                if piece.finish_reason is not None and event.finish_reason is None:
                    self.engine.cancel(event.request_id)  # a stop string: the engine need not go on
                if self.first_piece_at is None:
                    self.first_piece_at = time.perf_counter()
                yield piece
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Cancel every choice that has not finished (a no-op for finished ones)."""
        for rid, choice in self._choices.items():
            if not choice.done:
                choice.done = True
                self.engine.cancel(rid)

    async def collect(self) -> list[list[Piece]]:
        """Every piece, by choice."""
        out: list[list[Piece]] = [[] for _ in self._choices]
        async for piece in self:
            out[piece.index].append(piece)
        return out
