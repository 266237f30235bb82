"""The vector store: one Milvus collection per index, reached through `pymilvus.MilvusClient`.

A local path ending in `.db` is Milvus Lite, embedded in this process; `http://host:19530` (with a token)
is a standalone or distributed Milvus cluster. The client API, the schema and every query are the same,
so an index moves to a cluster by changing the URI and nothing else.

One row per chunk: its vector, text, document id and content hash, source, title, heading, character
offsets, page, tags and JSON metadata. The index's own metadata (embedder, dimension, chunking,
revision) lives in the collection's properties, so it travels with the collection.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llmkit.rag.errors import IndexNotFoundError, RagError

META_KEY = "llmkit.rag"
TEXT_BYTES = 65535  # Milvus' VARCHAR limit
FIELDS = ["pk", "doc_id", "doc_hash", "chunk_index", "source", "title", "heading", "text", "char_start",
          "char_end", "page", "tags", "metadata"]
INSERT_BATCH = 512

_lite_lock = threading.Lock()
_lite_refs: dict[str, int] = {}  # Milvus Lite server per data dir, shared by the clients of this process


def is_local(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def quote(value: str) -> str:
    """A Milvus expression string literal."""
    return json.dumps(value, ensure_ascii=False)


class MilvusStore:
    def __init__(self, uri: str, collection: str, token: str | None = None):
        self.uri, self.collection, self.local = uri, collection, is_local(uri)
        if self.local and not uri.endswith(".db"):
            raise RagError(f"{uri}: a Milvus Lite index path must end in .db (or pass --uri http://HOST:19530)")
        from pymilvus import MilvusClient  # its import configures its loggers: quiet them after it

        for name in ("pymilvus", "pymilvus.milvus_client", "milvus_lite"):  # they log failures; we raise instead
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if self.local:  # Milvus Lite serves in this process; it lacks AllocTimestamp, which iterators try first
            logging.getLogger("grpc._server").setLevel(logging.CRITICAL)

        key = str(Path(uri).resolve()) if self.local else ""
        # Milvus Lite's in-process server refuses pymilvus' idle keepalive pings (GOAWAY too_many_pings,
        # logged by gRPC while we embed for minutes): ping a local server only during calls
        options = {"grpc_options": {"grpc.keepalive_permit_without_calls": 0}} if self.local else {}
        try:
            self.client = MilvusClient(uri=key or uri, token=token or "", **options)
        except Exception as e:
            hint = " (is another process using this Milvus Lite index?)" if self.local else ""
            raise RagError(f"{uri}: cannot open Milvus: {_short(e)}{hint}") from None
        self._key = key
        if key:
            with _lite_lock:
                _lite_refs[key] = _lite_refs.get(key, 0) + 1

    # -- lifecycle

    def close(self) -> None:
        if self.client is None:
            return
        try:
            self.client.close()
        finally:
            self.client = None
            if self._key:
                with _lite_lock:
                    _lite_refs[self._key] -= 1
                    last = _lite_refs[self._key] == 0
                    if last:
                        del _lite_refs[self._key]
                if last:  # stop the in-process Milvus Lite server and free its lock on the data dir
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(self._key)

    def exists(self) -> bool:
        return bool(self.client.has_collection(self.collection))

    def create(self, dim: int, meta: dict, index_type: str = "AUTOINDEX") -> None:
        from pymilvus import DataType

        c = self.client
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False, description="llmkit rag chunks")
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=2048)
        schema.add_field("doc_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("source", DataType.VARCHAR, max_length=4096)
        schema.add_field("title", DataType.VARCHAR, max_length=2048)
        schema.add_field("heading", DataType.VARCHAR, max_length=2048)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_BYTES)
        schema.add_field("char_start", DataType.INT64)
        schema.add_field("char_end", DataType.INT64)
        schema.add_field("page", DataType.INT64)  # 0: no pages
        schema.add_field("tags", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=64, max_length=256)
        schema.add_field("metadata", DataType.JSON)
        params = c.prepare_index_params()
        extra = {"M": 16, "efConstruction": 200} if index_type.upper() == "HNSW" else {}
        params.add_index("vector", index_type=index_type.upper(), metric_type="COSINE", params=extra)
        c.create_collection(self.collection, schema=schema, index_params=params,
                            properties={META_KEY: json.dumps(meta)})

    def drop(self) -> None:
        if self.exists():
            self.client.drop_collection(self.collection)

    # -- metadata

    def meta(self) -> dict:
        if not self.exists():
            raise IndexNotFoundError(f"{self.uri}: no index collection {self.collection!r} "
                                     f"(build it with: llmkit rag index --input FILES --index ...)")
        props = self.client.describe_collection(self.collection).get("properties", {}) or {}
        if META_KEY not in props:
            raise IndexNotFoundError(f"{self.uri}: collection {self.collection!r} is not an llmkit rag index")
        self.load()
        return json.loads(props[META_KEY])

    def load(self) -> None:
        """Load the collection into memory (a reopened or released one answers no query before)."""
        state = self.client.get_load_state(self.collection).get("state")
        if "Loaded" not in str(state):
            self.client.load_collection(self.collection)

    def set_meta(self, meta: dict) -> None:
        self.client.alter_collection_properties(self.collection, properties={META_KEY: json.dumps(meta)})

    # -- writes

    def insert(self, rows: list[dict]) -> None:
        for i in range(0, len(rows), INSERT_BATCH):
            self.client.upsert(self.collection, rows[i: i + INSERT_BATCH])

    def delete(self, pks: list[str]) -> None:
        for i in range(0, len(pks), 1000):
            batch = pks[i: i + 1000]
            self.client.delete(self.collection, filter=f"pk in [{', '.join(map(quote, batch))}]")

    def flush(self) -> None:
        self.client.flush(self.collection)

    # -- reads

    def count(self, filter: str = "") -> int:
        rows = self.client.query(self.collection, filter=filter, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def vectors(self, filter: str = "") -> tuple[list[str], np.ndarray]:
        """pks and unit vectors [N, dim] of the rows matching `filter`."""
        pks, vecs = [], []
        for row in self.scan(["pk", "vector"], filter=filter):
            pks.append(row["pk"])
            vecs.append(row["vector"])
        mat = np.asarray(vecs, dtype=np.float32).reshape(len(pks), -1)
        return pks, mat / np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)

    def scan(self, fields: list[str], filter: str = "", batch_size: int = 2000) -> Iterator[dict]:
        it = self.client.query_iterator(self.collection, batch_size=batch_size, filter=filter, output_fields=fields)
        try:
            while True:
                batch = it.next()
                if not batch:
                    return
                yield from batch
        finally:
            it.close()

    def doc_state(self) -> dict[str, dict]:
        """{doc_id: {"hash": content hash, "pks": [chunk pks]}} for every document in the index."""
        state: dict[str, dict] = {}
        for row in self.scan(["pk", "doc_id", "doc_hash"]):
            entry = state.setdefault(row["doc_id"], {"hash": row["doc_hash"], "pks": []})
            entry["pks"].append(row["pk"])
        return state

    def search(self, vectors: np.ndarray, limit: int, filter: str = "", ef: int | None = None) -> list[list[tuple]]:
        """Per query: [(pk, cosine), ...] best first."""
        if len(vectors) == 0:
            return []
        params = {"metric_type": "COSINE", "params": {"ef": max(ef or 0, limit, 64)}}
        res = self.client.search(self.collection, data=[v.tolist() for v in vectors], limit=limit, filter=filter,
                                 output_fields=["pk"], search_params=params)
        return [[(h["pk"] if "pk" in h else h["id"], float(h["distance"])) for h in hits] for hits in res]

    def get(self, pks: Iterable[str], fields: list[str] | None = None) -> dict[str, dict]:
        pks = list(dict.fromkeys(pks))
        out: dict[str, dict] = {}
        for i in range(0, len(pks), 1000):
            for row in self.client.get(self.collection, ids=pks[i: i + 1000], output_fields=fields or FIELDS):
                out[row["pk"]] = row
        return out

    def pks_matching(self, filter: str) -> set[str]:
        return {row["pk"] for row in self.scan(["pk"], filter=filter)}


def make_filter(sources: Iterable[str] = (), tags: Iterable[str] = (), expr: str | None = None) -> str:
    """A Milvus boolean expression: any of `sources` (`*` is a wildcard), any of `tags`, and `expr`."""
    parts = []
    sources, tags = list(sources), list(tags)
    if sources:
        terms = [f"source like {quote(_like(s))}" if "*" in s else f"source == {quote(s)}" for s in sources]
        parts.append("(" + " or ".join(terms) + ")")
    if tags:
        parts.append(f"array_contains_any(tags, [{', '.join(map(quote, tags))}])")
    if expr:
        parts.append(f"({expr})")
    return " and ".join(parts)


def _like(pattern: str) -> str:
    return pattern.replace("%", "\\%").replace("*", "%")


def _short(e: Exception) -> str:
    text = getattr(e, "message", None) or str(e)
    return " ".join(str(text).split())[:300]
