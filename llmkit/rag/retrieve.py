"""Ranking math, independent of the store: score fusion, reciprocal rank fusion, MMR, and an llmkit re-ranker.

Fusion of dense and BM25 rankings:
- "zscore" (default): over the union of both candidate lists, each retriever's scores are standardised
  (mean 0, std 1) and combined as alpha * dense + (1 - alpha) * bm25. Scores, not just ranks, say how
  much better the first candidate is than the tenth; every candidate has both scores (BM25 is scored on
  the whole corpus, missing cosines are computed from stored vectors), so nothing is imputed.
- "rrf": reciprocal rank fusion, sum of 1 / (k + rank), k = 60 (Cormack et al., 2009).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FUSIONS = ("zscore", "rrf")


def zscore_fusion(dense: dict[str, float], bm25: dict[str, float], alpha: float = 0.5) -> dict[str, float]:
    """dense, bm25: score of every candidate (same keys). Returns the fused score per candidate."""
    keys = list(dense)
    if not keys:
        return {}
    d = np.array([dense[k] for k in keys], dtype=np.float64)
    b = np.array([bm25[k] for k in keys], dtype=np.float64)
    fused = alpha * _standardise(d) + (1 - alpha) * _standardise(b)
    return dict(zip(keys, fused.tolist()))


def _standardise(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return (x - x.mean()) / std if std > 1e-12 else np.zeros_like(x)


def rrf_fusion(rankings: Sequence[Sequence[str]], k: int = 60, weights: Sequence[float] | None = None
               ) -> dict[str, float]:
    weights = weights or [1.0] * len(rankings)
    scores: dict[str, float] = {}
    for w, ranking in zip(weights, rankings):
        for rank, key in enumerate(ranking):
            scores[key] = scores.get(key, 0.0) + w / (k + rank + 1)
    return scores


def mmr(relevance: Sequence[float], vectors: np.ndarray, k: int, lam: float = 0.7) -> list[int]:
    """Maximal marginal relevance (Carbonell & Goldstein, 1998): pick k rows that are relevant (cosine to
    the query) and unlike the rows already picked (cosine between unit `vectors`), by
    lam * relevance - (1 - lam) * max similarity to a picked row. Returns row indices in the order picked."""
    n = len(relevance)
    if n == 0:
        return []
    rel = np.asarray(relevance, dtype=np.float64)
    sim = vectors @ vectors.T
    chosen: list[int] = []
    best_sim = np.full(n, -np.inf)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(best_sim), best_sim, 0.0)
        score = lam * rel - (1 - lam) * penalty
        score[chosen] = -np.inf
        i = int(score.argmax())
        chosen.append(i)
        best_sim = np.maximum(best_sim, sim[i])
    return chosen


RERANK_PROMPT = ("Passage:\n{passage}\n\nQuestion: {question}\n\n"
                 "Is this passage relevant to the question? Answer yes or no.")


class LlmkitReranker:
    """Scores a (question, passage) pair by the model's log-probability of "yes" as the next token after
    RERANK_PROMPT (in the chat template when the tokenizer has one, else followed by "\\nAnswer:")."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_passage_tokens: int = 384):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_passage_tokens = batch_size, max_passage_tokens
        ids = set()
        for word in (" yes", "yes", " Yes", "Yes"):
            enc = tokenizer.encode(word)
            if enc:
                ids.add(enc[0])
        self.yes_ids = sorted(ids)

    def prompt(self, question: str, passage: str) -> str:
        enc = self.tokenizer.encode(passage)
        if len(enc) > self.max_passage_tokens:
            passage = self.tokenizer.decode(enc[: self.max_passage_tokens])
        text = RERANK_PROMPT.format(passage=passage, question=question)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return text + "\nAnswer:"

    def score(self, question: str, passages: Sequence[str]) -> list[float]:
        import torch

        from llmkit.infer.generate import left_pad

        prompts = [self.tokenizer.encode(self.prompt(question, p)) for p in passages]
        limit = getattr(self.model.config, "max_seq_len", None)
        if limit and self.model.config.position == "learned":
            prompts = [p[-limit:] for p in prompts]
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                ids, mask = left_pad(prompts[i: i + self.batch_size], pad, device)
                logits = self.model(ids, mask if bool((mask == 0).any()) else None)[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)[:, self.yes_ids]
                out += torch.logsumexp(logp, dim=-1).tolist()
        return out
