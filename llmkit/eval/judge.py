"""LLM-as-judge against any OpenAI-compatible endpoint: single-answer grading and pairwise comparison.

Prompts follow MT-Bench's judges (Zheng et al. 2023). Pairwise judgements are asked twice with the answers in
both orders: a verdict that survives the swap stands, one that flips (position bias) becomes a tie, as in
FastChat. Verdicts are parsed robustly (`[[A]]`, `[[B]]`, `[[C]]`/`[[tie]]`, and free-text fallbacks; the last
verdict in the reply wins; ratings from `[[7]]`, `Rating: 7`, `7/10`). Pairwise results come out as battles
(model_a, model_b, winner) that `llmkit.eval.arena` turns into ratings.

Answers file (JSONL): `{"question_id": ..., "question": ..., "model": ..., "answer": ...}` per answer, or
`{"question_id": ..., "question": ..., "answers": {"model": "answer", ...}}` per question.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from llmkit.data.io import iter_jsonl

SINGLE_SYSTEM = "You are a helpful assistant."
SINGLE_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
PAIR_PROMPT = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)


class JudgeError(ValueError):
    """Judge input or endpoint trouble; the message names the file, line or URL."""


# ----------------------------------------------------------------------------- client


class OpenAIClient:
    """Minimal blocking client for `POST {base_url}/chat/completions` (OpenAI, vLLM, llmkit serve, ...)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 1024, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def __call__(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read())
                return data["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
                if e.code in (400, 401, 403, 404):  # will not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            except (KeyError, IndexError, json.JSONDecodeError) as e:
                last = f"unexpected response ({e})"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise JudgeError(f"{self.url}: {last}")


# ----------------------------------------------------------------------------- parsing

_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_VERDICT_FALLBACKS = [
    (re.compile(r"(?:final\s+verdict|verdict|winner)\s*(?:is)?\s*[:=]?\s*\**\s*\[?\s*(A|B|C|tie)\b", re.I), None),
    (re.compile(r"\bassistant\s+(A|B)\s+(?:is|was|provides?|gives?)\s+(?:the\s+)?better", re.I), None),
    (re.compile(r"\b(?:it'?s|it\s+is|this\s+is)\s+a\s+(tie)\b", re.I), None),
]
_RATING = [re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"), re.compile(r"rating\s*[:=]?\s*\[?\s*(\d+(?:\.\d+)?)", re.I),
           re.compile(r"(\d+(?:\.\d+)?)\s*/\s*10\b"), re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)", re.I),
           re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")]


def parse_verdict(text: str) -> str | None:
    """The verdict of a judge's reply, "A", "B" or "tie" (the last one given); None when there is none."""
    found = _VERDICT.findall(text or "")
    if not found:
        for pattern, _ in _VERDICT_FALLBACKS:
            found = pattern.findall(text or "")
            if found:
                break
    if not found:
        return None
    last = found[-1].upper()
    return "tie" if last in ("C", "TIE") else last


def parse_rating(text: str, low: float = 1.0, high: float = 10.0) -> float | None:
    """A rating in [low, high] from a judge's reply (the last one in the first format that matches)."""
    for pattern in _RATING:
        values = [float(v) for v in pattern.findall(text or "")]
        values = [v for v in values if low <= v <= high]
        if values:
            return values[-1]
    return None


# ----------------------------------------------------------------------------- answers


def read_answers(path: str | Path) -> dict[str, dict[str, Any]]:
    """question_id -> {"question": str, "answers": {model: answer}} from either JSONL layout."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"{path}: no such answers file")
    questions: dict[str, dict[str, Any]] = {}
    for where, obj in iter_jsonl(path.read_text(encoding="utf-8").splitlines(), str(path), JudgeError):
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str):
            raise JudgeError(f"{where}: expected an object with a 'question' string")
        qid = str(obj.get("question_id", obj["question"]))
        entry = questions.setdefault(qid, {"question": obj["question"], "answers": {}})
        if "answers" in obj:
            if not isinstance(obj["answers"], dict) or not all(isinstance(v, str) for v in obj["answers"].values()):
                raise JudgeError(f"{where}: field 'answers' must map model names to answer strings")
            entry["answers"].update(obj["answers"])
        elif isinstance(obj.get("model"), str) and isinstance(obj.get("answer"), str):
            entry["answers"][obj["model"]] = obj["answer"]
        else:
            raise JudgeError(f"{where}: needs 'model' and 'answer' strings (or an 'answers' object)")
    if not questions:
        raise JudgeError(f"{path}: no answers")
    return questions


# ----------------------------------------------------------------------------- judging


def judge_single(client: Callable[[list[dict]], str], questions: dict[str, dict[str, Any]], workers: int = 4
                 ) -> dict[str, Any]:
    """Rate every answer 1-10; mean rating per model."""
    jobs = [(qid, model, q["question"], answer)
            for qid, q in questions.items() for model, answer in q["answers"].items()]

    def run(job):
        qid, model, question, answer = job
        reply = client([{"role": "system", "content": SINGLE_SYSTEM},
                        {"role": "user", "content": SINGLE_PROMPT.format(question=question, answer=answer)}])
        return {"question_id": qid, "model": model, "rating": parse_rating(reply), "judgment": reply}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        records = list(pool.map(run, jobs))
    scores: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["rating"] is not None:
            scores[r["model"]].append(r["rating"])
    return {"mode": "single", "judgments": records, "unparsed": sum(r["rating"] is None for r in records),
            "scores": {m: sum(v) / len(v) for m, v in sorted(scores.items())},
            "counts": {m: len(v) for m, v in sorted(scores.items())}}


def combine_swapped(first: str | None, second_swapped: str | None) -> tuple[str | None, bool]:
    """Winner ("model_a", "model_b", "tie" or None) from the verdicts in both orders; and whether they agree.

    `second_swapped` is the verdict when the answers were shown the other way round, already mapped back
    (its "A" means model_a). A flip between the two orders is position bias: a tie.
    """
    if first is None or second_swapped is None:
        return None, False
    names = {"A": "model_a", "B": "model_b", "tie": "tie"}
    if first == second_swapped:
        return names[first], True
    return "tie", False


def judge_pairwise(client: Callable[[list[dict]], str], questions: dict[str, dict[str, Any]],
                   baseline: str | None = None, swap: bool = True, workers: int = 4) -> dict[str, Any]:
    """Compare every pair of answers to each question (or each against `baseline`), both orders; battles out."""
    pairs = []
    for qid, q in questions.items():
        models = sorted(q["answers"])
        if baseline is not None:
            if baseline not in q["answers"]:
                raise JudgeError(f"question {qid!r} has no answer from the baseline {baseline!r}")
            combos = [(baseline, m) for m in models if m != baseline]
        else:
            combos = list(itertools.combinations(models, 2))
        pairs += [(qid, a, b) for a, b in combos]

    def ask(question: str, answer_a: str, answer_b: str) -> tuple[str | None, str]:
        reply = client([{"role": "system", "content": PAIR_SYSTEM},
                        {"role": "user", "content": PAIR_PROMPT.format(question=question, answer_a=answer_a,
                                                                       answer_b=answer_b)}])
        return parse_verdict(reply), reply

    def run(pair):
        qid, a, b = pair
        q = questions[qid]
        v1, r1 = ask(q["question"], q["answers"][a], q["answers"][b])
        record = {"question_id": qid, "model_a": a, "model_b": b, "verdict": v1, "judgment": r1}
        if swap:
            v2, r2 = ask(q["question"], q["answers"][b], q["answers"][a])
            back = {"A": "B", "B": "A", "tie": "tie", None: None}[v2]
            winner, consistent = combine_swapped(v1, back)
            record.update(verdict_swapped=back, judgment_swapped=r2, consistent=consistent, winner=winner)
        else:
            record["winner"] = {"A": "model_a", "B": "model_b", "tie": "tie", None: None}[v1]
        return record

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        records = list(pool.map(run, pairs))
    battles = [{"model_a": r["model_a"], "model_b": r["model_b"], "winner": r["winner"],
                "question_id": r["question_id"]} for r in records if r["winner"] is not None]
    out = {"mode": "pairwise", "judgments": records, "battles": battles,
           "unparsed": sum(r["winner"] is None for r in records)}
    if swap:
        out["position_consistency"] = (sum(r["consistent"] for r in records if r["winner"] is not None)
                                       / max(1, len(battles)))
    return out


def write_battles(battles: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(b) + "\n" for b in battles))
    tmp.replace(path)
    return path
