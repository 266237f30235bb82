"""Cited answers: citation mapping, token budgets, the not-found path, streaming, a scripted OpenAI-compatible
endpoint, a tiny local model, the semantic cache, and grounding for the server."""

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.rag.answer import (NO_CONTEXT_PROMPT, NOT_FOUND, Citation, LocalGenerator, OpenAIGenerator,
                               answer_question, ground_messages, map_citations, pack_passages, stream_answer)
from llmkit.rag.cache import SemanticCache
from llmkit.rag.embed import Embedder, load_embedder
from llmkit.rag.errors import RagError
from llmkit.rag.index import Hit, Index, build_index
from llmkit.rag.ingest import Document
from llmkit.tokenizer import CHAT_TEMPLATES, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DOCS = [
    Document("oxygen", "Oxygen was discovered by Carl Wilhelm Scheele in Uppsala in 1773.", "chem/oxygen.txt",
             "Oxygen"),
    Document("priestley", "Joseph Priestley published his discovery of oxygen in 1774 in Wiltshire.",
             "chem/priestley.pdf", "Priestley", page_starts=[0]),
    Document("nile", "The Nile is a major north-flowing river in northeastern Africa.", "geo/nile.txt", "Nile"),
    Document("tea", "Green tea is brewed at 80 degrees for two minutes.", "food/tea.md", "Tea"),
]



def hash_vectors(texts, dim=64):
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().replace("?", " ").replace(".", " ").replace(",", " ").split():
            out[i, zlib.crc32(w.encode()) % dim] += 1.0
    return out + 1e-3


class HashEmbedder(Embedder):
    kind, name, spec, dim, fingerprint = "test", "test:hash", "test:hash", 64, ""

    def _embed_batch(self, texts):
        return hash_vectors(texts)


class Endpoint(BaseHTTPRequestHandler):
    """A scripted OpenAI-compatible server: /v1/embeddings (hashed words) and /v1/chat/completions
    (replies with `server.reply`, streamed word by word when asked)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body, self.headers.get("Authorization")))
        if self.path == "/v1/embeddings":
            vectors = hash_vectors(body["input"], 32)
            return self._json({"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]})
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        reply = self.server.reply
        if not body.get("stream"):
            return self._json({"choices": [{"message": {"role": "assistant", "content": reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in reply.split(" "):
            event = {"choices": [{"delta": {"content": piece + " "}}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.requests, server.reply = [], ""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def chats(server):
    return [body for path, body, _ in server.requests if path == "/v1/chat/completions"]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("ans") / "a.db"
    build_index(DOCS, path, embedder=HashEmbedder())
    with Index.open(path, embedder=HashEmbedder()) as ix:
        yield ix


def hit(doc_id, text, score=1.0, **kw):
    return Hit(pk=doc_id, doc_id=doc_id, text=text, score=score, source=f"{doc_id}.txt", title=doc_id.title(),
               dense_score=score, **kw)


# ----------------------------------------------------------------------------- pieces


def test_citations_map_to_passages():
    passages = [Citation(n, f"d{n}", f"s{n}.txt") for n in (1, 2, 3)]
    cited, invalid = map_citations("A [2]. B [1, 3] and again [2][9]; C [3; 1].", passages)
    assert [c.n for c in cited] == [2, 1, 3] and invalid == [9]
    assert map_citations("no citations here", passages) == ([], [])


def test_passages_are_packed_into_the_token_budget():
    count = lambda text: len(text.split())  # noqa: E731 - one token per word keeps the arithmetic visible
    hits = [hit("a", "w " * 30), hit("b", "w " * 80), hit("c", "w " * 10), hit("d", "w " * 5)]
    packed = pack_passages(hits, 60, count)
    assert [h.doc_id for h, _ in packed] == ["a", "c", "d"]  # b does not fit, smaller ones after it do
    assert sum(count(t) + 1 for _, t in packed) <= 60
    assert [t.split("\n")[0].split()[0] for _, t in packed] == ["[1]", "[2]", "[3]"]  # renumbered densely
    (only,) = pack_passages([hit("big", "w " * 500, page=3)], 40, count)
    assert count(only[1]) <= 39 and only[1].startswith("[1] Big (page 3)")  # the best passage is cut, not lost
    assert pack_passages(hits, 0, count) == []


# ----------------------------------------------------------------------------- answering via an endpoint


def test_answer_cites_sources_through_a_scripted_endpoint(index, endpoint):
    endpoint.reply = "Scheele found it in 1773 [1], Priestley published in 1774 [2] [7]."
    gen = OpenAIGenerator(f"http://127.0.0.1:{endpoint.server_port}/v1", "scripted", api_key="sk-test")
    before = len(chats(endpoint))
    answer = answer_question(index, "Who discovered oxygen?", gen, k=2, min_score=0.1, mode="bm25")
    assert answer.found and answer.text == endpoint.reply
    assert [(c.n, c.doc_id) for c in answer.citations] == [(p.n, p.doc_id) for p in answer.passages[:2]]
    assert {c.source for c in answer.citations} == {"chem/oxygen.txt", "chem/priestley.pdf"}
    assert answer.invalid_citations == [7]
    priestley = next(c for c in answer.citations if c.doc_id == "priestley")
    assert priestley.page == 1 and DOCS[1].text[priestley.start:priestley.end] == priestley.text
    (sent,) = chats(endpoint)[before:]
    system, user = sent["messages"]
    assert "[n]" in system["content"] and NOT_FOUND in system["content"]
    assert "[1] Oxygen" in user["content"] or "[1] Priestley" in user["content"]
    assert user["content"].endswith("Question: Who discovered oxygen?") and sent["model"] == "scripted"
    assert endpoint.requests[-1][2] == "Bearer sk-test"


def test_not_found_below_threshold_calls_no_model(index, endpoint):
    gen = OpenAIGenerator(f"http://127.0.0.1:{endpoint.server_port}/v1")
    before = len(chats(endpoint))
    answer = answer_question(index, "quantum chromodynamics lattice gauge", gen, min_score=0.9)
    assert (answer.text, answer.found, answer.citations, answer.passages) == (NOT_FOUND, False, [], [])
    assert len(chats(endpoint)) == before
    endpoint.reply = "Not found in the documents."
    answer = answer_question(index, "Who discovered oxygen?", gen, min_score=0.1)
    assert not answer.found and answer.citations == [] and answer.passages  # the model said so itself


def test_streaming_matches_the_whole_answer(index, endpoint):
    endpoint.reply = "Oxygen was discovered by Scheele [1]."
    gen = OpenAIGenerator(f"http://127.0.0.1:{endpoint.server_port}/v1")
    stream = stream_answer(index, "Who discovered oxygen?", gen, k=2, min_score=0.1)
    deltas = list(stream)
    assert len(deltas) > 3 and "".join(deltas).strip() == stream.answer.text == endpoint.reply
    assert [c.n for c in stream.answer.citations] == [1]
    assert chats(endpoint)[-1]["stream"] is True


def test_unreachable_endpoint_is_one_clear_error(index):
    gen = OpenAIGenerator("http://127.0.0.1:9/v1")
    with pytest.raises(RagError, match=r"http://127.0.0.1:9/v1/chat/completions: cannot connect"):
        answer_question(index, "Who discovered oxygen?", gen, min_score=0.0)


def test_openai_compatible_embedder(tmp_path, endpoint):
    url = f"http://127.0.0.1:{endpoint.server_port}/v1"
    emb = load_embedder("openai:hash32", base_url=url)
    assert emb.dim == 32 and np.allclose(np.linalg.norm(emb.embed(["a b", "c"]), axis=1), 1)
    report = build_index(DOCS, tmp_path / "oa.db", embedder="openai:hash32", embed_base_url=url)
    assert report["embedder"] == "openai:hash32" and report["dim"] == 32
    with Index.open(tmp_path / "oa.db") as ix:  # the endpoint URL is recorded with the index
        assert ix.search("north-flowing river Africa", k=1, mode="dense")[0].doc_id == "nile"


# ----------------------------------------------------------------------------- a tiny local model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("tok") / "c.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:20_000])
    tok = train_tokenizer([corpus], "byte-bpe", 300, chat_template=CHAT_TEMPLATES["chatml"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=384)
    return Transformer(cfg).eval(), tok


def test_local_model_prompt_fits_its_context(index, tiny):
    model, tok = tiny
    gen = LocalGenerator(model, tok, max_new_tokens=16)
    seen = []
    complete = gen.complete
    gen.complete = lambda messages: seen.append(messages) or complete(messages)
    answer = answer_question(index, "Who discovered oxygen?", gen, k=4, budget=10_000, min_score=0.1)
    prompt = gen.render(seen[0])
    assert prompt.startswith("<|im_start|>system") and len(tok.encode(prompt)) + 16 <= 384
    assert 1 <= len(answer.passages) < 4  # the 384-token context forced the budget down
    streamed = stream_answer(index, "Who discovered oxygen?", gen, k=4, budget=10_000, min_score=0.1)
    assert "".join(streamed) == answer.text.strip() or streamed.answer.text == answer.text
    tiny_gen = LocalGenerator(model, tok, max_new_tokens=300)
    with pytest.raises(RagError, match="cannot hold the prompt"):
        answer_question(index, "Who discovered oxygen?", tiny_gen, min_score=0.1)


# ----------------------------------------------------------------------------- semantic cache


def test_semantic_cache_threshold_ttl_size_and_counts(tmp_path):
    now = [1000.0]
    cache = SemanticCache(threshold=0.9, ttl=60, max_entries=2, clock=lambda: now[0])
    a, b, c = np.eye(3, dtype=np.float32)
    assert cache.lookup(a) is None
    cache.store(a, "qa", {"text": "A"})
    near = a + 0.2 * b  # cosine 0.98 to a
    assert cache.lookup(near) == {"text": "A"} and cache.lookup(b) is None
    assert cache.lookup(near, namespace="other index") is None
    cache.store(b, "qb", {"text": "B"})
    now[0] += 10
    cache.lookup(a)  # a is now more recently used than b
    cache.store(c, "qc", {"text": "C"})  # over the size bound: b, the least recently used, goes
    assert cache.lookup(b) is None and cache.lookup(c) == {"text": "C"}
    now[0] += 61  # past the TTL of everything
    assert cache.lookup(a) is None and len(cache) == 0
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["expired"]) == (3, 5, 1, 2)

    path = tmp_path / "cache.json"
    persisted = SemanticCache(threshold=0.9, path=path)
    persisted.store(a, "qa", {"text": "A"})
    again = SemanticCache(threshold=0.9, path=path)
    assert again.lookup(a) == {"text": "A"} and again.stats()["hits"] == 1
    path.write_text("not json")
    with pytest.raises(RagError, match="cache.json: not a semantic cache file"):
        SemanticCache(path=path)


def test_answers_come_from_the_cache_for_close_questions(index, endpoint):
    endpoint.reply = "Scheele [1]."
    gen = OpenAIGenerator(f"http://127.0.0.1:{endpoint.server_port}/v1")
    cache = SemanticCache(threshold=0.8)
    first = answer_question(index, "Who discovered oxygen?", gen, min_score=0.1, cache=cache)
    calls = len(chats(endpoint))
    second = answer_question(index, "who discovered oxygen", gen, min_score=0.1, cache=cache)
    assert second.cached and not first.cached and second.text == first.text
    assert [c.source for c in second.citations] == [c.source for c in first.citations]
    assert len(chats(endpoint)) == calls and cache.stats()["hits"] == 1
    third = answer_question(index, "How long to brew green tea?", gen, min_score=0.1, cache=cache)
    assert not third.cached and len(chats(endpoint)) == calls + 1


# ----------------------------------------------------------------------------- grounding for the server


def test_ground_messages_for_the_server(index):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Who discovered oxygen?"}]
    original = json.dumps(messages)
    grounded, citations = ground_messages(index, messages, k=2, min_score=0.1, mode="bm25")
    assert json.dumps(messages) == original and len(grounded) == 4
    assert grounded[0]["content"].startswith("Be brief.\n\nAnswer the question using only the numbered passages")
    assert "[1]" in grounded[0]["content"] and [c.n for c in citations] == [1, 2]
    assert {c.doc_id for c in citations} <= {"oxygen", "priestley"} and grounded[1:] == messages[1:]
    cited, _ = map_citations("It was Scheele [2].", citations)
    assert cited == [citations[1]]

    bare, none = ground_messages(index, [{"role": "user", "content": [{"type": "text", "text": "zzz qqq"}]}],
                                 min_score=0.9)
    assert bare[0] == {"role": "system", "content": NO_CONTEXT_PROMPT} and none == []
    with pytest.raises(RagError, match="user message"):
        ground_messages(index, [{"role": "system", "content": "x"}])
