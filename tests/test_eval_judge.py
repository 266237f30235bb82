"""LLM-as-judge: verdict parsing, position swap, grading, all against a scripted OpenAI-compatible server."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmkit.eval.judge import (JudgeError, OpenAIClient, combine_swapped, judge_pairwise, judge_single,
                               parse_rating, parse_verdict, read_answers)


class Judge(BaseHTTPRequestHandler):
    """A scripted judge. Pairwise: prefers the answer with "GOOD" in it, else answers `position` (bias).
    Single: rates 9 with "GOOD" in the answer, else 2. Fails the first request when `flaky` is set."""

    position = "A"
    flaky = False
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.requests.append((self.path, self.headers.get("Authorization"), body))
        if Judge.flaky:
            Judge.flaky = False
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"busy")
            return
        prompt = body["messages"][-1]["content"]
        if "[The Start of Assistant A's Answer]" in prompt:
            a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)
            b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)
            if ("GOOD" in a) != ("GOOD" in b):
                verdict = "A" if "GOOD" in a else "B"
                reply = f"Assistant {verdict} is clearly better. Final verdict: [[{verdict}]]"
            else:
                reply = f"Both are fine, hard to say. [[{Judge.position}]]"
        else:
            answer = re.search(r"Assistant's Answer\]\n(.*?)\n\[The End", prompt, re.S).group(1)
            reply = "Helpful and correct. Rating: [[9]]" if "GOOD" in answer else "Poor. Rating: [[2]]"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def answers(tmp_path):
    rows = []
    for q in range(6):
        rows.append({"question_id": q, "question": f"Question {q}?", "model": "strong", "answer": f"GOOD answer {q}"})
        rows.append({"question_id": q, "question": f"Question {q}?", "model": "weak", "answer": f"meh {q}"})
        rows.append({"question_id": q, "question": f"Question {q}?", "model": "other",
                     "answer": "GOOD too" if q % 2 else "meh"})
    f = tmp_path / "answers.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.parametrize("text,verdict", [
    ("[[A]]", "A"), ("I think [[B]].", "B"), ("[[C]]", "tie"), ("It is a tie: [[tie]]", "tie"),
    ("Earlier I said [[A]] but on reflection the final verdict is [[B]]", "B"),
    ("Final verdict: B", "B"), ("**Verdict:** A", "A"), ("Assistant A is better overall.", "A"),
    ("It's a tie.", "tie"), ("no idea", None), ("", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("text,rating", [
    ("Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("I'd give it 6/10.", 6.0), ("Score: 4", 4.0), ("Rating: 9", 9.0),
    ("[[12]] is out of range, so Rating: [[3]]", 3.0), ("excellent", None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_swap_turns_position_bias_into_ties():
    assert combine_swapped("A", "A") == ("model_a", True)
    assert combine_swapped("B", "B") == ("model_b", True)
    assert combine_swapped("A", "B") == ("tie", False)  # the judge just picked the first position twice
    assert combine_swapped("tie", "tie") == ("tie", True)
    assert combine_swapped(None, "A") == (None, False)


def test_pairwise_against_a_server(server, answers):
    Judge.position = "A"
    client = OpenAIClient(server, "judge", api_key="secret", backoff=0.01)
    result = judge_pairwise(client, read_answers(answers))
    battles = result["battles"]
    assert len(battles) == 6 * 3 and result["unparsed"] == 0
    strong_vs_weak = [b for b in battles if {b["model_a"], b["model_b"]} == {"strong", "weak"}]
    assert all(b["winner"] == ("model_a" if b["model_a"] == "strong" else "model_b") for b in strong_vs_weak)
    # strong vs other on odd questions: both GOOD, the biased judge says A in both orders -> tie
    both_good = [r for r in result["judgments"] if {r["model_a"], r["model_b"]} == {"strong", "other"}
                 and int(r["question_id"]) % 2]
    assert all(r["winner"] == "tie" and not r["consistent"] for r in both_good)
    assert Judge.requests[-1][0] == "/v1/chat/completions" and Judge.requests[-1][1] == "Bearer secret"
    from llmkit.eval.arena import arena

    ratings = arena(battles, rounds=50)["bradley_terry"]
    assert ratings["strong"] > ratings["other"] > ratings["weak"]


def test_without_swap_bias_goes_through(server, answers):
    Judge.position = "A"
    result = judge_pairwise(OpenAIClient(server, "judge"), read_answers(answers), swap=False)
    both_good = [r for r in result["judgments"] if {r["model_a"], r["model_b"]} == {"strong", "other"}
                 and int(r["question_id"]) % 2]
    assert all(r["winner"] == "model_a" for r in both_good)


def test_single_grading_and_retry(server, answers):
    Judge.flaky = True  # the first request fails with 503 and is retried
    result = judge_single(OpenAIClient(server, "judge", backoff=0.01), read_answers(answers), workers=1)
    assert result["scores"]["strong"] == 9.0 and result["scores"]["weak"] == 2.0
    assert result["scores"]["other"] == pytest.approx((9 * 3 + 2 * 3) / 6)


def test_unreachable_endpoint_is_named():
    client = OpenAIClient("http://127.0.0.1:9/v1", "judge", retries=0, timeout=2)
    with pytest.raises(JudgeError, match=r"127\.0\.0\.1:9/v1/chat/completions"):
        client([{"role": "user", "content": "hi"}])


def test_bad_answers_file(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"question": "q", "model": "m", "answer": "x"}\n{"question": "q", "model": "m"}\n')
    with pytest.raises(JudgeError, match=r"a\.jsonl:2: needs 'model' and 'answer'"):
        read_answers(f)


def test_cli(server, answers, tmp_path, capsys):
    from llmkit.cli import main

    Judge.position = "B"
    out_file = tmp_path / "battles.jsonl"
    assert main(["eval", "judge", "--answers", str(answers), "--base-url", server, "--judge-model", "j",
                 "--battles-out", str(out_file), "--rounds", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arena"]["leaderboard"][0]["model"] == "strong"
    from llmkit.eval.arena import read_battles

    assert len(read_battles(out_file)) == len(out["battles"])
    assert main(["eval", "judge", "--answers", str(answers), "--base-url", server, "--judge-model", "j",
                 "--mode", "single", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scores"]["weak"] == 2.0
