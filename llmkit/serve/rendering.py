"""Token logprobs and usage in the two shapes OpenAI's endpoints use."""

from __future__ import annotations

from llmkit.serve.generation import Piece


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, pieces: list[Piece]) -> list[dict]:
    """chat.completions' `logprobs.content`: token, logprob, bytes and top_logprobs per generated token."""

    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    out = []
    for token in (t for p in pieces for t in p.tokens):
        if token.logprob is None:
            continue
        top = [entry(i, lp) for i, lp in token.top or []]
        out.append(entry(token.id, token.logprob) | {"top_logprobs": top})
    return out


def completion_logprobs(tokenizer, pieces: list[Piece], offset: int = 0) -> dict:
    """completions' `logprobs`: parallel lists of tokens, their logprobs, top alternatives and text offsets."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for token in (t for p in pieces for t in p.tokens):
        if token.logprob is None:
            continue
        text = _token_text(tokenizer, token.id)
        tokens.append(text)
        logprobs.append(token.logprob)
        tops.append({_token_text(tokenizer, i): lp for i, lp in token.top or []})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, pieces: list[list[Piece]]) -> dict:
    completion = sum(max((p.completion_tokens for p in ps), default=0) for ps in pieces)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}
