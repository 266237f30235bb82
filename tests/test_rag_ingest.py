"""RAG ingestion and chunking: every format, bad input named by file and line, exact offsets, token sizes."""

import dataclasses
import json
from pathlib import Path

import pytest
import tokenizers

from llmkit.rag.chunk import ChunkConfig, TokenCounter, chunk_document, context_text
from llmkit.rag.embed import minilm_dir
from llmkit.rag.errors import IngestError, RagError
from llmkit.rag.ingest import Document, read_documents


def make_pdf(path: Path, pages: list[str], title: str | None = None) -> Path:
    """A real PDF with one Helvetica text line per input line (pypdf extracts it back)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    w = PdfWriter()
    font = w._add_object(DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                                           NameObject("/Subtype"): NameObject("/Type1"),
                                           NameObject("/BaseFont"): NameObject("/Helvetica")}))
    for text in pages:
        page = w.add_blank_page(612, 792)
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in text.split("\n"):
            ops.append("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*")
        ops.append("ET")
        stream = DecodedStreamObject()
        stream.set_data("\n".join(ops).encode("latin-1"))
        page[NameObject("/Contents")] = w._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
            {NameObject("/F1"): font})})
    if title:
        w.add_metadata({"/Title": title})
    with open(path, "wb") as f:
        w.write(f)
    return path


@pytest.fixture(scope="module")
def counter():
    return TokenCounter(tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json")))


# ----------------------------------------------------------------------------- reading


def test_reads_every_format_from_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("Plain text about rivers.\n")
    (d / "b.md").write_text("# Mountains\n\nThe Alps are high.\n")
    (d / "sub" / "c.html").write_text(
        "<html><head><title>Oxygen page</title></head><body><nav>Home | About | Contact</nav><article>"
        "<h1>Oxygen</h1><p>Oxygen is a chemical element with symbol O and atomic number 8. It is a member of "
        "the chalcogen group in the periodic table.</p><h2>History</h2><p>Oxygen was discovered by Carl "
        "Wilhelm Scheele in Uppsala in 1773 and by Joseph Priestley in Wiltshire in 1774.</p></article>"
        "<footer>Copyright 2024 Example Corp. All rights reserved.</footer></body></html>")
    make_pdf(d / "d.pdf", ["Page one text.", "Page two text."], title="A PDF")
    (d / "e.jsonl").write_text(json.dumps({"id": "r1", "text": "Record one.", "title": "T1", "tags": ["x"],
                                           "year": 2020}) + "\n\n" + json.dumps({"text": "Record two."}) + "\n")
    (d / ".hidden.txt").write_text("skip me")
    (d / "notes.csv").write_text("ignored,in,directories")
    docs = {doc.id: doc for doc in read_documents([d], tags=["corpus"])}
    assert set(docs) == {"docs/a.txt", "docs/b.md", "docs/sub/c.html", "docs/d.pdf", "r1", "docs/e.jsonl:3"}
    assert docs["docs/b.md"].title == "Mountains" and docs["docs/b.md"].format == "markdown"
    html = docs["docs/sub/c.html"]
    assert html.title.startswith("Oxygen") and "Scheele" in html.text and "## History" in html.text
    assert "Copyright" not in html.text and "Contact" not in html.text  # boilerplate removed
    pdf = docs["docs/d.pdf"]
    assert pdf.title == "A PDF" and pdf.page_starts == [0, pdf.text.index("Page two")]
    assert pdf.page_of(pdf.text.index("two")) == 2 and pdf.page_of(0) == 1
    r1 = docs["r1"]
    assert r1.metadata == {"title": "T1", "tags": ["x"], "year": 2020} and r1.title == "T1"
    assert r1.tags == ["corpus", "x"] and r1.source == "docs/e.jsonl"


def test_jsonl_custom_fields_and_content_hash(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"key": 7, "body": "Hello there."}) + "\n")
    (doc,) = read_documents([f], id_field="key", text_field="body")
    assert doc.id == "7" and doc.text == "Hello there."
    same = dataclasses.replace(doc, metadata=dict(doc.metadata))
    assert same.content_hash() == doc.content_hash()
    same.text += "!"
    assert same.content_hash() != doc.content_hash()


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.txt", "", "empty.txt: empty document"),
    ("blank.md", "  \n\n ", "blank.md: empty document"),
    ("empty.jsonl", "\n\n", "empty.jsonl: empty file"),
    ("notext.jsonl", '{"id": "a", "text": "ok"}\n{"id": "b", "body": "x"}\n', "notext.jsonl:2: no 'text' field"),
    ("badjson.jsonl", '{"text": "ok"}\n{"text": \n', "badjson.jsonl:2: invalid JSON"),
    ("notobj.jsonl", '["text"]\n', "notobj.jsonl:1: expected a JSON object"),
    ("emptytext.jsonl", '{"text": "  "}\n', "emptytext.jsonl:1: field 'text' is empty"),
    ("dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "dup.jsonl:2: duplicate document id 'a'"),
    ("bad.pdf", "%PDF-1.4 this is not really a pdf", "bad.pdf: unreadable PDF"),
    ("table.csv", "a,b", "table.csv: unsupported file type"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(IngestError) as e:
        read_documents([path])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_invalid_utf8_and_missing_path(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes(b"line one\nline two caf\xe9\n")
    with pytest.raises(IngestError, match=r"latin.txt:2: not valid UTF-8"):
        read_documents([f])
    with pytest.raises(IngestError, match="nope: no such file"):
        read_documents([tmp_path / "nope"])


def test_pdf_without_text_is_refused(tmp_path):
    path = make_pdf(tmp_path / "scan.pdf", [""])
    with pytest.raises(IngestError, match="scan.pdf: no extractable text"):
        read_documents([path])


def test_skip_bad_reports_and_continues(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "mixed.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    skipped = []
    docs = read_documents([tmp_path], skip_bad=True, on_skip=skipped.append)
    assert sorted(d.text for d in docs) == ["fine", "ok"]
    assert len(skipped) == 2 and any("mixed.jsonl:2" in s for s in skipped)


# ----------------------------------------------------------------------------- chunking


def _doc(text, fmt="text", **kw):
    return Document(id="d", text=text, source="d", format=fmt, **kw)


TEXT = " ".join(f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(60))


def test_fixed_chunks_have_exact_size_and_overlap(counter):
    chunks = chunk_document(_doc(TEXT), counter, ChunkConfig("fixed", size=50, overlap=10))
    starts = counter.starts(TEXT)
    assert all(c.n_tokens == 50 for c in chunks[:-1]) and 0 < chunks[-1].n_tokens <= 50
    for a, b in zip(chunks, chunks[1:]):  # each window starts 40 tokens after the previous one
        assert starts.index(b.start) - starts.index(a.start) == 40
    assert chunks[0].start == 0 and chunks[-1].end == len(TEXT)


def test_recursive_chunks_respect_size_offsets_and_sentences(counter):
    chunks = chunk_document(_doc(TEXT), counter, ChunkConfig("recursive", size=60, overlap=15))
    assert len(chunks) > 5
    for c in chunks:
        assert TEXT[c.start:c.end] == c.text
        assert c.n_tokens <= 60 and counter.count(c.text) <= 60
        assert c.text.startswith("Sentence") and c.text.endswith(".")  # cut between sentences
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered or TEXT[i] == " " for i in range(len(TEXT)))
    assert any(a.end > b.start for a, b in zip(chunks, chunks[1:]))  # neighbours overlap


def test_recursive_splits_by_headings_and_keeps_their_path(counter):
    md = ("Intro line.\n\n# Gases\n\nGases fill their container.\n\n## Oxygen\n\nOxygen supports burning.\n\n"
          "## Nitrogen\n\nNitrogen is mostly inert.\n\n# Metals\n\nIron rusts.\n")
    chunks = chunk_document(_doc(md, "markdown"), counter, ChunkConfig("recursive", size=200, overlap=0))
    assert [c.heading for c in chunks] == ["", "Gases", "Gases > Oxygen", "Gases > Nitrogen", "Metals"]
    assert chunks[2].text == "## Oxygen\n\nOxygen supports burning."
    assert context_text("Chem_Book", chunks[2].heading, chunks[2].text).startswith("Chem Book > Gases > Oxygen\n")
    plain = chunk_document(_doc(md, "text"), counter, ChunkConfig("recursive", size=200, overlap=0))
    assert len(plain) == 1  # plain text has no headings: one chunk fits


def test_unbreakable_text_falls_back_to_token_cuts(counter):
    text = "x" * 3000  # no spaces or sentences anywhere
    chunks = chunk_document(_doc(text), counter, ChunkConfig("recursive", size=40, overlap=0))
    assert all(c.n_tokens <= 40 for c in chunks) and "".join(c.text for c in chunks) == text


def test_pdf_chunks_know_their_page(tmp_path, counter):
    (doc,) = read_documents([make_pdf(tmp_path / "p.pdf", [TEXT[:400], TEXT[400:800]])])
    chunks = chunk_document(doc, counter, ChunkConfig("recursive", size=30, overlap=0))
    assert chunks[0].page == 1 and chunks[-1].page == 2


def test_none_is_one_chunk_and_bad_configs_are_refused(counter):
    assert len(chunk_document(_doc(TEXT), counter, ChunkConfig("none"))) == 1
    for bad in (ChunkConfig("words"), ChunkConfig(size=0), ChunkConfig(size=10, overlap=10)):
        with pytest.raises(RagError):
            bad.validate()
