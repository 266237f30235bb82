"""`llmkit data decontaminate`: planted 13-gram overlaps with evaluation items are found and reported."""

import json
import random
from pathlib import Path

import pytest

from llmkit.cli import main
from llmkit.data.decontaminate import DecontamConfig, EvalIndex, EvalItem, decontaminate, normalize_words
from llmkit.data.io import DataError, StepIO

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = [json.loads(l) for l in open(DATA / "alpaca_2k.jsonl")]
SQUAD = [json.loads(l) for l in open(DATA / "squad_rag_corpus.jsonl")]


def test_planted_overlaps_found(tmp_path):
    rng = random.Random(0)
    evals = [r for r in ALPACA if len(r["output"].split()) >= 40][:100]
    ev_path = tmp_path / "eval.jsonl"
    ev_path.write_text("".join(json.dumps(r) + "\n" for r in evals))
    train = [s["text"] for s in SQUAD[:200]]
    planted = {}
    for i in rng.sample(range(len(train)), 20):  # paste 13 consecutive words of an eval output, re-cased
        k = rng.randrange(len(evals))
        words = evals[k]["output"].split()
        s = rng.randrange(len(words) - 13)
        piece = " ".join(words[s:s + 13]).upper()
        w = train[i].split()
        at = rng.randrange(len(w))
        train[i] = " ".join(w[:at] + [piece] + w[at:])
        planted[i] = k
    # 12 shared words are not enough
    near = [j for j in range(len(train)) if j not in planted][:5]
    for i in near:
        words = evals[0]["output"].split()
        train[i] = train[i] + " " + " ".join(words[:12])
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(train)))
    report = decontaminate(StepIO([str(src)], str(tmp_path / "o.jsonl"), progress=False),
                           DecontamConfig(eval_files=[str(ev_path)], eval_fields=["output"]))
    kept = {json.loads(l)["n"] for l in open(tmp_path / "o.jsonl")}
    assert kept == set(range(len(train))) - set(planted)
    assert report["rules"]["contaminated"]["removed"] == 20
    hit_lines = {h["where"] for h in report["eval"]["hits"]}
    assert hit_lines == {f"{ev_path}:{k + 1}" for k in planted.values()}
    assert report["eval"]["items"] == 100 and report["eval"]["items_hit"] == len(set(planted.values()))


def test_report_mode_keeps_documents_and_short_items(tmp_path, capsys):
    ev = tmp_path / "q.jsonl"
    ev.write_text(json.dumps({"id": "q1", "question": "Who wrote the ninety-five theses in 1517?"}) + "\n"
                  + json.dumps({"id": "q2", "question": "Why?"}) + "\n")
    src = tmp_path / "t.txt"
    src.write_text("Everyone knows who wrote the Ninety-Five Theses in 1517 already.\nUnrelated line.\n")
    assert main(["data", "decontaminate", "--input", str(src), "--output", str(tmp_path / "o.txt"), "--eval",
                 str(ev), "--eval-field", "question", "--mode", "report", "--min-ngram", "6", "--json",
                 "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["documents_out"] == 2 and r["rules"]["contaminated"]["flagged"] == 1
    assert r["eval"]["items_too_short"] == 1 and r["eval"]["hits"][0]["id"] == "q1"
    assert r["rules"]["contaminated"]["examples"][0]["ngram"] == "who wrote the ninety five theses in 1517"


def test_index_matches_and_normalisation():
    assert normalize_words("Hello,  World! It's") == "hello world it s"
    idx = EvalIndex([EvalItem("a", "a", " ".join(f"w{i}" for i in range(20)))], ngram=13)
    hits = idx.matches(["x y " + " ".join(f"w{i}" for i in range(5, 18)) + " z", "w0 w1 w2"])
    assert hits[0] == [(0, 13, 2)] and hits[1] == []


def test_bad_eval_file(tmp_path):
    ev = tmp_path / "e.jsonl"
    ev.write_text('{"q": "x"}\n')
    src = tmp_path / "t.txt"
    src.write_text("x\n")
    with pytest.raises(DataError, match="e.jsonl:1: none of the fields text"):
        decontaminate(StepIO([str(src)], str(tmp_path / "o.txt"), progress=False),
                      DecontamConfig(eval_files=[str(ev)]))
