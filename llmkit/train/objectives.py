"""Training objectives: causal LM, prefix LM and a UL2 mixture of denoisers on the decoder-only model;
masked LM on the encoder (BERT); span corruption on the encoder-decoder (T5).

Each turns a window of T+1 tokens (inputs x, shifted targets y) into model inputs, labels
(-100 where no loss is taken) and the model's other keyword arguments (prefix length, masks, decoder inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("causal", "prefix", "ul2", "mlm", "span")
# the model architecture each objective trains
OBJECTIVE_ARCHITECTURE = {"mlm": "encoder", "span": "encoder-decoder"}
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


class RouterLog:
    """Mixture-of-experts auxiliary losses and routing figures over one optimiser step.

    `loss(model, accum)` after each micro-batch's forward gives the term to add to its loss:
    (moe_aux_loss_coef * balance + moe_z_loss_coef * z-loss) summed over the MoE layers, over accum so
    the step's gradient is that of the mean over micro-batches (and, averaged by DDP, over ranks).
    `record()` at the end of the step: per-layer per-expert routed assignments and dropped ones (summed
    over micro-batches and ranks), the worst layer's max/min load, mean balance and z-losses.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loads = torch.zeros(0, dtype=torch.long)  # [MoE layers, experts]: assignments per expert
        self.dropped, self.balance, self.z, self.count = 0, 0.0, 0.0, 0

    def loss(self, model: torch.nn.Module, accum: int) -> Tensor | float:
        from llmkit.model import MoE

        layers = [m for m in model.modules() if isinstance(m, MoE) and m.stats is not None]
        stats = [m.stats for m in layers]
        for m in layers:
            m.stats = None  # read once: the next forward's are its own
        if not stats:
            return 0.0
        cfg = model.config
        aux = sum(cfg.moe_aux_loss_coef * s["balance_loss"] + cfg.moe_z_loss_coef * s["z_loss"] for s in stats)
        # one device-to-host copy for all layers: [layers, experts + 3] (load, then dropped, balance, z);
        # counts are exact in fp32 below 2^24 assignments a micro-batch
        figures = torch.stack([torch.cat([s["load"].float(), torch.stack(
            [s["dropped"].float(), s["balance_loss"].detach().float(), s["z_loss"].detach().float()])])
            for s in stats]).cpu()
        loads = figures[:, :-3].long()
        self.loads = loads if self.count == 0 else self.loads + loads
        dropped, balance, z = figures[:, -3:].T
        self.dropped += int(dropped.sum())
        self.balance += float(balance.mean())
        self.z += float(z.mean())
        self.count += 1
        return aux / accum

    def record(self) -> dict:
        """The step's figures for metrics.jsonl (empty for a dense model); resets for the next step."""
        if not self.count:
            return {}
        import torch.distributed as dist

        loads = self.loads
        means = torch.tensor([self.dropped, self.balance, self.z, self.count], dtype=torch.float64)
        if dist.is_initialized():  # every rank routed its own tokens
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            loads, means = loads.to(device), means.to(device)
            dist.all_reduce(loads)
            dist.all_reduce(means)
        loads = loads.cpu()
        dropped, balance, z, count = means.tolist()
        ratio = (loads.max(1).values.float() / loads.min(1).values.clamp(min=1).float()).max()
        out = {"moe_balance_loss": balance / count, "moe_z_loss": z / count,
               "moe_load_max_min": round(float(ratio), 3), "moe_dropped": int(dropped), "moe_load": loads.tolist()}
        self.reset()
        return out


def make_batch(objective: str, x: Tensor, y: Tensor, generator: torch.Generator, vocab_size: int,
               tokenizer=None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(input_ids, labels, the model's other keyword arguments) for one batch of windows.

    mlm masks with the tokenizer's [MASK]/<mask> token (else the top id, reserved as UL2 reserves its own);
    span uses T5's sentinels (the top 100 ids) and ends targets with the tokenizer's eos.
    """
    if objective == "causal":
        return x, y, {}
    if objective in ("prefix", "ul2"):
        windows = torch.cat([x, y[:, -1:]], 1)
        inputs, labels, prefix = _prefix_lm(x, y, generator) if objective == "prefix" else _ul2(windows, generator,
                                                                                                   vocab_size)
        return inputs, labels, {"prefix_len": prefix}
    if objective == "mlm":  # the T inputs alone: a learned-position encoder's context is seq_len
        mask_id = _token_id(tokenizer, ("[MASK]", "<mask>"), vocab_size - 1)
        special = torch.isin(x, torch.tensor(_special_ids(tokenizer), dtype=torch.long))
        inputs, labels = mask_tokens(x, vocab_size, mask_id, generator, special=special)
        return inputs, labels, {}
    if objective == "span":
        return _span_batch(torch.cat([x, y[:, -1:]], 1), generator, vocab_size, tokenizer)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def check_objective(objective: str, architecture: str) -> None:
    """The objective must train the model's architecture (mlm an encoder, span an encoder-decoder, others a decoder)."""
    wanted = OBJECTIVE_ARCHITECTURE.get(objective, "decoder")
    if architecture != wanted:
        raise ValueError(f"objective {objective!r} trains a {wanted} model, but the model's architecture is "
                         f"{architecture!r}; pick objective " +
                         " or ".join(repr(o) for o in OBJECTIVES
                                     if OBJECTIVE_ARCHITECTURE.get(o, "decoder") == architecture))


def _token_id(tokenizer, names: tuple[str, ...], default: int) -> int:
    for name in names:
        found = tokenizer.token_to_id(name) if tokenizer is not None else None
        if found is not None:
            return found
    return default


def _special_ids(tokenizer) -> list[int]:
    if tokenizer is None:
        return []
    return [i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None]


def _span_batch(windows: Tensor, generator: torch.Generator, vocab_size: int,
                tokenizer) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """T5 batches: encoder inputs right-padded with their mask, targets (-100 padded) and decoder inputs."""
    eos = tokenizer.eos_id if tokenizer is not None else None
    pad = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    pairs = [span_corrupt(w, generator, t5_sentinels(vocab_size), eos) for w in windows]
    inputs = torch.nn.utils.rnn.pad_sequence([i for i, _ in pairs], batch_first=True, padding_value=pad)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i, _ in pairs], batch_first=True)
    labels = torch.nn.utils.rnn.pad_sequence([t for _, t in pairs], batch_first=True, padding_value=IGNORE)
    # teacher forcing: the decoder reads the targets shifted right behind the start token (T5: the pad id)
    return inputs, labels, {"attention_mask": mask, "decoder_input_ids": shift_right(labels, pad)}


def shift_right(labels: Tensor, start_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: the start token, then labels[:-1] (-100 read as the start/pad id)."""
    shifted = torch.cat([torch.full_like(labels[:, :1], start_id), labels[:, :-1]], 1)
    return shifted.masked_fill(shifted == IGNORE, start_id)


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
