"""The index on Milvus Lite: search modes, filters, incremental re-indexing, a second process, refusals,
no partial index after an error, MMR, re-ranking, and llmkit's own embeddings."""

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.rag.chunk import ChunkConfig
from llmkit.rag.embed import Embedder, LlmkitEmbedder, llmkit_embeddings, load_embedder
from llmkit.rag.errors import EmbedderMismatchError, IndexNotFoundError, RagError
from llmkit.rag.index import Index, build_index
from llmkit.rag.ingest import Document, read_documents
from llmkit.rag.retrieve import LlmkitReranker, mmr
from llmkit.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

FACTS = {
    "oxygen": ("Oxygen", "Oxygen was discovered by Carl Wilhelm Scheele in Uppsala and independently by Joseph "
                         "Priestley in Wiltshire in 1774. It is the third most abundant element in the universe."),
    "everest": ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, located in the "
                                 "Mahalangur Himal sub-range of the Himalayas on the border of Nepal and China."),
    "python": ("Python language", "Python is a high-level programming language created by Guido van Rossum and "
                                  "first released in 1991. Its design emphasises code readability."),
    "nile": ("Nile", "The Nile is a major north-flowing river in northeastern Africa that drains into the "
                     "Mediterranean Sea. It has historically been considered the longest river in the world."),
    "violin": ("Violin", "The violin is a wooden string instrument in the violin family. Most violins have a "
                         "hollow wooden body and are played with a bow strung with horsehair."),
    "jupiter": ("Jupiter", "Jupiter is the fifth planet from the Sun and the largest in the Solar System. It is "
                           "a gas giant with a mass more than two and a half times that of all other planets."),
}



def corpus(tmp_path: Path, skip=(), change=None) -> list[Document]:
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    lines = []
    for key, (title, text) in FACTS.items():
        if key in skip:
            continue
        if key == change:
            text += " This sentence was added in a later edition."
        tags = ["science"] if key in ("oxygen", "jupiter", "everest") else ["culture"]
        lines.append(json.dumps({"id": key, "title": title, "text": text, "tags": tags}))
    (d / "facts.jsonl").write_text("\n".join(lines) + "\n")
    (d / "guide.md").write_text("# Tea\n\nGreen tea is made from unoxidised leaves of Camellia sinensis.\n\n"
                                "## Brewing\n\nBrew green tea at 80 degrees for two minutes.\n")
    return read_documents([d])


class HashEmbedder(Embedder):
    """Bag of hashed words: instant, deterministic, lexical. For tests that need no real semantics."""

    kind, name, spec, dim = "test", "test:hash", "test:hash", 64

    def __init__(self, fail_after: int | None = None, name: str = "test:hash", dim: int = 64):
        self.fail_after, self.calls, self.name, self.dim = fail_after, 0, name, dim
        self.fingerprint = ""

    def _embed_batch(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("embedding service went away")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.strip(".,").encode()) % self.dim] += 1.0
        return out + 1e-3


@pytest.fixture(scope="module")
def minilm():
    return load_embedder("minilm")


@pytest.fixture(scope="module")
def built(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("idx")
    path = root / "facts.db"
    report = build_index(corpus(root), path, embedder=minilm, chunking=ChunkConfig(size=40, overlap=8))
    return root, path, report


def test_build_and_search_every_mode(built, minilm):
    root, path, report = built
    assert report["added"] == 7 and report["chunks_total"] >= 7 and report["revision"] == 1
    assert report["embedder"] == "sentence-transformers:all-MiniLM-L6-v2" and report["dim"] == 384
    with Index.open(path) as index:
        assert index.stats()["documents"] == 7
        for mode in ("dense", "bm25", "hybrid"):
            hits = index.search("Who discovered oxygen?", k=3, mode=mode)
            assert hits[0].doc_id == "oxygen", mode
            top = hits[0]
            original = FACTS["oxygen"][1]
            assert original[top.start:top.end] == top.text and top.title == "Oxygen"
            assert top.tags == ["science"] and top.metadata["title"] == "Oxygen"
            assert 0.3 < top.dense_score <= 1.0
        tea = index.search("what temperature to brew green tea", k=1)[0]
        assert tea.heading == "Tea > Brewing" and tea.source.endswith("corpus/guide.md")


def test_filters_restrict_every_mode(built):
    _, path, _ = built
    with Index.open(path) as index:
        for mode in ("dense", "bm25", "hybrid"):
            hits = index.search("Who discovered oxygen near the river?", k=10, mode=mode, tags=["culture"])
            assert hits and all("culture" in h.tags for h in hits)
            hits = index.search("green tea", k=10, mode=mode, sources=["*guide.md"])
            assert hits and all(h.source.endswith("guide.md") for h in hits)
            assert index.search("oxygen river", k=5, mode=mode, filter='doc_id == "nile"')[0].doc_id == "nile"


def test_second_process_reopens_the_file_with_identical_results(built, minilm):
    _, path, _ = built
    queries = ["Who discovered oxygen?", "largest planet", "river in Africa"]
    vectors = minilm.embed(queries)
    with Index.open(path) as index:
        here = {mode: [[(h.pk, round(h.score, 5)) for h in hits]
                       for hits in index.search_many(queries, k=4, mode=mode, query_vectors=vectors)]
                for mode in ("dense", "bm25", "hybrid")}
    script = (
        "import json, sys, numpy as np\n"
        "from llmkit.rag.index import Index\n"
        "q, v = json.loads(sys.stdin.read())\n"
        f"with Index.open({str(path)!r}) as index:\n"
        "    out = {m: [[(h.pk, round(h.score, 5)) for h in hits] for hits in\n"
        "          index.search_many(q, k=4, mode=m, query_vectors=np.array(v, dtype=np.float32))]\n"
        "          for m in ('dense', 'bm25', 'hybrid')}\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps([queries, vectors.tolist()]),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout)
    assert there == {m: [[list(p) for p in hits] for hits in v] for m, v in here.items()}


def test_reindexing_is_incremental(tmp_path):
    path = tmp_path / "inc.db"
    emb = HashEmbedder()
    first = build_index(corpus(tmp_path), path, embedder=emb)
    calls = emb.calls
    again = build_index(corpus(tmp_path), path, embedder=emb)
    assert (again["added"], again["updated"], again["deleted"], again["chunks_added"]) == (0, 0, 0, 0)
    assert again["unchanged"] == 7 and again["revision"] == first["revision"] and emb.calls == calls

    changed = build_index(corpus(tmp_path, change="nile"), path, embedder=emb)
    assert (changed["added"], changed["updated"], changed["unchanged"]) == (0, 1, 6)
    assert changed["chunks_total"] == first["chunks_total"] and changed["revision"] == 2
    with Index.open(path, embedder=emb) as index:
        nile = [h for h in index.search("later edition", k=10, mode="bm25") if h.doc_id == "nile"]
        assert len(nile) == 1 and "later edition" in nile[0].text  # old chunk replaced, not duplicated

    removed = build_index(corpus(tmp_path, skip=("oxygen",), change="nile"), path, embedder=emb)
    assert removed["deleted"] == 1 and removed["chunks_deleted"] >= 1
    with Index.open(path, embedder=emb) as index:
        for mode in ("dense", "bm25", "hybrid"):
            assert all(h.doc_id != "oxygen" for h in index.search("Who discovered oxygen?", k=10, mode=mode))
        assert index.stats()["documents"] == 6 and index.store.count() == removed["chunks_total"]

    kept = build_index(corpus(tmp_path, skip=("nile", "oxygen")), path, embedder=emb, keep_missing=True)
    assert kept["deleted"] == 0
    with Index.open(path, embedder=emb) as index:
        assert "nile" in {h.doc_id for h in index.search("river Africa", k=3, mode="bm25")}


def test_embedder_mismatch_is_refused(tmp_path):
    path = tmp_path / "m.db"
    build_index(corpus(tmp_path), path, embedder=HashEmbedder())
    other = HashEmbedder(name="test:other", dim=32)
    with pytest.raises(EmbedderMismatchError, match=r"embedded with test:hash \(dim 64\), not test:other"):
        Index.open(path, embedder=other)
    with pytest.raises(EmbedderMismatchError):
        build_index(corpus(tmp_path, change="nile"), path, embedder=other)
    with Index.open(path, embedder=HashEmbedder()) as index:
        assert index.revision == 1
        with pytest.raises(EmbedderMismatchError, match="64-dimensional"):
            index.search("x", query_vectors=np.zeros((1, 32), dtype=np.float32))


def test_missing_index_and_bad_paths(tmp_path):
    with pytest.raises(IndexNotFoundError, match="nope.db: no such index"):
        Index.open(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()
    with pytest.raises(RagError, match="must end in .db"):
        build_index(corpus(tmp_path), tmp_path / "index", embedder=HashEmbedder())


def test_no_partial_index_after_an_error(tmp_path):
    path = tmp_path / "p.db"
    with pytest.raises(RuntimeError, match="went away"):
        build_index(corpus(tmp_path), path, embedder=HashEmbedder(fail_after=0))
    assert not path.exists() and list(tmp_path.glob("*.db")) == [] and not list(tmp_path.glob(".*tmp*"))

    build_index(corpus(tmp_path), path, embedder=HashEmbedder())
    with Index.open(path, embedder=HashEmbedder()) as index:
        before = [h.pk for h in index.search("oxygen river", k=5)]
    huge = Document("huge", "word " * 20000, "huge.txt")  # one 100 kB chunk: more than Milvus' VARCHAR holds
    with pytest.raises(RagError, match="huge.txt: document 'huge' has a chunk of 99999 bytes"):
        build_index(corpus(tmp_path) + [huge], path, embedder=HashEmbedder(), chunking=ChunkConfig("none"))
    with Index.open(path, embedder=HashEmbedder()) as index:
        assert index.revision == 1 and [h.pk for h in index.search("oxygen river", k=5)] == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".db")) == ["p.db"]


def test_mmr_and_reranker_reorder(tmp_path):
    docs = [Document(f"dup{i}", "Jupiter is the largest planet in the Solar System.", "dups.txt") for i in range(3)]
    docs.append(Document("saturn", "Saturn is a large planet with rings in the Solar System.", "s.txt"))
    path = tmp_path / "mmr.db"
    emb = HashEmbedder()
    build_index(docs, path, embedder=emb)
    with Index.open(path, embedder=emb) as index:
        plain = index.search("largest planet Solar System", k=2, mode="dense")
        assert {h.doc_id for h in plain} <= {"dup0", "dup1", "dup2"}
        diverse = index.search("largest planet Solar System", k=2, mode="dense", mmr_lambda=0.3)
        assert diverse[1].doc_id == "saturn"

        class Rings:
            def score(self, question, passages):
                return [float("rings" in p) for p in passages]

        reranked = index.search("largest planet Solar System", k=2, reranker=Rings())
        assert reranked[0].doc_id == "saturn" and reranked[0].rerank_score == 1.0
    assert mmr([1.0, 0.9, 0.1], np.eye(3, dtype=np.float32), 3, 1.0) == [0, 1, 2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    text = tmp_path_factory.mktemp("tok") / "t.txt"
    text.write_text((DATA / "tinyshakespeare.txt").read_text()[:20_000])
    tok = train_tokenizer([text], "byte-bpe", 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    llmkit.save(model, tok, out)
    return model, tok, out


def test_llmkit_embeddings_are_pooled_normalised_hidden_states(tiny):
    model, tok, _ = tiny
    texts = ["To be or not to be", "a", "Now is the winter of our discontent made glorious summer"]
    got = llmkit_embeddings(model, tok, texts, batch_size=3)
    assert got.shape == (3, model.config.d_model) and torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    for i, t in enumerate(texts):  # one by one, no padding: the same vector
        ids = torch.tensor([tok.encode(t)])
        ref = torch.nn.functional.normalize(model.model(ids).mean(1), dim=-1)[0]
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-4)


def test_llmkit_checkpoint_as_embedder_and_reranker(tmp_path, tiny):
    model, tok, ckpt = tiny
    emb = load_embedder(str(ckpt))
    assert isinstance(emb, LlmkitEmbedder) and emb.dim == model.config.d_model
    report = build_index(corpus(tmp_path), tmp_path / "ll.db", embedder=f"llmkit:{ckpt}",
                         chunking=ChunkConfig(size=64, overlap=0))
    assert report["embedder"] == "llmkit:tiny"
    with Index.open(tmp_path / "ll.db") as index:  # reloads the embedder from the recorded spec
        assert index.search("river Nile", k=1, mode="bm25")[0].doc_id == "nile"
        hits = index.search("river", k=3, mode="dense")
        assert len(hits) == 3 and all(-1 <= h.dense_score <= 1 for h in hits)
        scores = LlmkitReranker(model, tok).score("Which river?", [h.text for h in hits])
        assert len(scores) == 3 and all(s <= 0 and np.isfinite(s) for s in scores)
        reranked = index.search("river", k=3, reranker=LlmkitReranker(model, tok), rerank_top=3)
        assert [h.rerank_score for h in reranked] == sorted((h.rerank_score for h in reranked), reverse=True)


def test_same_index_on_a_milvus_server_via_uri(tmp_path, monkeypatch):
    """--uri moves the index to a server with no other change. Milvus Lite's own gRPC server stands in for a
    Milvus standalone here: pymilvus speaks the same protocol to both, and llmkit takes the server path."""
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a server index caches BM25 here
    server, db, port = start_server_in_thread(str(tmp_path / "server-data"), port=0)
    uri = f"http://127.0.0.1:{port}"
    try:
        emb = HashEmbedder()
        local = build_index(corpus(tmp_path), tmp_path / "facts.db", embedder=emb)
        remote = build_index(corpus(tmp_path), tmp_path / "facts.db", uri=uri, embedder=emb)
        assert remote["collection"] == "facts" and remote["chunks_total"] == local["chunks_total"]
        again = build_index(corpus(tmp_path), "facts.db", uri=uri, embedder=emb)
        assert again["chunks_added"] == 0 and again["unchanged"] == 7
        queries = ["Who discovered oxygen?", "largest planet", "river in Africa"]
        with Index.open(tmp_path / "facts.db", embedder=emb) as a, Index.open("facts.db", uri=uri, embedder=emb) as b:
            assert b.location.uri == uri and not b.location.local
            for mode in ("dense", "bm25", "hybrid"):
                def hits(index):
                    return [[(h.doc_id, h.text, round(h.score, 5)) for h in found]
                            for found in index.search_many(queries, 3, mode)]

                assert hits(a) == hits(b), mode
        assert list((tmp_path / "cache" / "llmkit" / "rag" / "bm25").iterdir())
        with pytest.raises(IndexNotFoundError, match="no index collection 'other'"):
            Index.open("other.db", uri=uri)
    finally:
        server.stop(grace=0)
        db.close()
