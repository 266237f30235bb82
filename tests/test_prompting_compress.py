"""Prompt compression: self-information equals a teacher-forced reference (windowed too), the least
informative units go first, the instruction and question stay whole, budgets hold, and the report counts
the compression ratio and answer changes."""

import re

import pytest
import torch

from llmkit.prompting.compress import (SelfInformation, compress, compress_prompt, compression_report, score_units,
                                       split_units)
from test_prompting_reasoning import Scripted
from test_structured import model, tok  # noqa: F401  (the same tiny tokenizer and random model)

CONTEXT = ("Paris is the capital of France. The weather was mild that day. It has about two million people. "
           "Nobody remembers the colour of the bus.\nThe Seine runs through it.")
BORING = {"weather", "bus"}  # words the scripted scorer finds uninformative


def word_scorer(text):
    """Self-information of "tokens" (words): 0.1 for boring words, 1 for the rest."""
    out = []
    for w in re.finditer(r"\S+", text):
        out.append((w.start(), w.end(), 0.1 if w.group().strip(".").lower() in BORING else 1.0))
    return out


word_scorer.count_tokens = lambda text: len(text.split())


def test_self_information_equals_a_teacher_forced_reference_windowed_or_not(model, tok):
    text = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."
    ids = tok.encode(text)
    with torch.no_grad():
        logp = model(torch.tensor([[tok.bos_id] + ids]))[0].log_softmax(-1)
    reference = [-float(logp[i, t]) for i, t in enumerate(ids)]
    full = SelfInformation(model, tok)(text)
    assert [x for _, _, x in full] == pytest.approx(reference, abs=1e-4)
    assert text[full[1][0]:full[1][1]] == tok.decode([ids[1]])
    windowed = SelfInformation(model, tok, max_length=8)(text)
    assert len(windowed) == len(ids) and [x for _, _, x in windowed[:7]] == pytest.approx(reference[:7], abs=1e-4)
    # the second window starts half a window back: tokens[4:12] (bos at 0), scoring ids 7..10 with 4+ tokens before
    tokens = [tok.bos_id] + ids
    with torch.no_grad():
        second = model(torch.tensor([tokens[4:12]]))[0].log_softmax(-1)
    expected = [-float(second[p, tokens[4 + p + 1]]) for p in range(3, 7)]
    assert [x for _, _, x in windowed[7:11]] == pytest.approx(expected, abs=1e-4)


def test_units_and_their_information():
    assert [CONTEXT[a:b] for a, b in split_units(CONTEXT)][:2] == ["Paris is the capital of France.",
                                                                   " The weather was mild that day."]
    assert len(split_units("a b  c", "word")) == 3
    units = score_units(CONTEXT, word_scorer)
    assert [u.info for u in units] == pytest.approx([6.0, 5.1, 6.0, 6.1, 5.0])
    with pytest.raises(ValueError, match="level"):
        split_units(CONTEXT, "paragraph")


def test_the_least_informative_sentences_go_first_and_the_budget_holds():
    original = word_scorer.count_tokens(CONTEXT)  # 30 words; sentence totals 6.0 5.1 6.0 6.1 5.0
    c = compress(CONTEXT, word_scorer, budget=original - 5)
    assert "Seine" not in c.text and "weather" in c.text  # the lowest total went, nothing more was needed
    c = compress(CONTEXT, word_scorer, budget=14)
    assert c.text == "It has about two million people. Nobody remembers the colour of the bus."
    assert [u.text.strip() for u in c.units if not u.kept] == ["Paris is the capital of France.",
                                                              "The weather was mild that day.",
                                                              "The Seine runs through it."]
    assert c.tokens == 13 and c.ratio == pytest.approx(30 / 13)
    assert compress(CONTEXT, word_scorer, keep_ratio=1.0).text == CONTEXT
    with pytest.raises(ValueError, match="exactly one"):
        compress(CONTEXT, word_scorer)


def test_compress_prompt_keeps_instruction_and_question_whole():
    instruction, question = "Answer from the context.", "Question: What is the capital of France?"
    prompt, c = compress_prompt(word_scorer, instruction, CONTEXT, question, budget=22)
    assert prompt.startswith(instruction + "\n\n") and prompt.endswith("\n\n" + question)
    assert word_scorer.count_tokens(prompt) <= 22 and c.tokens < c.original_tokens
    with pytest.raises(ValueError, match="never compressed"):
        compress_prompt(word_scorer, instruction, CONTEXT, question, budget=5)


def test_report_counts_the_ratio_and_how_often_the_answer_changes():
    items = [{"instruction": "Answer.", "context": CONTEXT, "question": "How many people?"},
             {"instruction": "Answer.", "context": CONTEXT, "question": "What is mild?"}]

    def reply(prompt, i, t):  # answers from what the prompt still says
        if "people" in prompt.split("\n\n")[-1]:
            return "two million" if "two million" in prompt else "unknown"
        return "the weather" if "weather was mild" in prompt else "unknown"

    report = compression_report(Scripted(reply), items, word_scorer, budget=24)
    assert report["items"] == 2 and report["compression_ratio"] > 1.0
    assert report["answer_change_rate"] == 0.5  # the weather sentence was dropped, the population kept
    assert report["details"][1] == {**report["details"][1], "before": "the weather", "after": "unknown"}


def test_a_real_model_compresses_a_long_context(model, tok):
    scorer = SelfInformation(model, tok)
    context = " ".join(f"Sentence number {i} says that item {i} costs {i * 3} coins." for i in range(12))
    prompt, c = compress_prompt(scorer, "Answer briefly.", context, "Question: what does item 4 cost?", budget=120)
    assert scorer.count_tokens(prompt) <= 120 < scorer.count_tokens(context)
    assert prompt.endswith("Question: what does item 4 cost?") and 1.5 < c.ratio
