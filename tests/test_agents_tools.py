"""Tool calling: the chat template renders tools, calls and results as transformers does; tool calls parse
(malformed JSON reported, not raised); a forced call decoded by a tiny random model always parses and validates."""

import json

import jsonschema
import pytest
import transformers

from llmkit.agents.tools import (Tool, ToolError, format_tool_call, forced_tool_processor, function_tool,
                                 parse_tool_calls, render_chat, select_tool, tool_call_processor, tools_prompt)
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.sampling import SamplingParams
from llmkit.tokenizer import LLAMA_TEMPLATE, Tokenizer
from test_structured import model, tok  # noqa: F401  (the same tiny tokenizer and random model)

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Current weather <in> a city & unit",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "unit": {"enum": ["c", "f"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "unit"]}}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and 2+2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "unit": "c"}}},
        {"id": "c2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "4"},
    {"role": "assistant", "content": "Sunny, 18 C; 4."},
    {"role": "user", "content": "Thanks"},
]


def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Longer notes that stay out of the description."""
    return a + b


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]])
def test_tools_calls_and_results_render_as_transformers_renders_the_template(tok, tmp_path, messages):
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tools = [WEATHER, function_tool(add).spec()]
    for offered in (tools, None):
        ours = tok.apply_chat_template(messages, tools=offered, add_generation_prompt=True)
        assert ours == hf.apply_chat_template(messages, tools=offered, tokenize=False, add_generation_prompt=True)
        assert render_chat(tok, messages, offered) == ours
    text = tok.apply_chat_template(CONVERSATION, tools=tools)
    assert text.count("<|im_start|>system\nBe brief.\n\n# Tools") == 1 and text.count("<|im_start|>system") == 1
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n4\n" in text


def test_without_tools_the_template_is_plain_chatml(tok):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant",
                                                                                       "content": "a"}]
    assert tok.apply_chat_template(messages) == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n" \
                                                "<|im_start|>assistant\na<|im_end|>\n"


def test_a_template_without_tool_support_gets_them_as_text(tok):
    llama = Tokenizer(tok.backend, bos_token="<s>", eos_token="</s>", chat_template=LLAMA_TEMPLATE)
    text = render_chat(llama, CONVERSATION, [WEATHER], add_generation_prompt=False)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n\n" + tools_prompt([WEATHER]) + "\n<</SYS>>")
    assert format_tool_call(CONVERSATION[2]["tool_calls"][0]) in text
    assert "[INST] <tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n4\n</tool_response> [/INST]" in text


def test_parse_tool_calls_in_openai_shape():
    text = ('Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
            '</tool_call>\n<tool_call>{"name": "add", "parameters": "{\\"a\\": 1}"}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["weather", "add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"a": 1}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("no tools here") == ("no tools here", [])
    # cut off before the closing tag, trailing text after the object: still a call
    _, calls = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1}} oops')
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1}


@pytest.mark.parametrize("body, why", [
    ('{"name": "add", "arguments": {"a": 1,}}', "malformed JSON"),
    ('{"arguments": {}}', '"name"'),
    ('{"name": "add", "arguments": [1]}', "JSON object"),
    ('{"name": "add", "arguments": "{a"}', "not JSON"),
    ("add(1)", "no JSON object"),
])
def test_malformed_tool_calls_are_reported_and_kept_as_text(body, why):
    errors = []
    text = f'ok <tool_call>{body}</tool_call> <tool_call>{{"name": "f", "arguments": {{}}}}</tool_call>'
    content, calls = parse_tool_calls(text, errors=errors)
    assert [c["function"]["name"] for c in calls] == ["f"]
    assert body in content and len(errors) == 1 and why in errors[0]
    assert [c["function"] for c in parse_tool_calls(text)[1]] == [c["function"] for c in calls]  # no list: no raise


def test_function_tools_describe_and_validate_their_arguments():
    t = function_tool(add)
    assert t.spec()["function"]["description"] == "Add two integers."
    assert t.parameters == {"type": "object", "properties": {"a": {"type": "integer"},
                                                             "b": {"type": "integer", "default": 2}},
                            "required": ["a"]}
    assert t.run({"a": 3}) == "5"
    with pytest.raises(ToolError, match="invalid arguments"):
        t.run({"a": "three"})
    with pytest.raises(ToolError, match="function name"):
        select_tool([{"type": "function", "function": {}}], "auto")
    with pytest.raises(ToolError, match="not among"):
        select_tool([WEATHER], {"type": "function", "function": {"name": "nope"}})
    assert select_tool([WEATHER, t], "auto") is None and len(select_tool([WEATHER, t], "required")) == 2
    assert select_tool([WEATHER, t], {"type": "function", "function": {"name": "add"}}) == [t.spec()]


def decode_calls(model, tok, proc, prompt, n, seed):
    gen = GenerationConfig(max_new_tokens=120, eos_token_ids=tuple(proc.stop_ids), logits_processors=(proc,),
                           sampling=SamplingParams(temperature=1.0, seed=seed))
    rows = generate(model, [tok.encode(prompt)] * n, gen, pad_id=tok.pad_id)
    assert all(row[-1] in proc.stop_ids for row in rows)
    parsed = []
    for row in rows:
        errors = []
        content, calls = parse_tool_calls(tok.decode(row, skip_special_tokens=True), errors=errors)
        assert content == "" and len(calls) == 1 and errors == []
        parsed.append(calls[0]["function"])
    return parsed


def test_a_forced_tool_call_always_parses_and_validates(model, tok):
    t = function_tool(add)
    prompt = render_chat(tok, [{"role": "user", "content": "Weather in Paris?"}], [WEATHER, t])
    schema = WEATHER["function"]["parameters"]
    for call in decode_calls(model, tok, forced_tool_processor(tok, WEATHER), prompt, 30, seed=0):
        assert call["name"] == "weather"
        jsonschema.validate(json.loads(call["arguments"]), schema)
    names = set()
    for call in decode_calls(model, tok, tool_call_processor(tok, [WEATHER, t]), prompt, 30, seed=1):
        names.add(call["name"])
        spec = {"weather": schema, "add": t.parameters}[call["name"]]
        jsonschema.validate(json.loads(call["arguments"]), spec)
    assert names == {"weather", "add"}


def test_a_tool_without_a_function_or_with_a_bad_schema():
    with pytest.raises(ToolError, match="no Python function"):
        Tool("x", "", {"type": "object"}).run({})
    with pytest.raises(ToolError, match="bad"):
        forced_tool_processor(None, {"name": "bad", "parameters": {"type": "object", "properties": {"a": {
            "type": "nonsense"}}}})
