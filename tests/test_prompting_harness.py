"""Strategies in the task harness: `llmkit eval tasks --strategy ... --samples N` against a scripted
OpenAI-compatible endpoint and a tiny local model, kNN few-shot selection, and the errors."""

import json
import re

import pytest

import llmkit
from llmkit.cli import main
from llmkit.eval.tasks import evaluate, load_tasks
from llmkit.prompting.harness import StrategyLM, use_demo_selection
from llmkit.prompting.reasoning import ANSWER_TRIGGER
from test_agents import ListsModels, send_json, serve
from test_prompting_reasoning import Scripted, WordHashEmbedder
from test_structured import model, tok  # noqa: F401  (the same tiny tokenizer and random model)

TASK = """task: arith
dataset_path: json
dataset_kwargs:
  data_files:
    train: arith/train.jsonl
    test: arith/test.jsonl
output_type: generate_until
training_split: train
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  max_gen_toks: 24
metric_list:
  - metric: exact_match
filter_list:
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
"""
MC_TASK = """task: arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: arith/test.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: ["1", "2"]
doc_to_target: 0
"""
TRAIN = ["How many apples are 2 plus 3", "How many legs do 4 cats have", "How many apples are 7 plus 1",
         "How many wheels do 3 cars have", "How many pears are 6 plus 6"]
TEST = [("How many apples are 4 plus 5", 9), ("How many apples are 10 plus 3", 13), ("How many apples are 1 plus 1", 2)]


@pytest.fixture
def tasks_dir(tmp_path):
    (tmp_path / "arith").mkdir()
    (tmp_path / "arith" / "train.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": "0"}) + "\n" for q in TRAIN))
    (tmp_path / "arith" / "test.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": str(a)}) + "\n" for q, a in TEST))
    (tmp_path / "arith.yaml").write_text(TASK)
    (tmp_path / "arith_mc.yaml").write_text(MC_TASK)
    return tmp_path


def solve(prompt: str) -> int:
    a, b = map(int, re.findall(r"are (\d+) plus (\d+)", prompt)[-1])
    return a + b


class Endpoint(ListsModels):
    """/v1/completions and /v1/chat/completions of a "model" that adds the last question's numbers; a sample
    whose seed is 1 mod 3 is off by one. The second stage of zero-shot CoT repeats the reasoning's number."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
        self.server.requests.append(body)
        if prompt.endswith(ANSWER_TRIGGER):
            text = f" {re.findall(r'= (-?[0-9]+)', prompt)[-1]}."
        else:
            total = solve(prompt) + (1 if (body.get("seed") or 0) % 3 == 1 else 0)
            text = f" The sum is {total}.\n\nQuestion: next"  # the stop strings cut the run-on
            if "step by step" in prompt:
                text = f" We add them: = {total}.\n\nQuestion: next"
        choice = {"index": 0, "finish_reason": "stop"}
        choice.update({"text": text} if "prompt" in body else {"message": {"role": "assistant", "content": text}})
        send_json(self, {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": [choice]})


@pytest.fixture
def endpoint():
    for server in serve(Endpoint, requests=[]):
        yield f"http://127.0.0.1:{server.server_port}/v1", server


def run_cli(capsys, *args):
    assert main(["eval", "tasks", *args, "--json", "--bootstrap-iters", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_self_consistency_over_an_endpoint_fixes_what_one_sample_gets_wrong(tasks_dir, endpoint, capsys):
    url, server = endpoint
    common = ["--base-url", url, "--tasks", "arith", "--include-path", str(tasks_dir), "--data-dir",
              str(tasks_dir), "--fewshot-seed", "1"]  # seed 1: the single sample is the wrong one
    one = run_cli(capsys, *common, "--strategy", "cot")
    assert one["results"]["arith"]["exact_match,flexible-extract"] == 0.0
    voted = run_cli(capsys, *common, "--strategy", "cot", "--samples", "3", "--concurrency", "2", "--log-samples")
    assert voted["results"]["arith"]["exact_match,flexible-extract"] == 1.0
    assert voted["strategy"]["samples"] == 3 and voted["strategy"]["mean_vote_share"] == pytest.approx(2 / 3, abs=1e-4)
    record = voted["strategy_records"][0]
    assert sorted(record["votes"].values()) == [1, 2] and len(record["calls"]) == 3
    assert "prompt" in server.requests[-1] and server.requests[-1]["stop"] == ["Question:", "\n\n"]
    zs = run_cli(capsys, *common, "--strategy", "zero-shot-cot", "--samples", "3", "--answer-format",
                 "#### {answer}", "--log-samples")
    assert zs["results"]["arith"]["exact_match,flexible-extract"] == 1.0
    assert zs["strategy_records"][0]["returned"].startswith("#### ")


def test_direct_over_an_endpoint_passes_the_text_through_and_chat_mode(tasks_dir, endpoint, capsys):
    url, server = endpoint
    out = run_cli(capsys, "--base-url", url, "--tasks", "arith", "--include-path", str(tasks_dir), "--data-dir",
                  str(tasks_dir), "--chat", "--log-samples", "--fewshot-seed", "0")
    assert out["results"]["arith"]["exact_match,flexible-extract"] == 1.0
    assert out["strategy_records"][0]["returned"] == " The sum is 9."
    assert server.requests[0]["messages"][0]["role"] == "user"


def test_multiple_choice_needs_a_local_model_and_exactly_one_model(tasks_dir, endpoint, capsys):
    url, _ = endpoint
    args = ["eval", "tasks", "--tasks", "arith_mc", "--include-path", str(tasks_dir), "--data-dir", str(tasks_dir)]
    assert main([*args, "--base-url", url]) == 2
    assert "need token log-probabilities" in capsys.readouterr().err
    assert main(args) == 2
    assert "exactly one of --model" in capsys.readouterr().err


def test_a_local_model_runs_a_strategy_through_the_cli(tasks_dir, model, tok, tmp_path, capsys):
    llmkit.save(model, tok, tmp_path / "ckpt")
    out = run_cli(capsys, "--model", str(tmp_path / "ckpt"), "--tasks", "arith", "--include-path", str(tasks_dir),
                  "--data-dir", str(tasks_dir), "--strategy", "zero-shot-cot", "--samples", "2", "--limit", "2",
                  "--gen-kwargs", "max_gen_toks=8", "--log-samples")
    assert out["strategy"]["requests"] == 2 and out["strategy"]["model"] == str(tmp_path / "ckpt")
    assert all(len(r["calls"]) == 4 for r in out["strategy_records"])  # 2 samples x (reason, answer)


def test_knn_selection_gives_each_document_its_nearest_demonstrations(tasks_dir):
    task = load_tasks(["arith"], tasks_dir, tasks_dir)["arith"]
    use_demo_selection(task, "knn", WordHashEmbedder(), order="similar_last")
    doc = {"question": "How many apples are 4 plus 5", "answer": "9"}
    ctx = task.fewshot_context(doc, 2)
    shots = re.findall(r"Question: (.*)\n", ctx)
    assert set(shots[:2]) == {TRAIN[0], TRAIN[2]} and ctx.endswith("Question: How many apples are 4 plus 5\nAnswer:")
    scripted = Scripted(lambda p, i, t: f" {solve(p)}")
    results = evaluate(StrategyLM(scripted, "cot"), {"arith": task}, num_fewshot=2, bootstrap_iters=0)
    assert results["results"]["arith"]["exact_match,flexible-extract"] == 1.0
    assert all(TRAIN[0] in p for p in scripted.calls[0]["prompts"])  # every document is an "apples" question
