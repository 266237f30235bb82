"""Retrieval-augmented generation: ingest, chunk, embed, index (Milvus Lite or a Milvus cluster), retrieve, answer.

    from llmkit.rag import Index, read_documents, build_index, answer_question
    docs = read_documents(["docs/"])
    build_index(docs, "docs.db")                 # Milvus Lite file; uri="http://host:19530" for a cluster
    with Index.open("docs.db") as index:
        hits = index.search("what is X?", k=5)    # hybrid: dense + BM25, z-score fusion

Heavy libraries (torch, pymilvus, sentence-transformers, bm25s) load only when used.
"""

from llmkit.rag.errors import EmbedderMismatchError, IndexNotFoundError, IngestError, RagError

__all__ = ["Index", "Hit", "build_index", "read_documents", "Document", "answer_question", "stream_answer",
           "ground_messages", "SemanticCache", "load_embedder", "llmkit_embeddings", "RagError", "IngestError",
           "IndexNotFoundError", "EmbedderMismatchError"]

_LAZY = {
    "Index": "llmkit.rag.index", "Hit": "llmkit.rag.index", "build_index": "llmkit.rag.index",
    "read_documents": "llmkit.rag.ingest", "Document": "llmkit.rag.ingest",
    "answer_question": "llmkit.rag.answer", "stream_answer": "llmkit.rag.answer",
    "ground_messages": "llmkit.rag.answer", "SemanticCache": "llmkit.rag.cache",
    "load_embedder": "llmkit.rag.embed", "llmkit_embeddings": "llmkit.rag.embed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit.rag' has no attribute {name!r}")
