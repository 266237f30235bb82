"""A toy alignment world small enough to train on a laptop CPU in seconds: the tests and
`benchmarks/rlhf_gpu.py --tiny` use it.

Texts are strings over a few letters, tokenized one character a token. Prompts are three letters and "=",
e.g. "cab=". Two checkable notions of a good reply:
  - preferences (reward model, DPO): the chosen reply has more "a"s than the rejected one;
  - reward (PPO, GRPO): `match_reward` is the fraction of the reply's first four letters equal to the
    record's "answer", the prompt's first letter: "cab=" -> "cccc" earns 1.0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdef"
PROMPT_LETTERS = "abcd"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
REPLY_LEN = 4


def char_tokenizer():
    """One token per character of LETTERS, "=" and " ", plus pad/bos/eos/unk (15 tokens)."""
    import tokenizers
    from tokenizers import decoders, models

    from llmkit.tokenizer import Tokenizer

    vocab = {t: i for i, t in enumerate(SPECIALS + list(LETTERS + "= "))}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_policy(tokenizer, seed: int = 0, d_model: int = 32, n_layer: int = 2, init_std: float = 0.3):
    """A randomly initialised Llama-shaped decoder over the tokenizer's vocabulary. The wide init stands in for
    pretraining: with the usual 0.02 a frozen output layer cannot express a peaked next-token distribution at
    width 32 (logits stay within about +-0.7), so adapters on the blocks alone could not learn a policy."""
    import torch

    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, d_model=d_model, d_ff=2 * d_model,
                                  n_layer=n_layer, n_head=4, n_kv_head=2, max_seq_len=64, init_std=init_std,
                                  bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=tokenizer.pad_id)
    return Transformer(cfg)


def _prompt(rng: random.Random) -> str:
    return "".join(rng.choice(PROMPT_LETTERS) for _ in range(3)) + "="


def _reply(rng: random.Random, p_a: float) -> str:
    return "".join("a" if rng.random() < p_a else rng.choice(LETTERS[1:]) for _ in range(REPLY_LEN))


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen reply has strictly more "a"s than the rejected one."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        chosen, rejected = _reply(rng, 0.6), _reply(rng, 0.15)
        if chosen.count("a") > rejected.count("a"):
            out.append({"prompt": _prompt(rng), "chosen": chosen, "rejected": rejected})
    return out


def ranked_records(n: int, k: int = 3, seed: int = 0) -> list[dict]:
    """Lists of k replies with distinct numbers of "a", ranked best first via their "scores"."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        replies = [_reply(rng, rng.random()) for _ in range(k)]
        counts = [r.count("a") for r in replies]
        if len(set(counts)) == k:
            out.append({"prompt": _prompt(rng), "responses": replies, "scores": counts})
    return out


def prompt_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": p, "answer": p[0]} for p in (_prompt(rng) for _ in range(n))]


def match_reward(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    """Fraction of each completion's first REPLY_LEN characters equal to its answer letter."""
    return [sum(ch == a for ch in c[:REPLY_LEN]) / REPLY_LEN for c, a in zip(completions, answer)]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
