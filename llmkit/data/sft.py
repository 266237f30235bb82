"""Supervised fine-tuning data: read chat/instruction records, render them with the chat template, mask the prompt.

Record formats (one JSON object per line; `format="auto"` picks by the keys of each record):
  alpaca    {"instruction": ..., "input": ..., "output": ..., ["system": ...]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ..., ["weight": 0|1]}, ...]}  (OpenAI)
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
  text      {"text": ...}, or a .txt file (one document per blank-line separated paragraph)

Chat records are rendered with the tokenizer's chat template and tokenized as one string (the ids inference
will see). The loss is taken only on assistant tokens: each assistant turn's characters are found by
rendering the conversation up to that turn (with and without it), which works for any template that
renders a conversation's prefix as a prefix of the string. Plain text is trained on everywhere.

    examples, stats = load_sft(["alpaca.jsonl"], tokenizer, max_seq_len=512)
    train, val = split_val(examples, 0.05, seed=0)
    batches = SFTBatches(train, batch_size=8, seq_len=512, pad_id=tokenizer.pad_id or 0, pack=True)
    batch = batches.next_batch()  # input_ids, labels, position_ids, segment_ids [B, T]
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmkit.data.io import DataError, expand_inputs, iter_jsonl, read_chunks

IGNORE = -100  # as llmkit.train.objectives.IGNORE (not imported: data must not pull in torch.nn.functional)
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass
class SFTExample:
    """One training sequence, already shifted: labels[i] is the target of input_ids[i] (IGNORE = no loss)."""

    input_ids: list[int]
    labels: list[int]
    where: str  # "file:line" of the record

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTStats:
    records: int = 0
    truncated: int = 0  # longer than max_seq_len: cut, the cut part is not trained on
    dropped: int = 0  # no assistant token left to learn from (after truncation)
    label_tokens: int = 0
    tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- records -> messages


def record_to_messages(rec: dict, fmt: str, where: str, system_prompt: str | None = None) -> list[dict] | str:
    """A chat (list of {role, content[, weight]}) or, for plain text, the text itself."""
    if fmt == "auto":
        fmt = detect_format(rec, where)
    if fmt == "text":
        text = rec.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: expected a string 'text' field")
        return text
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{where}: alpaca record needs a string {key!r} field")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: alpaca field 'input' must be a string, got {type(extra).__name__}")
        user = rec["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        system = rec.get("system") or system_prompt
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    if fmt == "messages":
        turns = rec.get("messages")
        messages = [_turn(t, where, i, "role", "content", None) for i, t in enumerate(_list(turns, where, "messages"))]
    elif fmt == "sharegpt":
        turns = rec.get("conversations")
        messages = [_turn(t, where, i, "from", "value", SHAREGPT_ROLES)
                    for i, t in enumerate(_list(turns, where, "conversations"))]
    else:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def detect_format(rec: dict, where: str) -> str:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    raise DataError(f"{where}: unknown record format (keys: {', '.join(list(rec)[:8]) or 'none'}); expected "
                    "'messages' (OpenAI), 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or 'text'")


def _list(turns, where: str, key: str) -> list:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns")
    return turns


def _turn(turn, where: str, i: int, role_key: str, text_key: str, role_map: dict | None) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"{where}: turn {i} must be an object, got {type(turn).__name__}")
    role, text = turn.get(role_key), turn.get(text_key)
    if role_map is not None:
        role = role_map.get(str(role).lower())
    if role not in ROLES:
        expected = sorted(role_map) if role_map else list(ROLES)
        raise DataError(f"{where}: turn {i} has {role_key}={turn.get(role_key)!r}; expected one of {expected}")
    if not isinstance(text, str):
        raise DataError(f"{where}: turn {i} needs a string {text_key!r}")
    out = {"role": role, "content": text}
    if turn.get("weight") == 0:  # OpenAI's per-message switch: this assistant turn is context, not a target
        out["weight"] = 0
    return out


# ----------------------------------------------------------------------------- messages -> tokens + mask


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans [start, end) of the assistant turns that are trained on.

    A turn's span runs from the end of the conversation rendered up to it (with the generation prompt) to the
    end of the conversation rendered through it, so it holds the reply and the template's end-of-turn marker.
    """
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(clean)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight") == 0:
            continue
        before = tokenizer.apply_chat_template(clean[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(clean[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the chat template does not render a conversation's prefix as a prefix of the whole "
                            "conversation, so assistant turns cannot be located; use a template such as chatml")
        spans.append((len(before), len(through)))
    return text, spans


def encode_example(tokenizer, item: list[dict] | str, where: str, max_seq_len: int,
                   train_on_prompt: bool = False) -> tuple[SFTExample, bool]:
    """Tokenize one chat or text; returns the (shifted, truncated) example and whether it was truncated."""
    if isinstance(item, str):
        ids = tokenizer.encode(item, add_special_tokens=True)
        if tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        train = [True] * len(ids)
    else:
        text, spans = assistant_spans(tokenizer, item)
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        ids = enc.ids
        # a token is an assistant token when it starts inside an assistant span
        train = [train_on_prompt or any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    truncated = len(ids) > max_seq_len + 1
    ids, train = ids[: max_seq_len + 1], train[: max_seq_len + 1]
    labels = [t if keep else IGNORE for t, keep in zip(ids[1:], train[1:])]
    return SFTExample(ids[:-1], labels, where), truncated


def load_sft(files: list[str] | str, tokenizer, max_seq_len: int, format: str = "auto",
             train_on_prompt: bool = False, system_prompt: str | None = None,
             limit: int | None = None, verbose: bool = True) -> tuple[list[SFTExample], SFTStats]:
    """Read, render and tokenize every record; bad records raise DataError naming file and line."""
    if format not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be >= 2, got {max_seq_len}")
    stats, examples = SFTStats(), []
    for item, where in iter_sft_records(files, format, system_prompt):
        if tokenizer.chat_template is None and not isinstance(item, str):
            raise DataError(f"{where}: chat records need a tokenizer with a chat_template (set --chat-template)")
        example, truncated = encode_example(tokenizer, item, where, max_seq_len, train_on_prompt)
        stats.records += 1
        kind = "text" if isinstance(item, str) else "chat"
        stats.formats[kind] = stats.formats.get(kind, 0) + 1
        stats.truncated += truncated
        n_label = sum(label != IGNORE for label in example.labels)
        if n_label == 0:
            stats.dropped += 1
            continue
        stats.label_tokens += n_label
        stats.tokens += len(example)
        examples.append(example)
        if limit and len(examples) >= limit:
            break
    if verbose and (stats.truncated or stats.dropped):
        print(f"llmkit sft: warning: {stats.truncated} of {stats.records} examples were longer than "
              f"max_seq_len={max_seq_len} and were truncated; {stats.dropped} had no assistant token left and "
              "were dropped", file=sys.stderr)
    if not examples:
        raise DataError(f"{', '.join(map(str, _as_list(files)))}: no usable training example")
    return examples, stats


def iter_sft_records(files: list[str] | str, format: str = "auto",
                     system_prompt: str | None = None) -> Iterator[tuple[list[dict] | str, str]]:
    """(chat messages or text, 'file:line') for every record of the files."""
    for chunk in read_chunks(expand_inputs(_as_list(files)), unit="paragraph"):
        for line, raw in zip(chunk.lines, chunk.raw):
            where = f"{chunk.path}:{line}"
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if chunk.fmt == "txt":
                if format not in ("auto", "text"):
                    raise DataError(f"{chunk.path}: a plain-text file can only be read as format 'text'")
                yield s, where
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield record_to_messages(rec, format, where, system_prompt), where


def _as_list(files) -> list[str]:
    return [files] if isinstance(files, str) else [str(f) for f in files]


def split_val(examples: list[SFTExample], val_fraction: float, seed: int = 0
              ) -> tuple[list[SFTExample], list[SFTExample]]:
    """A seeded random validation split (at least one example when val_fraction > 0)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise DataError(f"val_fraction={val_fraction} leaves no training example out of {len(examples)}")
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


# ----------------------------------------------------------------------------- batches


class SFTBatches:
    """Batches of examples in a seeded order per epoch, with an exact, resumable position.

    Unpacked: one example per row, right-padded to the longest row (causal attention never looks right, so
    padding needs no mask; its labels are IGNORE). Packed: examples are laid end to end in rows of `seq_len`
    tokens; `segment_ids` (1, 2, ... per example, 0 for padding) let the model keep attention inside each
    example and `position_ids` restart at 0 for each.
    """

    def __init__(self, examples: list[SFTExample], batch_size: int, seq_len: int, pad_id: int = 0,
                 pack: bool = False, shuffle: bool = True, seed: int = 0, collate_fn=None):
        if not examples:
            raise DataError("no examples to batch")
        self.collate_fn = collate_fn or collate  # collate_classification for labelled texts
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.pad_id, self.pack, self.shuffle, self.seed = pad_id, pack, shuffle, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def _roll(self) -> None:
        if self.cursor >= len(self._order):  # epoch boundary: (e, len) and (e + 1, 0) are the same position
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()

    def _peek(self) -> SFTExample:
        self._roll()
        return self.examples[self._order[self.cursor]]

    def _next_example(self) -> SFTExample:
        example = self._peek()
        self.cursor += 1
        return example

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = [self._packed_row() if self.pack else [self._next_example()] for _ in range(self.batch_size)]
        return self.collate_fn(rows, self.seq_len if self.pack else None, self.pad_id)

    def _packed_row(self) -> list[SFTExample]:
        row = [self._next_example()]
        used = len(row[0])
        while used + len(self._peek()) <= self.seq_len:
            row.append(self._next_example())
            used += len(row[-1])
        return row

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_examples", len(self.examples)) != len(self.examples):
            raise DataError(f"the data has {len(self.examples)} examples but the checkpoint was written with "
                            f"{state['n_examples']}: resume needs the same data and options")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()

    def __len__(self) -> int:
        """Batches in one epoch (unpacked), or an estimate when packing."""
        if self.pack:
            tokens = sum(len(e) for e in self.examples)
            return max(1, -(-tokens // (self.seq_len * self.batch_size)))
        return max(1, len(self.examples) // self.batch_size)


def collate(rows: list[list[SFTExample]], seq_len: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of one or more examples -> input_ids, labels, position_ids, segment_ids, all [B, T]."""
    T = seq_len or max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, e in enumerate(row, 1):
            n = min(len(e), T - t)
            input_ids[b, t: t + n] = torch.tensor(e.input_ids[:n])
            labels[b, t: t + n] = torch.tensor(e.labels[:n])
            positions[b, t: t + n] = torch.arange(n)
            segments[b, t: t + n] = s
            t += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "segment_ids": segments}


# ----------------------------------------------------------------------------- sequence classification


def classification_labels(files: list[str] | str) -> list[str]:
    """The sorted label names of classification records {"text": ..., "label": ...} (numbers sort numerically)."""
    seen = set()
    for rec, where in _iter_json_records(files):
        if "label" not in rec or not isinstance(rec.get("text"), str):
            raise DataError(f"{where}: a classification record needs a string 'text' and a 'label'")
        seen.add(rec["label"])
    if not seen:
        raise DataError(f"{', '.join(_as_list(files))}: no classification record")
    numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in seen)
    return [str(v) for v in sorted(seen, key=(lambda v: v) if numeric else str)]


def load_classification(files: list[str] | str, tokenizer, max_seq_len: int,
                        label_names: list[str]) -> list[SFTExample]:
    """Tokenized texts (with the tokenizer's special tokens, e.g. [CLS] ... [SEP]) whose `labels` is [class id]."""
    index = {name: i for i, name in enumerate(label_names)}
    examples = []
    for rec, where in _iter_json_records(files):
        label = str(rec.get("label"))
        if label not in index:
            raise DataError(f"{where}: label {rec.get('label')!r} is not one of the model's labels {label_names}")
        ids = tokenizer.encode(rec["text"], add_special_tokens=True)[:max_seq_len] or [tokenizer.pad_id or 0]
        examples.append(SFTExample(ids, [index[label]], where))
    return examples


def collate_classification(rows: list[list[SFTExample]], seq_len: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and segment_ids [B,T] (1 on real tokens), class labels [B]."""
    examples = [e for row in rows for e in row]
    T = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    segments = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        input_ids[b, : len(e)] = torch.tensor(e.input_ids)
        segments[b, : len(e)] = 1
    return {"input_ids": input_ids, "segment_ids": segments, "labels": torch.tensor([e.labels[0] for e in examples])}


def _iter_json_records(files: list[str] | str) -> Iterator[tuple[dict, str]]:
    for path in expand_inputs(_as_list(files)):
        if not path.endswith(".jsonl"):
            raise DataError(f"{path}: classification data must be JSONL records with 'text' and 'label'")
        with open(path, encoding="utf-8") as f:
            for where, rec in iter_jsonl(f, path):
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                yield rec, where
