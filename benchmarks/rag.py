"""RAG throughput and latency: indexing (chunks/s, embedding timed apart) and query latency p50/p99 at 10k and
100k chunks, Milvus Lite against a brute-force numpy baseline on the same vectors, with recall@10 of each.

    python benchmarks/rag.py                              # 10k and 100k chunks (several minutes on a CPU)
    python benchmarks/rag.py --sizes 10000                # quicker
    python benchmarks/rag.py --index squad.db             # reuse the vectors of `llmkit rag index` output

The real part is the SQuAD corpus in ../shared/data: its 551 paragraphs are chunked with `llmkit rag index`'s
defaults and embedded with the bundled all-MiniLM-L6-v2 (embedding throughput is measured here), and its 500
questions are the queries. To reach 10k and 100k chunks, synthetic distractor chunks are added: each is
normalise(a + b + noise) of two random real chunk vectors, so it lies where real embeddings lie and competes
with them. Both stores get exactly the same vectors and queries:
- Milvus Lite (this process, gRPC, AUTOINDEX = HNSW M=16 efConstruction=200 via faiss, ef=64), through the
  same MilvusStore llmkit uses;
- numpy brute force: one matrix-vector product and an argpartition per query (exact).
recall@10 is reported two ways: against the gold paragraph of each question (document level, distractors are
never gold) and against the exact top 10 (the ANN recall of the index). Latency is per single query, wall
clock, after a warm-up. The end-to-end pipeline (embed the question + search) is timed on the real index.
Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = ROOT / "shared" / "data"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentiles(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3)}


def real_chunks(args):
    """Chunk rows and unit vectors of the SQuAD corpus, the question vectors, and the timings."""
    from llmkit.rag.chunk import ChunkConfig, TokenCounter, chunk_document, context_text
    from llmkit.rag.embed import load_embedder
    from llmkit.rag.evaluate import read_questions
    from llmkit.rag.ingest import read_documents

    t = time.perf_counter()
    docs = read_documents([DATA / "squad_rag_corpus.jsonl"])
    read_s = time.perf_counter() - t
    embedder = load_embedder("minilm")
    counter = TokenCounter(embedder.tokenizer)
    t = time.perf_counter()
    rows = []
    for doc in docs:
        for c in chunk_document(doc, counter, ChunkConfig()):
            rows.append({"doc_id": doc.id, "title": doc.title, "heading": c.heading, "text": c.text})
    chunk_s = time.perf_counter() - t
    texts = [context_text(r["title"], r["heading"], r["text"]) for r in rows]
    sample = texts[: args.embed_sample] if args.index else texts
    log(f"embedding {len(sample)} real chunks with {embedder.name} ...")
    t = time.perf_counter()
    vectors = embedder.embed(sample, batch_size=32)
    embed_s = time.perf_counter() - t
    if args.index:  # the stored vectors of an existing index built from the same corpus
        from llmkit.rag.index import Index

        with Index.open(args.index) as index:
            stored = {}
            for row in index.store.scan(["doc_id", "chunk_index", "vector"]):
                stored[(row["doc_id"], row["chunk_index"])] = row["vector"]
        by_doc: dict[str, int] = {}
        keyed = []
        for r in rows:
            i = by_doc.get(r["doc_id"], 0)
            by_doc[r["doc_id"]] = i + 1
            keyed.append(stored.get((r["doc_id"], i)))
        if any(v is None for v in keyed):
            raise SystemExit(f"{args.index}: not built from squad_rag_corpus.jsonl with the default chunking")
        vectors = np.asarray(keyed, dtype=np.float32)
    questions = read_questions(DATA / "squad_rag_questions.jsonl")[: args.queries]
    t = time.perf_counter()
    qv = embedder.embed([q["question"] for q in questions], batch_size=64)
    query_embed_s = time.perf_counter() - t
    stats = {"documents": len(docs), "chunks": len(rows), "read_s": round(read_s, 3),
             "chunking_chunks_per_s": round(len(rows) / chunk_s, 1),
             "embedding_chunks_per_s": round(len(sample) / embed_s, 2), "embedded_chunks": len(sample),
             "embedding_s": round(embed_s, 2), "query_embedding_ms": round(1000 * query_embed_s / len(questions), 2),
             "embedder": embedder.name, "dim": embedder.dim, "torch_threads": _threads()}
    return rows, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), questions, qv, stats, embedder


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def with_distractors(rows, vectors, n_total: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_extra = max(0, n_total - len(rows))
    a = vectors[rng.integers(0, len(vectors), n_extra)]
    b = vectors[rng.integers(0, len(vectors), n_extra)]
    extra = a + b + rng.normal(0, 0.05, size=a.shape).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    all_vectors = np.concatenate([vectors, extra.astype(np.float32)])
    doc_ids = [r["doc_id"] for r in rows] + [f"synthetic#{i}" for i in range(n_extra)]
    texts = [r["text"] for r in rows] + [f"synthetic distractor {i}" for i in range(n_extra)]
    return all_vectors, doc_ids, texts


def doc_recall(rankings: list[list[int]], doc_ids: list[str], golds: list[str], k: int = 10) -> float:
    hits = 0
    for ranking, gold in zip(rankings, golds):
        hits += gold in {doc_ids[i] for i in ranking[:k]}
    return round(hits / len(golds), 4)


def bench_numpy(vectors, qv, k: int = 10):
    for q in qv[:5]:  # warm-up
        np.argpartition(-(vectors @ q), k)[:k]
    times, rankings = [], []
    for q in qv:
        t = time.perf_counter()
        s = vectors @ q
        top = np.argpartition(-s, k)[:k]
        top = top[np.argsort(-s[top])]
        times.append(time.perf_counter() - t)
        rankings.append(top.tolist())
    return rankings, times


def bench_milvus(vectors, doc_ids, texts, qv, workdir: Path, k: int = 10):
    from llmkit.rag.store import MilvusStore

    path = workdir / f"bench{len(vectors)}.db"
    store = MilvusStore(str(path), "bench")
    try:
        store.create(vectors.shape[1], {"benchmark": True}, "AUTOINDEX")
        rows = [{"pk": f"c{i}", "vector": v.tolist(), "doc_id": doc_ids[i], "doc_hash": "-", "chunk_index": 0,
                 "source": "bench", "title": "", "heading": "", "text": texts[i], "char_start": 0, "char_end": 0,
                 "page": 0, "tags": [], "metadata": {}} for i, v in enumerate(vectors)]
        t = time.perf_counter()
        store.insert(rows)
        insert_s = time.perf_counter() - t
        t = time.perf_counter()
        store.flush()
        store.close()  # Milvus Lite compacts segments and builds the vector index in the background; close waits
        store = MilvusStore(str(path), "bench")
        store.load()
        store.search(qv[:1], k)
        build_s = time.perf_counter() - t
        for q in qv[:5]:
            store.search(q[None], k)
        times, rankings = [], []
        for q in qv:
            t = time.perf_counter()
            hits = store.search(q[None], k)[0]
            times.append(time.perf_counter() - t)
            rankings.append([int(pk[1:]) for pk, _ in hits])
    finally:
        store.close()
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return rankings, times, {"insert_chunks_per_s": round(len(vectors) / insert_s, 1),
                             "flush_compact_index_reload_s": round(build_s, 2), "disk_mb": round(disk / 2**20, 1)}


def bench_pipeline(args, rows, vectors, questions, qv, embedder, workdir: Path) -> dict:
    """On the real chunks: embedding one question, then retrieval with each mode (top 5 of 50 candidates)."""
    from llmkit.rag.index import Index, build_index
    from llmkit.rag.ingest import read_documents

    path = workdir / "squad.db"

    from llmkit.rag.chunk import context_text
    from llmkit.rag.embed import Embedder

    class Cached(Embedder):  # the chunk vectors are known already: hand them over instead of embedding again
        kind, name, spec, dim = embedder.kind, embedder.name, embedder.spec, embedder.dim
        tokenizer, fingerprint = embedder.tokenizer, embedder.fingerprint
        lookup = {context_text(r["title"], r["heading"], r["text"]): v for r, v in zip(rows, vectors)}

        def embed(self, texts, batch_size=32, progress=False):
            return np.stack([self.lookup[t] if t in self.lookup else embedder.embed([t])[0] for t in texts])

    t = time.perf_counter()
    build_index(read_documents([DATA / "squad_rag_corpus.jsonl"]), path, embedder=Cached())
    write_s = time.perf_counter() - t
    out = {"index_write_s_excluding_embedding": round(write_s, 2)}
    n = min(args.pipeline_queries, len(questions))
    with Index.open(path, embedder=embedder) as index:
        index.search("warm up", k=5)
        times = []
        for q in questions[:n]:  # one question at a time, as `llmkit rag ask` and the server do
            t = time.perf_counter()
            index.embed_queries([q["question"]])
            times.append(time.perf_counter() - t)
        out["embed_one_query"] = percentiles(times)
        for mode in ("dense", "bm25", "hybrid"):  # retrieval given the query vector: search + fetch 50 candidates
            times = []
            for i, q in enumerate(questions[:n]):
                t = time.perf_counter()
                index.search(q["question"], k=5, mode=mode, query_vectors=qv[i: i + 1])
                times.append(time.perf_counter() - t)
            out[f"search_{mode}"] = percentiles(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="chunks in the store")
    p.add_argument("--queries", type=int, default=500, help="SQuAD questions used as queries")
    p.add_argument("--pipeline-queries", type=int, default=100, help="questions for the end-to-end timing")
    p.add_argument("--index", type=str, default=None, help="take the chunk vectors from this llmkit rag index")
    p.add_argument("--embed-sample", type=int, default=256, help="with --index: chunks embedded to time it")
    p.add_argument("--work-dir", type=str, default=None, help="where the Milvus Lite files go (default: temp)")
    args = p.parse_args()

    workdir = Path(args.work_dir or tempfile.mkdtemp(prefix="llmkit-rag-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}}
    try:
        rows, vectors, questions, qv, stats, embedder = real_chunks(args)
        report["indexing"] = stats
        golds = [q["gold"][0] for q in questions]
        log(f"{len(rows)} real chunks, {len(questions)} queries; end-to-end pipeline ...")
        report["pipeline_real_index"] = bench_pipeline(args, rows, vectors, questions, qv, embedder, workdir)
        report["sizes"] = {}
        for n in args.sizes:
            log(f"{n} chunks: numpy ...")
            all_vectors, doc_ids, texts = with_distractors(rows, vectors, n)
            exact, np_times = bench_numpy(all_vectors, qv)
            log(f"{n} chunks: Milvus Lite ...")
            approx, mv_times, mv_stats = bench_milvus(all_vectors, doc_ids, texts, qv, workdir)
            ann = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
            report["sizes"][str(n)] = {
                "numpy_bruteforce": {**percentiles(np_times), "recall@10_gold": doc_recall(exact, doc_ids, golds),
                                     "recall@10_vs_exact": 1.0,
                                     "memory_mb": round(all_vectors.nbytes / 2**20, 1)},
                "milvus_lite": {**percentiles(mv_times), "recall@10_gold": doc_recall(approx, doc_ids, golds),
                                "recall@10_vs_exact": round(float(ann), 4), **mv_stats},
            }
            log(json.dumps(report["sizes"][str(n)]))
    finally:
        if not args.work_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
