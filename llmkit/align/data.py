"""Alignment data: preference pairs, hh-rlhf conversations, K-wise ranked lists, and prompts for RL.

Preference records (JSONL, one object per line; the format is picked per record by its keys):
  pair      {"prompt": ..., "chosen": ..., "rejected": ..., ["margin": float]}
  hh-rlhf   {"chosen": FULL TEXT, "rejected": FULL TEXT}: the prompt is the shared prefix up to and including
            its last "\\n\\nAssistant:" (Anthropic's format), or the whole shared prefix without that marker
  ranked    {"prompt": ..., "responses": [best, ..., worst]} or with "scores": [...] (higher is better)
A prompt may also be a list of chat messages ({"role", "content"}), rendered with the tokenizer's chat template.

Prompt records for PPO/GRPO: {"prompt": ...} or {"question": ...}, or any preference record (its prompt);
the record's other fields (e.g. "answer") go to the reward function as keyword columns.

Every response is tokenized after its prompt and ends with EOS, so a reward model scores exactly what a
policy's finished sample looks like.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmkit.data.io import DataError, expand_inputs, iter_jsonl

HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class RankedExample:
    """A prompt and two or more responses, best first (a preference pair is K = 2)."""

    prompt: list[int]
    responses: list[list[int]]
    where: str
    margin: float = 0.0
    ref_logps: list[float] | None = None  # DPO: the reference's log-probs of the responses, when precomputed

    def __len__(self) -> int:
        return len(self.prompt) + max(len(r) for r in self.responses)


@dataclass
class PromptExample:
    """A prompt to sample from, with its text and the record's other fields (reward-function columns)."""

    prompt: list[int]
    text: str
    where: str
    columns: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)


@dataclass
class PreferenceStats:
    records: int = 0
    truncated: int = 0  # prompt or a response cut to fit max_prompt_len / max_seq_len
    formats: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- records


def split_shared_prompt(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two full conversations that share their prompt."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)  # the last marker wholly inside the shared prefix
    if cut >= 0:
        n = cut + len(HH_ASSISTANT)
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{where}: 'chosen' and 'rejected' do not differ after their shared prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def preference_record(rec: dict, where: str) -> tuple[object, list[str], float, str]:
    """(prompt, responses best first, margin, format name) of one preference record."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "responses" in rec:
        responses = rec["responses"]
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{where}: 'responses' must be a list of two or more strings (best first)")
        scores = rec.get("scores")
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != len(responses):
                raise DataError(f"{where}: 'scores' must be a list of {len(responses)} numbers, one per response")
            order = sorted(range(len(responses)), key=lambda i: -float(scores[i]))
            responses = [responses[i] for i in order]
        return _prompt_field(rec, where), responses, 0.0, "ranked"
    for key in ("chosen", "rejected"):
        if not isinstance(rec.get(key), str):
            raise DataError(f"{where}: a preference record needs string 'chosen' and 'rejected' (or 'prompt' and "
                            f"'responses'); got keys {sorted(rec)}")
    margin = rec.get("margin", 0.0)
    if not isinstance(margin, (int, float)):
        raise DataError(f"{where}: 'margin' must be a number, got {margin!r}")
    if "prompt" in rec:
        return _prompt_field(rec, where), [rec["chosen"], rec["rejected"]], float(margin), "pair"
    prompt, chosen, rejected = split_shared_prompt(rec["chosen"], rec["rejected"], where)
    return prompt, [chosen, rejected], float(margin), "hh-rlhf"


def _prompt_field(rec: dict, where: str, keys: tuple[str, ...] = ("prompt",)):
    for key in keys:
        value = rec.get(key)
        if isinstance(value, str) or (isinstance(value, list) and value and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in value)):
            return value
    raise DataError(f"{where}: needs {' or '.join(repr(k) for k in keys)}: a string or a list of chat messages")


def iter_records(files: list[str] | str) -> Iterator[tuple[dict, str]]:
    """(record, "file:line") of every JSONL line of `files` (comma-separated string or list; globs allowed)."""
    names = [f.strip() for f in files.split(",") if f.strip()] if isinstance(files, str) else list(files)
    for path in expand_inputs(names):
        with open(path, encoding="utf-8") as f:
            yield from ((rec, where) for where, rec in iter_jsonl(f, path))


# ----------------------------------------------------------------------------- tokenizing


def encode_prompt(tokenizer, prompt, max_prompt_len: int) -> tuple[list[int], bool]:
    """Prompt ids (with the tokenizer's BOS), keeping the last max_prompt_len tokens; and whether it was cut."""
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        ids = tokenizer.encode(text)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=True)
    if not ids:
        ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id or 0]
    return ids[-max_prompt_len:], len(ids) > max_prompt_len


def encode_response(tokenizer, response: str, budget: int) -> tuple[list[int], bool]:
    ids = tokenizer.encode(response) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    return ids[:budget], len(ids) > budget


def load_preferences(files: list[str] | str, tokenizer, max_seq_len: int,
                     max_prompt_len: int) -> tuple[list[RankedExample], PreferenceStats]:
    """Every preference record of `files`, tokenized; prompts keep their last max_prompt_len tokens and each
    response is cut to fit max_seq_len after its prompt."""
    examples, stats = [], PreferenceStats()
    for rec, where in iter_records(files):
        prompt, responses, margin, fmt = preference_record(rec, where)
        prompt_ids, cut = encode_prompt(tokenizer, prompt, max_prompt_len)
        encoded = [encode_response(tokenizer, r, max_seq_len - len(prompt_ids)) for r in responses]
        if any(not ids for ids, _ in encoded):
            raise DataError(f"{where}: a response is empty after tokenization")
        stats.records += 1
        stats.truncated += cut or any(c for _, c in encoded)
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        examples.append(RankedExample(prompt_ids, [ids for ids, _ in encoded], where, margin))
    if not examples:
        raise DataError(f"{files}: no preference records")
    return examples, stats


def load_prompts(files: list[str] | str, tokenizer, max_prompt_len: int) -> list[PromptExample]:
    """Prompts for sampling: {"prompt"} / {"question"} records or the prompts of preference records."""
    examples = []
    for rec, where in iter_records(files):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if "prompt" in rec or "question" in rec:
            prompt = _prompt_field(rec, where, ("prompt", "question"))
        else:
            prompt = preference_record(rec, where)[0]
        ids, _ = encode_prompt(tokenizer, prompt, max_prompt_len)
        text = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=True)
        columns = {k: v for k, v in rec.items() if k not in ("prompt", "question", "chosen", "rejected", "responses")}
        examples.append(PromptExample(ids, text, where, columns))
    if not examples:
        raise DataError(f"{files}: no prompt records")
    return examples


# ----------------------------------------------------------------------------- batches


def collate_ranked(rows: list[list[RankedExample]], seq_len: int | None, pad_id: int) -> dict:
    """All responses of all examples, example-major, as right-padded prompt + response rows.

    input_ids, attention_mask [N,T]; response_mask [N,T] is 1 where the token is a response token (its
    log-probability is what DPO sums); group_sizes lists each example's K; margins [B].
    """
    examples = [e for row in rows for e in row]
    seqs = [(e.prompt, r) for e in examples for r in e.responses]
    T = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for n, (p, r) in enumerate(seqs):
        input_ids[n, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[n, : len(p) + len(r)] = 1
        response_mask[n, len(p): len(p) + len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
             "group_sizes": [len(e.responses) for e in examples],
             "margins": torch.tensor([e.margin for e in examples], dtype=torch.float32)}
    if all(e.ref_logps is not None for e in examples):
        batch["ref_logps"] = torch.tensor([v for e in examples for v in e.ref_logps], dtype=torch.float32)
    return batch


def collate_prompts(rows: list[list[PromptExample]], seq_len: int | None, pad_id: int) -> list[PromptExample]:
    """Prompt batches stay a list: the rollout pads them (on the left) itself."""
    return [e for row in rows for e in row]


def pairs_of(examples: list[RankedExample]) -> list[RankedExample]:
    """Ranked lists as the C(K,2) preference pairs they imply (what DPO trains on); pairs stay as they are."""
    out = []
    for e in examples:
        K = len(e.responses)
        out.extend(RankedExample(e.prompt, [e.responses[i], e.responses[j]], e.where, e.margin)
                   for i in range(K) for j in range(i + 1, K))
    return out
