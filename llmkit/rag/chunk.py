"""Split documents into chunks whose sizes are measured in tokens of a given tokenizer.

- fixed: windows of `size` tokens, each starting `size - overlap` tokens after the previous one.
- recursive: by structure. Markdown headings split a document into sections (a chunk never spans two,
  and it remembers its heading path); a section too long is split at paragraphs, then lines, then
  sentences, then words, then tokens, and the pieces are merged back greedily up to `size` tokens,
  each new chunk starting with up to `overlap` tokens of whole trailing pieces of the previous one.
- none: the whole document is one chunk.

Every chunk is a span [start, end) of the document text, so its character offsets are exact.
Token counts come from one tokenisation of the whole document: a span's count is the number of
tokens that start inside it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from llmkit.rag.errors import RagError
from llmkit.rag.ingest import Document

METHODS = ("recursive", "fixed", "none")

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
# separators from coarse to fine; each split keeps the separator at the end of the piece before it
_SEPARATORS = [
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"\n"),  # lines
    re.compile(r"(?<=[.!?])[\"')\]]*\s+"),  # sentences
    re.compile(r"\s+"),  # words
]


@dataclass(frozen=True)
class ChunkConfig:
    method: str = "recursive"
    size: int = 128  # tokens per chunk at most (all-MiniLM-L6-v2 was trained on 128 word pieces, reads 256)
    overlap: int = 32  # tokens shared with the previous chunk at most
    header: bool = True  # embed and BM25-index "title > heading" above each chunk's text (stored text unchanged)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise RagError(f"chunking method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.size < 1:
            raise RagError(f"chunk size must be >= 1 token, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise RagError(f"chunk overlap must be >= 0 and < chunk size ({self.size}), got {self.overlap}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Chunk:
    doc_id: str
    index: int  # position in the document
    text: str
    start: int  # character offsets in the document text
    end: int
    heading: str = ""  # heading path, "Top > Sub" (recursive chunking of Markdown/HTML)
    page: int | None = None  # 1-based page of `start` (PDF)
    n_tokens: int = 0


class TokenCounter:
    """Token offsets of text with a `tokenizers.Tokenizer` (no truncation, no special tokens)."""

    def __init__(self, backend, name: str = ""):
        import tokenizers

        backend = tokenizers.Tokenizer.from_str(backend.to_str())  # a copy: we change truncation/padding
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path) -> TokenCounter:
        import tokenizers

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise RagError(f"{path}: no tokenizer.json to measure chunk sizes with")
        return cls(tokenizers.Tokenizer.from_file(str(file)), name=str(path))

    def starts(self, text: str) -> list[int]:
        """Character offset where each token begins (sorted)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        out, last = [], -1
        for s, e in enc.offsets:
            if e > s and s >= last:  # skip zero-width tokens and byte-fallback repeats
                out.append(s)
                last = s
        return out

    def count(self, text: str) -> int:
        return len(self.starts(text))

    def truncate(self, text: str, n: int) -> str:
        """The longest prefix of `text` with at most n tokens."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return text if len(enc.offsets) <= n else text[: enc.offsets[n - 1][1]] if n > 0 else ""


def context_text(title: str, heading: str, text: str, header: bool = True) -> str:
    """What is embedded and BM25-indexed for a chunk: a "title > heading" line, then the chunk text. The
    header keeps a chunk that never names its subject ("It was discovered in 1774") findable by it."""
    if not header:
        return text
    top = " > ".join(x for x in (title.replace("_", " ").strip(), heading.strip()) if x)
    return f"{top}\n{text}" if top else text


def chunk_document(doc: Document, counter: TokenCounter, config: ChunkConfig) -> list[Chunk]:
    config.validate()
    text = doc.text
    starts = counter.starts(text)

    def ntok(s: int, e: int) -> int:
        return bisect.bisect_left(starts, e) - bisect.bisect_left(starts, s)

    if config.method == "none":
        spans = [(0, len(text), "")]
    elif config.method == "fixed":
        spans = [(s, e, "") for s, e in _fixed(text, starts, config.size, config.overlap)]
    else:
        use_headings = doc.format in ("markdown", "html")
        spans = []
        for s, e, heading in _sections(text, use_headings):
            pieces = _split(text, s, e, 0, config.size, ntok, starts)
            spans += [(a, b, heading) for a, b in _merge(pieces, config.size, config.overlap, ntok)]
    chunks = []
    for s, e, heading in spans:
        s, e = _strip(text, s, e)
        if e <= s:
            continue
        chunks.append(Chunk(doc.id, len(chunks), text[s:e], s, e, heading, doc.page_of(s), ntok(s, e)))
    return chunks


def _strip(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _fixed(text: str, starts: list[int], size: int, overlap: int) -> list[tuple[int, int]]:
    if not starts:
        return [(0, len(text))]
    spans, step, n = [], size - overlap, len(starts)
    for i in range(0, n, step):
        j = min(i + size, n)
        spans.append((starts[i], starts[j] if j < n else len(text)))
        if j == n:
            break
    return spans


def _sections(text: str, use_headings: bool) -> list[tuple[int, int, str]]:
    """(start, end, heading path) of each section; text before the first heading has an empty path."""
    if not use_headings:
        return [(0, len(text), "")]
    marks = list(_HEADING.finditer(text))
    if not marks:
        return [(0, len(text), "")]
    out, path = [], []  # path: [(level, title), ...]
    if marks[0].start() > 0:
        out.append((0, marks[0].start(), ""))
    for i, m in enumerate(marks):
        level = len(m.group(1))
        path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2).strip())]
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append((m.start(), end, " > ".join(t for _, t in path)))
    return out


def _split(text: str, s: int, e: int, level: int, size: int, ntok, starts: list[int]) -> list[tuple[int, int]]:
    """Contiguous pieces covering [s, e), each of at most `size` tokens where the structure allows."""
    if ntok(s, e) <= size:
        return [(s, e)]
    if level == len(_SEPARATORS):  # no structure left: cut at token boundaries
        i, j = bisect.bisect_left(starts, s), bisect.bisect_left(starts, e)
        cuts = [starts[k] for k in range(i + size, j, size)]
        bounds = [s] + cuts + [e]
        return list(zip(bounds[:-1], bounds[1:]))
    cuts = [m.end() for m in _SEPARATORS[level].finditer(text, s, e) if s < m.end() < e]
    if not cuts:
        return _split(text, s, e, level + 1, size, ntok, starts)
    bounds = [s] + cuts + [e]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out += _split(text, a, b, level + 1, size, ntok, starts)
    return out


def _merge(pieces: list[tuple[int, int]], size: int, overlap: int, ntok) -> list[tuple[int, int]]:
    chunks, current, used = [], [], 0
    for piece in pieces:
        n = ntok(*piece)
        if current and used + n > size:
            chunks.append((current[0][0], current[-1][1]))
            tail, kept = [], 0  # whole trailing pieces, as many as fit in `overlap` and leave room for `piece`
            for prev in reversed(current):
                m = ntok(*prev)
                if kept + m > overlap or kept + m + n > size:
                    break
                tail.insert(0, prev)
                kept += m
            current, used = tail, kept
        current.append(piece)
        used += n
    if current:
        chunks.append((current[0][0], current[-1][1]))
    return chunks
