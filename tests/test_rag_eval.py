"""RAG evaluation: the metrics on hand-made rankings, answer EM/F1, the question file's errors, and the real
SQuAD corpus indexed with the bundled MiniLM (dense recall@5 >= 0.85, hybrid at least the better single)."""

import json
import math
import time
from pathlib import Path

import pytest

from llmkit.rag.errors import IngestError
from llmkit.rag.evaluate import (evaluate, exact_match, normalize_answer, read_questions, retrieval_metrics,
                                 strip_citations, token_f1)
from llmkit.rag.index import Index, build_index
from llmkit.rag.ingest import read_documents

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_retrieval_metrics_by_hand():
    rankings = [["a", "b", "c"], ["x", "y", "g"], ["p", "q", "r"], ["g1", "n", "g2"]]
    golds = [["a"], ["g"], ["zzz"], ["g1", "g2"]]
    m = retrieval_metrics(rankings, golds, k=10)
    assert set(m) == {"recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"}
    assert m["recall@1"] == pytest.approx((1 + 0 + 0 + 0.5) / 4, abs=1e-4)
    assert m["recall@5"] == pytest.approx((1 + 1 + 0 + 1) / 4, abs=1e-4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4, abs=1e-4)
    ndcg2 = 1 / math.log2(4)
    ndcg4 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((1 + ndcg2 + 0 + ndcg4) / 4, abs=1e-4)
    assert "recall@20" in retrieval_metrics(rankings, golds, k=20)


def test_answer_metrics_follow_squad_normalisation():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert token_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert token_f1("nothing alike", ["Eiffel Tower", "Paris"]) == 0.0
    assert strip_citations("Scheele [1] and Priestley [2, 3].") == "Scheele and Priestley."


@pytest.mark.parametrize("content, fragment", [
    ('{"question": "q?", "gold": "a"}\n{"gold": "b"}\n', "q.jsonl:2: no 'question' string"),
    ('{"question": "q?"}\n', "q.jsonl:1: 'gold' must be a document id"),
    ('{"question": "q?", "gold": []}\n', "q.jsonl:1: 'gold' must be"),
    ('{"question": "q?", "gold": "a", "answers": [1]}\n', "q.jsonl:1: 'answers' must be"),
    ('{"question": "q?", "gold": "a"\n', "q.jsonl:1: invalid JSON"),
    ("\n", "q.jsonl: empty file"),
])
def test_question_file_errors(tmp_path, content, fragment):
    f = tmp_path / "q.jsonl"
    f.write_text(content)
    with pytest.raises(IngestError) as e:
        read_questions(f)
    assert fragment in str(e.value)


def test_questions_accept_one_or_many_gold_ids(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a?", "gold": "d1", "answers": "x"}\n{"question": "b?", "gold": ["d1", 7]}\n')
    assert read_questions(f) == [{"question": "a?", "gold": ["d1"], "answers": ["x"]},
                                 {"question": "b?", "gold": ["d1", "7"], "answers": []}]
    assert len(read_questions(f, limit=1)) == 1


def test_squad_retrieval_with_minilm(tmp_path):
    """The whole corpus (551 paragraphs) and all 500 questions, with the defaults of `llmkit rag index`."""
    t0 = time.perf_counter()
    docs = read_documents([DATA / "squad_rag_corpus.jsonl"])
    report = build_index(docs, tmp_path / "squad.db")
    assert report["documents"] == 551 and report["chunks_total"] > 551  # long paragraphs were split
    questions = read_questions(DATA / "squad_rag_questions.jsonl")
    with Index.open(tmp_path / "squad.db") as index:
        m = evaluate(index, questions, k=10)
    print(json.dumps(m), f"{time.perf_counter() - t0:.0f}s")
    assert m["dense"]["recall@5"] >= 0.85
    best = {key: max(m["dense"][key], m["bm25"][key]) for key in m["dense"]}
    assert m["hybrid"]["recall@5"] >= best["recall@5"]
    for key in m["hybrid"]:
        assert m["hybrid"][key] >= best[key] - 0.005, key
    # the plain brute-force pipeline (MiniLM, bm25s, RRF k=60, no chunking) gets 0.87 / 0.91 / 0.94
    assert m["dense"]["recall@5"] > 0.87 and m["bm25"]["recall@5"] > 0.91 and m["hybrid"]["recall@5"] > 0.94
