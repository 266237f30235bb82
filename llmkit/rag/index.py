"""The index: build it incrementally from documents, open it, search it (dense, BM25, hybrid, MMR, re-rank).

    report = build_index(read_documents(["docs/"]), "docs.db")              # Milvus Lite
    report = build_index(docs, "docs.db", uri="http://host:19530", token=T)  # the same index on a cluster
    with Index.open("docs.db") as index:
        hits = index.search("who discovered oxygen?", k=5, mode="hybrid")

Re-indexing compares each document's content hash with the one stored: changed documents get their
chunks replaced, unchanged ones are skipped, documents no longer in the input are deleted (unless
keep_missing). All reading, chunking and embedding happens before anything is written. A local index is
then written into a temporary copy that replaces the old one only when complete, so an error never
leaves a partial index behind; on a cluster, the writes are ordered so a rerun repairs an interrupted
one (new chunks are upserted under content-derived keys before old ones are deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from llmkit.rag.chunk import ChunkConfig, TokenCounter, chunk_document, context_text
from llmkit.rag.embed import Embedder, identity, load_embedder, minilm_dir
from llmkit.rag.errors import EmbedderMismatchError, IndexNotFoundError, RagError
from llmkit.rag.ingest import Document
from llmkit.rag.retrieve import FUSIONS, mmr, rrf_fusion, zscore_fusion
from llmkit.rag.store import FIELDS, TEXT_BYTES, MilvusStore, is_local, make_filter

MODES = ("dense", "bm25", "hybrid")
FORMAT_VERSION = 1
BM25_DIR = "llmkit_bm25"  # inside a Milvus Lite data directory
EXACT_FILTER_ROWS = 50_000  # a filter matching at most this many rows may fall back to exact search


@dataclass
class Hit:
    pk: str
    doc_id: str
    text: str
    score: float  # the score the ranking used (cosine, BM25, fused, or re-ranker log-probability)
    source: str = ""
    title: str = ""
    heading: str = ""
    start: int = 0  # character offsets of the chunk in its document
    end: int = 0
    page: int | None = None
    chunk_index: int = 0
    tags: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    dense_score: float | None = None  # cosine similarity to the query (the not-found threshold reads it)
    bm25_score: float | None = None
    rerank_score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Location:
    uri: str  # a local .db path (Milvus Lite) or http(s)://host:port
    collection: str
    token: str | None = None

    @property
    def local(self) -> bool:
        return is_local(self.uri)


def locate(path: str | Path | None = None, uri: str | None = None, token: str | None = None,
           collection: str | None = None) -> Location:
    """Where an index lives. Locally, PATH is the Milvus Lite file; with `uri`, PATH only names the
    collection (its stem), so `--index docs.db --uri http://host:19530` is "the same index, on a cluster"."""
    if uri is None and path is None:
        raise RagError("an index needs --index PATH (a Milvus Lite .db file) or --uri URL")
    name = collection or (_collection_name(Path(path).name) if path is not None else "llmkit_chunks")
    if uri is not None and not is_local(uri):
        return Location(uri, name, token)
    local = str(uri or path)
    if not local.endswith(".db"):
        raise RagError(f"{local}: a Milvus Lite index path must end in .db (or pass --uri http://HOST:19530)")
    return Location(local, name, token)


def _collection_name(filename: str) -> str:
    stem = filename[:-3] if filename.endswith(".db") else filename
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "llmkit_chunks"
    return name if not name[0].isdigit() else f"_{name}"


class Index:
    """An opened index. Use as a context manager, or call close(): Milvus Lite holds a lock on its file."""

    def __init__(self, store: MilvusStore, meta: dict, location: Location):
        self.store, self.meta, self.location = store, meta, location
        self._embedder: Embedder | None = None
        self._bm25 = None

    # -- open / close

    @classmethod
    def open(cls, path: str | Path | None = None, *, uri: str | None = None, token: str | None = None,
             collection: str | None = None, embedder: Embedder | str | None = None,
             embed_base_url: str | None = None, embed_api_key: str | None = None) -> Index:
        loc = locate(path, uri, token, collection)
        if loc.local and not Path(loc.uri).exists():
            raise IndexNotFoundError(f"{loc.uri}: no such index (build one with: llmkit rag index --input FILES "
                                     f"--index {loc.uri})")
        store = MilvusStore(loc.uri, loc.collection, loc.token)
        try:
            meta = store.meta()
        except BaseException:
            store.close()
            raise
        index = cls(store, meta, loc)
        if embedder is not None:
            index.use_embedder(embedder, base_url=embed_base_url, api_key=embed_api_key)
        else:
            index._embed_base_url, index._embed_api_key = embed_base_url, embed_api_key
        return index

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- facts

    @property
    def dim(self) -> int:
        return int(self.meta["embedder"]["dim"])

    @property
    def revision(self) -> int:
        return int(self.meta["revision"])

    def stats(self) -> dict:
        return {"uri": self.location.uri, "collection": self.location.collection, "revision": self.revision,
                "documents": self.meta.get("documents"), "chunks": self.meta.get("chunks"),
                "embedder": self.meta["embedder"]["name"], "dim": self.dim, "chunking": self.meta.get("chunking")}

    # -- embedder

    def use_embedder(self, embedder: Embedder | str, base_url: str | None = None, api_key: str | None = None) -> None:
        if isinstance(embedder, str):
            embedder = load_embedder(embedder, base_url=base_url or self.meta.get("embed_base_url"),
                                     api_key=api_key)
        check_embedder(self.meta, embedder, self.location.uri)
        self._embedder = embedder

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            rec = self.meta["embedder"]
            base_url = getattr(self, "_embed_base_url", None) or self.meta.get("embed_base_url")
            self.use_embedder(load_embedder(rec["spec"], base_url=base_url,
                                            api_key=getattr(self, "_embed_api_key", None)))
        return self._embedder

    def embed_queries(self, queries: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.embedder.embed(list(queries), batch_size=batch_size, progress=progress)

    # -- BM25

    @property
    def bm25(self):
        from llmkit.rag.bm25 import BM25Index

        if self._bm25 is not None and self._bm25.revision == self.revision:
            return self._bm25
        cache = bm25_cache_dir(self.location)
        index = BM25Index.load(cache, self.revision)
        if index is None:
            index = build_bm25(self.store, self.revision, bool(self.meta.get("chunking", {}).get("header", True)))
            try:
                index.save(cache)
            except OSError:
                pass  # a read-only index still answers, it just rebuilds BM25 next time
        self._bm25 = index
        return index

    # -- search

    def search(self, query: str, k: int = 5, mode: str = "hybrid", **kwargs) -> list[Hit]:
        return self.search_many([query], k, mode, **kwargs)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, mode: str = "hybrid", *,
                    sources: Sequence[str] = (), tags: Sequence[str] = (), filter: str | None = None,
                    candidates: int = 50, fusion: str = "zscore", alpha: float = 0.5, rrf_k: int = 60,
                    mmr_lambda: float | None = None, reranker=None, rerank_top: int = 20,
                    unique_docs: bool = False, query_vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-k chunks per query.

        mode: dense (cosine in Milvus), bm25, or hybrid (both, fused by `fusion`: zscore with weight
        `alpha` on dense, or rrf with `rrf_k`). sources / tags / filter restrict the search (a source may
        hold `*` wildcards; filter is a raw Milvus expression). candidates: how deep each retriever looks.
        mmr_lambda: diversify the top of the ranking by maximal marginal relevance (1 = relevance only).
        reranker: an object with `score(query, passages) -> list[float]` (e.g. retrieve.LlmkitReranker),
        applied to the top `rerank_top`. unique_docs: at most one chunk per document (document-level
        ranking, as evaluation needs).
        """
        if mode not in MODES:
            raise RagError(f"search mode must be one of {', '.join(MODES)}, got {mode!r}")
        if fusion not in FUSIONS:
            raise RagError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if k < 1:
            raise RagError(f"k must be >= 1, got {k}")
        queries = list(queries)
        if not queries:
            return []
        expr = make_filter(sources, tags, filter)
        depth = max(candidates, k * (4 if unique_docs else 1))
        if query_vectors is None:
            query_vectors = self.embed_queries(queries)
        query_vectors = np.asarray(query_vectors, dtype=np.float32)
        if query_vectors.ndim != 2 or query_vectors.shape[1] != self.dim:
            raise EmbedderMismatchError(f"{self.location.uri}: query vectors have shape {query_vectors.shape}; "
                                        f"the index holds {self.dim}-dimensional vectors "
                                        f"({self.meta['embedder']['name']})")
        try:
            dense_lists = self.store.search(query_vectors, depth, expr) if mode != "bm25" else None
        except Exception as e:
            raise RagError(f"{self.location.uri}: search failed: {' '.join(str(e).split())[:300]}") from None
        if dense_lists is not None and expr:
            self._exact_when_short(dense_lists, query_vectors, depth, expr)
        bm25 = self.bm25 if mode != "dense" else None
        allowed = None
        if bm25 is not None and expr:
            keep = self.store.pks_matching(expr)
            allowed = np.array([pk in keep for pk in bm25.pks], dtype=bool)
        # per query: candidate scores; the Milvus reads for all queries are batched into one round trip each
        per_query, missing = [], set()
        for qi, query in enumerate(queries):
            dense = dict(dense_lists[qi]) if dense_lists is not None else {}
            bm_top: dict[str, float] = {}
            bm: dict[str, float] = {}  # BM25 score of every candidate (dense ones included)
            if bm25 is not None:
                bm_all = bm25.scores(query)
                if allowed is not None:
                    bm_all = np.where(allowed, bm_all, 0.0)
                bm_top = _top(bm25.pks, bm_all, depth)
                bm = {pk: float(bm_all[bm25.row[pk]]) if pk in bm25.row else 0.0 for pk in {*dense, *bm_top}}
            if mode == "hybrid" and fusion == "zscore":
                missing.update(pk for pk in bm_top if pk not in dense)
            per_query.append((dense, bm_top, bm))
        stored = self._unit_vectors(missing)  # cosines of BM25-only candidates come from their stored vectors
        ranked_all = []
        for qi, (dense, bm_top, bm) in enumerate(per_query):
            if mode == "dense":
                scores = dense
            elif mode == "bm25":
                scores = bm_top
            elif fusion == "rrf":
                scores = rrf_fusion([_ranked(dense), _ranked(bm_top)], k=rrf_k)
            else:
                for pk in bm_top:
                    if pk not in dense and pk in stored:
                        dense[pk] = float(stored[pk] @ query_vectors[qi])
                pool = [pk for pk in dict.fromkeys([*dense, *bm_top]) if pk in dense]
                scores = zscore_fusion({pk: dense[pk] for pk in pool}, {pk: bm.get(pk, 0.0) for pk in pool}, alpha)
            ranked_all.append((_ranked(scores)[:depth], scores))
        need = {pk for ranked, _ in ranked_all for pk in ranked}
        rows = self.store.get(need, FIELDS + ["vector"]) if need else {}
        return [self._finish(queries[qi], query_vectors[qi], ranked, scores, per_query[qi][0], per_query[qi][2],
                             rows, k, mmr_lambda, reranker, rerank_top, unique_docs)
                for qi, (ranked, scores) in enumerate(ranked_all)]

    def _unit_vectors(self, pks) -> dict[str, np.ndarray]:
        rows = self.store.get(pks, ["pk", "vector"]) if pks else {}
        return {pk: _unit(np.asarray(r["vector"], np.float32)) for pk, r in rows.items()}

    def _exact_when_short(self, dense_lists: list, query_vectors: np.ndarray, depth: int, expr: str) -> None:
        """An approximate index (HNSW) under a selective filter can miss matching rows that exist: it
        explores only so many graph nodes. When a query got fewer hits than rows match, search those rows
        exactly (Milvus itself switches to brute force for selective filters in the same way)."""
        n_match = self.store.count(expr)
        short = [i for i, hits in enumerate(dense_lists) if len(hits) < min(depth, n_match)]
        if not short or n_match > EXACT_FILTER_ROWS:
            return
        pks, mat = self.store.vectors(expr)
        sims = mat @ query_vectors[short].T  # [N, len(short)]
        for j, i in enumerate(short):
            top = np.argsort(-sims[:, j], kind="stable")[:depth]
            dense_lists[i] = [(pks[t], float(sims[t, j])) for t in top]

    def _finish(self, query, qv, ranked, scores, dense, bm, rows, k, mmr_lambda, reranker, rerank_top,
                unique_docs) -> list[Hit]:
        pool = [pk for pk in ranked if pk in rows]  # a row deleted by a concurrent re-index is skipped
        vec = {pk: _unit(np.asarray(rows[pk]["vector"], np.float32)) for pk in pool}
        if mmr_lambda is not None and pool:
            matrix = np.stack([vec[pk] for pk in pool])
            order = mmr(matrix @ qv, matrix, len(pool), mmr_lambda)
            pool = [pool[i] for i in order]
        hits = []
        for pk in pool:
            r = rows[pk]
            hits.append(Hit(pk=pk, doc_id=r["doc_id"], text=r["text"], score=float(scores[pk]), source=r["source"],
                            title=r["title"], heading=r["heading"], start=int(r["char_start"]),
                            end=int(r["char_end"]), page=int(r["page"]) or None, chunk_index=int(r["chunk_index"]),
                            tags=list(r.get("tags") or []), metadata=dict(r.get("metadata") or {}),
                            dense_score=float(dense[pk]) if pk in dense else float(vec[pk] @ qv),
                            bm25_score=bm.get(pk)))
        if unique_docs:
            seen: set[str] = set()
            hits = [h for h in hits if not (h.doc_id in seen or seen.add(h.doc_id))]
        if reranker is not None and hits:
            top = hits[:rerank_top]
            header = bool(self.meta.get("chunking", {}).get("header", True))
            rerank = reranker.score(query, [context_text(h.title, h.heading, h.text, header) for h in top])
            for h, s in zip(top, rerank):
                h.rerank_score = h.score = float(s)
            hits = sorted(top, key=lambda h: -h.score) + hits[rerank_top:]
        return hits[:k]


def _ranked(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda pk: (-scores[pk], pk))  # ties broken by key: the same order every run


def _top(pks: list[str], scores: np.ndarray, n: int) -> dict[str, float]:
    if len(scores) == 0:
        return {}
    n = min(n, len(scores))
    idx = np.argpartition(-scores, n - 1)[:n]
    return {pks[i]: float(scores[i]) for i in idx if scores[i] > 0}


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def check_embedder(meta: dict, embedder: Embedder, where: str) -> None:
    """Refuse an embedder other than the one the index was built with."""
    rec, ident = meta["embedder"], identity(embedder)
    same = rec["name"] == ident["name"] and int(rec["dim"]) == ident["dim"]
    if same and rec.get("fingerprint") and ident["fingerprint"]:
        same = rec["fingerprint"] == ident["fingerprint"]
    if not same:
        raise EmbedderMismatchError(
            f"{where}: the index was embedded with {rec['name']} (dim {rec['dim']}), not {ident['name']} "
            f"(dim {ident['dim']}); query it with its own embedder (omit --embedder) or build a new index")


def bm25_cache_dir(location: Location) -> Path:
    if location.local:
        return Path(location.uri) / BM25_DIR
    key = hashlib.sha256(f"{location.uri}|{location.collection}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmkit" / "rag" / "bm25"
    return root / key


def build_bm25(store: MilvusStore, revision: int, header: bool = True):
    from llmkit.rag.bm25 import BM25Index

    pks, texts = [], []
    for row in store.scan(["pk", "title", "heading", "text"]):
        pks.append(row["pk"])
        texts.append(context_text(row["title"], row["heading"], row["text"], header))
    return BM25Index.build(pks, texts, revision)


# ----------------------------------------------------------------------------- building


def build_index(documents: Sequence[Document], path: str | Path | None = None, *, uri: str | None = None,
                token: str | None = None, collection: str | None = None, embedder: Embedder | str | None = None,
                embed_base_url: str | None = None, embed_api_key: str | None = None,
                chunking: ChunkConfig | None = None, chunk_tokenizer: str | None = None,
                keep_missing: bool = False, index_type: str = "AUTOINDEX", batch_size: int = 32,
                progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Create or update an index so it holds exactly `documents` (plus the others, with keep_missing).

    Returns a report: documents added / updated / unchanged / deleted, chunks added / deleted / total,
    and timings (embedding separate). Raises RagError subclasses on bad input, before writing anything.
    """
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr) if progress else None)
    chunking = chunking or ChunkConfig()
    chunking.validate()
    loc = locate(path, uri, token, collection)
    ids = [d.id for d in documents]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RagError(f"duplicate document id {dup!r}")

    # 1. what is there now
    meta, state = None, {}
    exists = Path(loc.uri).exists() if loc.local else True
    if exists:
        store = MilvusStore(loc.uri, loc.collection, loc.token)
        try:
            if store.exists():
                meta = store.meta()
                state = store.doc_state()
        finally:
            store.close()
    if meta is not None and meta.get("format") != FORMAT_VERSION:
        raise RagError(f"{loc.uri}: index format {meta.get('format')} is not {FORMAT_VERSION}; rebuild it")

    # 2. the embedder: the index's own when it exists (a different one is refused)
    if meta is not None:
        if isinstance(embedder, str) or embedder is None:
            embedder = load_embedder(embedder or meta["embedder"]["spec"],
                                     base_url=embed_base_url or meta.get("embed_base_url"), api_key=embed_api_key)
        check_embedder(meta, embedder, loc.uri)
    elif not isinstance(embedder, Embedder):
        embedder = load_embedder(embedder, base_url=embed_base_url, api_key=embed_api_key)
    tok_source = chunk_tokenizer or (meta or {}).get("chunk_tokenizer")
    if tok_source:
        counter = TokenCounter.from_file(tok_source)
    elif embedder.tokenizer is not None:
        counter, tok_source = TokenCounter(embedder.tokenizer, embedder.name), embedder.name
    else:  # an endpoint: measure chunks in MiniLM word pieces
        counter, tok_source = TokenCounter.from_file(minilm_dir()), str(minilm_dir())
    setup = json.dumps({"chunking": chunking.to_dict(), "tokenizer": tok_source, "embedder": identity(embedder)},
                       sort_keys=True)

    # 3. what changes
    hashes = {d.id: hashlib.sha256((d.content_hash() + setup).encode()).hexdigest() for d in documents}
    changed = [d for d in documents if d.id not in state or state[d.id]["hash"] != hashes[d.id]]
    removed = [] if keep_missing else sorted(set(state) - set(hashes))
    report = {"index": loc.uri, "collection": loc.collection, "documents": len(documents),
              "added": sum(d.id not in state for d in changed), "updated": sum(d.id in state for d in changed),
              "unchanged": len(documents) - len(changed), "deleted": len(removed), "chunks_added": 0,
              "chunks_deleted": 0, "chunks_total": sum(len(s["pks"]) for s in state.values()),
              "embedder": embedder.name, "dim": embedder.dim, "chunk_seconds": 0.0, "embed_seconds": 0.0,
              "write_seconds": 0.0, "seconds": 0.0, "revision": (meta or {}).get("revision", 0)}
    if meta is not None and not changed and not removed:
        report["seconds"] = round(time.perf_counter() - t0, 3)
        log(f"{loc.uri}: up to date ({len(documents)} documents unchanged)")
        return report

    # 4. chunk and embed everything that changed, before touching the store
    t = time.perf_counter()
    rows: list[dict] = []
    for doc in changed:
        h = hashes[doc.id]
        for c in chunk_document(doc, counter, chunking):
            rows.append(_row(doc, c, h, loc.uri))
    report["chunk_seconds"] = round(time.perf_counter() - t, 3)
    log(f"{len(changed)} changed document(s) -> {len(rows)} chunks; embedding with {embedder.name}")
    t = time.perf_counter()
    texts = [context_text(r["title"], r["heading"], r["text"], chunking.header) for r in rows]
    vectors = embedder.embed(texts, batch_size=batch_size, progress=progress)
    for r, v in zip(rows, vectors):
        r["vector"] = v.tolist()
    report["embed_seconds"] = round(time.perf_counter() - t, 3)

    # 5. write (into a copy, for Milvus Lite)
    t = time.perf_counter()
    old = [pk for d in changed if d.id in state for pk in state[d.id]["pks"]]
    old += [pk for doc_id in removed for pk in state[doc_id]["pks"]]
    new_pks = {r["pk"] for r in rows}
    old = [pk for pk in old if pk not in new_pks]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    total = report["chunks_total"] + len(rows) - len(old) - len(new_pks & _all_pks(state))
    new_meta = {"format": FORMAT_VERSION, "embedder": {**embedder.describe(), **identity(embedder)},
                "embed_base_url": embed_base_url or (meta or {}).get("embed_base_url"),
                "chunking": chunking.to_dict(),
                "chunk_tokenizer": chunk_tokenizer or (meta or {}).get("chunk_tokenizer"),
                "index_type": (meta or {}).get("index_type", index_type.upper()),
                "revision": (meta or {}).get("revision", 0) + 1,
                "documents": len(set(state) - set(removed) | set(hashes)), "chunks": total,
                "created": (meta or {}).get("created", now), "updated": now}
    work = _workdir(loc, exists) if loc.local else None
    store = MilvusStore(str(work) if work else loc.uri, loc.collection, loc.token)
    fresh = meta is None
    try:
        if fresh:
            if store.exists():
                store.drop()  # a collection without our metadata: a leftover of an interrupted first build
            store.create(embedder.dim, new_meta, index_type)
        else:
            store.load()
        store.insert(rows)
        store.delete(old)
        store.set_meta(new_meta)
        store.flush()
        bm25 = build_bm25(store, new_meta["revision"], chunking.header)
        cache = Path(work) / BM25_DIR if work else bm25_cache_dir(loc)
        try:
            bm25.save(cache)
        except OSError:
            if work:
                raise
        store.close()
        if work:
            _swap(work, Path(loc.uri))
    except BaseException:
        store.close()
        if work:
            shutil.rmtree(work, ignore_errors=True)
        elif fresh:
            _drop_quietly(loc)
        raise
    report.update(chunks_added=len(rows), chunks_deleted=len(old), chunks_total=total,
                  revision=new_meta["revision"], write_seconds=round(time.perf_counter() - t, 3),
                  seconds=round(time.perf_counter() - t0, 3))
    report["chunks_per_second"] = round(len(rows) / report["seconds"], 1) if report["seconds"] else None
    report["embed_chunks_per_second"] = (round(len(rows) / report["embed_seconds"], 1)
                                         if report["embed_seconds"] else None)
    log(f"{loc.uri}: +{report['added']} new, {report['updated']} updated, {report['unchanged']} unchanged, "
        f"-{report['deleted']} deleted documents; {total} chunks (revision {new_meta['revision']})")
    return report


def _all_pks(state: dict) -> set[str]:
    return {pk for s in state.values() for pk in s["pks"]}


def _row(doc: Document, chunk, doc_hash: str, where: str) -> dict:
    if len(chunk.text.encode()) > TEXT_BYTES:
        raise RagError(f"{doc.source}: document {doc.id!r} has a chunk of {len(chunk.text.encode())} bytes; "
                       f"Milvus stores at most {TEXT_BYTES} (use --chunking recursive or fixed)")
    if len(doc.id.encode()) > 2048:
        raise RagError(f"{doc.source}: document id longer than 2048 bytes: {doc.id[:80]!r}...")
    return {"pk": f"{doc_hash[:24]}-{chunk.index}", "doc_id": doc.id, "doc_hash": doc_hash,
            "chunk_index": chunk.index, "source": doc.source[:4096], "title": _clip(doc.title, 2048),
            "heading": _clip(chunk.heading, 2048), "text": chunk.text, "char_start": chunk.start,
            "char_end": chunk.end, "page": chunk.page or 0, "tags": [t[:256] for t in doc.tags[:64]],
            "metadata": doc.metadata}


def _clip(s: str, limit: int) -> str:
    data = s.encode()
    return s if len(data) <= limit else data[:limit].decode(errors="ignore")


def _workdir(loc: Location, copy_existing: bool) -> Path:
    """A fresh sibling of the index file to build in; a copy of the index when updating one."""
    target = Path(loc.uri).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", suffix=".tmp.db", dir=target.parent))
    if copy_existing:
        shutil.rmtree(work)
        shutil.copytree(target, work, ignore=shutil.ignore_patterns("LOCK"))
    else:
        work.rmdir()  # Milvus Lite creates its data directory itself
    return work


def _swap(work: Path, target: Path) -> None:
    target = target.resolve()
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(work, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, target)


def _drop_quietly(loc: Location) -> None:
    try:
        store = MilvusStore(loc.uri, loc.collection, loc.token)
        try:
            store.drop()
        finally:
            store.close()
    except Exception:
        pass
