"""Prompt templates, demonstration selection and budgets, answer extraction, chain-of-thought stages, plan
sequencing, self-consistency votes (against the binomial formula) and Auto-CoT, on scripted models."""

import math
import random
import re
import zlib

import numpy as np
import pytest

from llmkit.prompting.answers import extract_choice, extract_number, extract_regex, extract_text, extractor
from llmkit.prompting.icl import DemoSelector, build_prompt
from llmkit.prompting.reasoning import (ANSWER_TRIGGER, COT_TEMPLATE, COT_TRIGGER, DECOMPOSE, FINAL_QUESTION,
                                       PLAN_TRIGGER, Direct, LeastToMost, PlanAndSolve, SelfConsistency, ZeroShotCoT,
                                       auto_cot_demos, kmeans, make_strategy, parse_subquestions, vote)
from llmkit.prompting.templates import PromptError, PromptTemplate, fit_demonstrations
from llmkit.rag.embed import Embedder


class Scripted:
    """A model with fixed replies: reply(prompt, sample index, temperature) -> text; every call is recorded."""

    name = "scripted"

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def generate(self, prompts, *, n=1, temperature=0.0, max_tokens=256, stop=(), seed=None):
        self.calls.append({"prompts": list(prompts), "n": n, "temperature": temperature, "stop": tuple(stop)})
        return [[self.reply(p, i, temperature) for i in range(n)] for p in prompts]

    @staticmethod
    def count_tokens(text):
        return len(text.split())


class WordHashEmbedder(Embedder):
    kind, name, spec, dim = "test", "test:words", "test:words", 256

    def _embed_batch(self, texts):
        out = np.full((len(texts), self.dim), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out


POOL = [
    {"question": "How many legs do two cats have?", "answer": "8"},
    {"question": "How many legs do three dogs have?", "answer": "12"},
    {"question": "What colour is the sky on a clear day?", "answer": "blue"},
    {"question": "What colour is fresh grass?", "answer": "green"},
    {"question": "How many wheels do two bikes have?", "answer": "4"},
    {"question": "Which planet is closest to the sun?", "answer": "Mercury"},
]
TEMPLATE = PromptTemplate(instruction="Answer the question.", input="Question: {{ question }}",
                          output="{{ answer }}", answer_prefix="Answer:")


# ----------------------------------------------------------------------------- templates and demonstrations


def test_template_parts_render_as_text_and_as_chat_messages():
    query = {"question": "How many legs do four cats have?"}
    text = TEMPLATE.render(query, POOL[:2], context="Cats have four legs.")
    assert text == ("Answer the question.\n\nCats have four legs.\n\n"
                    "Question: How many legs do two cats have?\nAnswer: 8\n\n"
                    "Question: How many legs do three dogs have?\nAnswer: 12\n\n"
                    "Question: How many legs do four cats have?\nAnswer:")
    assert TEMPLATE.messages(query, POOL[:1], context="ctx") == [
        {"role": "system", "content": "Answer the question.\n\nctx"},
        {"role": "user", "content": "Question: How many legs do two cats have?"},
        {"role": "assistant", "content": "8"},
        {"role": "user", "content": "Question: How many legs do four cats have?"},
    ]
    with pytest.raises(PromptError, match="'input'.*question"):
        TEMPLATE.render({"q": "misspelt field"})


def test_random_selection_is_seeded_and_never_picks_the_query():
    pick = [DemoSelector(POOL, "random", k=3, seed=7, order="selected").select(POOL[0]) for _ in range(2)]
    assert pick[0] == pick[1] and 0 not in pick[0] and len(set(pick[0])) == 3
    assert DemoSelector(POOL, "random", k=3, seed=8).select(POOL[0]) != pick[0]


def test_knn_picks_the_most_similar_and_mmr_trades_similarity_for_diversity():
    emb = WordHashEmbedder()
    query = {"question": "How many legs do four cats have?"}
    knn = DemoSelector(POOL, "knn", k=2, embedder=emb, text=lambda x: x["question"])
    assert knn.select(query) == [0, 1]  # the two "legs" questions, most similar first
    sims = knn.similarities(query)
    assert sims[0] > sims[1] > max(sims[2:])
    mmr = DemoSelector(POOL, "mmr", k=2, embedder=emb, text=lambda x: x["question"], mmr_lambda=0.3)
    chosen = mmr.select(query)
    assert chosen[0] == 0 and chosen[1] not in (1,)  # the near-duplicate of the first pick is passed over
    with pytest.raises(PromptError, match="embedder"):
        DemoSelector(POOL, "knn")


def test_ordering_puts_the_most_similar_demonstration_next_to_the_query():
    emb = WordHashEmbedder()
    query = {"question": "How many legs do four cats have?"}
    last = DemoSelector(POOL, "knn", k=3, embedder=emb, text=lambda x: x["question"], order="similar_last")
    prompt, demos = build_prompt(TEMPLATE, query, last)
    assert demos[-1] is POOL[0] and demos[-2] is POOL[1]
    assert prompt.index("two cats") > prompt.index("three dogs")
    first = DemoSelector(POOL, "knn", k=3, embedder=emb, text=lambda x: x["question"], order="similar_first")
    assert build_prompt(TEMPLATE, query, first)[1][0] is POOL[0]


def test_the_budget_drops_the_least_relevant_demonstrations_never_the_query():
    emb = WordHashEmbedder()
    query = {"question": "How many legs do four cats have?"}
    sel = DemoSelector(POOL, "knn", k=5, embedder=emb, text=lambda x: x["question"])
    count = Scripted.count_tokens
    full, all5 = build_prompt(TEMPLATE, query, sel)
    budget = count(full) - 3  # one demonstration too many
    prompt, kept = build_prompt(TEMPLATE, query, sel, count_tokens=count, budget=budget)
    assert len(kept) == 4 and count(prompt) <= budget
    dropped = [d for d in all5 if d not in kept]
    sims = sel.similarities(query)
    assert sims[POOL.index(dropped[0])] == min(sims[POOL.index(d)] for d in all5)  # the least similar went
    assert prompt.endswith("Question: How many legs do four cats have?\nAnswer:")
    assert fit_demonstrations(TEMPLATE, query, all5, count, count(TEMPLATE.render(query))) == []
    with pytest.raises(PromptError, match="over the budget"):
        build_prompt(TEMPLATE, query, sel, count_tokens=count, budget=5)


# ----------------------------------------------------------------------------- answer extraction


@pytest.mark.parametrize("text, expected", [
    ("She has 3 apples and buys 4 more, so 7 apples. The answer is 7.", "7"),
    ("Total: $1,250.00 dollars", "1250"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("The answer is -3.50 and then 9 more words 10", "-3.5"),
    ("answer: 0.25", "0.25"),
    ("no digits at all", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is (B).", "B"),
    ("I think (A) is tempting but (C) is right", "C"),
    ("D. Because the others are wrong", "D"),
    ("A man walks in. answer: e", "E"),
    ("none of these", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_regex_text_and_specs():
    assert extract_regex("Final: no ... Final: yes", r"Final: (\w+)") == "yes"
    assert extract_regex("nothing", r"Final: (\w+)") is None
    assert extract_text("\n  The answer is: Paris.\nmore") == "Paris"
    assert extractor("regex:Final: (\\w+)")("Final: maybe") == "maybe"
    assert extractor("choice:AB")("(C) or (B)") == "B"
    with pytest.raises(ValueError, match="extractor"):
        extractor("roman")


# ----------------------------------------------------------------------------- strategies


def test_zero_shot_cot_reasons_then_extracts_in_a_second_stage():
    def reply(prompt, i, t):
        if prompt.endswith(ANSWER_TRIGGER):
            return " 12 sheep."
        return "3 pens with 4 sheep each is 3 * 4 = 12, minus none."

    llm = Scripted(reply)
    [[o]] = ZeroShotCoT().run(llm, ["Q: 3 pens of 4 sheep. How many sheep?\nA:"])
    assert o.answer == "12" and len(llm.calls) == 2
    assert llm.calls[0]["prompts"] == [f"Q: 3 pens of 4 sheep. How many sheep?\nA: {COT_TRIGGER}"]
    stage2 = llm.calls[1]["prompts"][0]
    assert stage2.startswith(llm.calls[0]["prompts"][0]) and "3 * 4 = 12" in stage2
    assert stage2.endswith(ANSWER_TRIGGER) and llm.calls[1]["temperature"] == 0.0
    [[ps]] = PlanAndSolve().run(Scripted(reply), ["Q: x\nA:"])
    assert ps.calls[0]["prompt"].endswith(PLAN_TRIGGER)


def test_least_to_most_solves_sub_questions_in_order_feeding_each_answer_forward():
    answers = {"How many apples does Ann have?": "5", "How many does Bob have?": "twice Ann's 5, so 10",
               FINAL_QUESTION: "5 + 10 = 15. The answer is 15."}

    def reply(prompt, i, t):
        if prompt.endswith(DECOMPOSE):
            return "1. How many apples does Ann have?\n2. How many does Bob have?"
        question = prompt.rsplit("Q: ", 1)[1].removesuffix("\nA:")
        return " " + answers[question]

    llm = Scripted(reply)
    [[o]] = LeastToMost().run(llm, ["Ann has 5 apples; Bob has twice as many. How many together?"])
    assert o.answer == "15"
    prompts = [c["prompt"] for c in o.calls]
    assert len(prompts) == 4 and prompts[0].endswith(DECOMPOSE)
    assert prompts[1].endswith("Q: How many apples does Ann have?\nA:")
    assert "Q: How many apples does Ann have?\nA: 5\n\nQ: How many does Bob have?\nA:" in prompts[2]
    assert "A: twice Ann's 5, so 10\n\nQ: " + FINAL_QUESTION in prompts[3]
    assert parse_subquestions("Sub-questions:\n1) a?\n- b?\n  Q2: c?\n\n") == ["a?", "b?", "c?"]


def test_vote_counts_and_breaks_ties_by_first_seen():
    assert vote(["7", None, "8", "7", "8", "9"]) == ("7", {"7": 2, "8": 2, "9": 1})
    assert vote([None, None]) == (None, {})


def test_self_consistency_votes_over_samples_and_keeps_the_distribution():
    replies = ["The answer is 12.", "The answer is 11.", "The answer is 12.", "no idea", "The answer is 12."]
    llm = Scripted(lambda p, i, t: replies[i])
    [[o]] = SelfConsistency(Direct(extract="number"), n=5, temperature=0.8).run(llm, ["Q?"])
    assert o.answer == "12" and o.votes == {"12": 3, "11": 1}
    assert llm.calls[0]["n"] == 5 and llm.calls[0]["temperature"] == 0.8
    assert len(o.calls) == 5 and o.text == "The answer is 12."


def binomial_majority(n: int, p: float) -> float:
    """P(more than half of n independent samples are right), n odd."""
    return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n // 2 + 1, n + 1))


def test_self_consistency_accuracy_rises_with_n_as_the_binomial_formula_predicts():
    p, trials = 0.6, 1500
    rng = random.Random(0)
    llm = Scripted(lambda prompt, i, t: "The answer is 42." if rng.random() < p else "The answer is 41.")
    measured = {}
    for n in (1, 3, 7, 15, 31):
        outcomes = SelfConsistency(Direct(extract="number"), n=n).run(llm, ["Q?"] * trials)
        measured[n] = sum(o[0].answer == "42" for o in outcomes) / trials
        expected = binomial_majority(n, p)
        tolerance = 4 * math.sqrt(expected * (1 - expected) / trials)  # 4 standard errors
        assert abs(measured[n] - expected) <= tolerance, (n, measured[n], expected)
    assert measured[31] > measured[7] > measured[1] + 0.1


def test_make_strategy_names_and_options():
    assert isinstance(make_strategy("zero-shot-cot"), ZeroShotCoT)
    sc = make_strategy("least-to-most", samples=4)
    assert isinstance(sc, SelfConsistency) and isinstance(sc.inner, LeastToMost) and sc.n == 4
    with pytest.raises(ValueError, match="strategy"):
        make_strategy("tree-of-thought")


def test_auto_cot_takes_one_representative_per_cluster_with_a_zero_shot_rationale():
    questions = ["How many legs do two cats have?", "How many legs do three cats have?",
                 "How many legs do five cats have?", "What colour is the sky?", "What colour is the grass?",
                 "What colour is snow?"]

    def reply(prompt, i, t):
        if prompt.endswith(ANSWER_TRIGGER):
            return " 4."
        return "Each has four legs.\nSo 4."

    llm = Scripted(reply)
    vectors = WordHashEmbedder().embed(questions)
    labels, _ = kmeans(vectors, 2, seed=0)
    assert len(set(labels[:3])) == 1 and len(set(labels[3:])) == 1 and labels[0] != labels[3]
    demos = auto_cot_demos(llm, questions, WordHashEmbedder(), k=2)
    assert len(demos) == 2
    picked = {d["question"] for d in demos}
    assert len(picked & set(questions[:3])) == 1 and len(picked & set(questions[3:])) == 1
    assert all(d["rationale"].startswith(COT_TRIGGER) and d["answer"] == "4" for d in demos)
    text = COT_TEMPLATE.render({"question": "How many legs do 9 cats have?"}, demos)
    assert text.endswith("Q: How many legs do 9 cats have?\nA:") and "The answer is 4." in text
