"""Constrained decoding through xgrammar: the vocabulary table, JSON Schema / regex / choice constraints on a
tiny random model (every sample parses and validates), clean stops, the engine's per-request processor."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers
import xgrammar as xgr

from llmkit.config import ModelConfig
from llmkit.infer.engine import Engine, RequestOptions
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.prompting.structured import (constraint_from_response_format, default_stop_ids, grammar_processor,
                                         token_bytes)
from llmkit.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TEXT = "First Citizen:\nBefore we proceed any further, hear me  speak.\n\nAll: Speak, speak! \u00e9\u4e2d"

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ratio": {"type": "number"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "boolean"},
                                                              "maxItems": 3}},
            "required": ["id", "tags"],
        },
        "pets": {
            "type": "array", "maxItems": 2,
            "items": {"type": "object", "properties": {"k": {"const": "x"}, "n": {"type": ["integer", "null"]}},
                      "required": ["k", "n"]},
        },
    },
    "required": ["name", "age", "kind", "owner", "pets"],
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([DATA], type="byte-bpe", vocab_size=600)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512)).eval()


def sample(model, tok, proc, n, max_new_tokens=160, seed=0):
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=tuple(proc.stop_ids), logits_processors=(proc,),
                           sampling=SamplingParams(temperature=1.0, seed=seed))
    rows = generate(model, [tok.encode("Data:")] * n, gen, pad_id=tok.pad_id)
    assert all(row[-1] in proc.stop_ids for row in rows), "every sample stops on a stop token, not the length cap"
    return [tok.decode(row[:-1]) for row in rows]


@pytest.mark.parametrize("kind", ["byte-bpe", "bpe", "unigram"])
def test_token_bytes_concatenate_to_the_decoded_text(kind):
    tok = train_tokenizer([DATA], type=kind, vocab_size=600)
    table = token_bytes(tok)
    ids = tok.encode(TEXT)
    assert b"".join(table[i] for i in ids) == tok.decode(ids, skip_special_tokens=True).encode()  # unk: b""
    assert table[tok.eos_id] == b"" and table[tok.token_to_id("<|im_start|>")] == b""  # specials never match text


def test_token_bytes_match_xgrammars_own_reading_of_the_transformers_tokenizer(tok, tmp_path):
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    theirs = xgr.TokenizerInfo.from_huggingface(hf, stop_token_ids=[tok.eos_id])
    ours = xgr.TokenizerInfo(token_bytes(tok), xgr.VocabType.RAW, stop_token_ids=[tok.eos_id])
    # xgrammar keeps a special token's text, so "<|im_start|>" could be sampled inside a JSON string; ours never
    special = {tok.token_to_id(t) for t in tok.backend.get_vocab() if t.startswith("<|")}
    assert set(ours.special_token_ids) == special - {tok.eos_id} and not theirs.special_token_ids  # eos: a stop token
    assert [b for i, b in enumerate(ours.decoded_vocab) if i not in special] == \
        [b for i, b in enumerate(theirs.decoded_vocab) if i not in special]


def test_a_hundred_samples_under_a_nested_schema_all_parse_and_validate(model, tok):
    proc = grammar_processor(tok, json_schema=NESTED)
    texts = sample(model, tok, proc, 100, max_new_tokens=200)
    for text in texts:
        jsonschema.validate(json.loads(text), NESTED)
    assert len(set(texts)) > 90  # sampled, not one string repeated


def test_a_regex_constraint_always_matches(model, tok):
    pattern = r"[A-Z][a-z]{1,6} (is|was) \d{1,3}(\.\d)?%"
    texts = sample(model, tok, grammar_processor(tok, regex=pattern), 50, max_new_tokens=40, seed=1)
    assert all(re.fullmatch(pattern, t) for t in texts), texts
    assert len(set(texts)) > 40


def test_choices_and_json_object(model, tok):
    options = ["yes", "no", "not sure"]
    texts = sample(model, tok, grammar_processor(tok, choices=options), 30, max_new_tokens=10, seed=2)
    assert set(texts) <= set(options) and len(set(texts)) > 1
    proc = grammar_processor(tok, **constraint_from_response_format({"type": "json_object"}))
    first = proc(torch.empty(1, 0, dtype=torch.long), torch.zeros(1, tok.vocab_size))[0]
    assert first[tok.token_to_id("{")] == 0 and first[tok.token_to_id("[")] == float("-inf")  # an object
    proc(torch.tensor([tok.encode('{"a": [1, {"b": null}], "c": "d"}')]), torch.zeros(1, tok.vocab_size))
    assert proc.is_completed()


def test_only_stop_tokens_once_the_grammar_is_complete(tok):
    proc = grammar_processor(tok, choices=["no"])
    ids = tok.encode("no")
    V = tok.vocab_size + 8  # a padded embedding: the extra columns never win
    assert proc(torch.empty(1, 0, dtype=torch.long), torch.zeros(1, V)).isfinite().sum() > 0
    logits = proc(torch.tensor([ids]), torch.zeros(1, V))
    assert torch.nonzero(logits[0].isfinite()).flatten().tolist() == sorted(proc.stop_ids)
    assert proc.is_completed()
    after_stop = proc(torch.tensor([ids + [tok.eos_id]]), torch.zeros(1, V))  # a finished row keeps stopping
    assert torch.nonzero(after_stop[0].isfinite()).flatten().tolist() == sorted(proc.stop_ids)
    assert set(proc.stop_ids) == set(default_stop_ids(tok)) == {tok.eos_id, tok.token_to_id("<|im_end|>")}


def test_a_token_outside_the_grammar_is_a_clear_error(tok):
    proc = grammar_processor(tok, choices=["no"])
    with pytest.raises(ValueError, match="breaks the grammar"):
        proc(torch.tensor([tok.encode("x")]), torch.zeros(1, tok.vocab_size))


def test_bad_constraints(tok):
    with pytest.raises(ValueError, match="exactly one"):
        grammar_processor(tok, regex="a", choices=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        grammar_processor(tok)
    with pytest.raises(ValueError, match="JSON Schema"):
        grammar_processor(tok, json_schema="{not json")
    with pytest.raises(ValueError, match="json_schema.schema"):
        constraint_from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    assert constraint_from_response_format({"type": "text"}) is None
    schema = {"type": "object"}
    assert constraint_from_response_format({"type": "json_schema", "json_schema": {"schema": schema}}) == {
        "json_schema": schema}


def test_the_engine_decodes_each_request_under_its_own_grammar(model, tok):
    engine = Engine(model, max_batch_size=4)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99,
                                                                                 "minimum": 0}},
              "required": ["ok", "n"]}
    outs = []
    for seed in range(3):
        proc = grammar_processor(tok, json_schema=schema)
        opts = RequestOptions(max_new_tokens=40, sampling=SamplingParams(temperature=1.0, seed=seed),
                              eos_token_ids=tuple(proc.stop_ids), logits_processor=proc)
        outs.append(engine.generate([tok.encode("x")], opts)[0])
    for row in outs:
        assert row[-1] in default_stop_ids(tok)
        jsonschema.validate(json.loads(tok.decode(row[:-1])), schema)
