"""Text metrics: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), exact match, token F1, unbiased pass@k.

BLEU and ROUGE call the reference libraries, so their numbers are the libraries' numbers; exact match follows
Hugging Face evaluate's `exact_match` (the one lm-eval uses) and token F1 follows the SQuAD evaluation script.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np


def _as_refs(references: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], **kwargs) -> float:
    """Corpus BLEU (0-100) of `predictions` against one reference (or a list of references) each."""
    import sacrebleu

    refs = _as_refs(references)
    if len(refs) != len(predictions):
        raise ValueError(f"bleu: {len(predictions)} predictions but {len(refs)} references")
    width = max(len(r) for r in refs)
    # sacrebleu wants one stream per reference slot; missing references are None
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams, **kwargs).score


def sentence_bleu(prediction: str, references: str | Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [references] if isinstance(references, str) else list(references)).score


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]],
          rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE F-measure per type over the pairs (rouge-score; several references: the best one)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(rouge_types, 0.0)
    refs = _as_refs(references)
    if len(refs) != len(predictions):
        raise ValueError(f"rouge: {len(predictions)} predictions but {len(refs)} references")
    for pred, ref in zip(predictions, refs):
        scores = scorer.score_multi(ref, pred) if len(ref) > 1 else scorer.score(ref[0], pred)
        for t in rouge_types:
            totals[t] += scores[t].fmeasure
    n = max(1, len(predictions))
    return {t: v / n for t, v in totals.items()}


def exact_match(predictions: Sequence[str], references: Sequence[str], regexes_to_ignore: Sequence[str] | None = None,
                ignore_case: bool = False, ignore_punctuation: bool = False, ignore_numbers: bool = False) -> float:
    """Fraction of predictions equal to their reference after the optional normalisations (HF evaluate's)."""
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise ValueError(f"exact_match: {len(preds)} predictions but {len(refs)} references")
    for pattern in regexes_to_ignore or ():
        preds = [re.sub(pattern, "", x) for x in preds]
        refs = [re.sub(pattern, "", x) for x in refs]
    if ignore_case:
        preds, refs = [x.lower() for x in preds], [x.lower() for x in refs]
    tables = []
    if ignore_punctuation:
        tables.append(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        tables.append(str.maketrans("", "", string.digits))
    for table in tables:
        preds, refs = [x.translate(table) for x in preds], [x.translate(table) for x in refs]
    return float(np.mean([p == r for p, r in zip(preds, refs)])) if preds else 0.0


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1 of normalised answers (several references: the best)."""
    if not isinstance(reference, str):
        return max((token_f1(prediction, r) for r in reference), default=0.0)
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for c correct of n samples."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # the product form avoids huge binomials
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(samples: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem."""
    return float(np.mean([pass_at_k(n, c, k) for n, c in samples])) if samples else 0.0
