"""Prompting strategies inside the task harness (`llmkit eval tasks --strategy ...`).

`StrategyLM` answers the harness's generate_until requests through a reasoning strategy (llmkit.prompting.
reasoning) on any `LLM`: the context the task builds (few-shot demonstrations included) is the problem, the
task's `until` strings stop each call, and the extracted answer, formatted by `answer_format`, is what the
task's filters and metrics see. Log-likelihood requests (multiple-choice tasks) go to `base`, a local EvalLM.
`use_demo_selection` makes a task draw its few-shot examples by kNN or MMR instead of lm-eval's random sampler.

    lm = StrategyLM(OpenAILLM(url, concurrency=16), "cot", samples=16, temperature=0.7, extract="number")
    evaluate(lm, ["gsm8k"], num_fewshot=8)
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import mean
from typing import Any

from llmkit.prompting.reasoning import make_strategy

DEFAULT_MAX_GEN_TOKS = 256


class StrategyLM:
    """The harness's LM interface (generate_until; log-likelihoods through `base`) over a strategy."""

    def __init__(self, llm, strategy: str = "direct", *, samples: int = 1, temperature: float = 0.7,
                 extract: str = "number", answer_format: str = "{answer}", base=None, seed: int = 1234):
        make_strategy(strategy, extract=extract, samples=samples)  # fail now on a bad name or extractor
        if "{answer}" not in answer_format:
            raise ValueError(f"answer_format must contain {{answer}}, got {answer_format!r}")
        self.llm, self.strategy, self.samples, self.temperature = llm, strategy, samples, temperature
        self.extract, self.answer_format, self.base, self.seed = extract, answer_format, base, seed
        self.records: list[dict[str, Any]] = []

    @property
    def raw(self) -> bool:
        """Direct single answers go to the task untouched, exactly as a plain run would give them."""
        return self.strategy == "direct" and self.samples == 1

    def _need_base(self, what: str):
        if self.base is None:
            raise ValueError(f"{what} requests (multiple-choice and perplexity tasks) need token log-probabilities: "
                             "run them with --model, not --base-url")
        return self.base

    def loglikelihood(self, requests, **kwargs):
        return self._need_base("loglikelihood").loglikelihood(requests, **kwargs)

    def loglikelihood_rolling(self, texts, **kwargs):
        return self._need_base("loglikelihood_rolling").loglikelihood_rolling(texts, **kwargs)

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], **_) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(requests):
            groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
        for indices in groups.values():
            kwargs = requests[indices[0]][1]
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = next((int(kwargs[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                               if kwargs.get(k) is not None), DEFAULT_MAX_GEN_TOKS)
            strategy = make_strategy(self.strategy, extract=self.extract, samples=self.samples,
                                     temperature=self.temperature, max_tokens=max_tokens, stop=until)
            contexts = [requests[i][0] for i in indices]
            for i, ctx, [outcome] in zip(indices, contexts, strategy.run(self.llm, contexts, seed=self.seed)):
                if self.raw or outcome.answer is None:
                    results[i] = outcome.text
                else:
                    results[i] = self.answer_format.format(answer=outcome.answer)
                self.records.append({"context": ctx, "answer": outcome.answer, "returned": results[i],
                                     "votes": outcome.votes, "calls": outcome.calls})
        return results  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        """The strategy's settings and, with several samples, how strongly the votes agreed on average."""
        out: dict[str, Any] = {"strategy": self.strategy, "samples": self.samples, "extract": self.extract,
                               "temperature": self.temperature if self.samples > 1 else 0.0,
                               "answer_format": self.answer_format, "model": getattr(self.llm, "name", ""),
                               "requests": len(self.records),
                               "no_answer": sum(r["answer"] is None for r in self.records)}
        voted = [r["votes"] for r in self.records if r["votes"]]
        if voted:
            out["mean_vote_share"] = round(mean(max(v.values()) / sum(v.values()) for v in voted), 4)
        return out


def use_demo_selection(task, method: str, embedder=None, order: str = "similar_last", seed: int = 1234,
                       mmr_lambda: float = 0.5) -> None:
    """Make `task` draw its few-shot documents with `method` (random, knn, mmr) and `order`, the document text
    (doc_to_text) embedded by `embedder`."""
    from llmkit.prompting.icl import DemoSelector

    state: dict[str, DemoSelector] = {}

    def select(n: int, doc: dict) -> list[dict]:
        if "selector" not in state:  # the pool is embedded on first use: a zero-shot run embeds nothing
            state["selector"] = DemoSelector(task.fewshot_pool, method, n, embedder=embedder, seed=seed, order=order,
                                             text=lambda d: str(task.doc_to_text(d)), mmr_lambda=mmr_lambda)
        selector = state["selector"]
        selector.k = n
        return [selector.pool[i] for i in selector.arrange(doc, selector.select(doc))]  # never `doc` itself

    task.fewshot_selector = select
