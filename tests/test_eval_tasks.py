"""Task harness: the shipped task YAMLs and lm-eval's field names give lm-evaluation-harness's numbers."""

import json
import random
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.eval.lm import EvalLM
from llmkit.eval.tasks import TASKS_DIR, TaskError, evaluate, load_tasks
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer
from llmkit.train.objectives import lm_loss

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
if not SHAKESPEARE.is_file():
    SHAKESPEARE = Path(llmkit.__file__).parent / "assets" / "tinyshakespeare.txt"
ALL_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada_openai", "gsm8k", "mmlu",
             "crows_pairs_english", "tiny_rolling", "tiny_gen", "tiny_binary"]
# the two ARC tasks are asked for through a group, whose aggregate is compared too
REQUESTED = [t for t in ALL_TASKS if not t.startswith("arc_")] + ["tiny_group"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps on Shakespeare, so it writes words, spaces and newlines."""
    d = tmp_path_factory.mktemp("model")
    text = SHAKESPEARE.read_text()[:40000]
    (d / "corpus.txt").write_text(text)
    tok = train_tokenizer([d / "corpus.txt"], "byte-bpe", 320)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512, eos_token_id=tok.eos_id,
                                  bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    model = Transformer(cfg)
    ids = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
        x = torch.stack([ids[s: s + 64] for s in starts])
        y = torch.stack([ids[s + 1: s + 65] for s in starts])
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    llmkit.save(model, tok, d / "model")
    return d / "model"


def _write(root: Path, path: str, rows: list[dict]) -> None:
    p = root / path
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))


EXTRA_TASKS = {
    "rolling.yaml": """task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: extra/wiki.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "gen.yaml": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: extra/gen.jsonl
test_split: test
fewshot_split: test
num_fewshot: 2
output_type: generate_until
doc_to_text: "{{prompt}}\\n"
doc_to_target: "{{target}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
  - metric: bleu
  - metric: chrf
""",
    "bin.yaml": """task: tiny_binary
dataset_path: json
dataset_kwargs:
  data_files:
    test: extra/bin.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}} -"
doc_to_target: label
doc_to_choice: "{{[bad, good]}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: f1
  - metric: mcc
  - metric: brier_score
  - metric: acc_mutual_info
  - metric: acc_bytes
  - metric: exact_match
""",
    "group.yaml": """group: tiny_group
task:
  - arc_easy
  - arc_challenge
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
  - metric: acc_norm
    weight_by_size: false
""",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A few documents per shipped task (in each Hugging Face dataset's fields) and three extra tasks."""
    root = tmp_path_factory.mktemp("data")
    text = SHAKESPEARE.read_text()
    lines = [ln.strip() for ln in text[:60000].splitlines() if len(ln.split()) >= 4]
    r = random.Random(0)

    def pick(k):
        return r.sample(lines, k)

    def hella(n):
        out = []
        for _ in range(n):
            a, b, *ends = pick(6)
            out.append({"activity_label": "Drama", "ctx_a": a, "ctx_b": b.split()[0].lower(), "endings": ends,
                        "label": str(r.randrange(4))})
        return out

    def arc(n):
        out = []
        for i in range(n):
            q, *ch = pick(5)
            labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3", "4"]
            out.append({"id": f"q{i}", "question": q + "?", "answerKey": r.choice(labels),
                        "choices": {"text": [" ".join(c.split()[: r.randint(1, 4)]) for c in ch], "label": labels}})
        return out

    _write(root, "hellaswag/validation.jsonl", hella(5))
    _write(root, "hellaswag/train.jsonl", hella(4))
    for t in ("arc_easy", "arc_challenge"):
        _write(root, f"{t}/test.jsonl", arc(5))
        _write(root, f"{t}/train.jsonl", arc(4))
    _write(root, "piqa/validation.jsonl", [{"goal": a, "sol1": b, "sol2": c, "label": r.randrange(2)}
                                           for a, b, c in (pick(3) for _ in range(6))])
    _write(root, "piqa/train.jsonl", [{"goal": a, "sol1": b, "sol2": c, "label": r.randrange(2)}
                                      for a, b, c in (pick(3) for _ in range(4))])
    _write(root, "lambada_openai/test.jsonl", [{"text": ln} for ln in pick(6)])
    for split, n in (("test", 4), ("train", 6)):
        _write(root, f"gsm8k/{split}.jsonl", [{"question": a, "answer": f"{b}\n#### {r.randint(1, 99)}"}
                                              for a, b in (pick(2) for _ in range(n))])
    for split in ("test", "dev"):
        _write(root, f"mmlu/{split}.jsonl", [
            {"question": q, "subject": r.choice(["world_religions", "anatomy"]), "answer": r.randrange(4),
             "choices": [" ".join(c.split()[:2]) for c in ch]} for q, *ch in (pick(5) for _ in range(5))])
    import csv

    (root / "crows_pairs").mkdir()
    with open(root / "crows_pairs" / "crows_pairs_anonymized.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations", "anon_writer",
                    "anon_annotators"])
        for i, (a, b) in enumerate(pick(2) for _ in range(6)):
            w.writerow([i, a, b, "stereo", r.choice(["race-color", "gender"]), "[['gender']]", "a0", "['a1']"])
    _write(root, "extra/wiki.jsonl", [{"page": text[i * 3000: i * 3000 + 1500 + 500 * i]} for i in range(3)])
    _write(root, "extra/gen.jsonl", [{"prompt": a, "target": b.split()[0]} for a, b in (pick(2) for _ in range(6))])
    _write(root, "extra/bin.jsonl", [{"q": a, "good": b, "bad": c, "label": r.randrange(2)}
                                     for a, b, c in (pick(3) for _ in range(8))])
    (root / "extra_tasks").mkdir()
    for name, body in EXTRA_TASKS.items():
        (root / "extra_tasks" / name).write_text(body)
    return root


def _lm(path, batch_size=1):
    model, tok = llmkit.load(path)
    return EvalLM(model, tok, batch_size=batch_size, show_progress=False)


def _close(a, b, rel=1e-6):
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return abs(a - b) <= rel * max(1.0, abs(a))


def _same(a, b):
    """Equal structure; numbers to 1e-6 relative (log-likelihoods), text and booleans exactly."""
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, bool) or isinstance(a, str) or a is None:
        assert a == b, (a, b)
    else:
        assert _close(float(a), float(b)), (a, b)


def test_equals_lm_eval_harness(trained, data, monkeypatch, tmp_path):
    """Every shipped task plus rolling, generation and binary tasks: lm-eval (model hf) vs llmkit, per metric."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(tmp_path)),
                       ("TOKENIZERS_PARALLELISM", "false")):
        monkeypatch.setenv(var, value)
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(data)  # lm-eval (datasets) reads relative data_files from the working directory
    settings = dict(limit=4, num_fewshot=2, bootstrap_iters=200)
    manager = TaskManager(include_path=[str(TASKS_DIR), str(data / "extra_tasks")], include_defaults=False)
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={trained},dtype=float32", tasks=REQUESTED,
                                  task_manager=manager, device="cpu", batch_size=1, gen_kwargs="max_gen_toks=24",
                                  log_samples=True, **settings)
    ours = evaluate(_lm(trained), REQUESTED, include_path=data / "extra_tasks", data_dir=data,
                    gen_kwargs={"max_gen_toks": 24}, log_samples=True, **settings)
    compared = 0
    assert set(ref["results"]) == set(ours["results"]) == set(ALL_TASKS) | {"tiny_group"}
    for task in [*ALL_TASKS, "tiny_group"]:
        expected, got = ref["results"][task], ours["results"][task]
        for key, value in expected.items():
            if "," not in key:
                continue
            assert key in got, (task, key)
            assert _close(value, got[key]), (task, key, value, got[key])
            compared += 1
    assert ours["results"]["tiny_group"]["sample_count"] == ref["results"]["tiny_group"]["sample_count"]
    for task in ALL_TASKS:
        assert ours["n-shot"][task] == ref["n-shot"][task]
        ref_samples, our_samples = ref["samples"][task], ours["samples"][task]
        assert len(ref_samples) == len(our_samples)
        for a, b in zip(ref_samples, our_samples):  # per document: every response, every filtered response
            assert a["doc_id"] == b["doc_id"]
            _same(a["resps"], b["resps"])
            _same(a["filtered_resps"], b["filtered_resps"])
    assert compared >= 50
    # the bias score of `llmkit eval harms` on the same CSV: lm-eval's crows_pairs_english numbers
    from llmkit.eval.harms import crows_pairs, read_crows_pairs

    bias = crows_pairs(_lm(trained), read_crows_pairs(data / "crows_pairs" / "crows_pairs_anonymized.csv")[:4])
    for key in ("pct_stereotype", "likelihood_diff"):
        assert _close(bias[key], ref["results"]["crows_pairs_english"][f"{key},none"])


def test_batched_scores_equal_single(trained, data):
    single = evaluate(_lm(trained, 1), ["arc_easy", "tiny_rolling", "lambada_openai"],
                      include_path=data / "extra_tasks", data_dir=data, limit=4, bootstrap_iters=0, log_samples=True)
    batched = evaluate(_lm(trained, 8), ["arc_easy", "tiny_rolling", "lambada_openai"],
                       include_path=data / "extra_tasks", data_dir=data, limit=4, bootstrap_iters=0, log_samples=True)
    for task in single["samples"]:
        for a, b in zip(single["samples"][task], batched["samples"][task]):
            for ra, rb in zip(a["resps"], b["resps"]):
                ll_a = ra[0][0] if isinstance(ra[0], (list, tuple)) else ra[0]
                ll_b = rb[0][0] if isinstance(rb[0], (list, tuple)) else rb[0]
                assert ll_a == pytest.approx(ll_b, rel=1e-5)


def test_zero_shot_needs_only_the_eval_split(trained, data, tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text((data / "arc_easy" / "test.jsonl").read_text())
    out = evaluate(_lm(trained), ["arc_easy"], data_dir=tmp_path, bootstrap_iters=0)
    assert 0 <= out["results"]["arc_easy"]["acc,none"] <= 1
    with pytest.raises(TaskError, match="train.jsonl"):
        evaluate(_lm(trained), ["arc_easy"], data_dir=tmp_path, num_fewshot=1, bootstrap_iters=0)


def test_fewshot_seed_fixes_the_examples(trained, data):
    def contexts(seed):
        task = load_tasks(["piqa"], data_dir=data)["piqa"]
        task.set_fewshot_seed(seed)
        return [task.fewshot_context(doc, 2) for doc in task.eval_docs]

    assert contexts(1234) == contexts(1234)
    assert contexts(1234) != contexts(7)
    assert contexts(1234)[0].count("Question:") == 3


def _task_file(tmp_path, body: str) -> Path:
    d = tmp_path / "tasks"
    d.mkdir(exist_ok=True)
    (d / "t.yaml").write_text(body)
    (tmp_path / "d.jsonl").write_text('{"q": "a", "label": 0}\n')
    return d


BASE = """task: t
dataset_path: json
dataset_kwargs:
  data_files:
    test: d.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_target: label
doc_to_choice: ["x", "y"]
"""


@pytest.mark.parametrize("body,message", [
    (BASE + "metric_list:\n  - metric: acc\n   aggregation: mean\n", r"t\.yaml:\d+:\d+: invalid YAML"),
    (BASE + "colour: red\n", r"unknown task field\(s\) \['colour'\]"),
    (BASE + "metric_list:\n  - metric: accuracy\n", r"metric_list\[0\]: unknown metric 'accuracy'"),
    (BASE.replace("multiple_choice", "classification"), r"field 'output_type' must be one of"),
    (BASE.replace("d.jsonl", "missing.jsonl"), r"missing\.jsonl \(split 'test'\) not found"),
    (BASE.replace("dataset_path: json", "dataset_path: Rowan/hellaswag"), r"field 'dataset_path' must be json or csv"),
    (BASE + "filter_list:\n  - name: x\n    filter:\n      - function: nope\n", r"filter_list\[0\]\.filter\[0\]"),
])
def test_malformed_task_yaml_names_the_field_or_line(tmp_path, body, message):
    d = _task_file(tmp_path, body)
    with pytest.raises(TaskError, match=message):
        load_tasks(["t"], include_path=d, data_dir=tmp_path)


def test_bad_data_line_is_named(tmp_path):
    d = _task_file(tmp_path, BASE)
    (tmp_path / "d.jsonl").write_text('{"q": "a", "label": 0}\n{"q": oops}\n')
    with pytest.raises(TaskError, match=r"d\.jsonl:2: not valid JSON"):
        load_tasks(["t"], include_path=d, data_dir=tmp_path)


def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(TaskError, match="unknown task 'nope'.*hellaswag"):
        load_tasks(["nope"])


def test_cli_prints_lm_eval_shaped_json(trained, data, capsys):
    from llmkit.cli import main

    code = main(["eval", "tasks", "--model", str(trained), "--tasks", "arc_easy,piqa", "--data-dir", str(data),
                 "--limit", "3", "--bootstrap-iters", "0", "--json", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # one JSON object and nothing else on stdout
    assert set(result["results"]) == {"arc_easy", "piqa"}
    assert {"acc,none", "acc_norm,none"} <= set(result["results"]["arc_easy"])
    assert result["provenance"]["model"] == str(Path(trained).resolve())
    assert len(result["provenance"]["config_hash"]) == 64 and result["provenance"]["versions"]["torch"]
    assert main(["eval", "tasks", "--model", str(trained), "--tasks", "nope", "--quiet"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "tasks", "--model", str(trained), "--tasks", "tiny_group", "--include-path",
                 str(data / "extra_tasks"), "--data-dir", str(data), "--limit", "2", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "|tiny_group|none||acc|" in table and "|arc_easy|none|0|acc|" in table


def test_custom_process_results_and_function_metric(trained, tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "helpers.py").write_text(
        "def process(doc, results):\n    return {'longest': float(len(results[0]))}\n")
    (d / "t.yaml").write_text("""task: custom
dataset_path: json
dataset_kwargs:
  data_files: {test: d.jsonl}
test_split: test
output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: "{{a}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 5}
process_results: !function helpers.process
metric_list:
  - metric: exact_match
""")
    (tmp_path / "d.jsonl").write_text('{"q": "To be", "a": "or"}\n{"q": "The king", "a": "is"}\n')
    out = evaluate(_lm(trained), ["custom"], include_path=d, data_dir=tmp_path, bootstrap_iters=0)
    assert "longest,none" in out["results"]["custom"]
