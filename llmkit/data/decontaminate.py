"""Decontamination against evaluation sets (`llmkit data decontaminate`), as in GPT-3 (Brown et al. 2020, C.):
a training document is contaminated when it shares any n-gram (default 13 words) with an evaluation item.
Texts are compared lower-cased with punctuation removed. Evaluation items shorter than n words are matched
whole if they have at least `min_ngram` words (GPT-3 did the same for short items); shorter ones are skipped
and counted. Mode "drop" removes contaminated documents, "report" only flags them; either way the report
lists which evaluation items were hit and by how many documents.

Matching is vectorised: n-gram hashes of a whole chunk (dedup.WordHasher) are looked up in the sorted array
of evaluation hashes with `np.searchsorted`; only hits touch Python.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from llmkit.data.dedup import WordHasher
from llmkit.data.io import Batch, DataError, StepIO, Tally, expand_inputs, open_read, run_map, snippet, split_format

_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_words(text: str) -> str:
    """Lower-cased words without punctuation, separated by single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class DecontamConfig:
    eval_files: list[str] = field(default_factory=list)
    eval_fields: list[str] = field(default_factory=lambda: ["text"])  # JSONL fields joined into one item
    ngram: int = 13
    min_ngram: int = 8  # shorter eval items are matched whole down to this many words
    mode: str = "drop"  # drop | report

    def __post_init__(self):
        if self.mode not in ("drop", "report"):
            raise DataError(f"mode must be drop or report, got {self.mode!r}")
        if not 1 <= self.min_ngram <= self.ngram:
            raise DataError(f"need 1 <= min_ngram <= ngram, got {self.min_ngram} and {self.ngram}")


@dataclass
class EvalItem:
    id: str
    where: str
    text: str


def read_eval_items(files: list[str], fields: list[str]) -> list[EvalItem]:
    """Evaluation items: JSONL records (the named fields, strings or lists of strings, joined) or text lines."""
    items: list[EvalItem] = []
    for path in expand_inputs(files):
        fmt = split_format(path)[0]
        with open_read(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
                if not line:
                    continue
                if fmt == "txt":
                    items.append(EvalItem(where, where, line))
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected a JSON object")
                parts = []
                for name in fields:
                    v = rec.get(name)
                    if isinstance(v, str):
                        parts.append(v)
                    elif isinstance(v, list):
                        parts.extend(x for x in v if isinstance(x, str))
                if not parts:
                    raise DataError(f"{where}: none of the fields {', '.join(fields)} holds text (keys: "
                                    f"{', '.join(list(rec)[:8])}); set --eval-field")
                items.append(EvalItem(str(rec.get("id", where)), where, " ".join(parts)))
    return items


class EvalIndex:
    """Hashes of every evaluation n-gram, by n-gram length, mapped back to the items."""

    def __init__(self, items: list[EvalItem], ngram: int = 13, min_ngram: int = 8):
        self.items = items
        self.ngram = ngram
        self.too_short = 0
        norm = [normalize_words(it.text) for it in items]
        wh = WordHasher(norm)
        by_len: dict[int, tuple[list, list]] = {}
        h, d, _ = wh.ngrams(ngram, short=False)
        by_len[ngram] = ([h], [d])
        short = np.flatnonzero(wh.n_words < ngram)
        for i in short:
            nw = int(wh.n_words[i])
            if nw < min_ngram:
                self.too_short += 1
                continue
            first = wh.first_word[i]
            hs = wh.span(wh.starts[first:first + 1], wh.ends[first + nw - 1:first + nw])
            by_len.setdefault(nw, ([], []))
            by_len[nw][0].append(hs)
            by_len[nw][1].append(np.array([i]))
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for n, (hs, ds) in by_len.items():
            hh, dd = np.concatenate(hs), np.concatenate(ds)
            order = np.argsort(hh, kind="stable")
            self.tables[n] = (hh[order], dd[order])
        self.n_ngrams = sum(len(t[0]) for t in self.tables.values())

    def matches(self, texts: list[str]) -> list[list[tuple[int, int, int]]]:
        """Per text: (eval item, n-gram length, index of the first matching word in the normalised text)."""
        wh = WordHasher([normalize_words(t) for t in texts])
        out: list[list[tuple[int, int, int]]] = [[] for _ in texts]
        for n, (keys, item_of) in self.tables.items():
            if not len(keys):
                continue
            h, d, idx = wh.ngrams(n, short=False)
            if not len(h):
                continue
            pos = np.searchsorted(keys, h)
            pos[pos == len(keys)] = 0
            hit = np.flatnonzero(keys[pos] == h)
            for j in hit:
                p = pos[j]
                while p < len(keys) and keys[p] == h[j]:  # every item sharing this n-gram
                    out[d[j]].append((int(item_of[p]), n, int(idx[j] - wh.first_word[d[j]])))
                    p += 1
        return out


class Decontaminator:
    def __init__(self, index: EvalIndex, mode: str = "drop"):
        self.index, self.mode = index, mode

    def __call__(self, batch: Batch, tally: Tally) -> list[str | None]:
        out: list[str | None] = []
        for i, (text, hits) in enumerate(zip(batch.texts, self.index.matches(batch.texts))):
            if not hits:
                out.append(text)
                continue
            items = sorted({h[0] for h in hits})
            for it in items:
                tally.add(f"item:{it}")
            item, n, w = hits[0]
            ngram = " ".join(normalize_words(text).split()[w:w + n])
            tally.hit("contaminated", batch.where(i), key="removed" if self.mode == "drop" else "flagged",
                      eval_items=[self.index.items[k].id for k in items[:5]], ngram=ngram)
            out.append(None if self.mode == "drop" else text)
        return out


def decontaminate(io_: StepIO, config: DecontamConfig) -> dict:
    """Drop (or flag) training documents sharing an n-gram with the evaluation files; the report lists the
    evaluation items hit."""
    if not config.eval_files:
        raise DataError("decontaminate needs evaluation files (--eval F...)")
    items = read_eval_items(config.eval_files, config.eval_fields)
    index = EvalIndex(items, config.ngram, config.min_ngram)

    def eval_report(total: Tally) -> dict:
        hits = {int(k[5:]): int(v) for k, v in total.extra.items() if k.startswith("item:")}
        listed = sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))[:1000]
        return {
            "counts": {},
            "eval": {"files": config.eval_files, "items": len(items), "items_too_short": index.too_short,
                     "ngrams": index.n_ngrams, "items_hit": len(hits),
                     "hits": [{"id": items[k].id, "where": items[k].where, "documents": v,
                               "text": snippet(items[k].text, 120)} for k, v in listed]},
        }

    options = {"eval_files": config.eval_files, "eval_fields": config.eval_fields, "ngram": config.ngram,
               "min_ngram": config.min_ngram, "mode": config.mode}
    return run_map("decontaminate", io_, Decontaminator(index, config.mode), options, extra_report=eval_report)
