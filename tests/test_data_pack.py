"""Packing: pack -> unpack reproduces the tokenized documents; index, dtype, errors."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from llmkit.cli import main
from llmkit.data.pack import PackError, load_tokens, pack_documents, read_index, tokenizer_hash
from llmkit.tokenizer import Tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([DATA / "alpaca_2k.jsonl"], "byte-bpe", 600, text_field="output").save(out)
    return out


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    docs, start = [], 0
    for i in np.flatnonzero(tokens == eos):
        docs.append(tokens[start:i].tolist())
        start = i + 1
    return docs


def test_pack_unpack_round_trip(tok_dir, tmp_path, capsys):
    src = tmp_path / "alpaca.jsonl.gz"
    records = [json.loads(line) for line in (DATA / "alpaca_2k.jsonl").read_text().splitlines()[:300]]
    with gzip.open(src, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    code = main(["data", "pack", "--input", str(src), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "p"),
                 "--text-field", "output", "--val-fraction", "0.2", "--json"])
    assert code == 0
    meta = json.loads(capsys.readouterr().out)
    tok = Tokenizer.load(tmp_path / "p" / "tokenizer")
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == tokenizer_hash(tok)
    assert meta["documents"]["train"] + meta["documents"]["val"] == 300 and meta["documents"]["val"] > 20
    unpacked = split_docs(load_tokens(tmp_path / "p", "train"), tok.eos_id) + \
        split_docs(load_tokens(tmp_path / "p", "val"), tok.eos_id)
    expected = [tok.encode(r["output"]) for r in records]
    assert sorted(map(tuple, unpacked)) == sorted(map(tuple, expected))
    assert sorted(tok.decode(d) for d in unpacked) == sorted(r["output"] for r in records)
    assert read_index(tmp_path / "p")["tokens"]["train"] == len(load_tokens(tmp_path / "p", "train"))


def test_wide_vocabularies_use_uint32(tmp_path):
    class Wide:
        vocab_size, eos_id = 70_000, 69_999
        backend = type("B", (), {"to_str": lambda self: "wide"})()

        def encode_batch(self, texts):
            return [[65_000 + len(t)] for t in texts]

        def save(self, path):
            Path(path).mkdir()

    meta = pack_documents(["a", "bb"], Wide(), tmp_path / "p", val_fraction=0.0, progress=False)
    assert meta["dtype"] == "uint32"
    assert load_tokens(tmp_path / "p", "train").tolist() == [65_001, 69_999, 65_002, 69_999]


def test_bad_input_and_existing_output(tok_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    code = main(["data", "pack", "--input", str(bad), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in err and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]
    good = tmp_path / "good.txt"
    good.write_text("one paragraph\n\nanother one\n")
    assert main(["data", "pack", "--input", str(good), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o")]) == 0
    with pytest.raises(PackError, match="already exists"):
        pack_documents(["x"], Tokenizer.load(tok_dir), tmp_path / "o")
