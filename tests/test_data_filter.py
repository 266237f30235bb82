"""`llmkit data filter`: every heuristic rule on a document made to trip it and one made to pass; language,
blocklist, classifier and perplexity filters; the report and the CLI flags."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.cli import main
from llmkit.data.filter import RULES, FilterConfig, HashedClassifier, PerplexityScorer, QualityRules, \
    detect_language, filter_corpus
from llmkit.data.io import DataError, StepIO

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SQUAD = [json.loads(l)["text"] for l in open(DATA / "squad_rag_corpus.jsonl")]
HH = [json.loads(l)["chosen"] for l in open(DATA / "hh_rlhf_2k.jsonl")]
GOOD = next(t for t in SQUAD if len(t.split()) > 120 and QualityRules(FilterConfig()).first_failure(t) is None)
VOCAB = sorted({w for t in SQUAD for w in t.lower().split() if w.isalpha() and len(w) == 6})


def unique_words(n, seed=0):
    return random.Random(seed).sample(VOCAB, n)


def passage(words, k):
    """k words of filler text with stop words so the Gopher quality rules pass."""
    out = []
    for i, w in enumerate(words[:k]):
        out.append(w)
        if i % 6 == 5:
            out.append(["the", "and", "of", "to", "with", "that"][i // 6 % 6])
    return " ".join(out)


def skip_before(rule):
    """Rules checked before `rule` in the heuristic order, so a test can isolate one rule."""
    names = list(dict.fromkeys(r[0] for r in RULES))
    return names[: names.index(rule)]


def repeated_ngram_doc(n_gram_words, count, filler, seed=1):
    """`count` copies of an n-word phrase of 6-letter words, each followed by unique filler words."""
    words = unique_words(n_gram_words + count * filler, seed)
    phrase, rest = words[:n_gram_words], words[n_gram_words:]
    out = []
    for i in range(count):
        out += phrase + rest[i * filler:(i + 1) * filler]
    return " ".join(out) + " the and of"


TRIP = {
    "word_count": "The cat sat on the mat with the dog and that was all.",
    "mean_word_length": " ".join(["I am to be of it in on at by we go so"] * 6),
    "symbol_word_ratio": GOOD + " #" * 40,
    "bullet_lines": "\n".join(f"• item {w} with the thing and that" for w in unique_words(12)),
    "ellipsis_lines": "\n".join(f"{passage(unique_words(10, i), 10)}" + ("..." if i % 2 else ".") for i in range(10)),
    "alpha_words": GOOD + " " + " ".join(str(1000 + i) for i in range(200)),
    "stop_words": " ".join(unique_words(80)),
    "lorem_ipsum": GOOD + " Lorem ipsum dolor sit amet.",
    "dup_lines": "\n".join([passage(unique_words(12, i), 12) for i in range(6)] +
                           [passage(unique_words(12, 0), 12)] * 4),
    "dup_line_chars": "\n".join([passage(unique_words(60, 99), 60)] * 2 +
                                [passage(unique_words(8, i), 8) for i in range(10)]),
    "dup_paragraphs": "\n\n".join([passage(unique_words(12, i), 12) for i in range(6)] +
                                  [passage(unique_words(12, 0), 12)] * 4),
    "dup_paragraph_chars": "\n\n".join([passage(unique_words(60, 99), 60)] * 2 +
                                       [passage(unique_words(8, i), 8) for i in range(10)]),
    "top_2gram": repeated_ngram_doc(2, 30, 3),
    "top_3gram": repeated_ngram_doc(3, 14, 6),
    "top_4gram": repeated_ngram_doc(4, 9, 8),
}
for n in range(5, 11):
    # one 16-word sentence repeated twice inside ~70 unique words: ~30% of the characters are repeats
    TRIP[f"dup_{n}gram"] = passage(unique_words(40, 7), 40) + " " + " ".join([passage(unique_words(16, 8), 16)] * 2)


@pytest.mark.parametrize("rule", list(TRIP))
def test_each_rule_trips_and_passes(rule):
    skip = skip_before(rule)
    if rule.startswith("dup_paragraph"):
        skip = sorted(set(skip) - {"dup_paragraphs"})
    rules = QualityRules(FilterConfig(skip_rules=skip))
    fail = rules.first_failure(TRIP[rule])
    assert fail is not None and fail[0] == rule, fail
    assert rules.first_failure(GOOD) is None
    # the rule's own flag moves the threshold: disable it and the document gets past it
    fields = {f: None for r, f, _, _ in RULES if r == rule}
    relaxed = QualityRules(FilterConfig(skip_rules=skip, **fields)).first_failure(TRIP[rule])
    assert relaxed is None or relaxed[0] != rule


def test_max_words_and_curly_braces():
    assert QualityRules(FilterConfig(max_words=60)).first_failure(GOOD)[0] == "word_count"
    assert QualityRules(FilterConfig()).first_failure(GOOD + " {") is None  # off by default
    assert QualityRules(FilterConfig(max_curly_braces=0)).first_failure(GOOD + " {")[0] == "curly_brace"


def test_real_text_mostly_passes():
    rules = QualityRules(FilterConfig())
    passed = sum(rules.first_failure(t) is None for t in SQUAD)
    assert passed / len(SQUAD) > 0.95


def test_unknown_rule_is_an_error():
    with pytest.raises(DataError, match="unknown rule"):
        FilterConfig(skip_rules=["nope"])


def write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


HEURISTICS = list(dict.fromkeys(r[0] for r in RULES))

GERMAN = ("Die Stadt liegt am Ufer des Flusses und hat eine lange Geschichte. Im Mittelalter war sie ein wichtiger "
          "Handelsplatz, und noch heute prägen alte Häuser, Kirchen und enge Gassen das Bild der Altstadt. Viele "
          "Besucher kommen im Sommer, um die Museen zu besichtigen und am Wasser spazieren zu gehen.")


def test_language_filter(tmp_path):
    assert detect_language(GOOD)[0] == "en" and detect_language(GERMAN)[0] == "de"
    src = write(tmp_path / "in.jsonl", [GOOD, GERMAN])
    report = filter_corpus(StepIO([src], str(tmp_path / "o.jsonl"), progress=False),
                           FilterConfig(languages=["en"], skip_rules=HEURISTICS))
    assert report["documents_out"] == 1 and report["rules"]["language"]["removed"] == 1
    assert report["rules"]["language"]["examples"][0]["language"] == "de"


def test_blocklist_whole_words(tmp_path):
    docs = [GOOD, GOOD + " Watch free porn videos here.", GOOD + " Buy a size XXXL shirt."]
    src = write(tmp_path / "in.jsonl", docs)
    report = filter_corpus(StepIO([src], str(tmp_path / "o.jsonl"), progress=False),
                           FilterConfig(blocklist=["default"]))
    assert report["rules"]["blocklist"]["removed"] == 1 and report["documents_out"] == 2
    terms = tmp_path / "terms.txt"
    terms.write_text("# mine\nmartin luther\n")
    report = filter_corpus(StepIO([write(tmp_path / "l.jsonl", [SQUAD[0], GERMAN])], str(tmp_path / "o2.jsonl"),
                                  progress=False), FilterConfig(blocklist=[str(terms)], skip_rules=HEURISTICS))
    assert report["rules"]["blocklist"]["removed"] == 1


def test_classifier_train_save_apply(tmp_path):
    clf = HashedClassifier.train(SQUAD[:300], HH[:300], bits=16, epochs=120)
    path = tmp_path / "clf.npz"
    clf.save(path)
    clf = HashedClassifier.load(path)
    assert (clf.score(SQUAD[400:]) > 0.5).mean() > 0.9 and (clf.score(HH[400:600]) < 0.5).mean() > 0.9
    src = write(tmp_path / "in.jsonl", SQUAD[400:450] + HH[400:450])
    report = filter_corpus(StepIO([src], str(tmp_path / "o.jsonl"), progress=False),
                           FilterConfig(classifier=str(path), skip_rules=HEURISTICS))
    assert report["rules"]["classifier"]["removed"] >= 45 and report["documents_out"] >= 45
    # the CLI trains from example files and saves the model beside the output
    pos, neg = write(tmp_path / "pos.jsonl", SQUAD[:200]), write(tmp_path / "neg.jsonl", HH[:200])
    assert main(["data", "filter", "--input", src, "--output", str(tmp_path / "c.jsonl"), "--classifier-positive",
                 pos, "--classifier-negative", neg, "--classifier-bits", "16", "--skip-rules", *HEURISTICS,
                 "--quiet"]) == 0
    assert (tmp_path / "c.jsonl.classifier.npz").exists()
    with pytest.raises(DataError, match="not a classifier"):
        HashedClassifier.load(src)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import llmkit
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("ppl")
    corpus = d / "c.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:30_000])
    tok = train_tokenizer([corpus], "byte-bpe", 300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                  bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    llmkit.save(Transformer(cfg), tok, d / "model")
    return str(d / "model")


def test_perplexity_band(tmp_path, tiny_model):
    docs = SQUAD[:20]
    scorer = PerplexityScorer(tiny_model, max_tokens=64, batch_size=8)
    scores = scorer(docs)
    # batching and padding do not change a document's score
    single = np.array([scorer([d])[0] for d in docs[:4]])
    assert np.allclose(scores[:4], single, rtol=1e-4)
    src = write(tmp_path / "in.jsonl", docs)
    report = filter_corpus(StepIO([src], str(tmp_path / "o.jsonl"), progress=False, workers=2),
                           FilterConfig(perplexity_model=tiny_model, perplexity_max_percentile=50,
                                        perplexity_max_tokens=64, skip_rules=HEURISTICS))
    kept = [json.loads(l)["text"] for l in open(tmp_path / "o.jsonl")]
    assert report["documents_in"] == 20 and report["documents_out"] == len(kept) == 10
    assert report["rules"]["perplexity"]["removed"] == 10
    median = np.percentile(scores, 50)
    assert all(scores[docs.index(t)] <= median for t in kept)


def test_report_first_failing_rule_with_examples_and_cli(tmp_path, capsys):
    docs = [GOOD, TRIP["word_count"], TRIP["stop_words"], TRIP["bullet_lines"]]
    src = write(tmp_path / "in.jsonl", docs)
    assert main(["data", "filter", "--input", src, "--output", str(tmp_path / "o.jsonl"), "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["documents_in"] == 4 and r["documents_out"] == 1
    assert {k: v["removed"] for k, v in r["rules"].items()} == {"word_count": 1, "stop_words": 1, "bullet_lines": 1}
    ex = r["rules"]["word_count"]["examples"][0]
    assert ex["where"].endswith("in.jsonl:2") and ex["value"] == 13 and ex["threshold"] == 50
    assert main(["data", "filter", "--input", src, "--output", str(tmp_path / "o.jsonl"), "--min-words", "5",
                 "--min-stop-words", "null", "--max-bullet-lines", "1.0", "--json", "--quiet"]) == 0
    rules = json.loads(capsys.readouterr().out)["rules"]
    assert not {"word_count", "stop_words", "bullet_lines"} & set(rules)  # its repeated phrase still trips one
