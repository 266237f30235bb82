"""SFT data: formats, chat rendering, prompt masking, truncation, packing, resumable batches, errors."""

import json
from pathlib import Path

import pytest
import torch

from llmkit.data.io import DataError
from llmkit.data.sft import IGNORE, SFTBatches, collate, encode_example, load_sft, record_to_messages, split_val
from llmkit.tokenizer import CHAT_TEMPLATES, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, please?"},
    {"role": "assistant", "content": "Green, and then red."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("sft") / "corpus.txt"
    records = (DATA / "alpaca_2k.jsonl").read_text().splitlines()
    corpus.write_text("\n".join(json.loads(line)["output"] for line in records))
    return train_tokenizer([corpus], "byte-bpe", 400, chat_template=CHAT_TEMPLATES["chatml"])


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_labels_are_exactly_the_assistant_tokens(tok):
    example, truncated = encode_example(tok, CHAT, "x:1", max_seq_len=512)
    assert not truncated
    # the expected mask, built independently: tokenize the ChatML pieces one by one (special tokens and the
    # newline after the role are token boundaries, so the pieces' ids concatenate to the whole string's ids)
    pieces = []
    for m in CHAT:
        pieces.append((f"<|im_start|>{m['role']}\n", False))
        pieces.append((m["content"] + "<|im_end|>\n", m["role"] == "assistant"))
    ids, mask = [], []
    for text, train in pieces:
        piece = tok.encode(text)
        ids += piece
        mask += [train] * len(piece)
    assert example.input_ids == ids[:-1]  # the same ids inference sees
    expected = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    assert example.labels == expected
    learned = tok.decode([t for t in example.labels if t != IGNORE])
    assert learned == "Blue.<|im_end|>\nGreen, and then red.<|im_end|>\n"


def test_train_on_prompt_and_weight_zero(tok):
    everything, _ = encode_example(tok, CHAT, "x:1", 512, train_on_prompt=True)
    assert IGNORE not in everything.labels
    muted = [dict(m, weight=0) if m["content"] == "Blue." else m for m in CHAT]
    example, _ = encode_example(tok, muted, "x:1", 512)
    assert tok.decode([t for t in example.labels if t != IGNORE]) == "Green, and then red.<|im_end|>\n"


def test_llama_template_masks_replies(tok):
    tok2 = type(tok)(**{**tok.__dict__, "chat_template": CHAT_TEMPLATES["llama"]})
    tok2.bos_token, tok2.eos_token = tok.bos_token, tok.eos_token
    example, _ = encode_example(tok2, CHAT, "x:1", 512)
    learned = tok2.decode([t for t in example.labels if t != IGNORE])
    assert "Blue." in learned and "Green, and then red." in learned and "colour" not in learned


def test_formats_render_to_the_same_chat(tmp_path):
    alpaca = record_to_messages({"instruction": "Add", "input": "2 and 3", "output": "5"}, "auto", "f:1")
    assert alpaca == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    share = record_to_messages({"conversations": [{"from": "human", "value": "Add\n\n2 and 3"},
                                                  {"from": "gpt", "value": "5"}]}, "auto", "f:2")
    assert share == alpaca
    openai = record_to_messages({"messages": alpaca}, "auto", "f:3", system_prompt="Be exact.")
    assert openai[0] == {"role": "system", "content": "Be exact."} and openai[1:] == alpaca
    assert record_to_messages({"text": "plain"}, "auto", "f:4") == "plain"


def test_plain_text_is_trained_everywhere(tok, tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("The first paragraph.\nStill first.\n\nThe second one.\n")
    examples, stats = load_sft([str(f)], tok, 64)
    assert stats.records == 2
    for e in examples:
        assert IGNORE not in e.labels and e.labels[-1] == tok.eos_id


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": ', "malformed JSON"),
    ('{"instruction": "x"}', "unknown record format"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "turn 0 has role='robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_record_names_file_and_line(tok, tmp_path, line, message):
    good = json.dumps({"instruction": "Say hi", "input": "", "output": "Hi"})
    f = write_jsonl(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        load_sft([str(f)], tok, 64)


def test_truncation_is_counted_and_warned(tok, tmp_path, capsys):
    long = {"instruction": "Repeat", "input": "", "output": "word " * 200}
    short = {"instruction": "Say hi", "input": "", "output": "Hi"}
    f = write_jsonl(tmp_path / "d.jsonl", [long, short, long])
    examples, stats = load_sft([str(f)], tok, 32)
    assert stats.truncated == 2 and stats.records == 3 and len(examples) == 3
    assert all(len(e) <= 32 for e in examples)
    assert "2 of 3 examples were longer than max_seq_len=32" in capsys.readouterr().err


def test_alpaca_sample_loads_with_a_val_split(tok):
    examples, stats = load_sft([str(DATA / "alpaca_2k.jsonl")], tok, 256, verbose=False, limit=200)
    train, val = split_val(examples, 0.1, seed=0)
    assert len(val) == 20 and len(train) == 180
    assert {e.where for e in val}.isdisjoint(e.where for e in train)
    assert all(e.where.startswith(str(DATA / "alpaca_2k.jsonl") + ":") for e in examples)


def test_packing_restarts_positions_and_separates_segments(tok, tmp_path):
    records = [{"instruction": f"Count to {i}", "input": "", "output": " ".join(map(str, range(i)))}
               for i in range(1, 13)]
    examples, _ = load_sft([str(write_jsonl(tmp_path / "d.jsonl", records))], tok, 64)
    batches = SFTBatches(examples, batch_size=2, seq_len=128, pad_id=0, pack=True, seed=1)
    batch = batches.next_batch()
    seg, pos, labels = batch["segment_ids"], batch["position_ids"], batch["labels"]
    assert seg.shape == (2, 128) and int(seg.max()) >= 2  # several examples in a row
    for row in range(2):
        for s in range(1, int(seg[row].max()) + 1):
            where = (seg[row] == s).nonzero().view(-1)
            assert torch.equal(pos[row, where], torch.arange(len(where)))  # positions restart per example
        assert (labels[row][seg[row] == 0] == IGNORE).all()  # padding is never a target


def test_batches_resume_exactly(tok, tmp_path):
    records = [{"instruction": f"Item {i}", "input": "", "output": f"Answer {i}"} for i in range(7)]
    examples, _ = load_sft([str(write_jsonl(tmp_path / "d.jsonl", records))], tok, 64)
    straight = SFTBatches(examples, 3, 64, pack=False, seed=5)
    expected = [straight.next_batch()["input_ids"] for _ in range(6)]  # crosses two epoch boundaries
    first = SFTBatches(examples, 3, 64, pack=False, seed=5)
    got = [first.next_batch()["input_ids"] for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = SFTBatches(examples, 3, 64, pack=False, seed=5)
    resumed.load_state_dict(state)
    got += [resumed.next_batch()["input_ids"] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_collate_right_pads_with_ignored_labels():
    from llmkit.data.sft import SFTExample

    batch = collate([[SFTExample([5, 6, 7], [6, 7, 8], "a")], [SFTExample([9], [IGNORE], "b")]], None, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 8], [IGNORE, IGNORE, IGNORE]]
