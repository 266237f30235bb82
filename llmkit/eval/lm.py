"""Scoring and generation requests against an llmkit model, with lm-evaluation-harness's semantics.

`EvalLM` mirrors lm-eval's `HFLM` (model `hf`) so that the same checkpoint gives the same numbers:
- tokenisation: `encode(text)` with the tokenizer's own special tokens (no BOS added when the text already
  starts with it); a (context, continuation) pair moves the context's trailing spaces into the continuation,
  encodes context+continuation whole and splits after the context's tokens; an empty context is replaced by
  the prefix token (BOS, else EOS);
- scoring: inputs longer than `max_length + 1` tokens are cut from the left; log-softmax in the logits'
  dtype; `is_greedy` when every continuation token is the argmax;
- rolling log-likelihood: `rolling_windows` (lm-eval's `get_rolling_token_windows` + `make_disjoint_window`),
  every token predicted exactly once, the first from the prefix token;
- generation: greedy until a stop string (the `until` list plus the EOS string) or EOS, at most
  `max_gen_toks` tokens, decoded without special tokens and cut at each stop string in turn.
Requests are sorted longest first (lm-eval's order) and run in batches; requests whose model input is the
same token sequence (e.g. one-token answers "A".."D" after one prompt) share one forward pass.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from llmkit.infer.generate import GenerationConfig, decode_tokens
from llmkit.infer.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256


def progress(iterable=None, total: int | None = None, desc: str = "", enabled: bool = True):
    """A tqdm bar on stderr (tqdm itself hides it when stderr is not a terminal and enabled is None)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int, stride: int | None = None
                    ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token windows covering `tokens`, each token predicted once.

    The first window predicts up to `max_len` tokens after the prefix token; each later window predicts the
    next `stride` tokens (default `max_len`, lm-eval's `context_len=1`) with `max_len - stride` tokens of
    earlier text as context. Same windows as lm-eval's `get_rolling_token_windows` + `make_disjoint_window`.
    """
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_length={max_len}], got {stride}")
    windows = []
    if not tokens:
        return windows
    first = min(max_len, len(tokens))
    windows.append(([prefix_token] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, stride)
        end = predicted + n
        windows.append((tokens[max(0, end - max_len - 1): end - 1], tokens[end - n: end]))
        predicted += n
    # disjoint: the context keeps only what the continuation does not already supply
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


class EvalLM:
    """An llmkit model and tokenizer behind lm-eval's three request types."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 show_progress: bool = True):
        if tokenizer is None:
            raise ValueError("evaluation needs a tokenizer (the checkpoint has no tokenizer.json)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = max_length or model.config.max_seq_len
        self.device = next(model.parameters()).device  # not lm_head.weight: a quantised head has none
        self.show_progress = show_progress
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise ValueError("the tokenizer has neither a bos nor an eos token; scoring needs one to start from")
        self.prefix_token_id = prefix
        self.eot_token_id = tokenizer.eos_id
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_id
        self.stop_token_ids = () if eos is None else (eos,)

    # -- tokenisation (HFLM.tok_encode / TemplateLM._encode_pair)

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = not text.startswith(self.tokenizer.decode([self.prefix_token_id]))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if not cont:
                raise ValueError("cannot score an empty continuation after an empty context")
            return ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # -- log-likelihood

    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood"
                      ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy output) per (context, continuation)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], desc)

    @torch.inference_mode()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood"
                             ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError(f"request {i}: context and continuation must both have tokens")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length "
                                 f"{self.max_length}")
            inp = tuple((ctx + cont)[-(self.max_length + 1):][:-1])
            groups.setdefault(inp, []).append(i)
        # longest first, ties by tokens (lm-eval's order); one forward per distinct input
        order = sorted(groups, key=lambda inp: (-len(inp) - 1, inp))
        bar = progress(total=len(pairs), desc=desc, enabled=self.show_progress)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            width = len(chunk[0])
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, inp in enumerate(chunk):
                batch[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)  # right padding: causal, unseen
            logprobs = F.log_softmax(self.model(batch.to(self.device)), dim=-1)
            for row, inp in enumerate(chunk):
                for i in groups[inp]:
                    cont = pairs[i][1]
                    n = len(cont)
                    lp = logprobs[row, len(inp) - n: len(inp)]
                    target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    greedy = bool((lp.argmax(-1) == target).all())
                    results[i] = (float(lp.gather(1, target[:, None]).sum()), greedy)
                    bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None,
                              desc: str = "loglikelihood_rolling") -> list[float]:
        """Total log-likelihood of each text under rolling windows (every token scored once)."""
        return [ll for ll, _ in self.rolling_token_stats(texts, stride, desc)]

    def rolling_token_stats(self, texts: Sequence[str], stride: int | None = None,
                            desc: str = "loglikelihood_rolling") -> list[tuple[float, int]]:
        """(total log-likelihood, tokens scored) per text."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            tokens = self.tok_encode(text)
            for w in rolling_windows(tokens, self.prefix_token_id, self.max_length, stride):
                windows.append(w)
                owner.append(i)
        scores = self.loglikelihood_tokens(windows, desc) if windows else []
        totals = [0.0] * len(texts)
        counts = [0] * len(texts)
        for i, (ll, _), (_, cont) in zip(owner, scores, windows):
            totals[i] += ll
            counts[i] += len(cont)
        return list(zip(totals, counts))

    # -- generation

    @torch.inference_mode()
    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], desc: str = "generate_until"
                       ) -> list[str]:
        """Completion per (context, generation_kwargs)."""
        results: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(kwargs.items(), key=lambda kv: kv[0])), []).append(i)
        bar = progress(total=len(requests), desc=desc, enabled=self.show_progress)
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for indices in by_kwargs.values():
            kwargs = dict(requests[indices[0]][1])
            until, max_gen, sampling = self._generation_options(kwargs, eos_text)
            encoded = {i: self.tok_encode(requests[i][0]) for i in indices}
            indices = sorted(indices, key=lambda i: (-len(encoded[i]), requests[i][0]))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks ({max_gen}) must be below the model's max_length ({self.max_length})")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                prompts = [encoded[i][-max_ctx:] for i in chunk]
                for i, text in zip(chunk, self._generate(prompts, max_gen, until, sampling)):
                    results[i] = text
                    bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def _generation_options(self, kwargs: dict, eos_text: str | None):
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if eos_text is not None and eos_text not in until:
            until.append(eos_text)
        max_gen = DEFAULT_MAX_GEN_TOKS
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            if kwargs.get(alias) is not None:
                max_gen = int(kwargs[alias])
                break
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if do_sample and temperature > 0:
            sampling = SamplingParams(temperature=temperature, top_k=int(kwargs.get("top_k", 0) or 0),
                                      top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=kwargs.get("seed", 1234))
        else:
            sampling = SamplingParams(temperature=0.0)
        return until, max_gen, sampling

    def _generate(self, prompts: list[list[int]], max_gen: int, until: list[str], sampling: SamplingParams
                  ) -> list[str]:
        B = len(prompts)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        gen = GenerationConfig(max_new_tokens=max_gen, sampling=sampling, eos_token_ids=self.stop_token_ids)
        rows: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        stops = [s for s in until if s]
        eos = set(self.stop_token_ids)
        steps = decode_tokens(self.model, prompts, gen, pad)
        try:
            for token in steps:
                for b, tok in enumerate(token.tolist()):
                    if done[b]:
                        continue
                    if tok in eos:
                        done[b] = True
                        continue
                    rows[b].append(tok)
                    if stops and any(s in self._decode(rows[b]) for s in stops):
                        done[b] = True
                if all(done):
                    break
        finally:
            steps.close()  # frees the KV cache
        out = []
        for row in rows:
            text = self._decode(row)
            for s in stops:  # lm-eval cuts at each stop string in turn
                text = text.split(s)[0]
            out.append(text)
        return out

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
