"""The model behind a prompting strategy or an agent: a local llmkit checkpoint or any OpenAI-compatible endpoint.

Both answer `generate(prompts, n=..., temperature=...) -> [[text] * n] per prompt`, where a prompt is plain text
(completed as is) or a list of chat messages (rendered with the model's chat template, or sent to
/chat/completions), and `chat(messages, tools=...) -> Reply` for tool calling:

    llm = LocalLLM(*llmkit.load("ckpt"))                               # batched on the local model
    llm = OpenAILLM("http://localhost:8000/v1", concurrency=8)        # at most 8 requests in flight
    llm.generate(["Q: 2+2?\\nA:"], n=5, temperature=0.7, stop=["\\n"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

Prompt = Union[str, list[dict]]
MAX_STOP = 4  # stop strings an OpenAI request may carry


class LLMError(ValueError):
    """An endpoint that failed or answered in an unexpected shape; the message names the URL (a ValueError, so
    the CLI reports it in one line)."""


@dataclass
class Reply:
    """One chat reply: its text, the tool calls it made (OpenAI's shape) and how many tokens it took."""

    content: str
    tool_calls: list[dict] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    errors: list[str] = field(default_factory=list)  # malformed tool calls, reported by parse_tool_calls


class LLM(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.0, max_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int | None = None) -> list[list[str]]: ...

    def chat(self, messages: list[dict], *, tools: Sequence[dict] | None = None, temperature: float = 0.0,
             max_tokens: int = 256, stop: Sequence[str] = (), seed: int | None = None) -> Reply: ...

    def count_tokens(self, text: str) -> int: ...


class LocalLLM:
    """An llmkit model and tokenizer; prompts × samples run in batches of `batch_size` rows."""

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "llmkit"):
        self.model, self.tokenizer, self.batch_size, self.name = model.eval(), tokenizer, batch_size, name

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def render(self, prompt: Prompt, tools: Sequence[dict] | None = None) -> str:
        if isinstance(prompt, str):
            return prompt
        from llmkit.agents.tools import as_plain_messages, render_chat

        if self.tokenizer.chat_template:
            return render_chat(self.tokenizer, prompt, tools)
        # no chat template: the messages as plain text, then the assistant's turn
        lines = [f"{m['role']}: {m['content']}" for m in as_plain_messages(prompt, tools)]
        return "\n\n".join(lines) + "\n\nassistant:"

    def _config(self, temperature: float, max_tokens: int, stop: Sequence[str], seed: int | None,
                processors: tuple = ()):
        from llmkit.infer.generate import GenerationConfig
        from llmkit.infer.sampling import SamplingParams
        from llmkit.prompting.structured import default_stop_ids

        return GenerationConfig(max_new_tokens=max_tokens, eos_token_ids=tuple(default_stop_ids(self.tokenizer)),
                                stop=tuple(stop), logits_processors=processors,
                                sampling=SamplingParams(temperature=temperature, seed=seed))

    def complete_texts(self, texts: list[str], gen) -> list[tuple[str, int]]:
        """(completion, generated token count) per text, in batches."""
        from llmkit.infer.generate import generate

        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        stops = set(gen.eos_token_ids)
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [self.tokenizer.encode(t) for t in texts[start:start + self.batch_size]]
            seed = gen.sampling.seed
            batch_gen = gen if seed is None else dataclasses.replace(
                gen, sampling=dataclasses.replace(gen.sampling, seed=seed + start))  # fresh noise per batch
            for row in generate(self.model, chunk, batch_gen, pad):
                text = self.tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True)
                cuts = [text.find(s) for s in gen.stop if s and s in text]
                out.append((text[:min(cuts)] if cuts else text, len(row)))
        return out

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.0, max_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int | None = None) -> list[list[str]]:
        texts = [self.render(p) for p in prompts for _ in range(n)]
        done = self.complete_texts(texts, self._config(temperature, max_tokens, stop, seed))
        return [[text for text, _ in done[i * n:(i + 1) * n]] for i in range(len(prompts))]

    def chat(self, messages: list[dict], *, tools: Sequence[dict] | None = None, temperature: float = 0.0,
             max_tokens: int = 256, stop: Sequence[str] = (), seed: int | None = None,
             logits_processor: Callable | None = None) -> Reply:
        from llmkit.agents.tools import parse_tool_calls

        prompt = self.render(messages, tools)
        processors = (logits_processor,) if logits_processor else ()
        gen = self._config(temperature, max_tokens, stop, seed, processors)
        [(text, n_tokens)] = self.complete_texts([prompt], gen)
        errors: list[str] = []
        content, calls = parse_tool_calls(text, errors=errors) if tools else (text, [])
        return Reply(content, calls, n_tokens, self.count_tokens(prompt), errors)


class OpenAILLM:
    """Any OpenAI-compatible endpoint through the `openai` client, at most `concurrency` requests in flight.

    Chat prompts go to /chat/completions; plain-text prompts too (as one user message) unless `chat=False`,
    which sends them to /completions (base models). `n` samples are `n` requests (many servers ignore `n`),
    sample i seeded with seed + i. Token counts without a tokenizer are estimated as 4 characters a token.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 chat: bool = True, timeout: float = 300.0, count_tokens: Callable[[str], int] | None = None):
        import openai

        if not base_url.startswith(("http://", "https://")):
            raise LLMError(f"--base-url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1:
            raise LLMError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url, self.concurrency, self.use_chat = base_url.rstrip("/"), concurrency, chat
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        self._model = model
        self.name = f"openai:{model or 'auto'}"
        self._count = count_tokens

    @property
    def model(self) -> str:
        """The model name requests carry: the one given, else the first the endpoint lists (asked once), as servers
        such as llmkit serve and vLLM refuse names they do not serve."""
        if self._model is None:
            listed = self._call(lambda: self.client.models.list().data, "/models")
            if not listed:
                raise LLMError(f"{self.base_url}/models lists no model; give the model name")
            self._model = listed[0].id
        return self._model

    def count_tokens(self, text: str) -> int:
        return self._count(text) if self._count else (len(text) + 3) // 4

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        import openai

        try:
            return fn()
        except openai.APIStatusError as e:
            raise LLMError(f"{self.base_url}{what}: HTTP {e.status_code}: {str(e.message)[:300]}") from None
        except openai.APIError as e:
            raise LLMError(f"{self.base_url}{what}: {e}") from None

    def _one(self, prompt: Prompt, temperature: float, max_tokens: int, stop: Sequence[str], seed: int | None) -> str:
        # OpenAI takes at most 4 stop strings; any others are applied here
        params = dict(model=self.model, temperature=temperature, max_tokens=max_tokens,
                      stop=list(stop)[:MAX_STOP] or None, seed=seed)
        if isinstance(prompt, str) and not self.use_chat:
            out = self._call(lambda: self.client.completions.create(prompt=prompt, **params), "/completions")
            text = out.choices[0].text or ""
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            out = self._call(lambda: self.client.chat.completions.create(messages=messages, **params),
                             "/chat/completions")
            text = out.choices[0].message.content or ""
        cuts = [text.find(s) for s in stop if s and s in text]
        return text[:min(cuts)] if cuts else text

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.0, max_tokens: int = 256,
                 stop: Sequence[str] = (), seed: int | None = None) -> list[list[str]]:
        jobs = [(p, None if seed is None else seed + i) for p in prompts for i in range(n)]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            texts = list(pool.map(lambda job: self._one(job[0], temperature, max_tokens, stop, job[1]), jobs))
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def chat(self, messages: list[dict], *, tools: Sequence[dict] | None = None, temperature: float = 0.0,
             max_tokens: int = 256, stop: Sequence[str] = (), seed: int | None = None) -> Reply:
        from llmkit.agents.tools import parse_tool_calls, tool_spec

        params: dict[str, Any] = dict(model=self.model, messages=messages, temperature=temperature,
                                      max_tokens=max_tokens, stop=list(stop)[:MAX_STOP] or None, seed=seed)
        if tools:
            params["tools"] = [tool_spec(t) for t in tools]
        out = self._call(lambda: self.client.chat.completions.create(**params), "/chat/completions")
        message = out.choices[0].message
        calls = [c.model_dump() for c in (message.tool_calls or [])]
        errors: list[str] = []
        content = message.content or ""
        if tools and "<tool_call>" in content:  # a server that passes the model's own format through
            content, parsed = parse_tool_calls(content, errors=errors)
            calls += parsed
        usage = out.usage
        return Reply(content, calls, usage.completion_tokens if usage else self.count_tokens(content),
                     usage.prompt_tokens if usage else 0, errors)
