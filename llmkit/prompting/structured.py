"""Constrained decoding: output that always parses (JSON Schema, any JSON object, a regex, one of a list).

xgrammar compiles the constraint against the tokenizer's vocabulary; `GrammarProcessor` walks the grammar as
tokens are generated and masks every token that would leave it, inside llmkit's sampler:

    proc = grammar_processor(tokenizer, json_schema={"type": "object", ...})
    generate(model, prompts, GenerationConfig(logits_processors=(proc,), eos_token_ids=(tokenizer.eos_id,)))
    engine.submit(ids, RequestOptions(logits_processor=grammar_processor(tokenizer, regex=r"\\d+")), ...)

Once the grammar is complete, only the stop tokens (EOS) are allowed, so generation ends cleanly. One
processor serves one generation at a time (any batch size); it starts over when it sees an empty history.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr
from torch import Tensor

from llmkit.tokenizer import Tokenizer

_LOOSE_STRING_CHARS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\uD800-\uDFFF]'
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# (tokenizer, stop ids) -> GrammarCompiler: building the vocabulary table is the slow part, so it is done once
# per tokenizer; the compiler caches compiled grammars itself.
_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE spells its tokens with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _decoder_types(backend) -> set[str]:
    """Component types of the backend's decoder ({"ByteLevel"}, {"Sequence", "Replace", "ByteFallback", ...})."""
    if backend.decoder is None:
        return set()
    spec = json.loads(backend.decoder.__getstate__())
    return {spec["type"], *(d["type"] for d in spec.get("decoders", []))}


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id adds to decoded text; b"" for special tokens and unused ids.

    Byte-level BPE is read through GPT-2's byte table, byte-fallback pieces ("<0x0A>") are their byte, and any
    other token (Metaspace BPE/Unigram, WordPiece) is decoded after an anchor token, so a leading space that
    the decoder adds between tokens (or strips at the start) is counted as in running text.
    """
    backend = tokenizer.backend
    n = tokenizer.vocab_size
    added = backend.get_added_tokens_decoder()
    out: list[bytes | None] = [None] * n
    for i, tok in added.items():
        if i < n:
            out[i] = b"" if tok.special else tok.content.encode()
    types = _decoder_types(backend)
    rest = [i for i in range(n) if out[i] is None]
    if "ByteLevel" in types:
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        for i in rest:
            piece = backend.id_to_token(i)
            out[i] = b"" if piece is None else bytes(to_byte[c] for c in piece if c in to_byte)
        return out
    pieces = {i: backend.id_to_token(i) for i in rest}
    if "ByteFallback" in types:
        for i, piece in list(pieces.items()):
            m = _BYTE_PIECE.fullmatch(piece or "")
            if m:
                out[i] = bytes([int(m.group(1), 16)])
                del pieces[i]
    anchor = backend.token_to_id("a") if backend.token_to_id("a") is not None else next(iter(pieces), 0)
    head = backend.decode([anchor], skip_special_tokens=False)
    ids = [i for i, p in pieces.items() if p is not None]
    for i, text in zip(ids, backend.decode_batch([[anchor, i] for i in ids], skip_special_tokens=False)):
        out[i] = (text[len(head):] if text.startswith(head) else backend.decode([i])).encode()
    return [b"" if b is None else b for b in out]


def default_stop_ids(tokenizer: Tokenizer) -> list[int]:
    """EOS and the chat turn end (<|im_end|>, <|eot_id|>, <|end|>) where the vocabulary has them."""
    names = (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
    ids = [tokenizer.token_to_id(t) for t in names if t]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _compiler(tokenizer: Tokenizer, stop_ids: tuple[int, ...]) -> xgr.GrammarCompiler:
    per_tokenizer = _COMPILERS.setdefault(tokenizer, {})
    if stop_ids not in per_tokenizer:
        info = xgr.TokenizerInfo(token_bytes(tokenizer), xgr.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                 stop_token_ids=list(stop_ids))
        per_tokenizer[stop_ids] = xgr.GrammarCompiler(info, max_threads=1)
    return per_tokenizer[stop_ids]


def _literal(text: str) -> str:
    # An EBNF string literal; JSON's escapes (\" \\ \n \uXXXX) are the ones xgrammar's EBNF reads.
    return json.dumps(text, ensure_ascii=False)


def choices_grammar(choices: Sequence[str]) -> xgr.Grammar:
    """Exactly one of `choices`."""
    if not choices or any(not isinstance(c, str) or not c for c in choices):
        raise ValueError(f"choices must be a non-empty list of non-empty strings, got {choices!r}")
    return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_literal(c) for c in choices))


def json_schema_grammar(schema: dict | str) -> xgr.Grammar:
    """JSON that validates against `schema`, compact (no free whitespace, so a model cannot ramble in it)."""
    try:
        grammar = xgr.Grammar.from_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                               any_whitespace=False)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"unusable JSON Schema: {e}") from e
    # xgrammar 0.2's string characters admit what JSON text cannot hold: raw control characters in a
    # length-bounded string ([^"\\\r\n]; json.loads rejects "\x12") and, in every string, UTF-8-encoded
    # surrogates (U+D800-DFFF, invalid UTF-8: they decode to U+FFFD and break maxLength). Use JSON's class.
    text = str(grammar)
    fixed = text
    for loose in _LOOSE_STRING_CHARS:
        fixed = fixed.replace(loose, _JSON_STRING_CHAR)
    return grammar if fixed == text else xgr.Grammar.from_ebnf(fixed)


def literal_grammar(text: str) -> xgr.Grammar:
    return xgr.Grammar.from_ebnf(f"root ::= {_literal(text)}")


def build_grammar(*, json_schema: dict | str | None = None, regex: str | None = None,
                  choices: Sequence[str] | None = None, json_object: bool = False) -> xgr.Grammar:
    """The grammar of exactly one constraint."""
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("choices", choices),
                            ("json_object", json_object or None)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of json_schema, regex, choices, json_object; got {given or 'none'}")
    if json_schema is not None:
        return json_schema_grammar(json_schema)
    if regex is not None:
        try:
            return xgr.Grammar.from_regex(regex)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"unusable regex {regex!r}: {e}") from e
    if choices is not None:
        return choices_grammar(choices)
    return json_schema_grammar({"type": "object"})  # any object, compact as json_schema's


class GrammarProcessor:
    """A logits processor, proc(generated [B, n], logits [B, V]) -> logits, that keeps each row in a grammar.

    Tokens a row generated since the last call are fed to its matcher, then every token the grammar does not
    allow next gets -inf. A finished row (it generated a stop token) may only repeat stop tokens. Logit columns
    beyond the tokenizer's vocabulary (padded embeddings) are always masked.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, stop_ids: Sequence[int]):
        self.compiled = compiled
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.stop_ids = list(stop_ids)
        self._matchers: list[xgr.GrammarMatcher] = []
        self._seen = 0
        self._bitmask: Tensor | None = None
        self._stop_row = _stop_only_row(self.stop_ids, self._bitmask_words())

    def _bitmask_words(self) -> int:
        return xgr.get_bitmask_shape(1, self.vocab_size)[1]

    def reset(self, batch_size: int) -> None:
        self._matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(batch_size)]
        self._bitmask = xgr.allocate_token_bitmask(batch_size, self.vocab_size)
        self._seen = 0

    def is_completed(self, row: int = 0) -> bool:
        """Whether row `row` has generated a whole sentence of the grammar."""
        return bool(self._matchers) and self._matchers[row].is_completed()

    def __call__(self, generated: Tensor, logits: Tensor) -> Tensor:
        B, n = generated.shape
        if n == 0 or n < self._seen or B != len(self._matchers):
            self.reset(B)
        if n > self._seen:
            for row, (matcher, tokens) in enumerate(zip(self._matchers, generated[:, self._seen:].tolist())):
                self._advance(row, matcher, tokens)
            self._seen = n
        for row, matcher in enumerate(self._matchers):
            if matcher.is_terminated():
                self._bitmask[row] = self._stop_row
            else:
                matcher.fill_next_token_bitmask(self._bitmask, row)
        logits = logits.clone()
        V = logits.shape[-1]
        xgr.apply_token_bitmask_inplace(logits, self._bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=min(V, self.vocab_size))
        if V > self.vocab_size:
            logits[:, self.vocab_size:] = float("-inf")
        return logits

    def _advance(self, row: int, matcher: xgr.GrammarMatcher, tokens: list[int]) -> None:
        for t in tokens:
            if matcher.is_terminated():
                return  # the row ended; what follows is padding
            if not matcher.accept_token(t):
                raise ValueError(f"row {row}: token {t} breaks the grammar; was a token sampled without this "
                                 "processor's mask (another processor after it, or a different vocabulary)?")


def _stop_only_row(stop_ids: Sequence[int], words: int) -> Tensor:
    """One bitmask row (int32 words, bit t of the row = token t) that allows only the stop tokens."""
    row = torch.zeros(words, dtype=torch.int64)
    for t in stop_ids:
        row[t // 32] |= 1 << (t % 32)
    return torch.where(row >= 2**31, row - 2**32, row).to(torch.int32)  # the same 32 bits, signed


def compile_processor(tokenizer: Tokenizer, grammar: xgr.Grammar,
                      stop_token_ids: Sequence[int] | None = None) -> GrammarProcessor:
    """A `GrammarProcessor` for any xgrammar `Grammar` (see `build_grammar`)."""
    stop = list(stop_token_ids) if stop_token_ids is not None else default_stop_ids(tokenizer)
    if not stop:
        raise ValueError("constrained decoding needs a stop token: the tokenizer has no eos_token; pass stop_token_ids")
    compiled = _compiler(tokenizer, tuple(stop)).compile_grammar(grammar)
    first = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(first, 0)
    if not bool(first.any()):  # an empty language (e.g. the regex [^\s\S]): no first token, not even a stop
        raise ValueError("the constraint admits no output at all: no token can begin it")
    return GrammarProcessor(compiled, stop)


def grammar_processor(tokenizer: Tokenizer, *, json_schema: dict | str | None = None, regex: str | None = None,
                      choices: Sequence[str] | None = None, json_object: bool = False,
                      stop_token_ids: Sequence[int] | None = None) -> GrammarProcessor:
    """A logits processor that constrains generation to one of: a JSON Schema (dict or JSON string), a regex,
    one string of `choices`, or any JSON object (`json_object=True`, OpenAI's response_format json_object).

    Stop tokens default to EOS plus the chat turn-end token (`default_stop_ids`); they are the only tokens
    allowed once the output is complete. Raises ValueError for a bad or missing constraint.
    """
    grammar = build_grammar(json_schema=json_schema, regex=regex, choices=choices, json_object=json_object)
    return compile_processor(tokenizer, grammar, stop_token_ids)


def constraint_from_response_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """grammar_processor keyword arguments for OpenAI's `response_format`; None for plain text."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
        return {"json_schema": spec["schema"]}
    raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
