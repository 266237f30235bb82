"""Under-trained ("glitch") tokens: vocabulary entries the model never really learned.

Three independent signals, in the spirit of Land & Bartolo 2024 ("Fishing for Magikarp"):
- weights: a token that never appears as a target gets only the shared softmax push-down, so its unembedding
  row moves only along the direction every other untrained row moves. We centre the unembedding matrix,
  remove its first principal component (that shared direction), and take each row's norm. A row is flagged
  when it is a low outlier (robust z-score from median / MAD below `z_threshold`), or when the log-norms split
  into two well-separated groups (Otsu's threshold, groups more than `separation` pooled standard deviations
  apart: the case of many untrained tokens) and it lies in the low group. Cosine similarity to the mean of the
  flagged rows is reported as a second view of the same effect.
- data: tokens that never occur when the given training files are tokenized (`count == 0`);
- reachability: tokens whose text does not encode back to themselves, so no input ever produces them
  (byte tokens of multi-byte characters, which decode to U+FFFD alone, are skipped).
Special tokens are listed separately: they are meant to be absent from text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def unembedding_indicators(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(norm after centring and removing the first principal component, robust z-score of that norm) per row."""
    u = weight.astype(np.float64)
    u = u - u.mean(axis=0, keepdims=True)
    # first principal direction via power iteration on u^T u (C x C), cheap for any vocabulary size
    cov = u.T @ u
    v = np.ones(cov.shape[0]) / np.sqrt(cov.shape[0])
    for _ in range(100):
        w = cov @ v
        norm = np.linalg.norm(w)
        if norm == 0:
            break
        w /= norm
        if np.abs(w - v).max() < 1e-10:
            v = w
            break
        v = w
    u = u - np.outer(u @ v, v)
    norms = np.linalg.norm(u, axis=1)
    median = np.median(norms)
    mad = np.median(np.abs(norms - median)) * 1.4826  # a standard deviation for normal data
    z = (norms - median) / (mad if mad > 0 else (norms.std() or 1.0))
    return norms, z


def count_tokens(tokenizer, files: Sequence[str | Path], text_field: str = "text") -> np.ndarray:
    """Occurrences of every token id in the files (.txt line by line, .jsonl `text_field`)."""
    from llmkit.eval.perplexity import read_texts

    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for f in files:
        texts = read_texts(f, text_field, unit="line")
        for start in range(0, len(texts), 1024):
            for ids in tokenizer.encode_batch(texts[start: start + 1024]):
                np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    return counts


def low_group(norms: np.ndarray, separation: float = 4.0) -> tuple[np.ndarray, float]:
    """Rows in the low group of a two-group (Otsu) split of the log-norms, if the groups are well separated."""
    x = np.log(np.maximum(norms, 1e-12))
    order = np.sort(x)
    n = len(order)
    if n < 4:
        return np.zeros(n, dtype=bool), 0.0
    best, cut = -1.0, None
    csum = np.cumsum(order)
    for k in range(1, n):  # k values in the low group
        m0, m1 = csum[k - 1] / k, (csum[-1] - csum[k - 1]) / (n - k)
        between = k * (n - k) * (m0 - m1) ** 2
        if between > best:
            best, cut = between, k
    low, high = order[:cut], order[cut:]
    pooled = np.sqrt((low.var() + high.var()) / 2) or 1e-12
    d = float((high.mean() - low.mean()) / pooled)
    if d < separation:
        return np.zeros(n, dtype=bool), d
    return x <= low.max(), d


def audit(model, tokenizer, data_files: Sequence[str | Path] = (), text_field: str = "text",
          z_threshold: float = -3.0, separation: float = 4.0, top: int = 100) -> dict[str, Any]:
    """Tokens flagged as under-trained, with their strings and the evidence, most suspicious first."""
    head = model.lm_head.weight.detach().float().cpu().numpy()
    V = min(head.shape[0], tokenizer.vocab_size)
    head = head[:V]
    norms, z = unembedding_indicators(head)
    special = set()
    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        i = getattr(tokenizer, name, None)
        if i is not None:
            special.add(i)
    for tok in getattr(tokenizer, "extra_special_tokens", []) or []:
        i = tokenizer.token_to_id(tok)
        if i is not None:
            special.add(i)
    is_special = np.isin(np.arange(V), list(special))
    grouped, split = low_group(norms[~is_special], separation)
    weak = np.zeros(V, dtype=bool)
    weak[~is_special] = grouped | (z[~is_special] < z_threshold)
    reference = head[weak].mean(axis=0) if weak.any() else None
    if reference is not None:
        unit = head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
        cos = unit @ (reference / max(np.linalg.norm(reference), 1e-12))
    else:
        cos = np.full(V, np.nan)
    counts = count_tokens(tokenizer, data_files, text_field)[:V] if data_files else None
    decoded = [tokenizer.decode([i]) for i in range(V)]
    reencoded = tokenizer.encode_batch(decoded)
    # a byte-level token that is part of a multi-byte character decodes to U+FFFD on its own: reachable in
    # context, so only whole-text tokens are checked
    unreachable = np.array([ids != [i] and "\ufffd" not in decoded[i] for i, ids in enumerate(reencoded)])
    rows = []
    for i in range(V):
        reasons = []
        if weak[i]:
            reasons.append("untrained unembedding")
        if counts is not None and counts[i] == 0 and i not in special:
            reasons.append("never in data")
        if unreachable[i] and i not in special:
            reasons.append("unreachable")
        if not reasons:
            continue
        rows.append({"id": i, "token": tokenizer.id_to_token(i), "text": decoded[i], "norm": float(norms[i]),
                     "z": float(z[i]), "cosine_to_untrained": None if np.isnan(cos[i]) else float(cos[i]),
                     "count": None if counts is None else int(counts[i]), "reasons": reasons})
    # strongest evidence first: several reasons, then the most outlying weights
    rows.sort(key=lambda r: (-len(r["reasons"]), r["z"]))
    return {
        "vocab_size": V, "z_threshold": z_threshold, "separation": split, "flagged": len(rows),
        "untrained_unembedding": int(weak.sum()),
        "never_in_data": None if counts is None else int(sum(
            1 for i in range(V) if counts[i] == 0 and i not in special)),
        "unreachable": int(sum(1 for i in range(V) if unreachable[i] and i not in special)),
        "special_tokens": [{"id": i, "token": tokenizer.id_to_token(i)} for i in sorted(special)],
        "data_files": [str(f) for f in data_files], "tokens": rows[:top] if top else rows,
    }


def format_audit(result: dict[str, Any]) -> str:
    lines = [f"{result['flagged']} of {result['vocab_size']} tokens flagged: {result['untrained_unembedding']} with "
             f"untrained unembeddings (z < {result['z_threshold']}), "
             + (f"{result['never_in_data']} never in the data, " if result["never_in_data"] is not None else "")
             + f"{result['unreachable']} unreachable", ""]
    lines.append(f"{'id':>7}  {'token':<24} {'norm':>7} {'z':>7} {'count':>7}  reasons")
    for r in result["tokens"]:
        count = "-" if r["count"] is None else str(r["count"])
        shown = r["text"] if "\ufffd" not in r["text"] else r["token"]  # a byte token: show its vocabulary entry
        lines.append(f"{r['id']:>7}  {json.dumps(shown, ensure_ascii=False)[:24]:<24} {r['norm']:>7.3f} "
                     f"{r['z']:>7.2f} {count:>7}  " + ", ".join(r["reasons"]))
    return "\n".join(lines)
