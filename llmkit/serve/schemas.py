"""Request bodies of the OpenAI API, as pydantic models; responses are built as plain dicts in app.py.

Models are strict (a string is never coerced to a number, nor a number to a bool), so a wrong type is a 400
naming its field. Fields OpenAI defines and this server does not use (`user`, `service_tier`, ...) are
accepted and ignored, as OpenAI clients send them freely. Limits that depend on the server (max_tokens cap,
context length, n) are checked in app.py against its configuration.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions endpoint's limit

Stop = str | Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema object; None: no arguments


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: Annotated[dict[str, str], Field(min_length=1)]  # {"name": ...}


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for the system role; it is rendered as "system"
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a "tool" turn: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class SamplingRequest(_Strict):
    """Fields chat and text completions share."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: Stop | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch.Generator.manual_seed takes
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # token id (as a string key, as JSON objects must have) -> bias added to its logit
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's guided decoding extensions (`extra_body` in the openai client); at most one of them
    guided_json: dict | str | None = None  # a JSON Schema (object or JSON text)
    guided_regex: str | None = None
    guided_choice: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit()):  # "²".isdigit() is True, int("²") fails
                raise ValueError(f"keys must be token ids, got {key!r}")
        return bias

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def guided(self) -> dict[str, object]:
        """The guided_* fields given, by name."""
        return {name: value for name in ("guided_json", "guided_regex", "guided_choice")
                if (value := getattr(self, name)) is not None}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    tools: list[ToolSpec] | None = Field(None, max_length=128)  # OpenAI's limit
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # the Hermes format allows several <tool_call> blocks in one reply

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptInput = (Annotated[str, StringConstraints(min_length=1)]
               | Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)]
               | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
               | Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
                           Field(min_length=1)])


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        return split_prompts(self.prompt)


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[str | list[int]]:
        return split_prompts(self.input)


def split_prompts(p: str | list) -> list[str | list[int]]:
    """One entry per prompt (text, or token ids) of OpenAI's four `prompt` / `input` shapes."""
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)
