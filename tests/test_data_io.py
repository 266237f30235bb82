"""Data I/O shared by every step: formats, compression, bad input, shards, workers, atomic output, the CLI."""

import gzip
import json
from pathlib import Path

import pytest

from llmkit.cli import main
from llmkit.data.clean import clean
from llmkit.data.io import DataError, StepIO, expand_inputs, parse_shard, read_chunks, select_shard, shard_output

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def squad(n=40):
    with open(DATA / "squad_rag_corpus.jsonl") as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    if str(path).endswith(".zst"):
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    elif str(path).endswith(".gz"):
        data = gzip.open(path).read()
    else:
        data = Path(path).read_bytes()
    return [json.loads(l) for l in data.decode().splitlines()]


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_roundtrip_formats_keep_other_fields(tmp_path, suffix):
    recs = squad(30)
    src = write_jsonl(tmp_path / "in.jsonl", recs)
    report = clean(StepIO([str(src)], str(tmp_path / f"out.{suffix}"), progress=False))
    out = read_jsonl(tmp_path / f"out.{suffix}")
    assert report["documents_in"] == report["documents_out"] == 30
    assert [r["id"] for r in out] == [r["id"] for r in recs] and out[0]["title"] == recs[0]["title"]
    assert json.loads((tmp_path / f"out.{suffix}.report.json").read_text())["documents_out"] == 30
    # the output can be read back as input (compressed input detected by magic bytes)
    again = clean(StepIO([str(tmp_path / f"out.{suffix}")], str(tmp_path / "again.jsonl"), progress=False))
    assert again["documents_out"] == 30


def test_text_units_and_compressed_text(tmp_path):
    src = tmp_path / "a.txt.gz"
    with gzip.open(src, "wt") as f:
        f.write("first doc line one\nstill first\n\n\nsecond doc\n")
    para = clean(StepIO([str(src)], str(tmp_path / "p.jsonl"), unit="paragraph", progress=False))
    assert [r["text"] for r in read_jsonl(tmp_path / "p.jsonl")] == ["first doc line one\nstill first", "second doc"]
    assert para["documents_in"] == 2
    line = clean(StepIO([str(src)], str(tmp_path / "l.txt"), unit="line", progress=False))
    assert line["documents_in"] == 5 and line["rules"]["empty"]["removed"] == 2  # blank lines = empty docs
    assert (tmp_path / "l.txt").read_text() == "first doc line one\nstill first\nsecond doc\n"


@pytest.mark.parametrize("line, fragment", [
    (b'{"text": "ok", \n', "malformed JSON"),
    (b'{"body": "no text field"}\n', "no 'text' field"),
    (b'{"text": 5}\n', "non-string"),
    (b'["a list"]\n', "expected a JSON object"),
    (b'{"text": "bad \xff byte"}\n', "not valid UTF-8"),
])
def test_bad_input_names_file_and_line(tmp_path, line, fragment, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "good one"}\n{"text": "good two"}\n' + line + b'{"text": "good three"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{fragment}"):
        clean(StepIO([str(src)], str(out), progress=False))
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.tmp*"))  # nothing half-written
    code = main(["data", "clean", "--input", str(src), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:3" in err and len(err.strip().splitlines()) == 1
    report = clean(StepIO([str(src)], str(out), skip_bad=True, progress=False))
    assert report["documents_in"] == 3 and report["bad_input"]["count"] == 1
    assert "bad.jsonl:3" in report["bad_input"]["examples"][0]["error"]
    assert [r["text"] for r in read_jsonl(out)] == ["good one", "good two", "good three"]


def test_workers_give_the_same_output(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", squad(120))
    from llmkit.data import io as dio

    chunks = list(read_chunks([str(src)], chunk_docs=7))  # many small chunks through the pool
    a = clean(StepIO([str(src)], str(tmp_path / "a.jsonl"), workers=1, progress=False), )
    b = dio.run_map("clean", StepIO([str(src)], str(tmp_path / "b.jsonl"), workers=2, progress=False),
                    __import__("llmkit.data.clean", fromlist=["Cleaner"]).Cleaner(), chunks=iter(chunks))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a["documents_out"] == b["documents_out"] == 120


def test_shards(tmp_path):
    files = []
    for i in range(5):
        files.append(str(write_jsonl(tmp_path / f"part{i}.jsonl", [{"text": f"document number {i}"}])))
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) == (0, 1)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(DataError):
            parse_shard(bad)
    assert select_shard(files, (1, 3)) == [files[1], files[4]]
    assert shard_output("out/x.jsonl.gz", (3, 8)) == "out/x-00003-of-00008.jsonl.gz"
    assert shard_output("out/{shard}/x.jsonl", (3, 8)) == "out/00003/x.jsonl"
    assert expand_inputs([str(tmp_path / "part*.jsonl")]) == files
    seen = []
    for i in range(3):
        code = main(["data", "clean", "--input", str(tmp_path / "part*.jsonl"), "--output",
                     str(tmp_path / "o" / "c.jsonl"), "--shard", f"{i}/3", "--quiet"])
        assert code == 0
        seen += [r["text"] for r in read_jsonl(tmp_path / "o" / f"c-0000{i}-of-00003.jsonl")]
    assert sorted(seen) == [f"document number {i}" for i in range(5)]


def test_cli_yaml_config_and_json(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"body": "Hello   world  "}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: [{src}]\noutput: {tmp_path / 'o.jsonl'}\ntext_field: body\nquiet: true\n")
    assert main(["data", "clean", "--config", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents_out"] == 1 and read_jsonl(tmp_path / "o.jsonl") == [{"body": "Hello world"}]


def test_missing_input_is_one_line(tmp_path, capsys):
    assert main(["data", "dedup", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
