"""Harms: CrowS-Pairs scoring and input errors, toxicity scorers and rates, CLI.

(That the bias score equals lm-eval's crows_pairs_english on the same CSV is checked in
test_eval_tasks.py::test_equals_lm_eval_harness, beside the other lm-eval comparisons.)
"""

import csv
import json
from pathlib import Path

import pytest
import torch
import transformers

import llmkit
from llmkit.config import ModelConfig
from llmkit.eval.harms import (ClassifierScorer, HarmsError, WordListScorer, crows_pairs, read_crows_pairs,
                               read_prompts, toxicity)
from llmkit.eval.lm import EvalLM
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
if not SHAKESPEARE.is_file():
    SHAKESPEARE = Path(llmkit.__file__).parent / "assets" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("harms")
    (d / "c.txt").write_text(SHAKESPEARE.read_text()[:20000])
    tok = train_tokenizer([d / "c.txt"], "byte-bpe", 300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, init_std=0.2, eos_token_id=tok.eos_id,
                                  bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    llmkit.save(Transformer(cfg), tok, d / "model")
    return d / "model"


def _crows_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type"])
        for i, (more, less, kind) in enumerate(rows):
            w.writerow([i, more, less, "stereo", kind])
    return path


def test_crows_pairs_scores_whole_sentences(ckpt, tmp_path):
    model, tok = llmkit.load(ckpt)
    lm = EvalLM(model, tok, show_progress=False)
    rows = read_crows_pairs(_crows_csv(tmp_path / "c.csv", [
        ("The king is wise.", "The queen is wise.", "gender"),
        ("Poor men steal.", "Rich men steal.", "socioeconomic"),
        ("Old men forget.", "Young men forget.", "age")]))
    result = crows_pairs(lm, rows)
    lls = [ll for ll, _ in lm.loglikelihood([("", s) for r in rows for s in (r["sent_more"], r["sent_less"])])]
    more, less = lls[0::2], lls[1::2]
    assert result["pct_stereotype"] == pytest.approx(sum(m > s for m, s in zip(more, less)) / 3)
    assert result["likelihood_diff"] == pytest.approx(sum(abs(m - s) for m, s in zip(more, less)) / 3)
    assert set(result["by_bias_type"]) == {"gender", "socioeconomic", "age"}
    # an empty context scores the sentence after the prefix token, all of it
    ids = tok.encode("The king is wise.")
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([[tok.bos_id] + ids[:-1]])), -1)[0]
    assert more[0] == pytest.approx(float(logprobs.gather(1, torch.tensor(ids)[:, None]).sum()), rel=1e-5)


def test_crows_pairs_input_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sent_more,other\na,b\n")
    with pytest.raises(HarmsError, match="missing column 'sent_less'"):
        read_crows_pairs(bad)
    bad.write_text("sent_more,sent_less\na,b\nc,\n")
    with pytest.raises(HarmsError, match=r"bad\.csv:3: field 'sent_less'"):
        read_crows_pairs(bad)
    bad.write_text("sent_more,sent_less\na,b,c\n")
    with pytest.raises(HarmsError, match=r"bad\.csv:2: 3 fields"):
        read_crows_pairs(bad)


def test_word_list_scorer():
    default = WordListScorer()
    assert default(["what the hell", "good morning", "sh1t happens"]) == [1.0, 0.0, 1.0]
    custom = WordListScorer(["dagger"])
    assert custom(["is this a dagger", "what the hell"]) == [1.0, 0.0]


def test_classifier_scorer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "awful", "day"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=2,
                                     id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    scorer = ClassifierScorer(tmp_path / "clf")
    assert scorer.index == 1  # "toxic", not "non-toxic"
    scores = scorer(["good day", "awful bad day", "bad"])
    assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
    with pytest.raises(HarmsError, match="no label 'insult'"):
        ClassifierScorer(tmp_path / "clf", label="insult")
    with pytest.raises(HarmsError, match="not a classifier directory"):
        ClassifierScorer(tmp_path)


def test_toxicity_rates(ckpt):
    model, tok = llmkit.load(ckpt)
    prompts = ["To be", "The king", "My lord"]

    def scorer(texts):  # deterministic stand-in: "toxic" when the text holds the letter e
        return [1.0 if "e" in t else 0.0 for t in texts]

    r = toxicity(model, tok, prompts, scorer, samples_per_prompt=4, max_new_tokens=8, seed=1, show_progress=False)
    assert r["generations"] == 12
    texts = [m["text"] for m in r["most_toxic"]]
    assert all("e" in t for t in texts) and len(texts) == round(r["toxicity_rate"] * 12)
    assert r["toxicity_probability"] >= r["toxicity_rate"]  # any of a prompt's samples >= their mean
    again = toxicity(model, tok, prompts, scorer, samples_per_prompt=4, max_new_tokens=8, seed=1, show_progress=False)
    assert again["most_toxic"] == r["most_toxic"]  # seeded


def test_read_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": {"text": "Hello"}}\n{"text": "there"}\n')
    assert read_prompts(f) == ["Hello", "there"]
    f.write_text('{"prompt": 3}\n')
    with pytest.raises(HarmsError, match=r"p\.jsonl:1"):
        read_prompts(f)


def test_cli(ckpt, tmp_path, capsys):
    from llmkit.cli import main

    csv_path = _crows_csv(tmp_path / "c.csv", [("The king is wise.", "The queen is wise.", "gender")])
    (tmp_path / "p.txt").write_text("To be\nThe king\n")
    (tmp_path / "words.txt").write_text("king\n")
    code = main(["eval", "harms", "--model", str(ckpt), "--crows-pairs", str(csv_path), "--prompts",
                 str(tmp_path / "p.txt"), "--word-list", str(tmp_path / "words.txt"), "--max-new-tokens", "4",
                 "--json", "--quiet"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bias"]["n"] == 1 and 0 <= out["toxicity"]["toxicity_rate"] <= 1
    assert main(["eval", "harms", "--model", str(ckpt)]) == 2
    assert "--crows-pairs" in capsys.readouterr().err
