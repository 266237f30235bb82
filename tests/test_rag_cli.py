"""`llmkit rag index|search|ask|eval` end to end, and bad input: one line on stderr, exit 2, no index left."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from llmkit.cli import main

DOCS = {
    "oxygen.md": "# Oxygen\n\nOxygen was discovered by Carl Wilhelm Scheele in Uppsala in 1773.\n\n"
                 "## Uses\n\nOxygen is used in steelmaking and in medicine.\n",
    "nile.txt": "The Nile is a major north-flowing river in northeastern Africa. It flows into the Mediterranean.\n",
    "tea.html": "<html><head><title>Tea</title></head><body><article><h1>Green tea</h1><p>Green tea is brewed at "
                "80 degrees for two minutes, which keeps it from turning bitter.</p></article></body></html>",
}



class Scripted(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        text = "Scheele discovered it in 1773 [1]."
        if body.get("stream"):
            self.send_response(200)
            self.end_headers()
            for word in text.split(" "):
                self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {'content': word + ' '}}]})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        data = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.bodies = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import llmkit
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer import train_tokenizer

    text = tmp_path_factory.mktemp("tok") / "t.txt"
    text.write_text(" ".join(DOCS.values()) * 20)
    tok = train_tokenizer([text], "byte-bpe", 300, min_frequency=1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    llmkit.save(Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)), tok, out)
    return out


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_rag_commands_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["rag", "--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("index", "search", "ask", "eval"))
    with pytest.raises(SystemExit):
        main(["rag", "index", "--help"])
    out = capsys.readouterr().out
    assert "--chunk-size" in out and "default: 128" in out and "--uri" in out and "--keep-missing" in out


def test_index_search_ask_eval(workdir, endpoint, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    code, out, err = run(["rag", "index", "--input", "docs", "--index", "idx.db", "--tags", "demo", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert (report["added"], report["documents"]) == (3, 3) and report["embedder"].endswith("all-MiniLM-L6-v2")
    assert "embedding" in err  # progress goes to stderr
    code, out, _ = run(["rag", "index", "--input", "docs", "--index", "idx.db", "--tags", "demo", "--json",
                        "--quiet"], capsys)
    assert code == 0 and json.loads(out)["unchanged"] == 3 and json.loads(out)["chunks_added"] == 0

    code, out, _ = run(["rag", "search", "--index", "idx.db", "--k", "2", "--tag", "demo", "--json",
                        "who discovered oxygen"], capsys)
    hits = json.loads(out)["hits"]
    assert code == 0 and hits[0]["doc_id"] == "docs/oxygen.md" and hits[0]["heading"] == "Oxygen"

    code, _, err = run(["rag", "search", "--index", "idx.db", "--embedder", f"llmkit:{tiny_checkpoint}", "q"], capsys)
    assert code == 2 and "embedded with sentence-transformers:all-MiniLM-L6-v2 (dim 384), not llmkit:tiny" in err

    code, out, err = run(["rag", "ask", "--index", "idx.db", "--base-url", endpoint, "--json",
                          "--cache", "cache.json", "Who discovered oxygen?"], capsys)
    assert code == 0, err
    answer = json.loads(out)
    assert answer["text"] == "Scheele discovered it in 1773 [1]." and answer["found"]
    assert answer["citations"][0]["source"] == "docs/oxygen.md" and answer["cache"]["misses"] == 1
    code, out, _ = run(["rag", "ask", "--index", "idx.db", "--base-url", endpoint, "--json",
                        "--cache", "cache.json", "who discovered oxygen"], capsys)
    assert json.loads(out)["cached"] and json.loads(out)["cache"]["hits"] == 1

    code, out, err = run(["rag", "ask", "--index", "idx.db", "--base-url", endpoint, "--stream",
                          "Who discovered oxygen?"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].strip() == "Scheele discovered it in 1773 [1]." and lines[2].startswith(
        "[1] docs/oxygen.md (docs/oxygen.md, characters 0-")
    code, out, _ = run(["rag", "ask", "--index", "idx.db", "--base-url", endpoint, "--min-score", "0.99",
                        "Who discovered oxygen?"], capsys)
    assert out.strip() == "Not found in the documents."

    q = workdir / "q.jsonl"
    q.write_text(json.dumps({"question": "Who discovered oxygen?", "gold": "docs/oxygen.md",
                             "answers": ["Carl Wilhelm Scheele"]}) + "\n" +
                 json.dumps({"question": "Which river flows north in Africa?", "gold": ["docs/nile.txt"]}) + "\n")
    code, out, err = run(["rag", "eval", "--index", "idx.db", "--questions", str(q), "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) == {"dense", "bm25", "hybrid"}
    for mode in metrics.values():
        assert set(mode) == {"recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"}
    assert metrics["hybrid"]["recall@1"] == 1.0
    code, out, _ = run(["rag", "eval", "--index", "idx.db", "--questions", str(q), "--base-url", endpoint,
                        "--modes", "hybrid", "--json", "--quiet"], capsys)
    result = json.loads(out)
    assert set(result) == {"hybrid", "answers"} and set(result["answers"]) == {"exact_match", "f1"}
    assert 0 < result["answers"]["f1"] < 1  # "Scheele discovered it in 1773" vs "Carl Wilhelm Scheele"


def test_removed_document_disappears_via_cli(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / "two").mkdir()
    for name in ("oxygen.md", "nile.txt"):
        (workdir / "two" / name).write_text(DOCS[name])
    assert run(["rag", "index", "--input", "two", "--index", "two.db", "--quiet"], capsys)[0] == 0
    (workdir / "two" / "nile.txt").unlink()
    code, out, _ = run(["rag", "index", "--input", "two", "--index", "two.db", "--quiet", "--json"], capsys)
    assert code == 0 and json.loads(out)["deleted"] == 1
    code, out, _ = run(["rag", "search", "--index", "two.db", "--json", "--k", "5", "river Africa"], capsys)
    assert all(h["doc_id"] != "two/nile.txt" for h in json.loads(out)["hits"])


@pytest.mark.parametrize("files, argv, fragment", [
    ({"bad.jsonl": '{"text": "ok"}\n{"title": "no text"}\n'}, ["--input", "IN/bad.jsonl"],
     "bad.jsonl:2: no 'text' field"),
    ({"empty.txt": ""}, ["--input", "IN/empty.txt"], "empty.txt: empty document"),
    ({"broken.pdf": "%PDF-1.7 garbage"}, ["--input", "IN"], "broken.pdf: unreadable PDF"),
    ({"a.txt": "x"}, ["--input", "IN", "--chunk-overlap", "200"], "chunk overlap must be >= 0 and < chunk size"),
    ({"a.txt": "x"}, ["--input", "IN", "--embedder", "IN/nope"], "in/nope': not a directory"),
])
def test_bad_input_exits_2_with_one_line_and_no_index(tmp_path, capsys, files, argv, fragment):
    src = tmp_path / "in"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    argv = [a.replace("IN", str(src)) for a in argv]
    code, out, err = run(["rag", "index", *argv, "--index", str(tmp_path / "x.db"), "--quiet"], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "x.db").exists() and not list(tmp_path.glob(".x*"))


def test_query_errors_exit_2(workdir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    code, _, err = run(["rag", "search", "--index", str(tmp_path / "missing.db"), "q"], capsys)
    assert code == 2 and "missing.db: no such index" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["rag", "ask", "--index", "idx.db", "question"], capsys)
    assert code == 2 and "exactly one of --model DIR" in err
    code, _, err = run(["rag", "eval", "--index", "idx.db", "--questions", "nope.jsonl"], capsys)
    assert code == 2 and "nope.jsonl: questions file not found" in err
    code, _, err = run(["rag", "ask", "--index", str(tmp_path / "missing.db"), "--base-url", "ftp://x", "q"], capsys)
    assert code == 2 and "--base-url must start with http" in err


def test_a_lite_index_in_use_by_another_process_is_one_clear_error(workdir, capsys, monkeypatch):
    import subprocess
    import sys

    from llmkit.rag.embed import Embedder
    from llmkit.rag.index import Index, build_index
    from llmkit.rag.ingest import Document

    class Const(Embedder):
        kind, name, spec, dim, fingerprint = "test", "test:const", "test:const", 4, ""

        def _embed_batch(self, texts):
            import numpy as np

            return np.ones((len(texts), 4), dtype=np.float32)

    path = workdir / "busy.db"
    build_index([Document("a", "alpha", "a.txt")], path, embedder=Const())
    with Index.open(path, embedder=Const()):  # this process holds Milvus Lite's lock on the file
        proc = subprocess.run([sys.executable, "-m", "llmkit", "rag", "search", "--index", str(path), "alpha"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-1500:]
    assert "busy.db: cannot open Milvus" in proc.stderr and "another process" in proc.stderr
