"""The OpenAI-compatible server, started for real (uvicorn on 127.0.0.1, a free port) with a tiny random model saved
to disk: the official openai client for chat, completions and embeddings (same tokens as llmkit's own greedy
generate), raw HTTP for every malformed request, auth, rate limits, a full queue, client disconnects, metrics,
retrieval grounding and `llmkit chat --url`."""

import json
import logging
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.infer.engine import Engine
from llmkit.infer.generate import GenerationConfig, generate, generate_text
from llmkit.model import Transformer
from llmkit.rag.embed import llmkit_embeddings
from llmkit.serve import ServerConfig, ServerThread, create_app
from llmkit.tokenizer import CHAT_TEMPLATES, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEY, OTHER_KEY = "sk-test-0123456789", "sk-other-9876543210"
HELLO = [{"role": "user", "content": "Good morrow, what news?"}]


def tiny_checkpoint(tmp_path_factory, **overrides) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:30_000])
    tok = train_tokenizer([corpus], "byte-bpe", 300, chat_template=CHAT_TEMPLATES["chatml"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, **overrides)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    llmkit.save(Transformer(cfg), tok, out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


def start(checkpoint: Path, engine_step_delay: float = 0.0, engine_kwargs: dict | None = None, index=None,
          **config) -> tuple[str, ServerThread, object]:
    """A real server on a free loopback port: (base URL, thread, the app's Server)."""
    model, tok = llmkit.load(checkpoint)
    engine = Engine(model, **(engine_kwargs or {}))
    if engine_step_delay:  # a slow engine keeps requests running or waiting long enough to watch them
        step = engine.step
        engine.step = lambda: (time.sleep(engine_step_delay), step())[1]
    app = create_app(model, tok, ServerConfig(**{"model_name": "tiny", **config}), engine=engine, index=index)
    thread = ServerThread(app)
    return thread.start(), thread, app.state.server


@pytest.fixture(scope="module")
def served(checkpoint):
    url, thread, server = start(checkpoint, max_tokens=200, max_body_bytes=20_000)
    yield url, server
    thread.stop()
    server.engine.close()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """A second copy of the model for llmkit's own generate (the server's copy has the engine's paged cache)."""
    return llmkit.load(checkpoint)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def greedy(reference, prompt: str, n: int, eos) -> tuple[str, int]:
    model, tok = reference
    gen = GenerationConfig(max_new_tokens=n, eos_token_ids=tuple(eos))
    ids = generate(model, [tok.encode(prompt)], gen)[0]
    return generate_text(model, tok, [prompt], gen)[0], len(ids)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param and param.split(".")[0] in body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------- the OpenAI client


def test_models_health_and_unknown_model(served):
    url, _ = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert_error(httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(httpx.get(url + "/v1/models/nope"), 404, "model")


def test_chat_completion_is_llmkit_greedy_generate(served, reference):
    url, server = served
    _, tok = reference
    expected, n_tokens = greedy(reference, tok.apply_chat_template(HELLO, add_generation_prompt=True), 24, server.eos)
    c = client(url)
    reply = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == n_tokens and reply.choices[0].finish_reason in ("length", "stop")

    chunks = list(c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason

    sampled = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.9,
                                        seed=7, n=2, presence_penalty=0.5, frequency_penalty=0.5, logprobs=True,
                                        top_logprobs=3)
    again = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.9,
                                      seed=7, n=2, presence_penalty=0.5, frequency_penalty=0.5)
    assert [ch.message.content for ch in sampled.choices] == [ch.message.content for ch in again.choices]
    entries = sampled.choices[0].logprobs.content
    assert 1 <= len(entries) <= 16
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)


def test_completion_is_llmkit_greedy_generate_with_logprobs_echo_and_n(served, reference):
    url, server = served
    expected, n_tokens = greedy(reference, "ROMEO:", 20, server.eos)
    out = client(url).completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, n=2,
                                         logprobs=2, echo=True)
    assert [ch.text for ch in out.choices] == ["ROMEO:" + expected] * 2
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == n_tokens == len(lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert out.usage.completion_tokens == 2 * n_tokens

    streamed = client(url).completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0,
                                              stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == expected
    tokens = reference[1].encode("ROMEO:")  # a prompt given as token ids
    assert client(url).completions.create(model="tiny", prompt=tokens, max_tokens=20, temperature=0).choices[0].text \
        == expected


def test_stop_strings_cut_the_reply(served, reference):
    url, server = served
    full, _ = greedy(reference, "ROMEO:", 30, server.eos)
    stop = full.strip()[3:6]
    out = client(url).completions.create(model="tiny", prompt="ROMEO:", max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.find(stop)] and out.choices[0].finish_reason == "stop"


def test_embeddings_are_llmkit_embeddings(served, reference):
    url, _ = served
    texts = ["To be, or not to be", "that is the question"]
    expected = llmkit_embeddings(*reference, texts).numpy()
    out = client(url).embeddings.create(model="tiny", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in out.data])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5) and out.usage.prompt_tokens > 0
    raw = httpx.post(url + "/v1/embeddings", json={"input": texts[0], "encoding_format": "float"}).json()
    np.testing.assert_allclose(raw["data"][0]["embedding"], expected[0], atol=1e-5)


def test_response_format_json_schema(served):
    url, _ = served
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reply = client(url).chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert json.loads(reply.choices[0].message.content).keys() == {"ok"}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                   "properties": {"city": {"type": "string", "maxLength": 10},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now"}}
ASK_WEATHER = [{"role": "user", "content": "Rain in Verona?"}]


def assert_weather_call(name: str, arguments: str) -> None:
    import jsonschema

    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """A server whose model takes 2048 tokens: tool descriptions in a 300-token BPE fill hundreds of them."""
    url, thread, server = start(tiny_checkpoint(tmp_path_factory, max_seq_len=2048), max_tokens=200)
    yield url
    thread.stop()
    server.engine.close()


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_choice_returns_tool_calls_whose_arguments_parse(long_context, tool_choice):
    c = client(long_context)
    tools = [WEATHER] if tool_choice == "required" else [CLOCK, WEATHER]
    for seed in range(3):
        reply = c.chat.completions.create(model="tiny", messages=ASK_WEATHER, tools=tools, tool_choice=tool_choice,
                                          max_tokens=160, temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1 and choice.message.tool_calls[0].id.startswith("call_")
        assert_weather_call(choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments)

    chunks = list(c.chat.completions.create(model="tiny", messages=ASK_WEATHER, tools=tools, tool_choice=tool_choice,
                                            max_tokens=160, temperature=1.0, seed=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # the <tool_call> block never leaks out as text
    (call,) = [tc for d in deltas for tc in d.tool_calls or []]
    assert call.index == 0
    assert_weather_call(call.function.name, call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the call and its result go back in the conversation: the template renders both, the server answers
    called = ASK_WEATHER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"rain": true}'}]
    follow = c.chat.completions.create(model="tiny", messages=called, tools=tools, max_tokens=8, temperature=0)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_agents_client_finds_the_served_model_and_sends_tools(long_context):
    from llmkit.prompting.llm import OpenAILLM

    llm = OpenAILLM(long_context + "/v1", concurrency=2)  # no model name: the one GET /v1/models lists
    assert llm.model == "tiny"
    assert [len(s) for s in llm.generate(["Rain?", "Sun?"], n=2, temperature=1.0, max_tokens=4, seed=3)] == [2, 2]
    reply = llm.chat(ASK_WEATHER, tools=[WEATHER, CLOCK], max_tokens=6)
    assert 1 <= reply.completion_tokens <= 6 and reply.prompt_tokens > 100  # the tools are in the prompt


def test_tool_calls_in_free_replies_are_split_out_streamed_or_not():
    from llmkit.serve.tools import ToolCallStream, ToolUse

    reply = 'Let me look.\n<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>'
    use = ToolUse([CLOCK], forced=None, parse=True, parallel=True)
    content, calls = use.split(reply)
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["clock"]
    assert json.loads(calls[0]["function"]["arguments"]) == {}
    assert use.split("no calls here <tool") == ("no calls here <tool", [])
    assert ToolUse([CLOCK], None, parse=False, parallel=True).split(reply) == (reply, [])
    twice = reply + reply[len("Let me look.\n"):]
    assert len(use.split(twice)[1]) == 2
    assert len(ToolUse([CLOCK], None, parse=True, parallel=False).split(twice)[1]) == 1
    for size in (1, 3, 7):  # the tag split across pieces anywhere: no part of it is ever sent as content
        stream = ToolCallStream(use)
        sent = "".join(stream.push(reply[i:i + size]) for i in range(0, len(reply), size))
        assert sent == "Let me look.\n"
        rest, calls = stream.finish()
        assert rest == "" and calls[0]["function"]["name"] == "clock"
    stream = ToolCallStream(use)
    assert stream.push("a <tool") == "a " and stream.push("kit>") == "<toolkit>" and stream.finish() == ("", [])


def test_vllm_guided_decoding_fields_constrain_completions_and_chat(served):
    url, _ = served
    c = client(url)
    pattern = r"[0-9]{3}-[a-z]{2}"
    out = c.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], n=2, max_tokens=12, temperature=1.0,
                               seed=1, extra_body={"guided_regex": pattern})
    assert len(out.choices) == 4 and all(re.fullmatch(pattern, ch.text) for ch in out.choices), out.choices
    chosen = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=1.0, n=3, seed=2,
                                       extra_body={"guided_choice": ["yes", "no", "perchance"]})
    assert {ch.message.content for ch in chosen.choices} <= {"yes", "no", "perchance"}
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    reply = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24,
                                      extra_body={"guided_json": json.dumps(schema)})
    assert 0 <= json.loads(reply.choices[0].message.content)["n"] <= 9


# ----------------------------------------------------------------------------- malformed requests

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
MALFORMED = [
    (CHAT, b'{"messages": [', 400, None),  # malformed JSON
    (CHAT, b"[1, 2]", 400, None),  # JSON, but not an object
    (CHAT, b"", 400, None),
    (CHAT, {"messages": "hello"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": HELLO, "max_tokens": -5}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": 10**9}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {"messages": HELLO, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "temperature": 5}, 400, "temperature"),
    (CHAT, {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": HELLO, "n": 0}, 400, "n"),
    (CHAT, {"messages": HELLO, "n": 99}, 400, "n"),
    (CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"messages": HELLO, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": HELLO, "seed": 2**70}, 400, "seed"),
    (CHAT, {"messages": HELLO, "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    (CHAT, {"messages": HELLO, "logit_bias": {"cat": 5}}, 400, "logit_bias"),
    (CHAT, {"messages": HELLO, "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    (CHAT, {"messages": HELLO, "response_format": {"type": "yaml"}}, 400, "response_format"),
    (CHAT, {"messages": HELLO, "guided_regex": "[a-z]+", "guided_choice": ["a"]}, 400, "guided_regex"),
    (CHAT, {"messages": HELLO, "guided_choice": ["a"], "response_format": {"type": "json_object"}}, 400,
     "guided_choice"),
    (CHAT, {"messages": HELLO, "guided_choice": []}, 400, "guided_choice"),
    (COMPLETIONS, {"prompt": "hi", "guided_regex": "(unclosed"}, 400, "guided_regex"),
    (COMPLETIONS, {"prompt": "hi", "guided_regex": "[^\\s\\S]"}, 400, "guided_regex"),  # matches nothing
    (CHAT, {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": "x"}}, 400,
     "response_format"),
    (CHAT, {"messages": HELLO, "logit_bias": {"\u00b2": 5}}, 400, "logit_bias"),  # "²".isdigit() is True
    (COMPLETIONS, {"prompt": "hi", "guided_json": {"type": "frobnicate"}}, 400, "guided_json"),
    (CHAT, {"messages": HELLO, "tool_choice": "required"}, 400, "tool_choice"),  # no tools
    (CHAT, {"messages": HELLO, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     400, "tool_choice"),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    (CHAT, {"messages": HELLO, "tools": [WEATHER, WEATHER]}, 400, "tools"),
    (CHAT, {"messages": HELLO, "tools": [WEATHER], "tool_choice": "required",
            "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    (CHAT, {"messages": [{"role": "user", "content": "thou art " * 400}]}, 400, "messages"),  # > context
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "model": "tiny"}, 200, None),
    (CHAT, {"messages": [{"role": "user", "content": "thou " * 100}], "max_tokens": 200}, 400, "messages"),
    (COMPLETIONS, {"prompt": 42}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    (COMPLETIONS, {"max_tokens": 5}, 400, "prompt"),
    (EMBEDDINGS, {"input": []}, 400, "input"),
    (EMBEDDINGS, {"input": "hi", "encoding_format": "hex"}, 400, "encoding_format"),
    (CHAT, b'{"messages": "' + b"x" * 30_000 + b'"}', 413, None),  # over max_body_bytes
]


@pytest.mark.parametrize("path, body, status, param", MALFORMED,
                         ids=[f"{i}-{m[0].rsplit('/', 1)[1]}-{m[2]}" for i, m in enumerate(MALFORMED)])
def test_malformed_request_gets_an_openai_error_naming_the_field(served, path, body, status, param):
    url, _ = served
    if isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(url + path, json=body)
    if status == 200:  # the boundary case: prompt + max_tokens just fits the context
        assert response.status_code == 200, response.text
    else:
        assert_error(response, status, param)
    assert httpx.get(url + "/health").status_code == 200  # the server keeps serving


def test_a_chunked_body_over_the_cap_gets_413(served):
    url, _ = served

    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    assert_error(httpx.post(url + CHAT, content=chunks(), headers={"Content-Type": "application/json"}), 413)


def test_an_internal_error_is_a_500_without_a_traceback(served, monkeypatch, caplog):
    url, server = served
    monkeypatch.setattr(server, "render", lambda messages, tools=None: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="llmkit.serve"):
        error = assert_error(httpx.post(url + CHAT, json={"messages": HELLO}), 500)
    assert error == {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    assert "ZeroDivisionError" in caplog.text  # the trace is in the server's log, not the client's reply
    monkeypatch.undo()
    assert httpx.post(url + CHAT, json={"messages": HELLO, "max_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------- auth and rate limits


@pytest.fixture(scope="module")
def guarded(checkpoint):
    url, thread, server = start(checkpoint, api_keys=(KEY, OTHER_KEY), rate_limit=60, rate_burst=3)
    yield url, server
    thread.stop()
    server.engine.close()


def test_api_key_is_required_when_set_and_never_logged(guarded, caplog):
    url, _ = guarded
    with caplog.at_level(logging.DEBUG):
        assert_error(httpx.get(url + "/v1/models"), 401)
        assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"}), 401)
        assert_error(httpx.post(url + CHAT, content=b"{bad", headers={"Authorization": "Basic " + KEY}), 401)
        with pytest.raises(openai.AuthenticationError):
            client(url, "sk-wrong").models.list()
        assert [m.id for m in client(url, KEY).models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
    assert KEY not in caplog.text


def test_rate_limit_is_per_key_with_retry_after(guarded):
    url, _ = guarded
    auth = {"Authorization": f"Bearer {OTHER_KEY}"}
    statuses = [httpx.get(url + "/v1/models", headers=auth).status_code for _ in range(5)]
    assert statuses[:2] == [200, 200] and statuses[-1] == 429
    limited = httpx.get(url + "/v1/models", headers=auth)
    assert_error(limited, 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# ----------------------------------------------------------------------------- queue and disconnects


@pytest.fixture(scope="module")
def slow(checkpoint):
    """One request decodes at a time, one may wait, and each engine step takes 20 ms."""
    url, thread, server = start(checkpoint, engine_step_delay=0.02, max_tokens=200,
                                engine_kwargs=dict(max_batch_size=1, max_waiting=1))
    yield url, server
    thread.stop()
    server.engine.close()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_429_with_retry_after(slow):
    url, server = slow
    body = {"messages": HELLO, "max_tokens": 60}
    # the running request would take 3 s or more: ample time to queue one behind it (it is cancelled on close)
    with httpx.stream("POST", url + CHAT, json=body | {"stream": True, "max_tokens": 150}) as running:
        lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
        next(lines)  # the role chunk: the request is submitted
        wait_for(lambda: server.engine.stats().running == 1)
        waiting = threading.Thread(target=httpx.post, args=(url + CHAT,), kwargs=dict(json=body, timeout=60))
        waiting.start()
        wait_for(lambda: server.engine.stats().waiting == 1)
        rejected = httpx.post(url + CHAT, json=body)
        assert_error(rejected, 429)
        assert int(rejected.headers["Retry-After"]) >= 1
    waiting.join()
    assert httpx.post(url + CHAT, json=body | {"max_tokens": 2}).status_code == 200


def cancelled(server) -> int:
    return server.metrics.finished.get("cancelled", 0)


def test_client_disconnect_cancels_its_request(slow):
    url, server = slow
    before, engine_before = cancelled(server), server.engine.stats()
    with httpx.stream("POST", url + CHAT, json={"messages": HELLO, "max_tokens": 200, "stream": True}) as r:
        lines = r.iter_lines()
        while '"content": ""' not in next(lines):  # past the role chunk
            pass
    wait_for(lambda: cancelled(server) == before + 1 and server.engine.stats().running == 0)
    stats = server.engine.stats()
    assert stats.tokens_generated_total - engine_before.tokens_generated_total < 100  # stopped early
    assert stats.kv_blocks_used == 0

    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(url + CHAT, json={"messages": HELLO, "max_tokens": 200}, timeout=0.3)
    wait_for(lambda: cancelled(server) == before + 2 and server.engine.stats().running == 0)


# ----------------------------------------------------------------------------- metrics, CLI, retrieval


def test_metrics_are_prometheus_text(served):
    url, _ = served
    long_turn = [{"role": "user", "content": "Good morrow, what news from Verona, and what of Romeo? " * 2}]
    for _ in range(2):  # the second request reuses the first one's prompt blocks
        client(url).chat.completions.create(model="tiny", messages=long_turn, max_tokens=4)
    response = httpx.get(url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = dict(re.findall(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", response.text, re.M))
    assert float(samples['llmkit_requests_total{endpoint="/v1/chat/completions",status="200"}']) >= 1
    assert float(samples["llmkit_generation_tokens_total"]) >= 4 and float(samples["llmkit_prompt_tokens_total"]) > 0
    assert float(samples['llmkit_request_latency_seconds_count{endpoint="/v1/chat/completions"}']) >= 1
    assert float(samples["llmkit_time_to_first_token_seconds_count"]) >= 1
    assert samples["llmkit_queue_length"] == "0" and float(samples["llmkit_kv_cache_blocks_total"]) > 0
    assert 0 <= float(samples["llmkit_kv_cache_usage_ratio"]) <= 1
    assert 16 <= float(samples["llmkit_prefix_cache_hits_total"]) < float(samples["llmkit_prefix_cache_queries_total"])
    for family in ("llmkit_running_requests", "llmkit_engine_preemptions_total", "llmkit_kv_cache_blocks_cached"):
        assert f"# TYPE {family} " in response.text


def test_chat_cli_talks_to_a_running_server(served, reference, capsys):
    from llmkit import cli

    url, server = served
    _, tok = reference
    lines = iter(["Good morrow, what news?"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = cli.chat_parser().parse_args(["--url", url, "--max-new-tokens", "12", "--temperature", "0"])
    cli.run_chat(args, read=read)
    expected, _ = greedy(reference, tok.apply_chat_template(HELLO, add_generation_prompt=True), 12, server.eos)
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(ValueError, match="exactly one of"):
        cli.run_chat(cli.chat_parser().parse_args([]), read=read)


@pytest.fixture(scope="module")
def rag_index(checkpoint, tmp_path_factory) -> Path:
    """A Milvus Lite index of four short documents, embedded by the served checkpoint itself."""
    from test_rag_answer import DOCS

    from llmkit.rag.index import build_index

    path = tmp_path_factory.mktemp("rag") / "docs.db"
    build_index(DOCS, path, embedder=f"llmkit:{checkpoint}")
    return path


def test_rag_grounds_chat_and_returns_citations(checkpoint, rag_index):
    from llmkit.rag.answer import Citation, map_citations
    from llmkit.rag.index import Index

    with Index.open(rag_index) as index:
        url, thread, server = start(checkpoint, index=index, rag_k=2, rag_min_score=-1)
        try:
            question = [{"role": "user", "content": "Who discovered oxygen?"}]
            reply = httpx.post(url + CHAT, json={"messages": question, "max_tokens": 8}, timeout=60).json()
            passages = reply["passages"]
            assert 1 <= len(passages) <= 2 and passages[0]["n"] == 1 and passages[0]["doc_id"]
            text = reply["choices"][0]["message"]["content"]
            expected = map_citations(text, [Citation(**p) for p in passages])[0]
            assert [c["n"] for c in reply["citations"]] == [c.n for c in expected]
            with httpx.stream("POST", url + CHAT, json={"messages": question, "max_tokens": 8, "stream": True}) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert events[-1]["passages"] == passages and "citations" in events[-1]
            no_question = httpx.post(url + CHAT, json={"messages": [{"role": "system", "content": "Be brief."}]})
            assert_error(no_question, 400, "messages")
        finally:
            thread.stop()
            server.engine.close()


def test_serve_command_opens_the_rag_index_and_reads_the_env_key(checkpoint, rag_index, monkeypatch):
    """`llmkit serve --rag INDEX` in-process: uvicorn.run is replaced by a test client on the app it gets."""
    import uvicorn
    from fastapi.testclient import TestClient

    from llmkit.cli import main

    replies = []

    def run(app, **kwargs):
        assert kwargs["host"] == "127.0.0.1"
        with TestClient(app) as c:
            replies.append(c.post(CHAT, json={"messages": HELLO}))
            replies.append(c.post(CHAT, json={"messages": HELLO, "max_tokens": 4},
                                  headers={"Authorization": f"Bearer {KEY}"}))

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setenv("LLMKIT_API_KEY", KEY)
    assert main(["serve", "--model", str(checkpoint), "--rag", str(rag_index), "--rag-min-score", "-1"]) == 0
    assert replies[0].status_code == 401 and replies[1].status_code == 200
    assert replies[1].json()["passages"] and "citations" in replies[1].json()


def test_serve_command_runs_as_a_process(checkpoint):
    """`llmkit serve` as users run it, with the key from $LLMKIT_API_KEY."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llmkit", "serve", "--model", str(checkpoint), "--port", str(port),
           "--kv-cache-dtype", "int8", "--max-prefill-tokens", "64", "--no-prefix-caching"]  # the engine options
    server = subprocess.Popen(cmd, env={**os.environ, "LLMKIT_API_KEY": KEY}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=60)
        assert_error(httpx.post(url + CHAT, json={"messages": HELLO}), 401)
        reply = client(url, KEY).chat.completions.create(model="tiny", max_tokens=4, messages=HELLO)
        assert reply.usage.completion_tokens == 4
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Uvicorn running" in err or "llmkit serve: tiny" in err
    assert KEY not in err and "Traceback" not in err


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_token_bucket_and_key_matching():
    from llmkit.serve.security import ApiKeys, RateLimiter

    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert limiter.take("a") is None and limiter.take("a") is None
    assert limiter.take("a") == pytest.approx(1.0) and limiter.take("b") is None  # buckets are per client
    now[0] = 1.0  # one second refills one request
    assert limiter.take("a") is None and limiter.take("a") is not None
    keys = ApiKeys([KEY, OTHER_KEY, ""])
    assert keys.match(f"Bearer {OTHER_KEY}") == OTHER_KEY and keys.match(f"bearer {KEY}") == KEY
    assert keys.match(KEY) is None and keys.match(f"Basic {KEY}") is None and keys.match(None) is None
    assert not ApiKeys([""]).enabled


def test_api_keys_from_flag_env_and_file(tmp_path, monkeypatch):
    from llmkit.serve.commands import api_keys, serve_parser

    (tmp_path / "keys.txt").write_text(f"{KEY}\n\n{OTHER_KEY}\n")
    monkeypatch.setenv("LLMKIT_API_KEY", "from-env")
    parse = lambda *argv: serve_parser().parse_args(["--model", "m", *argv])  # noqa: E731
    assert api_keys(parse()) == ("from-env",)
    assert api_keys(parse("--api-key", "flag", "--api-key-file", str(tmp_path / "keys.txt"))) == ("flag", KEY,
                                                                                                    OTHER_KEY)
    monkeypatch.delenv("LLMKIT_API_KEY")
    assert api_keys(parse()) == ()
    with pytest.raises(FileNotFoundError, match="keys.txt"):
        api_keys(parse("--api-key-file", str(tmp_path / "missing" / "keys.txt")))
