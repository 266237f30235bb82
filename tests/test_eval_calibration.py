"""Calibration: ECE and Brier by hand and on synthetic data; from task results; reliability diagram; CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.eval.calibration import calibration, calibration_from_results, normalise, reliability_diagram
from llmkit.eval.lm import EvalLM
from llmkit.eval.tasks import evaluate
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
if not SHAKESPEARE.is_file():
    SHAKESPEARE = Path(llmkit.__file__).parent / "assets" / "tinyshakespeare.txt"


def test_by_hand():
    probs = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]
    golds = [0, 1, 1, 1]
    r = calibration(probs, golds, bins=10)
    # bins: 0.9 -> (0.8, 0.9], correct; 0.8 -> (0.7, 0.8], wrong; 0.7 -> (0.6, 0.7], correct; 0.6 -> (0.5, 0.6], wrong
    assert r["accuracy"] == 0.5
    assert r["ece"] == pytest.approx((0.1 + 0.8 + 0.3 + 0.6) / 4)
    assert r["mce"] == pytest.approx(0.8)
    brier = np.mean([np.sum((np.array(p) - np.eye(2)[g]) ** 2) for p, g in zip(probs, golds)])
    assert r["brier"] == pytest.approx(brier)
    assert r["brier_top_label"] == pytest.approx(np.mean([0.1 ** 2, 0.8 ** 2, 0.3 ** 2, 0.6 ** 2]))
    assert sum(b["count"] for b in r["bins"]) == 4


def test_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.25, 1.0, n)
    correct = rng.random(n) < conf
    probs, golds = [], []
    for c, ok in zip(conf, correct):
        p = np.full(4, (1 - c) / 3)
        p[0] = c  # choice 0 predicted with confidence c
        probs.append(p)
        golds.append(0 if ok else 1)
    assert calibration(probs, golds)["ece"] < 0.02
    over = calibration([[0.97, 0.01, 0.01, 0.01]] * 100, [0, 1] * 50)
    assert over["ece"] == pytest.approx(0.47) and over["accuracy"] == 0.5


def test_brier_equals_lm_eval_aggregation():
    from llmkit.eval.tasks import AGGREGATIONS

    rng = np.random.default_rng(1)
    probs = [normalise(rng.normal(size=3)) for _ in range(50)]
    golds = list(rng.integers(0, 3, 50))
    assert calibration(probs, golds)["brier"] == pytest.approx(AGGREGATIONS["brier_score"](list(zip(golds, probs))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    (d / "c.txt").write_text(SHAKESPEARE.read_text()[:20000])
    tok = train_tokenizer([d / "c.txt"], "byte-bpe", 300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, init_std=0.2, eos_token_id=tok.eos_id,
                                  bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    llmkit.save(Transformer(cfg), tok, d / "model")
    lines = [ln for ln in SHAKESPEARE.read_text()[:20000].splitlines() if len(ln.split()) > 3]
    rng = np.random.default_rng(0)
    with open(d / "mc.jsonl", "w") as f:
        for i in range(20):
            choices = [lines[int(j)] for j in rng.choice(len(lines), 3, replace=False)]
            f.write(json.dumps({"q": lines[i], "choices": choices, "label": int(rng.integers(0, 3))}) + "\n")
    (d / "tasks").mkdir()
    (d / "tasks" / "mc.yaml").write_text("""task: cal_mc
dataset_path: json
dataset_kwargs: {data_files: {test: mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: brier_score
""")
    return d


def test_from_task_results_agrees_with_the_task_metrics(setup, tmp_path):
    model, tok = llmkit.load(setup / "model")
    results = evaluate(EvalLM(model, tok, show_progress=False), ["cal_mc"], include_path=setup / "tasks",
                       data_dir=setup, bootstrap_iters=0, log_samples=True)
    cal = calibration_from_results(results)
    task = results["results"]["cal_mc"]
    assert cal["tasks"]["cal_mc"]["n"] == 20
    assert cal["tasks"]["cal_mc"]["accuracy"] == pytest.approx(task["acc,none"])
    assert cal["tasks"]["cal_mc"]["brier"] == pytest.approx(task["brier_score,none"])
    png = reliability_diagram(cal["overall"], tmp_path / "rel.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli(setup, tmp_path, capsys):
    from llmkit.cli import main

    code = main(["eval", "calibration", "--model", str(setup / "model"), "--tasks", "cal_mc", "--include-path",
                 str(setup / "tasks"), "--data-dir", str(setup), "--plot", str(tmp_path / "r.png"), "--json",
                 "--quiet"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["overall"]["ece"] <= 1 and (tmp_path / "r.png").is_file()
    assert main(["eval", "calibration", "--tasks", "cal_mc"]) == 2
    assert "either --model" in capsys.readouterr().err
