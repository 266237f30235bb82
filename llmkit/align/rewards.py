"""Reward functions for PPO and GRPO, and how `--reward-fn` finds one.

A reward function is called once per batch, TRL's way: `fn(prompts, completions, **columns)`, where
`prompts` and `completions` are lists of strings and each other field of the prompt records (e.g.
"answer") arrives as a list under its own name; it returns one float per completion.

    --reward-fn llmkit.align.rewards:exact_answer      a module and a name
    --reward-fn my_rewards.py:length_penalty           a file and a name
"""

from __future__ import annotations

import re
from collections.abc import Callable

from llmkit.user_code import load_callable

RewardFn = Callable[..., list[float]]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer a math solution states: the number after "####" (GSM8K) or else the last number in it."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value.rstrip("0").rstrip(".") if "." in value else value


def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 when the completion's final number equals the record's answer (GSM8K "... #### 42" or "42"), else 0."""
    return [float(final_number(c) is not None and final_number(c) == final_number(str(a)))
            for c, a in zip(completions, answer)]


def load_reward_fn(spec: str) -> RewardFn:
    """The function `spec` names: "package.module:name" or "path/to/file.py:name"."""
    return load_callable(spec, "--reward-fn")
