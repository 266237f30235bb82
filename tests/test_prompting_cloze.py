"""PET cloze classification: label scores equal a naive teacher-forced log-probability, few-shot contexts, and
the prompt-based fine-tuning objective through `llmkit finetune` lifts a tiny model from chance to accurate."""

import json

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.data.sft import DataError
from llmkit.eval.lm import EvalLM
from llmkit.prompting.cloze import PVP, accuracy, classify, encode_cloze, load_pet_examples, score_labels
from llmkit.prompting.templates import PromptError
from test_structured import model, tok  # noqa: F401  (the same tiny tokenizer and random model)

PVP_SENTIMENT = PVP("Review: {{ text }}\nSentiment: ___", {"pos": "good", "neg": "no"})  # one token each
POSITIVE = ["wonderful", "lovely", "superb", "excellent", "delightful", "brilliant", "charming", "marvellous"]
NEGATIVE = ["dreadful", "boring", "awful", "terrible", "dull", "horrible", "tedious", "miserable"]
FRAMES = ["the film was {}", "what a {} story", "the acting felt {}", "a {} evening overall", "truly {} music",
          "the ending was {}"]


def records(frames):
    return [{"text": f.format(w), "label": label} for f in frames
            for words, label in ((POSITIVE, "pos"), (NEGATIVE, "neg")) for w in words]


def naive_logprob(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) by one teacher-forced forward pass, summing token log-softmaxes."""
    ctx = tok.encode(context.rstrip(), add_special_tokens=True)
    whole = tok.encode(context.rstrip() + context[len(context.rstrip()):] + continuation, add_special_tokens=True)
    with torch.no_grad():
        logp = model(torch.tensor([whole]))[0].log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_pattern_parts_and_errors():
    rec = {"text": "a fine film", "label": "pos"}
    assert PVP_SENTIMENT.split(rec) == ("Review: a fine film\nSentiment: ", "")
    assert PVP_SENTIMENT.filled(rec, "neg") == "Review: a fine film\nSentiment: no"
    demo = {"text": "awful", "label": "neg"}
    assert PVP_SENTIMENT.context(rec, [demo]) == "Review: awful\nSentiment: no\n\nReview: a fine film\nSentiment: "
    with pytest.raises(PromptError, match="exactly one"):
        PVP("___ and ___", {"a": "x", "b": "y"})
    with pytest.raises(PromptError, match="JSON object"):
        PVP.from_json("It was ___.", "[1, 2]")
    with pytest.raises(PromptError, match="two or more"):
        PVP("It was ___.", {"a": "x"})


def test_label_scores_equal_a_naive_teacher_forced_log_probability(model, tok):
    lm = EvalLM(model, tok, show_progress=False)
    pvp = PVP("{{ text }} All in all it was ___ indeed.", {"pos": "good", "neg": "bad"})
    recs = [{"text": "the film was superb"}, {"text": "what a dull story"}]
    demos = [{"text": "truly lovely music", "label": "pos"}]
    for scores, rec in zip(score_labels(lm, pvp, recs, demos), recs):
        for label, word in pvp.verbalizer.items():
            expected = naive_logprob(model, tok, pvp.context(rec, demos), word + " indeed.")
            assert scores[label] == pytest.approx(expected, abs=1e-4)
    assert classify(lm, pvp, recs) == [max(s, key=s.get) for s in score_labels(lm, pvp, recs)]


def test_pet_examples_stop_at_the_slot_and_name_the_label_tokens(tok, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(FRAMES[:1])))
    examples, firsts = load_pet_examples([str(data)], tok, 64, PVP_SENTIMENT)
    ids, expected = encode_cloze(tok, PVP_SENTIMENT, records(FRAMES[:1])[0], 64)
    assert examples[0].input_ids == ids and firsts == expected and examples[0].labels == [0]
    assert tok.decode([firsts[0]]).strip() == "good"[: len(tok.decode([firsts[0]]).strip())]
    data.write_text(json.dumps({"text": "x", "label": "meh"}) + "\n")
    with pytest.raises(DataError, match="not in the verbalizer"):
        load_pet_examples([str(data)], tok, 64, PVP_SENTIMENT)


def test_pet_fine_tuning_through_the_cli_learns_the_verbalizer(model, tok, tmp_path, capsys):
    base = tmp_path / "base"
    llmkit.save(model, tok, base)
    train, held_out = records(FRAMES[:4]), records(FRAMES[4:])
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    before = accuracy(EvalLM(model, tok, show_progress=False), PVP_SENTIMENT, held_out)
    rc = main(["finetune", "--model", str(base), "--data", str(tmp_path / "train.jsonl"), "--method", "full",
               "--pet-pattern", PVP_SENTIMENT.pattern, "--pet-verbalizer", json.dumps(PVP_SENTIMENT.verbalizer),
               "--out", str(tmp_path / "run"), "--max-steps", "60", "--lr", "3e-3", "--micro-batch-size", "16",
               "--val-fraction", "0.1", "--eval-every", "60", "--save-every", "60", "--warmup-steps", "5"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["val_loss"] < summary["val_loss_start"]
    tuned, tuned_tok = llmkit.load(tmp_path / "run" / "model")
    after = accuracy(EvalLM(tuned, tuned_tok, show_progress=False), PVP_SENTIMENT, held_out)
    assert before <= 0.75 and after >= 0.9, (before, after)
    assert main(["finetune", "--model", str(base), "--data", str(tmp_path / "train.jsonl"), "--out",
                 str(tmp_path / "bad"), "--pet-pattern", "It was ___."]) == 2
    assert "go together" in capsys.readouterr().err
