"""Training objectives on the decoder-only model: causal LM, prefix LM, and a UL2 mixture of denoisers.

Each turns a window of T+1 tokens (inputs x, shifted targets y) into model inputs, labels
(-100 where no loss is taken) and an optional bidirectional prefix length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("causal", "prefix", "ul2")
IGNORE = -100
# UL2 (Tay et al. 2022) denoisers: (mode, mean span length, corruption rate); "S" is sequential prefix-LM
UL2_DENOISERS = (("R", 3, 0.15), ("R", 8, 0.15), ("S", 0, 0.25), ("X", 3, 0.5), ("X", 64, 0.15))
N_SENTINELS = 100


def ul2_special_ids(vocab_size: int) -> dict:
    """Mode tokens and sentinels take the top ids of the vocabulary (reserve them when training the tokenizer)."""
    return {"R": vocab_size - 1, "S": vocab_size - 2, "X": vocab_size - 3,
            "sentinels": list(range(vocab_size - 4, vocab_size - 4 - N_SENTINELS, -1))}


def lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Token cross-entropy in fp32, ignoring label -100."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def make_batch(objective: str, x: Tensor, y: Tensor, generator: torch.Generator,
               vocab_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(input_ids, labels, prefix_len or None) for one batch of windows."""
    if objective == "causal":
        return x, y, None
    if objective == "prefix":
        return _prefix_lm(x, y, generator)
    if objective == "ul2":
        return _ul2(torch.cat([x, y[:, -1:]], 1), generator, vocab_size)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _prefix_lm(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    B, T = x.shape
    prefix = torch.randint(1, T, (B,), generator=generator)
    # position i < prefix-1 would predict a token it can already see through the bidirectional prefix
    labels = y.masked_fill(torch.arange(T)[None, :] < (prefix - 1)[:, None], IGNORE)
    return x, labels, prefix


def _ul2(windows: Tensor, generator: torch.Generator, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    ids = ul2_special_ids(vocab_size)
    rows, labels, prefixes = [], [], []
    for window in windows:
        k = int(torch.randint(len(UL2_DENOISERS), (1,), generator=generator))
        mode, span, rate = UL2_DENOISERS[k]
        if mode == "S":
            seq, prefix = _sequential(window, rate, generator, ids["S"])
        else:
            seq, prefix = _span_corrupt(window, span, rate, generator, ids[mode], ids["sentinels"])
        rows.append(seq[:-1])
        label = seq[1:].clone()
        label[: prefix - 1] = IGNORE
        labels.append(label)
        prefixes.append(prefix)
    return torch.stack(rows), torch.stack(labels), torch.tensor(prefixes)


def _sequential(window: Tensor, rate: float, generator: torch.Generator, mode_id: int) -> tuple[Tensor, int]:
    n = len(window) - 1  # room for the mode token
    split = max(1, int(n * (1 - rate * 2 * float(torch.rand((), generator=generator)))))
    return torch.cat([torch.tensor([mode_id]), window[:n]]), 1 + min(split, n - 1)


def _span_corrupt(window: Tensor, mean_span: int, rate: float, generator: torch.Generator, mode_id: int,
                  sentinels: list[int]) -> tuple[Tensor, int]:
    """[mode] + text with spans replaced by sentinels, then each sentinel followed by its span (T5/UL2)."""
    total = len(window)
    n_spans = max(1, min(len(sentinels), round(total * rate / mean_span)))
    length = total - 1 - 2 * n_spans  # mode token + one sentinel per span on each side
    noise = max(n_spans, min(length - 1, round(length * rate)))
    source = window[:length]
    noise_lengths = _random_partition(noise, n_spans, generator)
    keep_lengths = _random_partition(length - noise, n_spans, generator)
    inputs, targets, pos = [torch.tensor([mode_id])], [], 0
    for s in range(n_spans):
        inputs.append(source[pos: pos + keep_lengths[s]])
        pos += keep_lengths[s]
        sentinel = torch.tensor([sentinels[s]])
        inputs.append(sentinel)
        targets += [sentinel, source[pos: pos + noise_lengths[s]]]
        pos += noise_lengths[s]
    prefix = torch.cat(inputs)
    return torch.cat([prefix, *targets]), len(prefix)


def _random_partition(n: int, parts: int, generator: torch.Generator) -> list[int]:
    """n split into `parts` positive lengths at random cut points."""
    if parts == 1:
        return [n]
    cuts = torch.randperm(n - 1, generator=generator)[: parts - 1].sort().values + 1
    bounds = [0, *cuts.tolist(), n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------- encoder objectives


def mask_tokens(ids: Tensor, vocab_size: int, mask_id: int, generator: torch.Generator, rate: float = 0.15,
                special: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """BERT's masked LM: pick `rate` of the tokens (never `special` ones); of those 80% become [MASK],
    10% a random token, 10% stay. -> (inputs, labels with -100 where no prediction is asked)."""
    picked = torch.rand(ids.shape, generator=generator) < rate
    if special is not None:
        picked &= ~special
    labels = ids.masked_fill(~picked, IGNORE)
    draw = torch.rand(ids.shape, generator=generator)
    inputs = ids.masked_fill(picked & (draw < 0.8), mask_id)
    randomised = picked & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    return torch.where(randomised, random_ids, inputs), labels


def t5_sentinels(vocab_size: int, n: int = N_SENTINELS) -> list[int]:
    """T5's <extra_id_0>, <extra_id_1>, ... are the top ids of the vocabulary, counting down."""
    return list(range(vocab_size - 1, vocab_size - 1 - n, -1))


def span_corrupt(tokens: Tensor, generator: torch.Generator, sentinels: list[int], eos_id: int | None,
                 rate: float = 0.15, mean_span: float = 3.0) -> tuple[Tensor, Tensor]:
    """T5's span corruption of one sequence -> (encoder inputs, decoder targets).

    round(L*rate) noise tokens in round(noise/mean_span) spans, alternating with kept spans (a kept span
    first); each noise span becomes one sentinel in the input, and the target lists every sentinel followed
    by the tokens it hides, then eos.
    """
    length = len(tokens)
    noise = min(max(1, round(length * rate)), length - 1)
    n_spans = max(1, min(len(sentinels), noise, round(noise / mean_span)))
    noise_lengths = _random_partition(noise, n_spans, generator)
    keep_lengths = _random_partition(length - noise, n_spans, generator)
    inputs, targets, pos = [], [], 0
    for s in range(n_spans):
        inputs += [tokens[pos: pos + keep_lengths[s]], torch.tensor([sentinels[s]])]
        pos += keep_lengths[s]
        targets += [torch.tensor([sentinels[s]]), tokens[pos: pos + noise_lengths[s]]]
        pos += noise_lengths[s]
    end = [torch.tensor([eos_id])] if eos_id is not None else []
    return torch.cat(inputs + end), torch.cat(targets + end)
