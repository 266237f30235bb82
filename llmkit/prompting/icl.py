"""In-context learning: choose k demonstrations for a query, order them, and fit them into a token budget.

Selection: `random` (seeded), `knn` (the k most similar by embedding cosine, with the RAG embedder), or `mmr`
(relevant but unlike each other: maximal marginal relevance). Ordering: `similar_last` (the most similar
demonstration next to the query), `similar_first`, `random` (seeded) or `selected` (as chosen). The budget
drops the least relevant demonstrations first, never the query.

    selector = DemoSelector(pool, method="knn", k=8, embedder=load_embedder(), text=lambda ex: ex["question"])
    prompt, demos = build_prompt(template, query, selector, count_tokens=tok_len, budget=1024)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from llmkit.prompting.templates import PromptError, PromptTemplate, fit_demonstrations

METHODS = ("random", "knn", "mmr")
ORDERS = ("similar_last", "similar_first", "random", "selected")


def _default_text(example: dict) -> str:
    for key in ("input", "question", "text", "query", "prompt"):
        if isinstance(example.get(key), str):
            return example[key]
    raise PromptError(f"cannot tell which field of a demonstration to embed (keys {sorted(example)}); pass text=")


class DemoSelector:
    """Chooses demonstrations from `pool` for each query; the pool is embedded once."""

    def __init__(self, pool: Sequence[dict], method: str = "random", k: int = 4, *, embedder=None,
                 text: Callable[[dict], str] = _default_text, seed: int = 0, mmr_lambda: float = 0.5,
                 order: str = "similar_last"):
        if method not in METHODS:
            raise PromptError(f"demonstration selection must be one of {METHODS}, got {method!r}")
        if order not in ORDERS:
            raise PromptError(f"demonstration order must be one of {ORDERS}, got {order!r}")
        if method != "random" and embedder is None:
            raise PromptError(f"{method} selection needs an embedder (llmkit.rag.embed.load_embedder())")
        if k < 0:
            raise PromptError(f"k must be >= 0, got {k}")
        self.pool, self.method, self.k, self.embedder, self.text = list(pool), method, k, embedder, text
        self.mmr_lambda, self.order = mmr_lambda, order
        self.rng = random.Random(seed)
        needs_vectors = method != "random" or order in ("similar_last", "similar_first")
        self.vectors = embedder.embed([text(x) for x in self.pool]) if needs_vectors and embedder else None

    def similarities(self, query: dict) -> np.ndarray | None:
        """Cosine similarity of the query to every pool example (None without an embedder)."""
        if self.vectors is None:
            return None
        return self.vectors @ self.embedder.embed([self.text(query)])[0]

    def select(self, query: dict) -> list[int]:
        """Pool indices, most important first (the budget drops from the end). The query itself, when it is in
        the pool, is never its own demonstration."""
        candidates = [i for i, x in enumerate(self.pool) if x != query]
        k = min(self.k, len(candidates))
        if self.method == "random":
            return self.rng.sample(candidates, k)
        sims = self.similarities(query)
        if self.method == "knn":
            return sorted(candidates, key=lambda i: -sims[i])[:k]
        from llmkit.rag.retrieve import mmr

        picked = mmr(sims[candidates], self.vectors[candidates], k, self.mmr_lambda)
        return [candidates[j] for j in picked]

    def arrange(self, query: dict, chosen: list[int]) -> list[int]:
        """`chosen` in the configured order."""
        if self.order == "selected":
            return list(chosen)
        if self.order == "random":
            return self.rng.sample(chosen, len(chosen))
        sims = self.similarities(query)
        if sims is None:  # random selection without an embedder: nothing to order by
            return list(chosen)
        ranked = sorted(chosen, key=lambda i: -sims[i])
        return ranked[::-1] if self.order == "similar_last" else ranked


def build_prompt(template: PromptTemplate, query: dict, selector: DemoSelector | None = None, *,
                 count_tokens: Callable[[str], int] | None = None, budget: int | None = None,
                 context: str | None = None, chat: bool = False, render_messages: Callable | None = None
                 ) -> tuple[str | list[dict], list[dict]]:
    """(prompt, demonstrations used): select, fit the budget (dropping the least important), order, render.

    With `chat`, the prompt is a message list; `render_messages` (e.g. a tokenizer's apply_chat_template with
    add_generation_prompt) turns it into the text whose tokens the budget counts.
    """
    chosen = selector.select(query) if selector else []
    if budget is not None:
        if count_tokens is None:
            raise PromptError("a token budget needs count_tokens")
        def as_text(q, demos, ctx):
            if not chat:
                return template.render(q, demos, ctx)
            messages = template.messages(q, demos, ctx)
            return render_messages(messages) if render_messages else "\n".join(m["content"] for m in messages)

        candidates = [selector.pool[i] for i in chosen] if selector else []
        kept = fit_demonstrations(template, query, candidates, count_tokens, budget, context, as_text)
        chosen = chosen[:len(kept)]
    ordered = selector.arrange(query, chosen) if selector else []
    demos = [selector.pool[i] for i in ordered] if selector else []
    prompt = template.messages(query, demos, context) if chat else template.render(query, demos, context)
    return prompt, demos
