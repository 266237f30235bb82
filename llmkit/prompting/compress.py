"""Prompt compression for long contexts, after Selective Context (Li et al. 2023): a small causal LM scores
every token's self-information, -log p(token | text before it); sentences (or words) carrying the least
information are dropped until the prompt fits a token budget. The instruction and the question are never
touched: only the context is compressed.

    scorer = SelfInformation(*llmkit.load("small-model"))
    prompt, stats = compress_prompt(scorer, instruction, context, question, budget=512)
    report = compression_report(llm, items, scorer, budget=512)   # compression ratio, answer-change rate
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("sentence", "word")
_SENTENCE = re.compile(r"[^\n.!?]*(?:[.!?]+|\n+|$)")
_WORD = re.compile(r"\S+")


class SelfInformation:
    """-log p(token | preceding text) for every token of a text, from a local llmkit model; texts longer than
    its context are read in overlapping windows, each token scored with at least half a window before it."""

    def __init__(self, model, tokenizer, max_length: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length or model.config.max_seq_len
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise ValueError("self-information needs a bos or eos token to score the first token from")
        self.start = start

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def __call__(self, text: str) -> list[tuple[int, int, float]]:
        """(start, end, self-information in nats) per token, character offsets into `text`."""
        import torch

        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        if not ids:
            return []
        tokens = [self.start] + ids
        info = [0.0] * len(ids)
        window, step = self.max_length, max(1, self.max_length // 2)
        device = self.model.model.embed_tokens.weight.device
        scored = 0  # tokens[1:scored + 1] have their value
        with torch.no_grad():
            while scored < len(ids):
                lo = max(0, scored + 1 - step) if scored else 0
                chunk = tokens[lo: lo + window]
                logp = self.model(torch.tensor([chunk], device=device))[0].float().log_softmax(-1)
                for pos in range(max(1, scored + 1 - lo), len(chunk)):  # predict chunk[pos] from chunk[:pos]
                    info[lo + pos - 1] = -float(logp[pos - 1, chunk[pos]])
                scored = lo + len(chunk) - 1
        return [(a, b, x) for (a, b), x in zip(offsets, info)]


@dataclass
class Unit:
    start: int
    end: int
    text: str
    info: float  # summed self-information of the unit's tokens
    kept: bool = True


def split_units(text: str, level: str = "sentence") -> list[tuple[int, int]]:
    """Character spans of sentences (with their trailing punctuation) or whitespace-delimited words."""
    if level not in LEVELS:
        raise ValueError(f"compression level must be one of {LEVELS}, got {level!r}")
    pattern = _SENTENCE if level == "sentence" else _WORD
    return [(m.start(), m.end()) for m in pattern.finditer(text) if m.group().strip()]


def score_units(text: str, scorer: Callable[[str], list[tuple[int, int, float]]], level: str = "sentence"
                ) -> list[Unit]:
    """Each unit with the summed self-information of the tokens that start inside it."""
    tokens = scorer(text)
    units = []
    for start, end in split_units(text, level):
        info = sum(x for a, _, x in tokens if start <= a < end)
        units.append(Unit(start, end, text[start:end], info))
    return units


def join_kept(text: str, units: Sequence[Unit]) -> str:
    """The kept units in their order, each with the text that followed it in the original up to the next unit
    (its spacing and line breaks)."""
    ends = [u.start for u in units[1:]] + [len(text)]
    return "".join(text[u.start:end] for u, end in zip(units, ends) if u.kept).strip()


@dataclass
class Compression:
    text: str  # the compressed context
    original_tokens: int
    tokens: int
    units: list[Unit] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Original tokens / compressed tokens (2.0: half the tokens)."""
        return self.original_tokens / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "original_tokens": self.original_tokens, "tokens": self.tokens,
                "ratio": round(self.ratio, 4), "dropped": [u.text for u in self.units if not u.kept]}


def compress(text: str, scorer, *, budget: int | None = None, keep_ratio: float | None = None,
             level: str = "sentence", count_tokens: Callable[[str], int] | None = None) -> Compression:
    """Drop the lowest-information units of `text` until it takes at most `budget` tokens, or until at most
    `keep_ratio` of its tokens remain (the units are dropped one at a time, least informative first)."""
    if (budget is None) == (keep_ratio is None):
        raise ValueError("give exactly one of budget (tokens) and keep_ratio (fraction of tokens to keep)")
    if keep_ratio is not None and not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    count = count_tokens or scorer.count_tokens
    original = count(text)
    limit = budget if budget is not None else int(original * keep_ratio)
    units = score_units(text, scorer, level)
    compressed = text
    for unit in sorted(units, key=lambda u: u.info):
        if count(compressed) <= limit:
            break
        unit.kept = False
        compressed = join_kept(text, units)
    return Compression(compressed, original, count(compressed), units)


def compress_prompt(scorer, instruction: str, context: str, question: str, *, budget: int,
                    level: str = "sentence", template: str = "{instruction}\n\n{context}\n\n{question}"
                    ) -> tuple[str, Compression]:
    """A prompt of at most `budget` tokens (as the scorer's tokenizer counts them): the context compressed,
    the instruction and question kept whole. ValueError when they alone exceed the budget."""
    frame = template.format(instruction=instruction, context="", question=question)
    room = budget - scorer.count_tokens(frame)
    if room < 0:
        raise ValueError(f"the instruction and question take {scorer.count_tokens(frame)} tokens, over the budget "
                         f"of {budget}; they are never compressed")
    result = compress(context, scorer, budget=room, level=level)
    return template.format(instruction=instruction, context=result.text, question=question), result


def compression_report(llm, items: Sequence[dict], scorer, *, budget: int, level: str = "sentence",
                       extract: str = "text", max_tokens: int = 64) -> dict[str, Any]:
    """Compress each item's context ({"instruction", "context", "question"}), ask `llm` both prompts greedily,
    and report the mean compression ratio and how often the extracted answer changed."""
    from llmkit.prompting.answers import extractor

    get = extractor(extract)
    full, short, compressions = [], [], []
    for item in items:
        full.append(f"{item.get('instruction', '')}\n\n{item['context']}\n\n{item['question']}".strip())
        prompt, c = compress_prompt(scorer, item.get("instruction", ""), item["context"], item["question"],
                                    budget=budget, level=level)
        short.append(prompt.strip())
        compressions.append(c)
    answers = llm.generate(full + short, max_tokens=max_tokens)
    before, after = [get(a[0]) for a in answers[:len(items)]], [get(a[0]) for a in answers[len(items):]]
    changed = [b != a for b, a in zip(before, after)]
    n = max(len(items), 1)
    return {"items": len(items), "budget": budget, "level": level,
            "compression_ratio": round(sum(c.ratio for c in compressions) / n, 4),
            "kept_fraction": round(sum(c.tokens for c in compressions) / max(sum(c.original_tokens
                                                                               for c in compressions), 1), 4),
            "answer_change_rate": round(sum(changed) / n, 4),
            "details": [{"before": b, "after": a, **{k: v for k, v in c.to_dict().items() if k != "text"}}
                        for b, a, c in zip(before, after, compressions)]}
