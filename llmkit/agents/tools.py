"""Tool calling in the Hermes/Qwen format, with OpenAI's shapes at the edges.

Tools are described as OpenAI does (`{"type": "function", "function": {"name", "description", "parameters"}}`);
the chat template renders them into the system turn; the model answers with

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2 + 2"}}
    </tool_call>

which `parse_tool_calls` turns into OpenAI `tool_calls` entries. A forced call (`tool_choice`) is decoded under
a grammar of exactly that block with the tool's JSON Schema for its arguments, so it always parses:

    proc = forced_tool_processor(tokenizer, tool)          # a logits processor (llmkit.prompting.structured)
    content, calls = parse_tool_calls(text)                # calls[0]["function"]["arguments"] is a JSON string
"""

from __future__ import annotations

import inspect
import json
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llmkit.tokenizer import TOOLS_INSTRUCTIONS, TOOLS_PREAMBLE, Tokenizer

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# A complete block, or a last one cut off by the end of generation (no closing tag).
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


class ToolError(ValueError):
    """A tool definition or call that cannot be used; the message names the tool and what is wrong."""


@dataclass
class Tool:
    """A callable tool: OpenAI's function description plus the Python function that runs it."""

    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    fn: Callable[..., Any] | None = None
    # results from outside (documents, web pages, user code) are quoted as data and checked for prompt
    # injection by the agent; a pure function of its arguments (the calculator) may be trusted
    trusted: bool = False

    def spec(self) -> dict:
        """The OpenAI `tools` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def run(self, arguments: dict) -> str:
        """Validate `arguments` against the schema, call the function, return its result as text.

        Raises ToolError for invalid arguments; whatever the function raises propagates (the agent reports it).
        """
        import jsonschema

        if self.fn is None:
            raise ToolError(f"tool {self.name!r} has no Python function to run")
        try:
            jsonschema.validate(arguments, self.parameters)
        except jsonschema.ValidationError as e:
            raise ToolError(f"tool {self.name!r}: invalid arguments: {e.message}") from None
        result = self.fn(**arguments)
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def function_tool(fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> Tool:
    """A `Tool` from a Python function: parameters from its signature and type hints (pydantic), description
    from the first paragraph of its docstring."""
    import pydantic

    fields = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolError(f"tool {fn.__name__!r}: *args/**kwargs cannot be described as JSON Schema")
        annotation = str if p.annotation is inspect.Parameter.empty else p.annotation
        fields[p.name] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
    schema = pydantic.create_model(f"{fn.__name__}_arguments", **fields).model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    doc = (description or inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ").strip()
    return Tool(name or fn.__name__, doc, schema, fn)


def tool_spec(tool: Tool | dict) -> dict:
    """An OpenAI `tools` entry from a Tool, an OpenAI entry, or a bare {"name", "description", "parameters"}."""
    if isinstance(tool, Tool):
        return tool.spec()
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolError(f"a tool needs a function name: {str(tool)[:120]}")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ToolError(f"tool {function['name']!r}: parameters must be a JSON Schema object")
    return {"type": "function", "function": {**function, "parameters": parameters}}


def tools_prompt(tools: Iterable[Tool | dict]) -> str:
    """The system-prompt text describing `tools`, exactly as llmkit's ChatML template renders it."""
    lines = "".join("\n" + json.dumps(tool_spec(t), ensure_ascii=False) for t in tools)
    return TOOLS_PREAMBLE + lines + TOOLS_INSTRUCTIONS


def render_chat(tokenizer: Tokenizer, messages: list[dict], tools: Sequence[Tool | dict] | None = None,
                add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` (tool calls and "tool" results included) with `tools` offered.

    A chat template that knows tools (llmkit's ChatML, Qwen's, Hermes') renders them itself; for any other the
    tools go into the system message and tool calls/results are written as text in the same format.
    """
    specs = [tool_spec(t) for t in tools] if tools else None
    template = tokenizer.chat_template or ""
    if "tools" in template or not specs and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return tokenizer.apply_chat_template(messages, tools=specs, add_generation_prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(as_plain_messages(messages, specs),
                                         add_generation_prompt=add_generation_prompt)


def as_plain_messages(messages: list[dict], tools: Sequence[Tool | dict] | None) -> list[dict]:
    """`messages` for a template (or an endpoint) without tool support: the tool description joins the system
    message, assistant tool calls become <tool_call> text, tool results user turns of <tool_response> text."""
    out: list[dict] = []
    if tools:
        system = tools_prompt(tools)
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"] + "\n\n" + system
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    previous = None
    for m in messages:
        if m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if previous == "tool":  # consecutive results share one user turn, as the template renders them
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [format_tool_call(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([m["content"]] * bool(m.get("content")) + blocks)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
        previous = m["role"]
    return out


def format_tool_call(call: dict) -> str:
    """The <tool_call> block of an OpenAI tool call (or a bare {"name", "arguments"})."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(function["name"], ensure_ascii=False)}, "arguments": ' \
           f"{arguments}}}\n{TOOL_CALL_CLOSE}"


def parse_tool_calls(text: str, *, errors: list[str] | None = None) -> tuple[str, list[dict]]:
    """Split model output into (content, tool_calls in OpenAI's shape).

    Each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block becomes
    `{"id": "call_...", "type": "function", "function": {"name": ..., "arguments": "<JSON string>"}}`;
    `content` is the text outside the blocks, stripped. A block that is not a JSON object with a string
    "name" stays in `content` as text, and a line saying why is appended to `errors` (when given): malformed
    output is reported, never raised. Trailing text after the JSON object and a missing closing tag (the
    model stopped early) are tolerated; "parameters" is read as "arguments"; string arguments are kept when
    they hold a JSON object.
    """
    calls, kept, pos = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        call, problem = _read_call(m.group(1))
        if problem is None:
            kept.append(text[pos:m.start()])
            calls.append(call)
        else:
            kept.append(text[pos:m.end()])
            if errors is not None:
                errors.append(f"tool call {len(calls) + 1}: {problem}: {m.group(1)[:200]!r}")
        pos = m.end()
    kept.append(text[pos:])
    return "".join(kept).strip(), calls


def _read_call(body: str) -> tuple[dict | None, str | None]:
    start = body.find("{")
    if start < 0:
        return None, "no JSON object"
    try:
        obj, _ = json.JSONDecoder().raw_decode(body[start:])
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg} at character {e.pos})"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None, 'expected {"name": <string>, "arguments": <object>}'
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None, "arguments is a string that is not JSON"
    if not isinstance(arguments, dict):
        return None, "arguments must be a JSON object"
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}, None


def tool_call_grammar(tools: Sequence[Tool | dict]):
    """xgrammar Grammar of one <tool_call> block calling any of `tools` with arguments valid for its schema."""
    import xgrammar as xgr

    from llmkit.prompting.structured import json_schema_grammar, literal_grammar

    if not tools:
        raise ToolError("a forced tool call needs at least one tool")
    bodies = []
    for spec in (tool_spec(t)["function"] for t in tools):
        schema = {"type": "object", "properties": {"name": {"const": spec["name"]}, "arguments": spec["parameters"]},
                  "required": ["name", "arguments"]}
        try:
            bodies.append(json_schema_grammar(schema))
        except ValueError as e:
            raise ToolError(f"tool {spec['name']!r}: {e}") from None
    body = bodies[0] if len(bodies) == 1 else xgr.Grammar.union(*bodies)
    return xgr.Grammar.concat(literal_grammar(TOOL_CALL_OPEN + "\n"), body, literal_grammar("\n" + TOOL_CALL_CLOSE))


def tool_call_processor(tokenizer: Tokenizer, tools: Sequence[Tool | dict],
                        stop_token_ids: Sequence[int] | None = None):
    """A logits processor forcing one call of any of `tools` (OpenAI's tool_choice "required")."""
    from llmkit.prompting.structured import compile_processor

    return compile_processor(tokenizer, tool_call_grammar(tools), stop_token_ids)


def forced_tool_processor(tokenizer: Tokenizer, tool: Tool | dict, stop_token_ids: Sequence[int] | None = None):
    """A logits processor forcing `<tool_call>{"name": NAME, "arguments": <valid for its schema>}</tool_call>`
    (OpenAI's tool_choice {"type": "function", "function": {"name": NAME}}); the output always parses."""
    return tool_call_processor(tokenizer, [tool], stop_token_ids)


def select_tool(tools: Sequence[Tool | dict], tool_choice: Any) -> list[dict] | None:
    """The tools a call must be drawn from under OpenAI's `tool_choice`: None when the model may answer freely
    ("auto", "none" or absent), all tools for "required", the named one for {"function": {"name": ...}}."""
    specs = [tool_spec(t) for t in tools]
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not specs:
            raise ToolError('tool_choice "required" needs tools')
        return specs
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    chosen = [s for s in specs if s["function"]["name"] == name]
    if not chosen:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools "
                        f"{[s['function']['name'] for s in specs]}")
    return chosen
