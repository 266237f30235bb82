"""Grounded answers: retrieve, pack numbered passages into a token budget, ask a model to cite them as [n],
map the citations back to their sources.

    gen = LocalGenerator(*llmkit.load("ckpt"))            # or OpenAIGenerator(base_url, model)
    with Index.open("docs.db") as index:
        a = answer_question(index, "who discovered oxygen?", gen)
        a.text, [(c.n, c.source, c.page) for c in a.citations]

When the best passage's cosine similarity to the question is below `min_score`, the answer is
NOT_FOUND and no model is called. `ground_messages` does the retrieval half for a chat server: it returns
the messages with the passages added and the citation list, for `map_citations` on the reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from llmkit.rag.errors import RagError

NOT_FOUND = "Not found in the documents."
SYSTEM_PROMPT = ("Answer the question using only the numbered passages. After each statement, cite the "
                 f"passages it comes from as [n], e.g. [1] or [2][3]. If the passages do not contain the "
                 f"answer, reply exactly: {NOT_FOUND}")
NO_CONTEXT_PROMPT = f"No passage of the documents is relevant to the question. Reply exactly: {NOT_FOUND}"
_CITE = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")


@dataclass
class Citation:
    n: int  # the passage number the model saw
    doc_id: str
    source: str
    title: str = ""
    page: int | None = None
    start: int = 0  # character offsets of the passage in its document
    end: int = 0
    text: str = ""
    score: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    question: str
    text: str
    citations: list[Citation] = field(default_factory=list)  # the passages the answer cites, in order
    passages: list[Citation] = field(default_factory=list)  # every passage given to the model
    found: bool = True
    cached: bool = False
    invalid_citations: list[int] = field(default_factory=list)  # [n] with no passage n

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- generators


class LocalGenerator:
    """An llmkit model: the chat template when the tokenizer has one, else a plain prompt."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.0, seed: int | None = None,
                 name: str = "llmkit"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.context = getattr(model.config, "max_seq_len", None)  # prompt + answer must fit in it

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def render(self, messages: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        parts = [m["content"] for m in messages if m["role"] != "assistant"]
        return "\n\n".join(parts) + "\nAnswer:"

    def _gen(self):
        from llmkit.infer.generate import GenerationConfig
        from llmkit.infer.sampling import SamplingParams

        eos = [t for t in (self.tokenizer.eos_id, self.tokenizer.token_to_id("<|im_end|>")) if t is not None]
        return GenerationConfig(max_new_tokens=self.max_new_tokens, eos_token_ids=tuple(eos),
                                sampling=SamplingParams(temperature=self.temperature, seed=self.seed))

    def complete(self, messages: list[dict]) -> str:
        from llmkit.infer.generate import generate_text

        return generate_text(self.model, self.tokenizer, [self.render(messages)], self._gen())[0]

    def stream(self, messages: list[dict]) -> Iterator[str]:
        from llmkit.infer.generate import stream_text

        yield from stream_text(self.model, self.tokenizer, self.render(messages), self._gen())


class OpenAIGenerator:
    """Any OpenAI-compatible chat completions endpoint. Token counts are estimated (4 characters a token)
    unless `count_tokens` is given."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, count_tokens: Callable[[str], int] | None = None,
                 context: int | None = None):
        from llmkit.rag.openai import OpenAIClient

        self.client, self.model, self.name = OpenAIClient(base_url, api_key), model, f"openai:{model}"
        self.max_new_tokens, self.temperature, self.context = max_new_tokens, temperature, context
        self._count = count_tokens

    def count_tokens(self, text: str) -> int:
        return self._count(text) if self._count else (len(text) + 3) // 4

    def render(self, messages: list[dict]) -> str:
        return "\n\n".join(m["content"] for m in messages)

    def complete(self, messages: list[dict]) -> str:
        return self.client.chat(self.model, messages, max_tokens=self.max_new_tokens, temperature=self.temperature)

    def stream(self, messages: list[dict]) -> Iterator[str]:
        yield from self.client.chat_stream(self.model, messages, max_tokens=self.max_new_tokens,
                                           temperature=self.temperature)


# ----------------------------------------------------------------------------- prompt building


def format_passage(n: int, hit) -> str:
    where = " ".join(x for x in (hit.title.replace("_", " "), f"(page {hit.page})" if hit.page else "",
                                 f"- {hit.heading}" if hit.heading else "") if x)
    return f"[{n}] {where}\n{hit.text}" if where else f"[{n}]\n{hit.text}"


def pack_passages(hits: Sequence, budget: int, count_tokens: Callable[[str], int]) -> list[tuple[object, str]]:
    """Passages in rank order while their rendered text fits in `budget` tokens (a passage that does not
    fit is skipped, a shorter one after it may still fit). The first passage is cut to fit rather than
    dropped, so a tight budget still gets the best passage. Returns [(hit, rendered text)], numbered 1..n."""
    out: list[tuple[object, str]] = []
    used = 0
    for hit in hits:
        text = format_passage(len(out) + 1, hit)
        n = count_tokens(text) + 1  # + the blank line between passages
        if used + n <= budget:
            out.append((hit, text))
            used += n
        elif not out:
            text = _cut_to_fit(text, budget - 1, count_tokens)
            if text:
                out.append((hit, text))
                used += count_tokens(text) + 1
    return out


def _cut_to_fit(text: str, budget: int, count_tokens: Callable[[str], int]) -> str:
    if budget <= 0:
        return ""
    lo, hi = 0, len(text)  # longest prefix that fits: binary search on characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def build_messages(question: str, passages: Sequence[str], system: str = SYSTEM_PROMPT) -> list[dict]:
    block = "\n\n".join(passages)
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Passages:\n\n{block}\n\nQuestion: {question}"}]


def prompt_budget(generator, question: str, budget: int) -> int:
    """The passage budget, shrunk when the model's context cannot hold budget + prompt + answer."""
    context = getattr(generator, "context", None)
    if not context:
        return budget
    overhead = generator.count_tokens(generator.render(build_messages(question, [])))
    room = context - overhead - generator.max_new_tokens
    if room <= 0:
        raise RagError(f"the model's context ({context} tokens) cannot hold the prompt ({overhead}) and "
                       f"{generator.max_new_tokens} new tokens; lower --max-new-tokens")
    return min(budget, room)


def citation_of(n: int, hit) -> Citation:
    return Citation(n=n, doc_id=hit.doc_id, source=hit.source, title=hit.title, page=hit.page, start=hit.start,
                    end=hit.end, text=hit.text, score=float(hit.score))


def map_citations(text: str, passages: Sequence[Citation]) -> tuple[list[Citation], list[int]]:
    """The passages `text` cites as [n] (also [n, m] and [n][m]), in order of first citation, and the
    numbers that name no passage."""
    by_n = {c.n: c for c in passages}
    cited, invalid = [], []
    for m in _CITE.finditer(text):
        for part in re.split(r"\s*[,;]\s*", m.group(1)):
            n = int(part)
            if n in by_n:
                if by_n[n] not in cited:
                    cited.append(by_n[n])
            elif n not in invalid:
                invalid.append(n)
    return cited, invalid


def is_not_found(text: str) -> bool:
    return NOT_FOUND.lower().rstrip(".") in text.lower()


# ----------------------------------------------------------------------------- answering


def retrieve_passages(index, question: str, generator, k: int = 5, budget: int = 1536, min_score: float = 0.3,
                      query_vector=None, **search) -> tuple[list[dict], list[Citation], bool]:
    """(messages, passages, found). found is False when no hit reaches `min_score` (cosine)."""
    hits = index.search(question, k=k, query_vectors=query_vector, **search)
    if not hits or max(h.dense_score for h in hits) < min_score:
        return build_messages(question, [], NO_CONTEXT_PROMPT), [], False
    packed = pack_passages(hits, prompt_budget(generator, question, budget), generator.count_tokens)
    passages = [citation_of(n, hit) for n, (hit, _) in enumerate(packed, 1)]
    return build_messages(question, [text for _, text in packed]), passages, True


def _finish(question: str, text: str, passages: list[Citation], found: bool) -> Answer:
    if not found:
        return Answer(question, NOT_FOUND, [], passages, found=False)
    if is_not_found(text):
        return Answer(question, text.strip(), [], passages, found=False)
    cited, invalid = map_citations(text, passages)
    return Answer(question, text.strip(), cited, passages, found=True, invalid_citations=invalid)


def _cache_key(index, generator) -> str:
    return f"{index.location.uri}|{index.location.collection}|rev{index.revision}|{getattr(generator, 'name', '')}"


def answer_question(index, question: str, generator, *, k: int = 5, budget: int = 1536, min_score: float = 0.3,
                    cache=None, **search) -> Answer:
    """Retrieve, pack, generate, map citations. With a SemanticCache, a question close enough to an earlier
    one (same index revision and model) returns the earlier answer without retrieval or generation."""
    stream = stream_answer(index, question, generator, k=k, budget=budget, min_score=min_score, cache=cache,
                           _stream=False, **search)
    for _ in stream:
        pass
    return stream.answer


class AnswerStream:
    """Iterate for the answer's text deltas; `.answer` holds the whole Answer once iteration is over."""

    def __init__(self, deltas: Iterator[str]):
        self._deltas = deltas
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._deltas


def stream_answer(index, question: str, generator, *, k: int = 5, budget: int = 1536, min_score: float = 0.3,
                  cache=None, _stream: bool = True, **search) -> AnswerStream:
    if not question.strip():
        raise RagError("the question is empty")
    holder: AnswerStream

    def run() -> Iterator[str]:
        qv = index.embed_queries([question])
        namespace = _cache_key(index, generator)
        if cache is not None:
            entry = cache.lookup(qv[0], namespace=namespace)
            if entry is not None:
                answer = _answer_from_dict(entry)
                answer.cached, answer.question = True, question
                holder.answer = answer
                yield answer.text
                return
        messages, passages, found = retrieve_passages(index, question, generator, k, budget, min_score,
                                                      query_vector=qv, **search)
        parts: list[str] = []
        if not found:
            parts.append(NOT_FOUND)
            yield NOT_FOUND
        elif _stream:
            for delta in generator.stream(messages):
                parts.append(delta)
                yield delta
        else:
            parts.append(generator.complete(messages))
        answer = _finish(question, "".join(parts), passages, found)
        holder.answer = answer
        if cache is not None:
            cache.store(qv[0], question, answer.to_dict(), namespace=namespace)

    holder = AnswerStream(run())
    return holder


def _answer_from_dict(d: dict) -> Answer:
    d = dict(d)
    d["citations"] = [Citation(**c) for c in d.get("citations", [])]
    d["passages"] = [Citation(**c) for c in d.get("passages", [])]
    return Answer(**d)


def ground_messages(index, messages: list[dict], *, k: int = 5, budget: int = 1536, min_score: float = 0.3,
                    count_tokens: Callable[[str], int] | None = None, **search) -> tuple[list[dict], list[Citation]]:
    """For `llmkit serve --rag INDEX`: the chat messages with the passages retrieved for the last user
    message added to the system message, and the numbered citations (map the reply's [n] with
    `map_citations(reply, citations)`). With no relevant passage, the system message asks for NOT_FOUND and
    the citation list is empty. The input list is not modified."""
    count = count_tokens or (lambda text: (len(text) + 3) // 4)
    question = _last_user_text(messages)
    if question is None:
        raise RagError("grounding needs a user message with text content")
    hits = index.search(question, k=k, **search) if question.strip() else []
    if not hits or max(h.dense_score for h in hits) < min_score:
        system, citations = NO_CONTEXT_PROMPT, []
    else:
        packed = pack_passages(hits, budget, count)
        citations = [citation_of(n, hit) for n, (hit, _) in enumerate(packed, 1)]
        system = SYSTEM_PROMPT + "\n\nPassages:\n\n" + "\n\n".join(text for _, text in packed)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = out[0]["content"] + "\n\n" + system
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, citations


def _last_user_text(messages: list[dict]) -> str | None:
    for m in reversed(messages):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # OpenAI content parts
            return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return None
