"""Experience for PPO and GRPO: sample replies with llmkit's generation loop, then score them.

A rollout samples every prompt's replies in one batch through `decode_tokens` (left-padded prompts, the
static KV cache), then lays each row out as [prompt, left-padded to P | reply, right-padded to R] so one
forward pass per model gives, for the R reply tokens: the sampling policy's log-probs, the reference's
log-probs, the critic's values (PPO) and the reward (a reward model read at the last real token, or a
Python function of the decoded texts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmkit.align.data import PromptExample
from llmkit.align.losses import entropy_from_logits, sequence_logprobs
from llmkit.train.trainer import TrainError


def shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of `module` that shares every parameter and buffer with it (no new weight memory):
    PPO's critic backbone on the actor's frozen base."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


@dataclass
class Rollout:
    """N sampled sequences and what each model said about their R reply tokens."""

    sequences: Tensor  # [N, P + R] prompt (left-padded) then reply (right-padded)
    attention_mask: Tensor  # [N, P + R]
    prompt_len: int  # P
    response_mask: Tensor  # [N, R] float: 1 on reply tokens up to and including EOS
    logprobs: Tensor  # [N, R] of the policy that sampled them, at the sampling temperature
    ref_logprobs: Tensor | None  # [N, R]
    scores: Tensor  # [N]
    completions: list[str] = field(default_factory=list)

    @property
    def responses(self) -> Tensor:
        return self.sequences[:, self.prompt_len:]

    def kl_per_sequence(self) -> Tensor:
        """Sum over each reply of log pi - log pi_ref (the k1 estimate of KL(pi || pi_ref) of that sample)."""
        return ((self.logprobs - self.ref_logprobs) * self.response_mask).sum(1)


def reply_logprobs(model: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_len: int,
                   temperature: float, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log p(reply token | prefix) [N, R] at `temperature`, and the entropy of each of those distributions."""
    logits = model(sequences, attention_mask)[:, prompt_len - 1: -1]
    logp = sequence_logprobs(logits, sequences[:, prompt_len:], temperature)
    return logp, entropy_from_logits(logits.detach(), temperature) if with_entropy else None


def chunked(fn, n: int, size: int) -> Tensor:
    """torch.cat of fn(rows) over consecutive row slices of at most `size` (bounded activation memory)."""
    return torch.cat([fn(slice(i, min(n, i + size))) for i in range(0, n, size)])


class RewardSource:
    """A reward model (`--reward-model DIR`) or a Python function (`--reward-fn MODULE:NAME`)."""

    def __init__(self, reward_model: str, reward_fn: str, tokenizer, device):
        self.model, self.fn = None, None
        if reward_model:
            from llmkit.align.reward import load_reward_model
            from llmkit.data.pack import tokenizer_hash

            self.model, rm_tokenizer = load_reward_model(reward_model, device)
            self.model.requires_grad_(False)
            if rm_tokenizer is not None and tokenizer_hash(rm_tokenizer) != tokenizer_hash(tokenizer):
                raise TrainError(f"{reward_model}: the reward model's tokenizer differs from the policy's; it must "
                                 "score the very tokens the policy samples")
        else:
            from llmkit.align.rewards import load_reward_fn

            self.fn = load_reward_fn(reward_fn)
            self.name = reward_fn

    @torch.no_grad()
    def score(self, rollout: Rollout, prompts: list[str], columns: dict[str, list], micro: int) -> Tensor:
        if self.model is not None:
            return chunked(lambda rows: self.model(rollout.sequences[rows], rollout.attention_mask[rows]),
                           len(prompts), micro)
        values = self.fn(prompts, rollout.completions, **columns)
        if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
            raise TrainError(f"reward function {self.name}: returned {type(values).__name__} of length "
                             f"{len(values) if hasattr(values, '__len__') else '?'}, expected {len(prompts)} floats")
        try:
            return torch.tensor([float(v) for v in values], device=rollout.sequences.device)
        except (TypeError, ValueError):
            raise TrainError(f"reward function {self.name}: returned a value that is not a number") from None


class Sampler:
    """Samples replies from the policy and gathers log-probs and rewards: the experience of one step."""

    def __init__(self, cfg, tokenizer, reward: RewardSource, reference_mode, autocast):
        self.cfg, self.tokenizer, self.reward = cfg, tokenizer, reward
        self.reference_mode = reference_mode  # the trainer's: (policy) -> context yielding the reference model
        self.autocast = autocast  # the trainer's precision context: sampling and scoring compute as updates do
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        self.eos = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()

    def generation_config(self, seed: int):
        from llmkit.infer.generate import GenerationConfig
        from llmkit.infer.sampling import SamplingParams

        cfg = self.cfg
        return GenerationConfig(cfg.max_new_tokens, SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k,
                                                                   top_p=cfg.top_p, seed=seed),
                                eos_token_ids=self.eos)

    def sample(self, policy: nn.Module, prompts: list[list[int]], seed: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """(sequences, attention mask, reply mask, P): the prompts continued by the policy, one batch."""
        from llmkit.infer.generate import decode_tokens, left_pad

        was_training = policy.training
        policy.eval()
        try:
            steps = list(decode_tokens(policy, prompts, self.generation_config(seed), self.pad_id))
        finally:
            policy.train(was_training)
        # clone: tensors made in inference mode cannot enter the autograd graph of the update passes
        replies = torch.stack(steps, 1).clone()
        is_eos = torch.isin(replies, torch.tensor(self.eos or (-1,), device=replies.device)).long()
        after_eos = is_eos.cumsum(1) - is_eos  # > 0 past the first EOS
        reply_mask = (after_eos == 0).long()
        ids, mask = left_pad(prompts, self.pad_id, replies.device)
        replies = torch.where(reply_mask.bool(), replies, torch.full_like(replies, self.pad_id))
        return torch.cat([ids, replies], 1), torch.cat([mask, reply_mask], 1), reply_mask.float(), ids.shape[1]

    @torch.no_grad()
    def collect(self, policy: nn.Module, examples: list[PromptExample], seed: int, need_reference: bool) -> Rollout:
        """Sample one reply per example (repeat examples for groups) and score the replies.

        Sampling computes in the weights' dtype (the static KV cache is allocated in it); log-probs, values and
        reward-model scores in the trainer's precision, the one the updates use, so the first update's
        probability ratios are exactly 1."""
        sequences, attention_mask, reply_mask, P = self.sample(policy, [e.prompt for e in examples], seed)
        with self.autocast():
            return self._score(policy, examples, sequences, attention_mask, reply_mask, P, need_reference)

    def _score(self, policy: nn.Module, examples: list[PromptExample], sequences: Tensor, attention_mask: Tensor,
               reply_mask: Tensor, P: int, need_reference: bool) -> Rollout:
        cfg, micro, n = self.cfg, self.cfg.micro_batch_size, len(examples)

        def logprobs_of(model):
            return chunked(lambda rows: reply_logprobs(model, sequences[rows], attention_mask[rows], P,
                                                       cfg.temperature)[0], n, micro)

        was_training = policy.training
        policy.eval()  # behaviour log-probs without dropout, as the samples were drawn
        try:
            logprobs = logprobs_of(policy)
        finally:
            policy.train(was_training)
        ref_logprobs = None
        if need_reference:
            with self.reference_mode(policy) as reference:
                ref_logprobs = logprobs_of(reference)
        completions = [self.tokenizer.decode([t for t, keep in zip(row.tolist(), kept.tolist()) if keep],
                                             skip_special_tokens=True)
                       for row, kept in zip(sequences[:, P:], reply_mask)]
        rollout = Rollout(sequences, attention_mask, P, reply_mask, logprobs, ref_logprobs,
                          torch.zeros(n, device=sequences.device), completions)
        keys = sorted({k for e in examples for k in e.columns})
        columns = {k: [e.columns.get(k) for e in examples] for k in keys}
        rollout.scores = self.reward.score(rollout, [e.text for e in examples], columns, micro)
        return rollout
