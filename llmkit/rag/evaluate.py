"""Retrieval and answer evaluation at the document level.

Questions are JSONL: `question`, `gold` (a document id or a list of them), optional `answers` (list of
strings). For each mode (dense, BM25, hybrid): recall@1/5/10 (share of the gold documents in the top k,
averaged over questions), MRR (reciprocal rank of the first gold document within the top k) and nDCG@10
(binary relevance). With a generator: exact match and token F1 of the answer against the best-matching
reference, normalised as in the official SQuAD script.
"""

from __future__ import annotations

import collections
import json
import math
import re
import string
import sys
from collections.abc import Sequence
from pathlib import Path

from llmkit.rag.errors import IngestError

CUTOFFS = (1, 5, 10)


def read_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: questions file not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        place = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(f"{place}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise IngestError(f"{place}: expected a JSON object")
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise IngestError(f"{place}: no 'question' string")
        gold = rec.get("gold")
        gold = [gold] if isinstance(gold, (str, int)) and not isinstance(gold, bool) else gold
        if not isinstance(gold, list) or not gold or not all(isinstance(g, (str, int)) for g in gold):
            raise IngestError(f"{place}: 'gold' must be a document id or a non-empty list of them")
        answers = rec.get("answers", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise IngestError(f"{place}: 'answers' must be a string or a list of strings")
        out.append({"question": q, "gold": [str(g) for g in gold], "answers": answers})
        if limit and len(out) >= limit:
            break
    if not out:
        raise IngestError(f"{path}: empty file (no questions)")
    return out


def retrieval_metrics(rankings: Sequence[Sequence[str]], golds: Sequence[Sequence[str]], k: int = 10) -> dict:
    """Document rankings (best first, unique ids) against gold ids, one per question."""
    cutoffs = sorted(set(CUTOFFS) | {k})
    sums = collections.defaultdict(float)
    for ranking, gold in zip(rankings, golds):
        gold = set(gold)
        ranking = list(ranking)[: max(cutoffs)]
        for c in cutoffs:
            sums[f"recall@{c}"] += len(gold & set(ranking[:c])) / len(gold)
        first = next((i for i, d in enumerate(ranking[:max(k, 10)]) if d in gold), None)
        sums["mrr"] += 0.0 if first is None else 1.0 / (first + 1)
        dcg = sum(1.0 / math.log2(i + 2) for i, d in enumerate(ranking[:10]) if d in gold)
        ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(gold), 10)))
        sums["ndcg@10"] += dcg / ideal
    n = max(len(rankings), 1)
    keys = [f"recall@{c}" for c in cutoffs] + ["mrr", "ndcg@10"]
    return {key: round(sums[key] / n, 4) for key in keys}


# SQuAD's official normalisation: lower case, no punctuation, no articles, single spaces
def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    def f1(pred: str, ref: str) -> float:
        p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
        common = collections.Counter(p) & collections.Counter(r)
        same = sum(common.values())
        if not p or not r:
            return float(p == r)
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(r)
        return 2 * precision * recall / (precision + recall)

    return max((f1(prediction, r) for r in references), default=0.0)


def strip_citations(text: str) -> str:
    return re.sub(r"\s*\[\d+(?:\s*[,;]\s*\d+)*\]", "", text).strip()


def evaluate(index, questions: list[dict], k: int = 10, modes: Sequence[str] = ("dense", "bm25", "hybrid"),
             generator=None, answer_k: int = 5, budget: int = 1536, min_score: float = 0.0,
             progress: bool = False, **search) -> dict:
    """{"dense": {...}, "bm25": {...}, "hybrid": {...}} (+ "answers": {"exact_match", "f1"} with a generator)."""
    texts = [q["question"] for q in questions]
    golds = [q["gold"] for q in questions]
    vectors = index.embed_queries(texts, progress=progress)
    depth = max(k, max(CUTOFFS))
    report = {}
    for mode in modes:
        results = index.search_many(texts, k=depth, mode=mode, unique_docs=True, query_vectors=vectors, **search)
        report[mode] = retrieval_metrics([[h.doc_id for h in hits] for hits in results], golds, k)
        if progress:
            print(f"{mode}: {report[mode]}", file=sys.stderr)
    if generator is not None:
        from llmkit.rag.answer import answer_question

        scored = [q for q in questions if q["answers"]]
        em = f1 = 0.0
        for i, q in enumerate(scored, 1):
            answer = answer_question(index, q["question"], generator, k=answer_k, budget=budget,
                                     min_score=min_score, **search)
            prediction = strip_citations(answer.text)
            em += exact_match(prediction, q["answers"])
            f1 += token_f1(prediction, q["answers"])
            if progress and (i % 10 == 0 or i == len(scored)):
                print(f"\ranswers: {i}/{len(scored)}", end="\n" if i == len(scored) else "", file=sys.stderr)
        n = max(len(scored), 1)
        report["answers"] = {"exact_match": round(em / n, 4), "f1": round(f1 / n, 4)}
    return report
