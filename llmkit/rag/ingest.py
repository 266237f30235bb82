"""Read documents for the index: text, Markdown, HTML (main text via trafilatura), PDF (pypdf) and JSONL.

`read_documents(paths)` walks files and directories and returns `Document`s in a stable order. Every
problem raises `IngestError` naming the file (and the line for JSONL), or, with `skip_bad=True`, is
reported through `on_skip` and the document is left out. Nothing is written here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.rag.errors import IngestError

TEXT_SUFFIXES = (".txt", ".text", ".rst")
MARKDOWN_SUFFIXES = (".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
PDF_SUFFIXES = (".pdf",)
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED = TEXT_SUFFIXES + MARKDOWN_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES + JSONL_SUFFIXES


@dataclass
class Document:
    id: str  # unique in the index: a path for files, the id field (or path:line) for JSONL records
    text: str
    source: str  # the file it came from
    title: str = ""
    metadata: dict = field(default_factory=dict)  # JSONL fields other than id and text
    tags: list[str] = field(default_factory=list)
    page_starts: list[int] | None = None  # PDF: character offset where each page begins in `text`
    format: str = "text"  # text | markdown | html | pdf | jsonl (markdown and html chunk by headings)

    def content_hash(self) -> str:
        """Changes when anything the index stores about the document changes."""
        payload = json.dumps([self.id, self.text, self.source, self.title, self.metadata, sorted(self.tags),
                              self.page_starts, self.format], ensure_ascii=False, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def page_of(self, offset: int) -> int | None:
        """1-based page holding character `offset` (PDF only)."""
        if not self.page_starts:
            return None
        import bisect

        return bisect.bisect_right(self.page_starts, offset)


def read_documents(paths: Iterable[str | Path], *, id_field: str = "id", text_field: str = "text",
                   title_field: str = "title", tags: Iterable[str] = (), skip_bad: bool = False,
                   on_skip: Callable[[str], None] | None = None) -> list[Document]:
    """Documents from files and directories (walked recursively, hidden entries skipped, sorted).

    JSONL: one document per line; `id_field` (default: path:line when absent), `text_field` (required),
    `title_field` and `tags` (a string or list) are read, every other field is kept as metadata.
    `tags` given here are added to every document.
    """
    files = list(_walk(paths))
    if not files:
        raise IngestError(f"no input files found in {', '.join(map(str, paths))} "
                          f"(supported: {', '.join(SUPPORTED)})")
    docs: list[Document] = []
    where: dict[str, str] = {}
    extra_tags = list(tags)
    for path in files:
        try:
            found = list(_read_file(path, id_field, text_field, title_field, skip_bad, on_skip))
        except IngestError as e:
            if not skip_bad:
                raise
            (on_skip or _ignore)(str(e))
            continue
        for doc, place in found:
            if doc.id in where:
                raise IngestError(f"{place}: duplicate document id {doc.id!r} (first seen at {where[doc.id]})")
            where[doc.id] = place
            doc.tags = sorted(set(doc.tags) | set(extra_tags))
            docs.append(doc)
    if not docs:
        raise IngestError(f"no documents could be read from {', '.join(map(str, paths))}")
    return docs


def _ignore(_: str) -> None:
    pass


def _walk(paths: Iterable[str | Path]) -> Iterable[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and name.lower().endswith(SUPPORTED):
                        yield Path(root) / name
        elif path.is_file():
            if not path.name.lower().endswith(SUPPORTED):
                raise IngestError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED)})")
            yield path
        else:
            raise IngestError(f"{path}: no such file or directory")


def display_path(path: Path) -> str:
    """The path relative to the working directory when it is below it (stable ids across machines)."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def _read_file(path: Path, id_field: str, text_field: str, title_field: str, skip_bad: bool,
               on_skip: Callable[[str], None] | None) -> Iterable[tuple[Document, str]]:
    name = path.name.lower()
    source = display_path(path)
    if name.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(path, source, id_field, text_field, title_field, skip_bad, on_skip)
        return
    if name.endswith(PDF_SUFFIXES):
        yield _read_pdf(path, source), source
        return
    raw = _read_text(path)
    if name.endswith(HTML_SUFFIXES):
        text, title = _html_main_text(raw, path)
        fmt = "html"
    elif name.endswith(MARKDOWN_SUFFIXES):
        text, title, fmt = raw, _markdown_title(raw) or path.stem, "markdown"
    else:
        text, title, fmt = raw, path.stem, "text"
    if not text.strip():
        raise IngestError(f"{path}: empty document (no text to index)")
    yield Document(id=source, text=text, source=source, title=title, format=fmt), source


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise IngestError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return None


def _html_main_text(html: str, path: Path) -> tuple[str, str]:
    """Main text as Markdown (headings kept for chunking), boilerplate (menus, footers) removed."""
    import logging

    import trafilatura

    logging.getLogger("trafilatura").setLevel(logging.ERROR)
    if not html.strip():
        raise IngestError(f"{path}: empty document (no text to index)")
    text = trafilatura.extract(html, output_format="markdown", include_comments=False, include_tables=True,
                               favor_recall=True)
    if not text or not text.strip():  # very short pages fall below trafilatura's main-text heuristics
        text = trafilatura.html2txt(html) or ""
    meta = trafilatura.extract_metadata(html)
    title = (meta.title if meta is not None and meta.title else None) or _markdown_title(text) or path.stem
    return text.strip(), title


def _read_pdf(path: Path, source: str) -> Document:
    import logging

    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns on every slightly malformed object
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted:
            try:
                reader.decrypt("")
            except Exception:
                raise IngestError(f"{path}: the PDF is encrypted") from None
        pages = [page.extract_text() or "" for page in reader.pages]
        title = None
        try:
            title = reader.metadata.title if reader.metadata else None
        except Exception:
            pass
    except IngestError:
        raise
    except Exception as e:  # pypdf raises many types (PdfReadError, struct errors, ...) on a broken file
        raise IngestError(f"{path}: unreadable PDF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")\
            from None
    if not any(p.strip() for p in pages):
        raise IngestError(f"{path}: no extractable text in {len(pages)} page(s) (a scanned PDF needs OCR first)")
    starts, parts, offset = [], [], 0
    for text in pages:
        starts.append(offset)
        parts.append(text)
        offset += len(text) + 2  # the "\n\n" joining pages
    return Document(id=source, text="\n\n".join(parts), source=source, title=str(title or path.stem),
                    page_starts=starts, format="pdf")


def _read_jsonl(path: Path, source: str, id_field: str, text_field: str, title_field: str, skip_bad: bool,
                on_skip: Callable[[str], None] | None) -> Iterable[tuple[Document, str]]:
    raw = _read_text(path)
    count = 0
    for n, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        place = f"{path}:{n}"
        try:
            doc = _jsonl_record(line, place, source, n, id_field, text_field, title_field)
        except IngestError as e:
            if not skip_bad:
                raise
            (on_skip or _ignore)(str(e))
            continue
        count += 1
        yield doc, place
    if count == 0:
        raise IngestError(f"{path}: empty file (no JSONL records)")


def _jsonl_record(line: str, place: str, source: str, n: int, id_field: str, text_field: str,
                  title_field: str) -> Document:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise IngestError(f"{place}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise IngestError(f"{place}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise IngestError(f"{place}: no {text_field!r} field (fields: {', '.join(record) or 'none'}; "
                          f"set --text-field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise IngestError(f"{place}: field {text_field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise IngestError(f"{place}: field {text_field!r} is empty")
    doc_id = record.get(id_field)
    if doc_id is None:
        doc_id = f"{source}:{n}"
    elif not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or str(doc_id) == "":
        raise IngestError(f"{place}: field {id_field!r} must be a non-empty string or integer")
    tags = record.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise IngestError(f"{place}: field 'tags' must be a string or a list of strings")
    title = record.get(title_field)
    metadata = {k: v for k, v in record.items() if k not in (id_field, text_field)}
    return Document(id=str(doc_id), text=text, source=source, title=str(title) if title is not None else "",
                    metadata=metadata, tags=list(tags), format="jsonl")
