"""Tokenizers: train, save, load and chat-format, built on Hugging Face `tokenizers`.

A saved tokenizer is a Hugging Face directory (`tokenizer.json` + `tokenizer_config.json`), so
`transformers.AutoTokenizer.from_pretrained(dir)` gives the same ids and the same chat strings as
`Tokenizer.load(dir)`. `Tokenizer.load` also reads directories written by transformers, including
older GPT-2 style ones that only hold `vocab.json` + `merges.txt`.

    tok = train_tokenizer(["data.txt"], type="byte-bpe", vocab_size=8000)
    tok.save("out/tokenizer")
    ids = Tokenizer.load("out/tokenizer").encode("Hello")
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

# Roles with a named attribute (`bos_token`, ...); any other key of a special-tokens dict is an extra special token.
ROLES = ("bos", "eos", "pad", "unk")
DEFAULT_SPECIAL_TOKENS = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "unk": "<|unk|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}
TYPES = ("bpe", "byte-bpe", "wordpiece", "unigram")

# Tool calling in the Hermes/Qwen2.5 format (llmkit.agents.tools): `tools` go into the system turn inside <tools>,
# an assistant's `tool_calls` become <tool_call> JSON blocks, and consecutive "tool" results one user turn of
# <tool_response> blocks. Without tools, tool calls or tool results, the output is plain ChatML.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    f"{{{{ {json.dumps(TOOLS_PREAMBLE)} }}}}"
    "{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
    f"{{{{ {json.dumps(TOOLS_INSTRUCTIONS)} + '<|im_end|>\\n' }}}}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant' }}"
    "{% if message['content'] is defined and message['content'] %}{{ '\\n' + message['content'] }}{% endif %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-2 chat format: the system prompt goes inside the first [INST] block; the model's reply ends with eos.
LLAMA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}"
    "{% set content = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama": LLAMA_TEMPLATE}

# transformers writes this for "no limit"; we read it back as None.
_NO_MAX_LENGTH = int(1e30)
# What transformers' GPT2Tokenizer assumes when a vocab.json + merges.txt directory names no special tokens.
_GPT2_SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
_BATCH = 1000  # texts per batch handed to the Rust trainer
HELDOUT_EVERY = 100  # one text in 100 is held out when the caller asks for a held-out slice
HELDOUT_MAX = 2000


class TokenizerError(ValueError):
    """Training data or a tokenizer directory that cannot be used; the message names the file."""


def chat_template_by_name(name: str) -> str:
    """The built-in chat template called `name` ("chatml" or "llama")."""
    if name not in CHAT_TEMPLATES:
        raise TokenizerError(f"unknown chat template {name!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


@dataclass(eq=False)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template transformers keeps beside it."""

    backend: tokenizers.Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    extra_special_tokens: list[str] = field(default_factory=list)
    chat_template: str | None = None
    model_max_length: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return self._id(self.unk_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the backend's post-processor adds bos (if configured)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, tok: str) -> int | None:
        return self.backend.token_to_id(tok)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, keyed as in transformers: {"bos_token": ..., ...}."""
        named = {f"{role}_token": getattr(self, f"{role}_token") for role in ROLES}
        return {key: tok for key, tok in named.items() if tok is not None}

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template exactly as transformers' `apply_chat_template` does."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template; set one, e.g. chat_template_by_name('chatml')")
        # transformers drops None-valued keys (OpenAI-style `content=None`) and passes the named special
        # tokens, `tools` and `documents`; kwargs override them.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens_map, **kwargs}
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        # transformers tokenizes the rendered chat without adding special tokens: the template holds them.
        return self.encode(text) if tokenize else text

    def save(self, path: str | Path) -> None:
        """Write a Hugging Face tokenizer directory; each file is replaced atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        special = {**self.special_tokens_map, "extra_special_tokens": list(self.extra_special_tokens)}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.model_max_length or _NO_MAX_LENGTH,
            # transformers' default clean-up would change decoded text ("a ." -> "a."); ours does not.
            "clean_up_tokenization_spaces": False,
            **special,
            "chat_template": self.chat_template,
        }
        _write_atomic(path / "tokenizer.json", self.backend.to_str(pretty=True))
        _write_atomic(path / "tokenizer_config.json", _dumps(config))
        _write_atomic(path / "special_tokens_map.json", _dumps(special))
        # transformers prefers chat_template.jinja over the config's template, so a stale one would win.
        (path / "chat_template.jinja").unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load an llmkit or Hugging Face tokenizer directory."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: tokenizer directory not found")
        config = _read_config(path)
        tokenizer_json = path / "tokenizer.json"
        if tokenizer_json.is_file():
            backend = _backend_from_file(tokenizer_json)
        else:
            backend = _legacy_backend(path, config)
            config = {**_GPT2_SPECIAL_TOKENS, **config}
        roles = {f"{role}_token": _content(config.get(f"{role}_token")) for role in ROLES}
        extra = _extra_special_tokens(config)
        # transformers registers configured special tokens missing from tokenizer.json; so must we to match its ids.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in [*roles.values(), *extra] if t is not None and t not in known]
        backend.add_special_tokens(list(dict.fromkeys(missing)))
        if not tokenizer_json.is_file():
            # transformers 5 honours add_bos_token / add_eos_token only without a tokenizer.json; with one,
            # its post-processor alone decides.
            flags = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            backend.post_processor = _bos_eos_processor(backend, roles["bos_token"], roles["eos_token"], *flags)
        # transformers only truncates or pads when a call asks for it, so encode() never should either.
        backend.no_truncation()
        backend.no_padding()
        max_len = config.get("model_max_length")
        return cls(
            backend,
            **roles,
            extra_special_tokens=extra,
            chat_template=_chat_template(path, config),
            model_max_length=max_len if isinstance(max_len, int) and max_len < _NO_MAX_LENGTH else None,
        )


def compression(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over `texts` (higher packs more text into each token)."""
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    if n_tokens == 0:
        raise TokenizerError("compression needs texts that encode to at least one token")
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens


def train_tokenizer(
    files: list[str | Path],
    type: str = "byte-bpe",
    vocab_size: int = 8000,
    *,
    text_field: str = "text",
    special_tokens: dict | None = None,
    min_frequency: int = 2,
    chat_template: str | None = CHATML_TEMPLATE,
    add_bos: bool = False,
    heldout: list[str] | None = None,
) -> Tokenizer:
    """Train a tokenizer on `.txt` files (line by line) and `.jsonl` files (`text_field` of each line).

    When `heldout` is a list, every `HELDOUT_EVERY`-th text is kept out of training and appended to it
    (at most `HELDOUT_MAX`), so compression can be measured on text the tokenizer never saw.

    `special_tokens` maps a role to a token; roles bos/eos/pad/unk become `bos_token`, ...; other keys are extra
    special tokens. `add_bos` makes `encode(..., add_special_tokens=True)` prepend bos, here and in transformers.
    `min_frequency` is ignored by unigram, whose trainer has no such option.

    Raises:
        TokenizerError: unknown `type`, a missing unk token (all but byte-bpe need one), `vocab_size` below the
            alphabet plus special tokens, a missing or unreadable file, bad UTF-8, a malformed JSONL line or one
            without `text_field`, or no text at all.
    """
    special_tokens = dict(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    _check_train_args(type, vocab_size, special_tokens, add_bos)
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise TokenizerError(f"{f}: no such file")
    build = _BUILDERS[type]
    backend, trainer = build(vocab_size, min_frequency, list(special_tokens.values()), special_tokens.get("unk"))
    corpus = _Corpus(files, text_field, heldout)
    try:
        backend.train_from_iterator(corpus, trainer)
    except TokenizerError:
        raise
    except Exception as e:  # the Rust trainer raises a bare Exception, e.g. unigram's "vocabulary is not large enough"
        raise TokenizerError(
            f"training a {type} tokenizer with vocab_size={vocab_size} on {_names(files)} failed: {e}"
        ) from e
    if not corpus.saw_text:
        raise TokenizerError(f"no text found in {_names(files)}")
    if backend.get_vocab_size() > vocab_size:
        # BPE and WordPiece trainers silently exceed vocab_size rather than drop characters of the alphabet.
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: the characters of {_names(files)} plus "
            f"{len(special_tokens)} special tokens already need {backend.get_vocab_size()} {type} entries"
        )
    tok = Tokenizer(
        backend,
        **{f"{role}_token": special_tokens.get(role) for role in ROLES},
        extra_special_tokens=[t for role, t in special_tokens.items() if role not in ROLES],
        chat_template=chat_template,
    )
    if add_bos:
        backend.post_processor = _bos_eos_processor(backend, tok.bos_token, None, True, False)
    return tok


def _check_train_args(type: str, vocab_size: int, special_tokens: dict, add_bos: bool) -> None:
    if type not in TYPES:
        raise TokenizerError(f"unknown tokenizer type {type!r}; expected one of {TYPES}")
    if type != "byte-bpe" and "unk" not in special_tokens:
        raise TokenizerError(f"a {type} tokenizer needs an 'unk' special token for characters it never saw")
    if add_bos and "bos" not in special_tokens:
        raise TokenizerError("add_bos=True needs a 'bos' special token")
    # Byte-level BPE starts from all 256 bytes; the others learn their alphabet and are checked after training.
    alphabet = 256 if type == "byte-bpe" else 1
    if vocab_size < alphabet + len(special_tokens):
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small for {type}: it needs at least {alphabet} alphabet entries "
            f"plus {len(special_tokens)} special tokens = {alphabet + len(special_tokens)}"
        )


def _byte_bpe(vocab_size: int, min_frequency: int, specials: list[str], unk: str | None):
    # GPT-2 style: every byte is in the alphabet, so any string encodes and decodes back exactly.
    # No normalizer, since NFC would break that round trip for decomposed input.
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    return backend, trainer


def _bpe(vocab_size: int, min_frequency: int, specials: list[str], unk: str | None):
    backend = tokenizers.Tokenizer(models.BPE(unk_token=unk))
    backend.normalizer = normalizers.NFC()
    _metaspace(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
    )
    return backend, trainer


def _wordpiece(vocab_size: int, min_frequency: int, specials: list[str], unk: str | None):
    # BERT-style but cased: split on whitespace and punctuation, CJK characters become words of their own.
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token=unk))
    backend.normalizer = normalizers.Sequence([
        normalizers.NFC(),
        normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False),
    ])
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        continuing_subword_prefix="##", show_progress=False,
    )
    return backend, trainer


def _unigram(vocab_size: int, min_frequency: int, specials: list[str], unk: str | None):
    backend = tokenizers.Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFC()
    _metaspace(backend)
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token=unk, show_progress=False
    )
    return backend, trainer


def _metaspace(backend: tokenizers.Tokenizer) -> None:
    # Spaces become "▁" that the decoder turns back, so runs of spaces survive decode. No "▁" is prepended
    # (GPT-2 style): with one, the decoder strips a leading space and "  x" would decode to " x".
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    backend.decoder = decoders.Metaspace(prepend_scheme="never")


_BUILDERS = {"bpe": _bpe, "byte-bpe": _byte_bpe, "wordpiece": _wordpiece, "unigram": _unigram}


class _Corpus:
    """Streams training text in batches, one file at a time, so huge files never sit in memory."""

    def __init__(self, files: list[Path], text_field: str, heldout: list[str] | None = None):
        self.files = files
        self.text_field = text_field
        self.heldout = heldout
        self.saw_text = False

    def __iter__(self) -> Iterator[list[str]]:
        batch = []
        count = 0
        for path in self.files:
            texts = self._jsonl(path) if path.suffix.lower() == ".jsonl" else (line for _, line in _lines(path))
            for text in texts:
                self.saw_text = self.saw_text or bool(text.strip())
                count += 1
                if self.heldout is not None and count % HELDOUT_EVERY == 0:
                    if len(self.heldout) < HELDOUT_MAX:
                        self.heldout.append(text)
                    continue
                batch.append(text)
                if len(batch) == _BATCH:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _jsonl(self, path: Path) -> Iterator[str]:
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{path}:{n}: malformed JSON ({e.msg}); expected one JSON object per line") from e
            if not isinstance(record, dict) or self.text_field not in record:
                raise TokenizerError(f"{path}:{n}: expected a JSON object with a {self.text_field!r} field")
            text = record[self.text_field]
            if not isinstance(text, str):
                raise TokenizerError(
                    f"{path}:{n}: field {self.text_field!r} should be a string, got {type(text).__name__}"
                )
            yield text


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a UTF-8 file."""
    try:
        # Bytes, decoded line by line, so a bad byte is reported at its own line, not somewhere in a read chunk.
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TokenizerError(f"{path}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from e


def _names(files: list[Path]) -> str:
    return ", ".join(str(f) for f in files) or "(no files)"


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """The post-processor transformers builds for `add_bos_token` / `add_eos_token`, token for token."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    used = ([bos] if add_bos else []) + ([eos] if add_eos else [])
    special = {tok: backend.token_to_id(tok) for tok in used}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items()))


def _read_config(path: Path) -> dict:
    """tokenizer_config.json, falling back to the legacy special_tokens_map.json for keys it lacks."""
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                config.update(json.loads(file.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{file}: not valid JSON ({e})") from e
    return config


def _backend_from_file(file: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust loader raises a bare Exception for bad JSON or an unknown component
        raise TokenizerError(f"{file}: cannot load ({e})") from e


def _legacy_backend(path: Path, config: dict) -> tokenizers.Tokenizer:
    """The backend of a directory without tokenizer.json: GPT-2's vocab.json + merges.txt, or an error."""
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _gpt2_backend(path, bool(config.get("add_prefix_space", False)))
    if any(path.glob("*.model")):
        raise TokenizerError(
            f"{path}: tokenizer.json is required, found only a sentencepiece .model; convert it with transformers: "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    raise TokenizerError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) in this directory")


def _gpt2_backend(path: Path, add_prefix_space: bool) -> tokenizers.Tokenizer:
    """Byte-level BPE from vocab.json + merges.txt, set up as transformers' GPT2Tokenizer does."""
    model = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _content(token: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken dict whose text is under "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _extra_special_tokens(config: dict) -> list[str]:
    # transformers 5 writes a list under extra_special_tokens; 4.x used additional_special_tokens (or a name dict).
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    values = extra.values() if isinstance(extra, dict) else extra
    return [_content(t) for t in values]


def _chat_template(path: Path, config: dict) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():  # transformers gives it precedence over the config's chat_template
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the one transformers uses by default
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _write_atomic(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it, so no reader or crash ever sees half a file."""
    # Not tempfile.mkstemp: it creates files mode 0600 whatever the umask, unlike every other file we write.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}` blocks (assistant-token masks) and renders their body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Like transformers': jinja's own tojson HTML-escapes "<", ">" and "&", which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache
def _compile_template(template: str) -> jinja2.Template:
    # The environment transformers renders chat templates in, so both give the same string. Sandboxed: templates
    # from the Hub are untrusted code.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
