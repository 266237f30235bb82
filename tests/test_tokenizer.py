"""Tokenizer tests: parity with transformers (ids, special tokens, chat strings), loading HF dirs, errors."""

import json
import unicodedata
from pathlib import Path

import jinja2
import pytest

transformers = pytest.importorskip("transformers")

from llmkit.tokenizer import (  # noqa: E402
    CHATML_TEMPLATE,
    DEFAULT_SPECIAL_TOKENS,
    LLAMA_TEMPLATE,
    TYPES,
    Tokenizer,
    TokenizerError,
    chat_template_by_name,
    compression,
    train_tokenizer,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"

# Synthetic documents so every type sees accents, CJK, emoji, tabs and \r: then bpe and unigram round-trip them.
DOCS = [
    "Café naïve résumé — déjà vu, señor Ångström.",
    "日本語のテキストと中文的句子。",
    "emoji 🙂👍🏽 and 🚀 in a line",
    "tabs\tbetween\twords\r\nand windows line ends\r\n",
    "code:    indented    by    spaces",
]
TEXTS = [
    "Hello, world!",
    "  leading and   multiple spaces\tand\ttabs\n\nnewlines\r\n",
    "Café naïve résumé — déjà vu",
    "日本語のテキスト 中文",
    "emoji 🙂👍🏽 mix 🚀",
    "<|bos|>special<|eos|> in <|im_start|>user text",
    "",
    " ",
    "\n",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Café? 🙂"},
]
# Types trained with add_bos=True, so both post-processor paths are checked against transformers.
ADD_BOS = {"bpe": True, "wordpiece": True, "byte-bpe": False, "unigram": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"training text not found: {SHAKESPEARE}")
    root = tmp_path_factory.mktemp("corpus")
    txt = root / "shakespeare.txt"
    txt.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS * 3)), encoding="utf-8")
    return [txt, jsonl]


def _train_and_save(kind: str, corpus: list[Path], path: Path):
    tok = train_tokenizer(corpus, kind, vocab_size=500, add_bos=ADD_BOS[kind])
    tok.save(path)
    return kind, tok, path, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=TYPES)
def trained(request, corpus, tmp_path_factory):
    """(type, our tokenizer, its saved dir, transformers' tokenizer loaded from that dir)."""
    return _train_and_save(request.param, corpus, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def byte_bpe(corpus, tmp_path_factory):
    return _train_and_save("byte-bpe", corpus, tmp_path_factory.mktemp("byte-bpe"))


def test_ids_match_transformers(trained):
    kind, tok, _, hf = trained
    for text in TEXTS:
        for add_special in (False, True):
            assert tok.encode(text, add_special) == hf.encode(text, add_special_tokens=add_special), (text, add_special)
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.encode_batch(TEXTS, True) == [tok.encode(t, True) for t in TEXTS]
    assert (tok.encode("", True) == [tok.bos_id]) == ADD_BOS[kind]


def test_special_tokens_match_transformers(trained):
    _, tok, _, hf = trained
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(tok, f"{role}_token") == getattr(hf, f"{role}_token") == DEFAULT_SPECIAL_TOKENS[role]
        assert getattr(tok, f"{role}_id") == getattr(hf, f"{role}_token_id")
    assert set(hf.all_special_tokens) == set(DEFAULT_SPECIAL_TOKENS.values())
    assert tok.vocab_size == len(hf) == 500
    # Specials are whole tokens, never split, in the text as well.
    assert tok.encode("<|im_start|><|im_end|>") == [tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")]


def test_decode_round_trip(trained):
    kind, tok, _, _ = trained
    if kind == "wordpiece":
        pytest.skip("wordpiece normalises whitespace away")
    for text in TEXTS + DOCS:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    if kind == "byte-bpe":  # any string at all, even unseen characters and decomposed accents
        odd = "e\u0301 \x00\x7f 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ"
        assert tok.decode(tok.encode(odd)) == odd
        assert tok.unk_id not in tok.encode(odd)


@pytest.mark.parametrize("name", ["chatml", "llama"])
def test_chat_template_matches_transformers(name, trained, tmp_path):
    _, tok, _, _ = trained
    tok.chat_template = chat_template_by_name(name)
    try:
        tok.save(tmp_path)
    finally:
        tok.chat_template = CHATML_TEMPLATE  # the fixture is shared
    ours = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for gen in (False, True):
        text = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True) == ids


def test_chat_template_strings():
    tok = Tokenizer(backend=None, bos_token="<s>", eos_token="</s>", chat_template=CHATML_TEMPLATE)
    chatml = tok.apply_chat_template(MESSAGES[:3], add_generation_prompt=True)
    assert chatml == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>assistant\n"
    )
    tok.chat_template = LLAMA_TEMPLATE
    assert tok.apply_chat_template(MESSAGES) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHello there [/INST] Hi. </s><s>[INST] Café? 🙂 [/INST]"
    )
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(TokenizerError, match="unknown chat template"):
        chat_template_by_name("vicuna")


def test_load_llmkit_dir(trained):
    _, tok, path, _ = trained
    back = Tokenizer.load(path)
    # Not to_str(): unigram scores come back from JSON a last digit off.
    assert back.backend.get_vocab() == tok.backend.get_vocab()
    assert back.encode_batch(TEXTS, True) == tok.encode_batch(TEXTS, True)
    assert back.special_tokens_map == tok.special_tokens_map
    assert back.extra_special_tokens == tok.extra_special_tokens == ["<|im_start|>", "<|im_end|>"]
    assert back.chat_template == tok.chat_template and back.model_max_length is None


def test_load_dir_saved_by_transformers(trained, tmp_path):
    _, tok, _, hf = trained
    hf.save_pretrained(tmp_path)  # transformers 5 layout: chat_template.jinja, no special_tokens_map.json
    back = Tokenizer.load(tmp_path)
    for text in TEXTS:
        for add_special in (False, True):
            assert back.encode(text, add_special) == hf.encode(text, add_special_tokens=add_special)
    assert back.special_tokens_map == tok.special_tokens_map == hf.special_tokens_map
    assert back.extra_special_tokens == tok.extra_special_tokens
    assert back.chat_template == tok.chat_template


def test_load_hf_config_variants(trained, tmp_path):
    """Older configs: AddedToken dicts, additional_special_tokens, named templates, add_*_token flags."""
    _, tok, path, _ = trained
    (tmp_path / "tokenizer.json").write_text((path / "tokenizer.json").read_text(encoding="utf-8"), encoding="utf-8")
    config = {
        "bos_token": {"content": "<|bos|>", "lstrip": False, "__type": "AddedToken"},
        "eos_token": "<|eos|>",
        # transformers 5 rejects AddedToken dicts in this list (TypeError in add_tokens), so strings only
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": LLAMA_TEMPLATE}],
        "add_bos_token": True,
        "add_eos_token": True,
        "model_max_length": 2048,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    back = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert back.bos_token == hf.bos_token == "<|bos|>" and back.pad_token is None
    assert back.extra_special_tokens == ["<|im_start|>", "<|im_end|>"]
    assert back.chat_template == LLAMA_TEMPLATE and back.model_max_length == 2048
    for text in TEXTS:
        # transformers 5 ignores add_bos_token / add_eos_token when there is a tokenizer.json
        assert back.encode(text, True) == hf.encode(text) == tok.encode(text, True)


def test_load_gpt2_vocab_merges_dir(byte_bpe, tmp_path):
    _, tok, _, _ = byte_bpe
    tok.backend.model.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    ours = Tokenizer.load(tmp_path)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert ours.bos_token == ours.eos_token == ours.unk_token == hf.eos_token == "<|endoftext|>"
    assert ours.eos_id == hf.eos_token_id and ours.vocab_size == len(hf)
    for text in [*TEXTS, "end<|endoftext|>start"]:
        for add_special in (False, True):
            assert ours.encode(text, add_special) == hf.encode(text, add_special_tokens=add_special)
        assert ours.decode(ours.encode(text)) == hf.decode(ours.encode(text)) == text
    # Without tokenizer.json, transformers builds the bos/eos post-processor from the config's flags.
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": true, "eos_token": "<|eos|>"}', encoding="utf-8")
    ours = Tokenizer.load(tmp_path)
    hf = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert ours.eos_token == hf.eos_token == "<|eos|>"
    for text in TEXTS:
        assert ours.encode(text, True) == hf.encode(text) == [hf.bos_token_id, *ours.encode(text)]


def test_save_replaces_files_in_existing_dir(trained, tmp_path):
    _, tok, _, hf = trained
    hf.save_pretrained(tmp_path)  # leaves a chat_template.jinja that transformers would prefer over our config
    tok.chat_template = LLAMA_TEMPLATE
    try:
        tok.save(tmp_path)
    finally:
        tok.chat_template = CHATML_TEMPLATE
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"
    ]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == LLAMA_TEMPLATE


def test_template_environment_matches_transformers(byte_bpe, tmp_path):
    """Features Hub templates use: {% generation %}, tojson (no HTML escaping), kwargs, loop controls, namespace."""
    _, tok, _, _ = byte_bpe
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m | tojson }}{% endif %}\n"
        "{% endfor %}{{ ns.n }} {{ greeting }} {{ tools | tojson }} {{ bos_token }}"
    )
    other = Tokenizer(tok.backend, bos_token="<|bos|>", chat_template=template)
    other.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [*MESSAGES, {"role": "user", "content": "a < b && c > d", "name": None}]
    tools = [{"name": "f", "description": "<tool>"}]
    ours = other.apply_chat_template(messages, greeting="hi", tools=tools)
    assert ours == hf.apply_chat_template(messages, tokenize=False, greeting="hi", tools=tools)
    assert '"a < b && c > d"' in ours and "null" not in ours


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="nowhere.*not found"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match=f"{tmp_path}.*tokenizer.json is required"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 1}', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load"):
        Tokenizer.load(tmp_path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "kwargs", "match"),
    [
        ("empty.txt", b"\n\n  \n", {}, r"no text found in .*empty\.txt"),
        ("empty.jsonl", b"", {}, r"no text found in .*empty\.jsonl"),
        ("empty.txt", b"", {"type": "unigram"}, r"no text found in .*empty\.txt"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', {}, r"bad\.jsonl:2: malformed JSON"),
        ("field.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', {}, r"field\.jsonl:3: .*'text' field"),
        ("field.jsonl", b'{"body": "b"}\n', {"text_field": "content"}, r"field\.jsonl:1: .*'content' field"),
        ("type.jsonl", b'{"text": 3}\n', {}, r"type\.jsonl:1: field 'text' should be a string"),
        ("latin1.txt", b"fine\ncaf\xe9\n", {}, r"latin1\.txt:2: not valid UTF-8"),
        ("small.txt", b"hello world\n", {"vocab_size": 100}, r"vocab_size=100 is too small for byte-bpe.*262"),
        ("small.txt", b"hello world\n", {"type": "bpe", "vocab_size": 10}, r"vocab_size=10 is too small: .*small\.txt"),
        ("small.txt", b"hello world\n", {"type": "unigram", "vocab_size": 10}, r"vocab_size=10 .*small\.txt"),
        ("small.txt", b"hello world\n", {"type": "unigram", "vocab_size": 8}, r"vocab_size=8 .*small\.txt.*not large"),
        ("small.txt", b"hi\n", {"type": "wordpiece", "special_tokens": {"bos": "<s>"}}, r"needs an 'unk'"),
        ("small.txt", b"hi\n", {"type": "sentencepiece"}, r"unknown tokenizer type"),
    ],
)
def test_train_errors(tmp_path, name, data, kwargs, match):
    with pytest.raises(TokenizerError, match=match):
        train_tokenizer([_write(tmp_path / name, data)], **{"vocab_size": 300, "min_frequency": 1, **kwargs})


def test_train_file_errors(tmp_path):
    ok = _write(tmp_path / "ok.txt", b"hello\n")
    with pytest.raises(TokenizerError, match=r"missing\.txt: no such file"):
        train_tokenizer([ok, tmp_path / "missing.txt"], vocab_size=300)
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(TokenizerError, match=r"dir\.txt: no such file"):
        train_tokenizer([tmp_path / "dir.txt"], vocab_size=300)


def test_compression():
    import tokenizers
    from tokenizers import models, pre_tokenizers

    backend = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # "hello world": 11 bytes, 2 tokens; "héllo": 6 bytes (é is 2), 1 token -> 17 / 3
    assert compression(Tokenizer(backend), ["hello world", "héllo"]) == pytest.approx(17 / 3)
    with pytest.raises(TokenizerError):
        compression(Tokenizer(backend), [""])
