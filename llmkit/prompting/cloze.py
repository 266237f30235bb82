"""Cloze classification with pattern-verbalizer pairs (PET, Schick & Schütze 2021) on a causal LM.

A pattern is Jinja over a labelled record with one slot "___" for the label word; the verbalizer maps each
label to its word. A record's class is the label whose word (and the rest of the pattern after the slot) the
model finds most likely at the slot, zero-shot or after few-shot demonstrations filled in with their words:

    pvp = PVP("Review: {{ text }}\\nSentiment: ___", {"positive": "great", "negative": "terrible"})
    classify(EvalLM(model, tok), pvp, [{"text": "A joy from start to end."}])      # ['positive']

As a fine-tuning objective (`llmkit finetune --pet-pattern ... --pet-verbalizer ...`), the loss is PET's
cross-entropy over the label words' first tokens at the slot, the logits of all other tokens ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from llmkit.prompting.templates import PromptError, render_part

SLOT = "___"


@dataclass
class PVP:
    pattern: str  # Jinja over the record with one SLOT where the label word goes
    verbalizer: dict[str, str]  # label -> word
    demo_separator: str = "\n\n"

    def __post_init__(self) -> None:
        if self.pattern.count(SLOT) != 1:
            raise PromptError(f"a PET pattern needs exactly one {SLOT!r} slot for the label word: {self.pattern!r}")
        if len(self.verbalizer) < 2 or not all(isinstance(w, str) and w.strip() for w in self.verbalizer.values()):
            raise PromptError(f"a verbalizer maps two or more labels to non-empty words, got {self.verbalizer!r}")
        self.verbalizer = {str(k): v for k, v in self.verbalizer.items()}

    @classmethod
    def from_json(cls, pattern: str, verbalizer: str) -> PVP:
        """From the command line: the verbalizer as a JSON object."""
        try:
            words = json.loads(verbalizer)
        except json.JSONDecodeError as e:
            raise PromptError(f"--pet-verbalizer must be a JSON object label -> word: {e.msg}") from None
        if not isinstance(words, dict):
            raise PromptError(f"--pet-verbalizer must be a JSON object label -> word, got {verbalizer!r}")
        return cls(pattern, words)

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    def split(self, record: dict) -> tuple[str, str]:
        """(text before the slot, text after it) for `record`."""
        text = render_part(self.pattern.replace(SLOT, "\x00"), record, "pet pattern")
        prefix, _, suffix = text.partition("\x00")
        return prefix, suffix

    def filled(self, record: dict, label: str) -> str:
        prefix, suffix = self.split(record)
        return prefix + self.verbalizer[str(label)] + suffix

    def context(self, record: dict, demos: Sequence[dict] = ()) -> str:
        """Few-shot demonstrations (filled with their own labels' words), then the record up to the slot."""
        shots = [self.filled(d, d["label"]) for d in demos]
        return self.demo_separator.join([*shots, self.split(record)[0]])


def score_labels(lm, pvp: PVP, records: Sequence[dict], demos: Sequence[dict] = ()) -> list[dict[str, float]]:
    """log P(label word + rest of the pattern | context) per label, per record; `lm` is an llmkit EvalLM."""
    requests = []
    for record in records:
        context, suffix = pvp.context(record, demos), pvp.split(record)[1]
        requests += [(context, word + suffix) for word in pvp.verbalizer.values()]
    scores = [ll for ll, _ in lm.loglikelihood(requests, desc="cloze")]
    k = len(pvp.verbalizer)
    return [dict(zip(pvp.labels, scores[i * k:(i + 1) * k])) for i in range(len(records))]


def classify(lm, pvp: PVP, records: Sequence[dict], demos: Sequence[dict] = ()) -> list[str]:
    """The most likely label of each record (zero-shot, or few-shot with `demos`)."""
    return [max(s, key=s.get) for s in score_labels(lm, pvp, records, demos)]


def accuracy(lm, pvp: PVP, records: Sequence[dict], demos: Sequence[dict] = ()) -> float:
    predicted = classify(lm, pvp, records, demos)
    return sum(p == str(r["label"]) for p, r in zip(predicted, records)) / max(len(records), 1)


# ----------------------------------------------------------------------------- the fine-tuning objective


def encode_cloze(tokenizer, pvp: PVP, record: dict, max_seq_len: int) -> tuple[list[int], list[int]]:
    """(ids of the record up to the slot, first token of each label word there), tokenized as scoring does:
    the prefix's trailing spaces belong to the word."""
    prefix = pvp.split(record)[0]
    stripped = prefix.rstrip()
    spaces = prefix[len(stripped):]
    ctx = tokenizer.encode(stripped, add_special_tokens=True)
    firsts = []
    for word in pvp.verbalizer.values():
        whole = tokenizer.encode(stripped + spaces + word, add_special_tokens=True)
        if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
            raise PromptError(f"the label word {word!r} merges with the pattern's text before the slot; put a space "
                              "or punctuation before the slot")
        firsts.append(whole[len(ctx)])
    return ctx[-max_seq_len:], firsts


def load_pet_examples(files: list[str], tokenizer, max_seq_len: int, pvp: PVP):
    """SFTExamples for the PET objective: input_ids = the record up to the slot, labels = [class index];
    and the label words' first token ids (one per label, the same for every record)."""
    from llmkit.data.sft import DataError, SFTExample, _iter_json_records

    examples, token_ids = [], None
    index = {label: i for i, label in enumerate(pvp.labels)}
    for rec, where in _iter_json_records(files):
        label = str(rec.get("label"))
        if label not in index:
            raise DataError(f"{where}: label {rec.get('label')!r} is not in the verbalizer {pvp.labels}")
        try:
            ids, firsts = encode_cloze(tokenizer, pvp, rec, max_seq_len)
        except PromptError as e:
            raise DataError(f"{where}: {e}") from None
        if token_ids is None:
            if len(set(firsts)) < len(firsts):
                raise DataError(f"{where}: two label words start with the same token ({firsts}); PET needs "
                                "words that differ in their first token")
            token_ids = firsts
        elif firsts != token_ids:
            raise DataError(f"{where}: the label words tokenize differently here than in the first record")
        examples.append(SFTExample(ids, [index[label]], where))
    if not examples:
        raise DataError(f"{', '.join(files)}: no records")
    return examples, token_ids


def pet_loss(logits, batch: dict, label_token_ids: Sequence[int]):
    """Summed cross-entropy of each row's class over the label words' first tokens, read at the row's last
    real token (logits [B, T, V]; batch from collate_classification: segment_ids mark real tokens)."""
    import torch
    import torch.nn.functional as F

    last = batch["segment_ids"].to(logits.device).sum(1) - 1
    at_slot = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, V]
    words = at_slot[:, torch.as_tensor(list(label_token_ids), device=logits.device)]  # [B, classes]
    return F.cross_entropy(words.float(), batch["labels"].to(logits.device), reduction="sum")
