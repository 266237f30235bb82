"""lm-evaluation-harness runs llmkit checkpoints itself: model `llmkit` gives model `hf`'s numbers."""

import json
import sys
from pathlib import Path

import pytest

import llmkit
from llmkit.cli import main

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

import llmkit.eval.harness_lm  # noqa: E402,F401  (registers model "llmkit")

# the checkpoint, data and task YAMLs of tests/test_eval_tasks.py: a multiple-choice task (with
# acc_mutual_info, so empty contexts too), a perplexity task spanning several windows, a few-shot generation task
from test_eval_tasks import data, trained  # noqa: E402,F401

TASKS = ["tiny_binary", "tiny_rolling", "tiny_gen"]
SETTINGS = dict(limit=4, num_fewshot=1, bootstrap_iters=100)


def _offline(mp: pytest.MonkeyPatch, data: Path, cache: Path) -> None:
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(cache)),
                       ("TOKENIZERS_PARALLELISM", "false")):
        mp.setenv(var, value)
    mp.chdir(data)  # lm-eval (datasets) reads relative data_files from the working directory


@pytest.fixture
def offline(data, monkeypatch, tmp_path):
    _offline(monkeypatch, data, tmp_path)


@pytest.fixture(scope="module")
def reference(trained, data, tmp_path_factory):
    """lm-eval's own HF model (unbatched) on the checkpoint: the numbers to match. Asked for after
    `llmkit.eval.harness_lm` registered "llmkit", so lm-eval's own models must still be found."""
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, data, tmp_path_factory.mktemp("hf_cache"))
        return _evaluate("hf", f"pretrained={trained},dtype=float32", data, batch_size=1)


def _evaluate(model: str, model_args: str, data: Path, **kwargs) -> dict:
    manager = TaskManager(include_path=str(data / "extra_tasks"), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=manager,
                                   device="cpu", log_samples=True, **SETTINGS, **kwargs)


def _assert_same_metrics(expected: dict, got: dict) -> int:
    """Every metric of every task to 1e-6 relative; returns how many numbers were compared."""
    compared = 0
    for task in TASKS:
        for key, value in expected[task].items():
            if "," not in key or isinstance(value, str):  # "acc_stderr,none": "N/A" without bootstrap
                continue
            assert got[task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
            compared += 1
    return compared


def test_llmkit_model_equals_hf(trained, data, offline, reference):
    ours = _evaluate("llmkit", f"pretrained={trained},batch_size=4", data)
    assert _assert_same_metrics(reference["results"], ours["results"]) >= 9
    assert reference["results"]["tiny_gen"]["exact_match,none"] == ours["results"]["tiny_gen"]["exact_match,none"]
    for task in TASKS:  # per document: the same log-likelihoods, the same generated text
        for a, b in zip(reference["samples"][task], ours["samples"][task], strict=True):
            for (x,), (y,) in zip(a["resps"], b["resps"], strict=True):
                if isinstance(x, (list, tuple)):  # loglikelihood: (log-likelihood, is_greedy)
                    assert y[1] == x[1]
                    x, y = x[0], y[0]
                if isinstance(x, str):
                    assert y == x
                else:
                    assert y == pytest.approx(x, rel=1e-6)
    assert any(r["resps"][0][0] for r in ours["samples"]["tiny_gen"])  # generation produced text


def test_wraps_a_loaded_model(trained, data, offline, reference):
    from llmkit.eval.harness_lm import LlmkitHarnessLM

    model, tokenizer = llmkit.load(trained)
    lm = LlmkitHarnessLM(model=model, tokenizer=tokenizer, batch_size="2")
    manager = TaskManager(include_path=str(data / "extra_tasks"), include_defaults=False)
    ours = lm_eval.simple_evaluate(model=lm, tasks=["tiny_binary"], task_manager=manager, **SETTINGS)
    assert ours["results"]["tiny_binary"]["acc,none"] == reference["results"]["tiny_binary"]["acc,none"]
    with pytest.raises(ValueError, match="positive integer, got 'auto'"):
        LlmkitHarnessLM(model=model, tokenizer=tokenizer, batch_size="auto")
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        LlmkitHarnessLM(str(trained), model=model, tokenizer=tokenizer)


def test_cli_json_prints_the_same_numbers(trained, data, offline, reference, capsys):
    code = main(["eval", "harness", "--model", str(trained), "--tasks", ",".join(TASKS), "--include-path",
                 str(data / "extra_tasks"), "--num-fewshot", "1", "--limit", "4", "--bootstrap-iters", "100",
                 "--batch-size", "4", "--device", "cpu", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # one JSON object and nothing else on stdout
    assert _assert_same_metrics(reference["results"], out["results"]) >= 9


def test_cli_bad_input_is_one_line(trained, data, offline, capsys, tmp_path):
    args = ["eval", "harness", "--tasks", "tiny_binary", "--include-path", str(data / "extra_tasks")]
    assert main([*args, "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such checkpoint directory" in err
    assert main([*args, "--model", str(trained), "--tasks", "tiny_binary,nope_task"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("llmkit eval harness: error: unknown lm-eval task(s) nope_task")


def test_without_lm_eval_says_how_to_install(trained, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "llmkit.eval.harness_lm")
    with pytest.raises(ImportError, match="pip install lm-eval"):
        import llmkit.eval.harness_lm  # noqa: F401
    assert main(["eval", "harness", "--model", str(trained), "--tasks", "tiny_binary"]) == 2
    assert "pip install lm-eval" in capsys.readouterr().err
