"""Perplexity of long text under rolling windows (lm-eval's `loglikelihood_rolling`, with an optional stride).

Every token is predicted exactly once: the first window from the prefix token (BOS, else EOS), each later one
with `max_length - stride` tokens of earlier text as context (stride = max_length, the default, is lm-eval's
disjoint windows). Over all documents, with LL the summed natural-log likelihood:
    token perplexity = exp(-LL / tokens)        word perplexity = exp(-LL / words)
    byte perplexity  = exp(-LL / UTF-8 bytes)   bits per byte   = -LL / (bytes * ln 2) = log2(byte perplexity)
Words are counted as lm-eval does: len(re.split(r"\\s+", text)).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from llmkit.data.io import iter_jsonl


class DataError(ValueError):
    """An evaluation data file that cannot be read; the message names the file and line."""


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def perplexity_from_loglikelihood(loglikelihood: float, tokens: int, words: int, n_bytes: int) -> dict[str, float]:
    return {
        "token_perplexity": math.exp(-loglikelihood / tokens),
        "word_perplexity": math.exp(-loglikelihood / words),
        "byte_perplexity": math.exp(-loglikelihood / n_bytes),
        "bits_per_byte": -loglikelihood / n_bytes / math.log(2),
    }


def perplexity(lm, texts: list[str], stride: int | None = None) -> dict[str, Any]:
    """Perplexities of `texts` (documents) under `lm` (an `EvalLM`), aggregated over all of them."""
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("no text to evaluate")
    stats = lm.rolling_token_stats(texts, stride, desc="perplexity")
    loglikelihood = sum(ll for ll, _ in stats)
    tokens = sum(n for _, n in stats)
    words = sum(count_words(t) for t in texts)
    n_bytes = sum(count_bytes(t) for t in texts)
    out = {"documents": len(texts), "tokens": tokens, "words": words, "bytes": n_bytes,
           "loglikelihood": loglikelihood, "max_length": lm.max_length, "stride": stride or lm.max_length}
    out.update(perplexity_from_loglikelihood(loglikelihood, tokens, words, n_bytes))
    return out


def read_texts(path: str | Path, text_field: str = "text", unit: str | None = None) -> list[str]:
    """Documents of a .txt file (the whole file, or per line/paragraph) or a .jsonl file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e})") from None
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for where, obj in iter_jsonl(raw.splitlines(), str(path), DataError):
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{where}: expected an object with a string field {text_field!r}")
            texts.append(obj[text_field])
        return texts
    unit = unit or "file"
    if unit == "file":
        return [raw]
    if unit == "line":
        return [line for line in raw.splitlines() if line.strip()]
    if unit == "paragraph":
        return [p.strip("\n") for p in re.split(r"\n\s*\n", raw) if p.strip()]
    raise DataError(f"unit must be file, line or paragraph, got {unit!r}")
