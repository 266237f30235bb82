"""Next-token sampling: logit processors and a sync-free sampler, with transformers' semantics.

Every function works on a batch of logits [B, V] on any device and branches only on the
(Python) sampling parameters, never on tensor values, so a decode step that calls them
compiles with `torch.compile(fullgraph=True)` and needs no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (ties with the k-th included); 0 = off
    top_p: float = 1.0  # keep the smallest most-likely set with mass >= top_p; 1.0 = off
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob (after temperature); 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, over token ids present in the context; 1.0 = off
    seed: int | None = None  # seeds the generator of a whole generation (make_generator), not each step
    # OpenAI's penalties over the tokens generated so far: logit - presence * [count > 0] - frequency * count
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its allowed range."""
        checks = (
            ("temperature", self.temperature >= 0, ">= 0 (0 means greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 means off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 means off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1] (0 means off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 means off)"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2] (0 means off)"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2] (0 means off)"),
        )
        # Written as "not ok" rather than a negated comparison so NaN fails every check.
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded from `params.seed` (None when unseeded), to pass to every `sample` call of one run."""
    if params.seed is None:
        return None
    return torch.Generator(device).manual_seed(params.seed)


def apply_repetition_penalty(logits: Tensor, context_ids: Tensor, penalty: float) -> Tensor:
    """Divide positive / multiply negative logits of every id present in `context_ids` [B, T].

    Each id counts once however often it occurs. Ids outside [0, V) are ignored, so -1 can pad
    ragged contexts (transformers likewise drops ids >= V).
    """
    B, V = logits.shape
    # Out-of-range ids land in a spare column V that is cut off again.
    ids = torch.where((context_ids >= 0) & (context_ids < V), context_ids, V)
    present = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter(1, ids, True)[:, :V]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(present, penalised, logits)


def apply_presence_frequency_penalty(logits: Tensor, generated_ids: Tensor, presence: float,
                                     frequency: float) -> Tensor:
    """OpenAI's penalties: subtract presence * [id generated] + frequency * (times generated); -1 pads rows."""
    B, V = logits.shape
    ids = torch.where((generated_ids >= 0) & (generated_ids < V), generated_ids, V)
    counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, :V]
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def process_logits(logits: Tensor, params: SamplingParams, context_ids: Tensor | None = None,
                   generated_ids: Tensor | None = None) -> Tensor:
    """Float32 logits [B, V] of the distribution `sample` draws from; filtered tokens are -inf.

    context_ids [B, T] (prompt and generated tokens) feed the repetition penalty; generated_ids
    [B, n] (generated tokens only) feed OpenAI's presence and frequency penalties, applied next.

    Order as in transformers 5.23 `GenerationMixin._get_logits_processor`: the repetition
    penalty (a processor, applied in greedy decoding too), then the sampling-only warpers
    temperature, top-k, top-p, min-p. Greedy keeps only the argmax of the penalised logits.
    """
    logits = logits.float()  # generate() upcasts next-token logits too; top-p's cumsum needs it
    if params.repetition_penalty != 1.0 and context_ids is not None:
        logits = apply_repetition_penalty(logits, context_ids, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated_ids is not None:
        logits = apply_presence_frequency_penalty(logits, generated_ids, params.presence_penalty,
                                                  params.frequency_penalty)
    if params.greedy:
        return _keep_argmax(logits)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = _top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    if params.min_p > 0.0:
        logits = _min_p(logits, params.min_p)
    return logits


def probs(logits: Tensor, params: SamplingParams, context_ids: Tensor | None = None,
          generated_ids: Tensor | None = None) -> Tensor:
    """Float32 probabilities [B, V] that `sample` draws from."""
    return process_logits(logits, params, context_ids, generated_ids).softmax(dim=-1)


def sample(
    logits: Tensor,
    params: SamplingParams,
    context_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    generated_ids: Tensor | None = None,
) -> Tensor:
    """Draw one token id per row of `logits` [B, V]; returns [B] int64.

    `generator` must live on the logits' device; pass the same one every step for a reproducible run.
    """
    processed = process_logits(logits, params, context_ids, generated_ids)
    if params.greedy:
        return processed.argmax(dim=-1)
    p = processed.softmax(dim=-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, and unlike
    # torch.multinomial it never syncs with the host. The clamp keeps 0 / 0 = NaN out of the argmax.
    noise = torch.empty_like(p).exponential_(generator=generator).clamp_min_(torch.finfo(p.dtype).tiny)
    return (p / noise).argmax(dim=-1)


def _keep_argmax(logits: Tensor) -> Tensor:
    # Greedy as a distribution: one-hot on the first maximum, the token argmax picks.
    idx = logits.argmax(dim=-1, keepdim=True)
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, logits.gather(-1, idx))


def _top_k(logits: Tensor, k: int) -> Tensor:
    k = min(k, logits.size(-1))  # k > V keeps everything, as in transformers
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    # Mirrors TopPLogitsWarper op for op: an ascending sort, so tied logits order the same way and
    # the same tokens drop; a token is removed when the mass at or below it is <= 1 - top_p.
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1] = False  # min_tokens_to_keep=1: the most likely token always stays
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _min_p(logits: Tensor, min_p: float) -> Tensor:
    # The top token always passes (min_p <= 1), so transformers' min_tokens_to_keep step is a no-op here.
    p = logits.softmax(dim=-1)
    return logits.masked_fill(p < min_p * p.amax(dim=-1, keepdim=True), float("-inf"))
