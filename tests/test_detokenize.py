"""StreamDecoder on tokenizers trained here: byte-level BPE, Metaspace BPE and a Llama-style byte-fallback BPE."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from llmkit.infer.detokenize import StreamDecoder

WORDS = (
    "the quick brown fox jumps over lazy dog café naïve résumé crème brûlée Ærøskøbing Zürich "
    "Привет мир 你好 世界 今天 天气 很好 我们 学习 東京 こんにちは 안녕하세요 😀 🎉 👍🏽 🇫🇷 👨‍👩‍👧 ∑ → ½ €"
).split()
SPECIAL = "<|endoftext|>"


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


TEXTS = corpus(40, seed=1) + [
    "  leading spaces, double  spaces and a trailing one ",
    "unseen: 🦄🦄 façade Ελληνικά 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    f"before{SPECIAL} after 🎉",
]


def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[SPECIAL]
    )
    tok.train_from_iterator(corpus(300, seed=0), trainer)
    return tok


def metaspace_bpe() -> Tokenizer:
    # sentencepiece-like: "▁" marks word starts, and decoding strips the first token's leading space.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", SPECIAL])
    tok.train_from_iterator(corpus(300, seed=0), trainer)
    return tok


def llama_style_bpe() -> Tokenizer:
    # Llama-2's tokenizer.json layout: characters outside a small alphabet fall back to <0xNN> byte tokens.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=400, limit_alphabet=60, special_tokens=["<unk>", SPECIAL])
    tok.train_from_iterator(corpus(300, seed=0), trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module", params=[byte_level_bpe, metaspace_bpe, llama_style_bpe])
def tok(request) -> Tokenizer:
    return request.param()


def stream(decode, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    dec = StreamDecoder(decode, skip_special_tokens=skip_special_tokens)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("make", [byte_level_bpe, llama_style_bpe])
def test_multibyte_characters_span_several_tokens(make):
    # Guards the streaming test below: single tokens must decode to incomplete characters.
    tok = make()
    ids = [i for text in TEXTS for i in tok.encode(text).ids]
    assert sum("\ufffd" in tok.decode([i]) for i in ids) > 50


@pytest.mark.parametrize("skip", [False, True])
def test_stream_concatenates_to_full_decode(tok, skip):
    for text in TEXTS:
        ids = tok.encode(text).ids
        deltas = stream(tok.decode, ids, skip)
        assert not any("\ufffd" in d for d in deltas), (text, deltas)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_metaspace_leading_space_survives_mid_stream():
    tok = metaspace_bpe()
    ids = tok.encode("the quick fox").ids
    # Decoded alone every token loses its "▁" space, so decoding only the new tokens would glue words.
    assert [tok.decode([i]) for i in ids] == ["the", "quick", "fox"]
    assert stream(tok.decode, ids) == ["the", " quick", " fox", ""]


def test_emoji_bytes_one_by_one_emit_only_at_the_last_byte():
    emoji = "🦄"  # 4 UTF-8 bytes
    byte_tok = byte_level_bpe()
    byte_chars = byte_tok.pre_tokenizer.pre_tokenize_str(emoji)[0][0]  # one ByteLevel char per byte
    llama_tok = llama_style_bpe()
    for tok, ids in [
        (byte_tok, [byte_tok.token_to_id(c) for c in byte_chars]),
        (llama_tok, [llama_tok.token_to_id(f"<0x{b:02X}>") for b in emoji.encode()]),
    ]:
        assert len(ids) == 4 and None not in ids
        dec = StreamDecoder(tok.decode)
        assert [dec.push(i) for i in ids] == ["", "", "", emoji]
        assert dec.flush() == ""


def test_truncated_character_is_flushed_as_decode_does():
    def decode(ids: list[int], skip_special_tokens: bool = False) -> str:  # token id = byte value
        return bytes(ids).decode("utf-8", errors="replace")

    ids = list("ok €".encode()) + list("🦄".encode())[:2]
    deltas = stream(decode, ids)
    assert deltas[-1] == "\ufffd" and "".join(deltas) == decode(ids)


def test_window_stays_short():
    tok = byte_level_bpe()
    dec = StreamDecoder(tok.decode)
    for i in tok.encode(" ".join(TEXTS)).ids:
        dec.push(i)
        assert len(dec._ids) <= 16  # the prefix plus held-back tokens, never the whole sequence
