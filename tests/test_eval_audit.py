"""Under-trained token audit: tokens a model never saw are found from its weights alone and from the data."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.eval.audit import audit, format_audit, low_group, unembedding_indicators
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer
from llmkit.train.objectives import lm_loss

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
if not SHAKESPEARE.is_file():
    SHAKESPEARE = Path(llmkit.__file__).parent / "assets" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def lowercase_model(tmp_path_factory):
    """A tokenizer trained on all of the text; a model trained only on its lowercase letters and spaces."""
    d = tmp_path_factory.mktemp("audit")
    text = SHAKESPEARE.read_text()[:40000]
    (d / "all.txt").write_text(text)
    tok = train_tokenizer([d / "all.txt"], "byte-bpe", 320)
    train_text = re.sub(r"[^a-z \n]", "", text.lower())
    (d / "train.txt").write_text(train_text)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    ids = torch.tensor(tok.encode(train_text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.randint(0, len(ids) - 65, (16,), generator=g)
        x = torch.stack([ids[i: i + 64] for i in s])
        y = torch.stack([ids[i + 1: i + 65] for i in s])
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    llmkit.save(model, tok, d / "model")
    seen = set(ids.tolist())  # what the model trained on
    return d, model, tok, seen


def test_weights_alone_find_the_unseen_tokens(lowercase_model):
    d, model, tok, seen = lowercase_model
    special = {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id} | {tok.token_to_id(t) for t in tok.extra_special_tokens}
    unseen = set(range(tok.vocab_size)) - seen - special
    result = audit(model, tok, top=0)
    flagged = {r["id"] for r in result["tokens"] if "untrained unembedding" in r["reasons"]}
    assert len(flagged & unseen) / len(unseen) > 0.9  # recall
    assert len(flagged & unseen) / len(flagged) > 0.9  # precision
    row = next(r for r in result["tokens"] if r["id"] == tok.token_to_id("Q"))
    assert row["text"] == "Q" and row["token"] == "Q"


def test_data_counts_name_every_token_never_seen(lowercase_model):
    d, model, tok, seen = lowercase_model
    result = audit(model, tok, [d / "train.txt"], top=0)
    never = {r["id"] for r in result["tokens"] if "never in data" in r["reasons"]}
    special = {s["id"] for s in result["special_tokens"]}
    # .txt data is read line by line
    in_lines = {t for line in (d / "train.txt").read_text().splitlines() if line.strip() for t in tok.encode(line)}
    assert never == set(range(tok.vocab_size)) - in_lines - special
    assert result["never_in_data"] == len(never)
    assert all(r["count"] == 0 for r in result["tokens"] if r["id"] in never)
    assert "never in data" in format_audit(result)


def test_outlier_and_group_rules():
    rng = np.random.default_rng(0)
    norms = np.concatenate([rng.normal(1.0, 0.05, 500), [0.2, 0.25]])
    grouped, d = low_group(norms)
    assert grouped[-2:].all() and grouped.sum() == 2
    unimodal, d = low_group(rng.normal(1.0, 0.05, 500))
    assert not unimodal.any() and d < 4
    w = rng.normal(size=(300, 16))
    w[:5] = w.mean(axis=0) + 0.01 * rng.normal(size=(5, 16))  # five rows that never moved from the crowd
    _, z = unembedding_indicators(w)
    assert (z[:5] < -3).all() and (z[5:] > -3).mean() > 0.99


def test_cli(lowercase_model, capsys):
    from llmkit.cli import main

    d, *_ = lowercase_model
    assert main(["eval", "audit", "--model", str(d / "model"), "--data", str(d / "train.txt"), "--top", "5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 5 and out["never_in_data"] > 100
