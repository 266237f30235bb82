"""OpenAI `tools` / `tool_choice` for chat completions, on llmkit.agents.tools (the Hermes/Qwen format).

The tools are rendered into the prompt by the chat template; the reply is split into content and
`tool_calls` by `parse_tool_calls`. `tool_choice` "required" or a named function decodes the reply under the
grammar of one <tool_call> block whose arguments follow the tool's JSON Schema, so the call always parses.
When streaming, text goes out as it comes until a <tool_call> may be starting; the calls follow as one
`tool_calls` delta when the choice ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.agents.tools import TOOL_CALL_OPEN, ToolError, parse_tool_calls, select_tool, tool_spec
from llmkit.serve.errors import ApiError
from llmkit.serve.schemas import ChatCompletionRequest


@dataclass
class ToolUse:
    """The tools a request offers and how the reply may use them."""

    specs: list[dict]  # OpenAI `tools` entries, rendered into the prompt
    forced: list[dict] | None  # the reply must call one of these ("required" or a named tool_choice)
    parse: bool  # split <tool_call> blocks out of the reply (not under tool_choice "none")
    parallel: bool  # several calls in one reply allowed

    def split(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a finished reply; content is None when the reply is only calls."""
        if not self.parse:
            return text, []
        content, calls = parse_tool_calls(text)
        calls = calls if self.parallel else calls[:1]
        return (content or None) if calls else text, calls


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's ToolUse, None when it offers no tools; a bad tool or tool_choice is a 400."""
    choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None
    try:
        specs = [tool_spec(t.model_dump(exclude_none=True)) for t in body.tools]
        forced = select_tool(specs, choice)
    except ToolError as e:
        raise ApiError(400, f"tools: {e}", param="tool_choice" if "tool_choice" in str(e) else "tools") from None
    names = [s["function"]["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ApiError(400, f"tools: function names must be unique, got {names}", param="tools")
    return ToolUse(specs, forced, parse=choice != "none", parallel=body.parallel_tool_calls)


def finish_reason(reason: str, calls: list[dict]) -> str:
    """OpenAI's "tool_calls" when a reply that ended on its own called tools."""
    return "tool_calls" if calls and reason == "stop" else reason


class ToolCallStream:
    """One streamed choice's text: `push` returns what may be sent as content now, holding back anything
    from a possible <tool_call> on; `finish` splits what was held into (content, tool_calls)."""

    def __init__(self, tools: ToolUse):
        self.tools = tools
        self.text, self.sent = "", 0

    def push(self, piece: str) -> str:
        self.text += piece
        if not self.tools.parse:
            end = len(self.text)
        elif (start := self.text.find(TOOL_CALL_OPEN, self.sent)) >= 0:
            end = start
        else:
            end = len(self.text) - _open_tag_overlap(self.text)
        out, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        content, calls = self.tools.split(rest)
        return content or "", calls


def _open_tag_overlap(text: str) -> int:
    """Length of the longest end of `text` that begins the <tool_call> tag (it may continue in the next piece)."""
    for n in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


def stream_calls(calls: list[dict]) -> list[dict]:
    """`tool_calls` entries of a streamed delta: each with its index, as OpenAI's chunks carry them."""
    return [{"index": i, **call} for i, call in enumerate(calls)]
