"""Metrics: BLEU and ROUGE equal their reference libraries; exact match, token F1, unbiased pass@k."""

import itertools
import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llmkit.eval.metrics import bleu, exact_match, mean_pass_at_k, pass_at_k, rouge, sentence_bleu, token_f1

PREDS = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi", "to be or not to be"]
REFS = ["the cat is on the mat", "the quick brown fox jumped over", "hello there", "to be, or not to be: that is"]


def test_bleu_equals_sacrebleu():
    assert bleu(PREDS, REFS) == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    two = [[r, r.upper()] for r in REFS]
    assert bleu(PREDS, two) == sacrebleu.corpus_bleu(PREDS, [REFS, [r.upper() for r in REFS]]).score
    assert sentence_bleu(PREDS[0], REFS[0]) == sacrebleu.sentence_bleu(PREDS[0], [REFS[0]]).score
    assert bleu(REFS, REFS) == pytest.approx(100.0)


def test_rouge_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    ours = rouge(PREDS, REFS, rouge_types=("rouge1", "rouge2", "rougeL"))
    for t in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[t].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
        assert ours[t] == pytest.approx(expected, abs=1e-12)
    assert rouge(["a b c"], ["a b c"])["rouge2"] == 1.0


def test_exact_match_normalisations():
    assert exact_match(["Paris", "rome"], ["Paris", "Rome"]) == 0.5
    assert exact_match(["Paris", "rome"], ["Paris", "Rome"], ignore_case=True) == 1.0
    assert exact_match(["The answer is 1,234."], ["1234"], regexes_to_ignore=[",", r"\.$", "(?s).*is "]) == 1.0
    assert exact_match(["hello!"], ["hello"], ignore_punctuation=True) == 1.0
    assert exact_match(["a1"], ["a2"], ignore_numbers=True) == 1.0


def test_token_f1_squad():
    assert token_f1("The Cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1("nothing", "else") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("blue whale", ["red fox", "the blue whale"]) == 1.0


def test_pass_at_k_is_unbiased():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 5, 5), (20, 7, 10), (6, 2, 6)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
        # the definition: the chance that a random k-subset of the n samples holds a correct one
        samples = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(samples[i] for i in s) for s in subsets) / len(subsets))
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    assert mean_pass_at_k([(10, 3), (10, 0)], 1) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 1, 6)
