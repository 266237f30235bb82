"""BM25 over the chunks of an index (bm25s: Lucene's BM25 on sparse matrices).

It is derived data: rebuilt from the texts in Milvus whenever the index revision changes, and cached on
disk (inside a Milvus Lite data directory, or under ~/.cache/llmkit/rag for a cluster) so a query does
not pay for it. English stop words are removed and words stemmed (Snowball, via PyStemmer) when
PyStemmer is installed; the cache records which, so queries are tokenised the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _stemmer(name: str | None):
    if not name:
        return None
    import Stemmer

    return Stemmer.Stemmer(name)


def default_stemmer() -> str | None:
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        return None
    return "english"


class BM25Index:
    def __init__(self, retriever, pks: list[str], stemmer: str | None, revision: int):
        self.retriever, self.pks, self.stemmer_name, self.revision = retriever, pks, stemmer, revision
        self.row = {pk: i for i, pk in enumerate(pks)}
        self._stemmer = _stemmer(stemmer)

    @classmethod
    def build(cls, pks: list[str], texts: Sequence[str], revision: int, stemmer: str | None = "default",
              k1: float = 1.5, b: float = 0.75) -> BM25Index:
        import bm25s

        stemmer = default_stemmer() if stemmer == "default" else stemmer
        retriever = bm25s.BM25(k1=k1, b=b)
        if texts:
            tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=_stemmer(stemmer), show_progress=False)
            retriever.index(tokens, show_progress=False)
        return cls(retriever, list(pks), stemmer, revision)

    def tokens(self, query: str) -> list[str]:
        import bm25s

        return bm25s.tokenize([query], stopwords="en", stemmer=self._stemmer, return_ids=False,
                              show_progress=False)[0]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk (rows in `pks` order); zeros when no query word is in the index."""
        if not self.pks:
            return np.zeros(0, dtype=np.float32)
        tokens = [t for t in self.tokens(query) if t in self.retriever.vocab_dict]
        if not tokens:
            return np.zeros(len(self.pks), dtype=np.float32)
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)

    # -- cache

    def save(self, directory: Path) -> None:
        """Write atomically: a reader sees the old cache or the new one, never half of one."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bm25-", dir=directory.parent))
        try:
            if self.pks:
                self.retriever.save(str(tmp / "bm25"), show_progress=False)
            (tmp / "pks.json").write_text(json.dumps(self.pks))
            (tmp / "info.json").write_text(json.dumps({"revision": self.revision, "stemmer": self.stemmer_name}))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Path, revision: int) -> BM25Index | None:
        """The cached index if it is for `revision`, else None."""
        import bm25s

        directory = Path(directory)
        try:
            info = json.loads((directory / "info.json").read_text())
            if info["revision"] != revision:
                return None
            pks = json.loads((directory / "pks.json").read_text())
            retriever = bm25s.BM25.load(str(directory / "bm25"), show_progress=False) if pks else bm25s.BM25()
            return cls(retriever, pks, info["stemmer"], revision)
        except (OSError, ValueError, KeyError, ImportError):
            return None
