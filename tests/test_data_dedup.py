"""`llmkit data dedup`: near-duplicates with small edits are found (recall >= 0.95 at Jaccard >= 0.9), distinct
documents are not merged (false positives <= 1% at threshold 0.8), exact and repeated-line dedup, dataset-level
over several files, and the MinHash estimate against exact Jaccard."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from llmkit.cli import main
from llmkit.data.dedup import DedupConfig, MinHashConfig, MinHasher, WordHasher, connected_components, dedup, \
    dedup_texts, estimate_jaccard, lsh_params, normalize_text, remove_repeated_lines
from llmkit.data.io import StepIO

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SQUAD = [json.loads(l)["text"] for l in open(DATA / "squad_rag_corpus.jsonl")]
ALPACA = [json.loads(l)["output"] for l in open(DATA / "alpaca_2k.jsonl")]


def shingles(text, n=5):
    w = normalize_text(text).split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {" ".join(w)}


def jaccard(a, b):
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edit(text, k, rng):
    """k small word edits: substitutions, deletions, insertions."""
    w = text.split()
    for _ in range(k):
        i = rng.randrange(len(w))
        op = rng.random()
        if op < 0.4:
            w[i] = rng.choice(["quickly", "house", "seven", "river", "green"])
        elif op < 0.7:
            del w[i]
        else:
            w.insert(i, rng.choice(["very", "also", "then", "still"]))
    return " ".join(w)


@pytest.fixture(scope="module")
def corpus():
    """Distinct documents (3 SQuAD paragraphs each, and Alpaca answers) and near-duplicate copies of some."""
    rng = random.Random(0)
    base = [" ".join(SQUAD[i:i + 3]) for i in range(0, 540, 3)]
    distinct = base + [t for t in ALPACA if len(t.split()) >= 40]
    pairs = []  # (index of original in distinct, variant text)
    for i in range(0, len(base), 1):
        if i % 3 == 2:
            continue
        pairs.append((i, edit(base[i], rng.choice([1, 2, 3, 4, 6]), rng)))
    return distinct, pairs


def test_recall_and_false_positives(corpus, tmp_path):
    distinct, pairs = corpus
    texts = distinct + [v for _, v in pairs]
    keep, dup_of = dedup_texts(texts)
    n = len(distinct)
    sims = np.array([jaccard(distinct[i], v) for i, v in pairs])
    found = np.array([not keep[n + k] and dup_of[n + k] == i for k, (i, _) in enumerate(pairs)])
    high = sims >= 0.9
    assert high.sum() >= 60
    recall = found[high].mean()
    assert recall >= 0.95, recall
    fp = 1 - keep[:n].mean()  # distinct documents removed (all originals come first, so they are kept)
    assert fp <= 0.01, fp
    # pairs well below the threshold stay apart
    low = sims < 0.6
    if low.any():
        assert found[low].mean() <= 0.05


def test_estimate_tracks_exact_jaccard(corpus):
    distinct, pairs = corpus
    hasher = MinHasher(MinHashConfig())
    a = hasher.signatures([distinct[i] for i, _ in pairs[:60]])
    b = hasher.signatures([v for _, v in pairs[:60]])
    est = estimate_jaccard(a, b)
    true = np.array([jaccard(distinct[i], v) for i, v in pairs[:60]])
    assert np.abs(est - true).max() < 0.15 and abs((est - true).mean()) < 0.02  # unbiased, ~4 sigma at 128 perms
    # signatures are deterministic and independent of the batch they are computed in
    assert (hasher.signatures([distinct[0]]) == hasher.signatures(distinct[:5])[:1]).all()


def test_word_hasher_matches_python_strings():
    texts = [normalize_text(t) for t in SQUAD[:20]] + ["", "one two", "ünïcödé wörds here ok now yes"]
    h, d, idx = WordHasher(texts).ngrams(5)
    expected = []
    for j, t in enumerate(texts):
        w = t.split()
        grams = [" ".join(w[i:i + 5]) for i in range(len(w) - 4)] if len(w) >= 5 else ([" ".join(w)] if w else [])
        expected += [(j, g) for g in grams]
    assert len(expected) == len(h) and list(d) == [j for j, _ in expected]
    by_string = {}
    for (j, g), x in zip(expected, h):
        assert by_string.setdefault(g, x) == x  # the same n-gram always gets the same hash
    assert len(set(by_string.values())) == len(by_string)
    wh = WordHasher(texts)
    assert list(wh.word_chars[-6:]) == [len(w) for w in texts[-1].split()]


def test_lsh_params_and_components():
    assert lsh_params(0.8, 128) == (18, 7)
    b, r = lsh_params(0.5, 64)
    assert 1 - (1 - 0.5 ** r) ** b >= 0.95
    labels = connected_components(6, np.array([[4, 5], [1, 2], [2, 3]]))
    assert list(labels) == [0, 1, 1, 1, 4, 4]


def test_exact_duplicates_and_repeated_lines():
    keep, dup_of = dedup_texts(["Hello  World\n", "hello world", "Other text entirely here"], near=False)
    assert list(keep) == [True, False, True] and dup_of[1] == 0
    text, n = remove_repeated_lines("a\nb\n\na\n  b \nc")
    assert text == "a\nb\n\nc" and n == 2


def test_dataset_level_across_files_with_workers(corpus, tmp_path):
    distinct, pairs = corpus
    a = tmp_path / "a.jsonl.gz"
    b = tmp_path / "b.jsonl"
    import gzip

    with gzip.open(a, "wt") as f:
        for k, (_, v) in enumerate(pairs[:40]):
            f.write(json.dumps({"text": v, "id": f"v{k}"}) + "\n")
    b.write_text("".join(json.dumps({"text": distinct[i], "id": f"o{i}"}) + "\n" for i, _ in pairs[:40])
                 + json.dumps({"text": distinct[-1].upper(), "id": "exact"}) + "\n"
                 + json.dumps({"text": distinct[-1], "id": "orig"}) + "\n")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"o{workers}.jsonl"
        report = dedup(StepIO([str(a), str(b)], str(out), workers=workers, progress=False))
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    ids = [json.loads(l)["id"] for l in outs[0].decode().splitlines()]
    originals_kept = [i for i in ids if i.startswith("o")]
    sims = [jaccard(distinct[i], v) for i, v in pairs[:40]]
    assert len(originals_kept) <= sum(s < 0.8 for s in sims) + 1  # the variants in a.jsonl.gz came first
    assert "exact" in ids and "orig" not in ids
    assert report["rules"]["exact"]["removed"] == 1
    ex = report["rules"]["near"]["examples"][0]
    assert ex["where"].startswith(str(b)) and ex["duplicate_of"].startswith(str(a)) and ex["jaccard"] >= 0.8
    assert report["documents_in"] == 82 and report["documents_out"] == len(ids)
    # kept records pass through byte for byte
    assert outs[0].decode().splitlines()[0] == gzip.open(a, "rt").readline().rstrip("\n")


def test_cli_options(tmp_path, capsys):
    src = tmp_path / "in.txt"
    lines = ["the same line of text here", "the same line of text here", "The same  line of text here",
             "a b c\u00a0d", "first\u2028first"]
    src.write_text("\n".join(lines[:4]) + "\n")
    assert main(["data", "dedup", "--input", str(src), "--output", str(tmp_path / "o.txt"), "--no-near",
                 "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["documents_out"] == 2 and r["rules"]["exact"]["removed"] == 2
    para = tmp_path / "p.txt"
    para.write_text("line one\nline two\nline one\n\nother doc\n")
    assert main(["data", "dedup", "--input", str(para), "--output", str(tmp_path / "p.jsonl"), "--unit", "paragraph",
                 "--repeated-lines", "--num-perm", "64", "--threshold", "0.7", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [json.loads(l)["text"] for l in open(tmp_path / "p.jsonl")] == ["line one\nline two", "other doc"]
    assert r["rules"]["repeated_lines"]["modified"] == 1 and r["options"]["minhash_num_perm"] == 64
