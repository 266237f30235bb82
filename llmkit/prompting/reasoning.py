"""Reasoning strategies over any `LLM` (llmkit.prompting.llm): direct answers, zero-shot chain-of-thought (two
stages: reason, then extract), plan-and-solve, least-to-most (sub-questions solved in order, each answer fed
into the next), self-consistency (N samples, majority vote, the vote distribution kept) and Auto-CoT
demonstrations (cluster the questions, take a representative of each, let zero-shot CoT write its rationale).

Every strategy maps problems (prompt texts) to `Outcome`s: the extracted answer, the final text, and every
model call made, in order:

    sc = SelfConsistency(ZeroShotCoT(extract="number"), n=16, temperature=0.7)
    [[outcome]] = sc.run(llm, ["Q: A farmer has 3 pens of 4 sheep. How many sheep?\\nA:"])
    outcome.answer, outcome.votes           # '12', {'12': 13, '7': 3}
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmkit.prompting.answers import Extractor, extractor
from llmkit.prompting.templates import PromptTemplate

COT_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer is"
# Wang et al. 2023 (PS+): plan first, then carry the plan out
PLAN_TRIGGER = ("Let's first understand the problem, extract relevant variables and their corresponding numerals, "
                "and devise a plan. Then, let's carry out the plan, calculate intermediate variables (pay attention "
                "to correct numerical calculation and commonsense), solve the problem step by step, and show the "
                "answer.")
DECOMPOSE = ("To solve the problem above, which simpler sub-questions must be answered first, in order? "
             "Write one sub-question per line.")
FINAL_QUESTION = "Using the answers above, what is the answer to the original problem?"
# few-shot chain-of-thought: demonstrations {"question", "rationale", "answer"} (Auto-CoT writes these)
COT_TEMPLATE = PromptTemplate(input="Q: {{ question }}", answer_prefix="A:",
                              output="{{ rationale }} The answer is {{ answer }}.")
STRATEGIES = ("direct", "cot", "zero-shot-cot", "plan-and-solve", "least-to-most")


@dataclass
class Outcome:
    answer: str | None  # the extracted answer (None when nothing could be extracted)
    text: str  # the model's final text for this problem (reasoning included)
    calls: list[dict] = field(default_factory=list)  # {"prompt", "output"} for every model call, in order
    votes: dict[str, int] | None = None  # self-consistency: answer -> number of samples that gave it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Strategy:
    """Base: `run(llm, problems, n=, temperature=, seed=) -> n Outcomes per problem`."""

    name = "direct"

    def __init__(self, extract: str | Extractor = "text", max_tokens: int = 256, stop: Sequence[str] = ()):
        self.extract = extractor(extract)
        self.max_tokens, self.stop = max_tokens, tuple(stop)

    def run(self, llm, problems: Sequence[str], *, n: int = 1, temperature: float = 0.0,
            seed: int | None = None) -> list[list[Outcome]]:
        outputs = llm.generate(list(problems), n=n, temperature=temperature, max_tokens=self.max_tokens,
                               stop=self.stop, seed=seed)
        return [[Outcome(self.extract(text), text, [{"prompt": p, "output": text}]) for text in samples]
                for p, samples in zip(problems, outputs)]


class Direct(Strategy):
    """Answer in one call; with few-shot demonstrations that carry rationales this is few-shot CoT."""


class FewShotCoT(Strategy):
    """One call whose prompt holds demonstrations with rationales (COT_TEMPLATE); the answer is extracted."""

    name = "cot"

    def __init__(self, extract: str | Extractor = "number", max_tokens: int = 256, stop: Sequence[str] = ()):
        super().__init__(extract, max_tokens, stop)


class ZeroShotCoT(Strategy):
    """Kojima et al. 2022: "Let's think step by step." to reason, then "Therefore, the answer is" to answer."""

    name = "zero-shot-cot"
    trigger = COT_TRIGGER

    def __init__(self, extract: str | Extractor = "number", max_tokens: int = 256, stop: Sequence[str] = (),
                 answer_trigger: str = ANSWER_TRIGGER, answer_tokens: int = 32):
        super().__init__(extract, max_tokens, stop)
        self.answer_trigger, self.answer_tokens = answer_trigger, answer_tokens

    def run(self, llm, problems, *, n=1, temperature=0.0, seed=None):
        reason_prompts = [f"{p.rstrip()} {self.trigger}" for p in problems]
        rationales = llm.generate(reason_prompts, n=n, temperature=temperature, max_tokens=self.max_tokens,
                                  stop=self.stop, seed=seed)
        answer_prompts = [f"{rp} {r.strip()}\n{self.answer_trigger}" for rp, rs in zip(reason_prompts, rationales)
                          for r in rs]
        answers = [a[0] for a in llm.generate(answer_prompts, n=1, temperature=0.0, max_tokens=self.answer_tokens,
                                              stop=("\n\n",))]
        out, flat = [], iter(zip(answer_prompts, answers))
        for rp, rs in zip(reason_prompts, rationales):
            samples = []
            for r in rs:
                ap, a = next(flat)
                answer = self.extract(a) or self.extract(r)  # the second stage may ramble; the rationale may not
                samples.append(Outcome(answer, f"{r.strip()}\n{self.answer_trigger}{a}",
                                       [{"prompt": rp, "output": r}, {"prompt": ap, "output": a}]))
            out.append(samples)
        return out


class PlanAndSolve(ZeroShotCoT):
    """Wang et al. 2023 (PS+): devise a plan, carry it out step by step, then extract the answer."""

    name = "plan-and-solve"
    trigger = PLAN_TRIGGER


def parse_subquestions(text: str, limit: int = 8) -> list[str]:
    """Sub-questions from a decomposition: one per line, numbering and bullets removed."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:(?:sub-?question\s*)?\d+[.):]|[-*•]|q\d*[.:])\s*", "", line, flags=re.I).strip()
        if line and not line.lower().startswith(("sub-questions", "here are")):
            out.append(line)
    return out[:limit]


class LeastToMost(Strategy):
    """Zhou et al. 2023: decompose the problem into sub-questions, answer them in order with every earlier
    answer in the prompt, then answer the original problem from them."""

    name = "least-to-most"

    def __init__(self, extract: str | Extractor = "number", max_tokens: int = 256, stop: Sequence[str] = (),
                 max_subquestions: int = 6):
        super().__init__(extract, max_tokens, stop)
        self.max_subquestions = max_subquestions

    def run(self, llm, problems, *, n=1, temperature=0.0, seed=None):
        plans = llm.generate([f"{p.rstrip()}\n\n{DECOMPOSE}" for p in problems], n=n, temperature=temperature,
                             max_tokens=self.max_tokens, seed=seed)
        # one chain per (problem, sample), all advanced one sub-question at a time, batched
        chains = [{"problem": p.rstrip(), "questions": parse_subquestions(plan, self.max_subquestions),
                   "answers": [], "calls": [{"prompt": f"{p.rstrip()}\n\n{DECOMPOSE}", "output": plan}]}
                  for p, samples in zip(problems, plans) for plan in samples]
        qa_stop = (*self.stop, "\nQ:")
        step = 0
        while True:
            active = [c for c in chains if step < len(c["questions"])]
            if not active:
                break
            prompts = [self._prompt(c, c["questions"][step]) for c in active]
            outs = llm.generate(prompts, n=1, temperature=temperature, max_tokens=self.max_tokens, stop=qa_stop,
                                seed=None if seed is None else seed + step + 1)
            for c, prompt, [out] in zip(active, prompts, outs):
                c["answers"].append(out.strip())
                c["calls"].append({"prompt": prompt, "output": out})
            step += 1
        prompts = [self._prompt(c, FINAL_QUESTION) for c in chains]
        finals = llm.generate(prompts, n=1, temperature=0.0, max_tokens=self.max_tokens, stop=qa_stop)
        flat = [Outcome(self.extract(f) or self.extract(c["answers"][-1] if c["answers"] else ""), f.strip(),
                        c["calls"] + [{"prompt": p, "output": f}])
                for c, p, [f] in zip(chains, prompts, finals)]
        return [flat[i * n:(i + 1) * n] for i in range(len(problems))]

    @staticmethod
    def _prompt(chain: dict, question: str) -> str:
        solved = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(chain["questions"], chain["answers"]))
        return f"{chain['problem']}\n\n{solved}Q: {question}\nA:"


def vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """(majority answer, answer -> count); None answers do not vote; a tie goes to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    return (counts.most_common(1)[0][0] if counts else None), dict(counts)


class SelfConsistency(Strategy):
    """Wang et al. 2023: sample `n` reasoning paths of `inner` at `temperature`, return the majority answer
    with the vote distribution; the outcome's text is the first sample that gave the winning answer."""

    def __init__(self, inner: Strategy, n: int = 8, temperature: float = 0.7):
        if n < 1:
            raise ValueError(f"self-consistency needs n >= 1 samples, got {n}")
        self.inner, self.n, self.temperature = inner, n, temperature
        self.name = f"self-consistency({inner.name})"
        self.extract = inner.extract

    def run(self, llm, problems, *, n=1, temperature=0.0, seed=None):
        samples = self.inner.run(llm, problems, n=self.n, temperature=self.temperature, seed=seed)
        out = []
        for outcomes in samples:
            winner, votes = vote([o.answer for o in outcomes])
            best = next((o for o in outcomes if o.answer == winner), outcomes[0])
            calls = [c for o in outcomes for c in o.calls]
            out.append([Outcome(winner, best.text, calls, votes)])
        return out


def make_strategy(name: str, *, extract: str | Extractor = "number", samples: int = 1, temperature: float = 0.7,
                  max_tokens: int = 256, stop: Sequence[str] = ()) -> Strategy:
    """A strategy by name (STRATEGIES), wrapped in self-consistency when `samples` > 1."""
    kinds = {"direct": Direct, "cot": FewShotCoT, "zero-shot-cot": ZeroShotCoT, "plan-and-solve": PlanAndSolve,
             "least-to-most": LeastToMost}
    if name not in kinds:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    inner = kinds[name](extract=extract, max_tokens=max_tokens, stop=stop)
    return SelfConsistency(inner, samples, temperature) if samples > 1 else inner


# ----------------------------------------------------------------------------- Auto-CoT


def kmeans(vectors: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], centres [k, dim]): Lloyd's algorithm from a k-means++ start, seeded."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    k = min(k, n)
    centres = [vectors[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((vectors[:, None] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(vectors[rng.choice(n, p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(n)])
    centres = np.array(centres)
    labels = np.zeros(n, dtype=int)
    for it in range(iters):
        new = ((vectors[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        if it and (new == labels).all():
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centres[j] = vectors[labels == j].mean(0)
    return labels, centres


def auto_cot_demos(llm, questions: Sequence[str], embedder, k: int = 8, *, seed: int = 0,
                   extract: str | Extractor = "number", max_question_words: int = 60, max_steps: int = 5,
                   tries: int = 3, prompt: str = "Q: {question}\nA:") -> list[dict]:
    """Zhang et al. 2023: k demonstrations {"question", "rationale", "answer"} for COT_TEMPLATE.

    The questions are clustered by embedding (k-means); each cluster offers its questions nearest the centre
    first, and the first whose question has at most `max_question_words` words and whose zero-shot-CoT
    rationale has at most `max_steps` lines is taken (else the nearest one with an answer); a cluster whose
    candidates give no extractable answer offers no demonstration.
    """
    vectors = embedder.embed(list(questions))
    labels, centres = kmeans(vectors, k, seed)
    queues = []
    for j in range(len(centres)):
        members = np.flatnonzero(labels == j)
        if len(members):
            members = members[np.argsort(((vectors[members] - centres[j]) ** 2).sum(-1))]
            queues.append([int(i) for i in members[:tries]])
    cot = ZeroShotCoT(extract=extract)
    chosen: dict[int, dict] = {}
    fallback: dict[int, dict] = {}
    for attempt in range(tries):
        pending = [(j, q[attempt]) for j, q in enumerate(queues) if j not in chosen and attempt < len(q)]
        if not pending:
            break
        outcomes = cot.run(llm, [prompt.format(question=questions[i]) for _, i in pending])
        for (j, i), [o] in zip(pending, outcomes):
            rationale = o.calls[0]["output"].strip()
            demo = {"question": questions[i], "rationale": f"{COT_TRIGGER} {rationale}", "answer": o.answer}
            if o.answer is None:
                continue  # a demonstration must show an answer
            fallback.setdefault(j, demo)
            steps = len([line for line in rationale.splitlines() if line.strip()])
            if len(questions[i].split()) <= max_question_words and steps <= max_steps:
                chosen[j] = demo
    return [chosen.get(j, fallback.get(j)) for j in range(len(queues)) if j in chosen or j in fallback]
