"""A semantic cache, as GPTCache does it: answers keyed by the query's embedding.

A new query whose embedding is within `threshold` cosine similarity of a cached one (in the same
namespace: index revision and model) gets the cached answer. Entries expire after `ttl` seconds; past
`max_entries` the least recently used one is evicted. Hits, misses, evictions and expirations are
counted. With `path`, the cache is a JSON file, loaded on start and written atomically on every store,
so separate `llmkit rag ask` runs share it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmkit.rag.errors import RagError


class SemanticCache:
    def __init__(self, threshold: float = 0.92, ttl: float | None = 24 * 3600, max_entries: int = 1000,
                 path: str | Path | None = None, clock: Callable[[], float] = time.time):
        if not -1.0 <= threshold <= 1.0:
            raise RagError(f"cache threshold is a cosine similarity in [-1, 1], got {threshold}")
        if max_entries < 1:
            raise RagError(f"cache max_entries must be >= 1, got {max_entries}")
        self.threshold, self.ttl, self.max_entries, self.clock = threshold, ttl, max_entries, clock
        self.path = Path(path) if path else None
        self.entries: list[dict] = []  # {"vector", "query", "value", "namespace", "created", "used"}
        self.counts = {"hits": 0, "misses": 0, "evictions": 0, "expired": 0}
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            self._load()

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, vector, namespace: str = "") -> dict | None:
        """The cached value for the closest earlier query above the threshold, or None (a miss)."""
        with self._lock:
            self._expire()
            candidates = [e for e in self.entries if e["namespace"] == namespace]
            best, best_sim = None, -2.0
            if candidates:
                v = _unit(vector)
                sims = np.stack([e["vector"] for e in candidates]) @ v
                i = int(sims.argmax())
                best, best_sim = candidates[i], float(sims[i])
            if best is None or best_sim < self.threshold:
                self.counts["misses"] += 1
                self._save()
                return None
            self.counts["hits"] += 1
            best["used"] = self.clock()
            self._save()
            return best["value"]

    def store(self, vector, query: str, value: dict, namespace: str = "") -> None:
        with self._lock:
            now = self.clock()
            self.entries.append({"vector": _unit(vector), "query": query, "value": value, "namespace": namespace,
                                 "created": now, "used": now})
            self._expire()
            while len(self.entries) > self.max_entries:
                oldest = min(range(len(self.entries)), key=lambda i: self.entries[i]["used"])
                self.entries.pop(oldest)
                self.counts["evictions"] += 1
            self._save()

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self._save()

    def stats(self) -> dict:
        total = self.counts["hits"] + self.counts["misses"]
        return {**self.counts, "size": len(self.entries), "max_entries": self.max_entries,
                "hit_rate": round(self.counts["hits"] / total, 4) if total else 0.0}

    def _expire(self) -> None:
        if self.ttl is None:
            return
        now = self.clock()
        keep = [e for e in self.entries if now - e["created"] <= self.ttl]
        self.counts["expired"] += len(self.entries) - len(keep)
        self.entries = keep

    def _save(self) -> None:
        if not self.path:
            return
        data = {"counts": self.counts,
                "entries": [{**e, "vector": e["vector"].tolist()} for e in self.entries]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.entries = [{**e, "vector": np.asarray(e["vector"], dtype=np.float32)} for e in data["entries"]]
            self.counts.update(data.get("counts", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RagError(f"{self.path}: not a semantic cache file ({type(e).__name__}: {e})") from None


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-12)
