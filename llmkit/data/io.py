"""Corpus input/output and the runner every data step shares.

Formats, chosen by the file name (compression is also recognised by its magic bytes):
  *.jsonl / *.json / *.ndjson   one JSON object per line; the text is in `text_field`, other fields are kept
  *.txt (anything else)         plain text; a document is a line (`unit="line"`, the default), a block of
                                non-blank lines (`unit="paragraph"`) or the whole file (`unit="file"`)
  + .gz / .zst / .zstd          gzip or zstandard compression, read and written as streams

Reading is streaming: the main process reads raw lines in chunks of about `CHUNK_BYTES` and hands them to
`workers` processes (bounded in flight, so memory stays constant however large the input); the workers
decode, parse, process and serialise, and the main process only writes bytes. Output is written to a
temporary file beside the target and renamed into place, so a failed run leaves nothing half-written.

Bad input (malformed JSON, a missing or non-string text field, bytes that are not UTF-8) raises
`DataError` naming file and line; with `skip_bad=True` the line is dropped and counted in the report
under "bad_input" instead (with a few examples) — never silently.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20  # ~1 MB of raw input per task: large enough to amortise IPC, small enough to stream
CHUNK_DOCS = 2000
MAX_EXAMPLES = 3
SNIPPET = 200  # characters of text kept per report example

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
UNITS = ("line", "paragraph", "file")


class DataError(ValueError):
    """Bad input data or options; the message names the file (and line) and what was expected."""


# ----------------------------------------------------------------------------- paths, formats, shards


def split_format(path: str | os.PathLike) -> tuple[str, str | None]:
    """('jsonl' | 'txt', None | 'gz' | 'zst') from a file name."""
    name = str(path).lower()
    comp = None
    for suffix, c in ((".gz", "gz"), (".zst", "zst"), (".zstd", "zst")):
        if name.endswith(suffix):
            name, comp = name[: -len(suffix)], c
            break
    return ("jsonl" if name.endswith(JSONL_SUFFIXES) else "txt"), comp


def iter_jsonl(lines: Iterable[str], source: str, error: type[Exception] = DataError) -> Iterator[tuple[str, Any]]:
    """("file:line", value) for every non-blank JSONL line; a malformed one raises `error` naming file:line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{source}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Input paths with glob patterns expanded (sorted) and directories listed; each must be a file."""
    files: list[str] = []
    for item in inputs:
        item = str(item)
        if os.path.isdir(item):
            files.extend(sorted(str(p) for p in Path(item).rglob("*") if p.is_file()))
        elif any(c in item for c in "*?[") and not os.path.exists(item):
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise DataError(f"{item}: no file matches this pattern")
            files.extend(matched)
        elif not os.path.isfile(item):
            raise DataError(f"{item}: no such file")
        else:
            files.append(item)
    if not files:
        raise DataError("no input files given")
    return files


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n); None -> (0, 1)."""
    if shard in (None, ""):
        return 0, 1
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise DataError(f"--shard must look like i/n (e.g. 0/8), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise DataError(f"--shard {shard}: need 0 <= i < n")
    return i, n


def select_shard(files: list[str], shard: tuple[int, int]) -> list[str]:
    """Files i, i+n, i+2n, ... of the list: every machine gets the same list and takes its own slice."""
    i, n = shard
    return files[i::n]


def shard_output(output: str, shard: tuple[int, int]) -> str:
    """The output path for this shard: `{shard}` in the path is replaced by i (zero-padded); without the
    placeholder and with n > 1, `-i-of-n` goes before the suffixes (out.jsonl.gz -> out-00003-of-00008.jsonl.gz)."""
    i, n = shard
    if "{shard}" in output:
        return output.replace("{shard}", f"{i:05d}")
    if n == 1:
        return output
    p = Path(output)
    suffixes = "".join(s for s in p.suffixes if len(s) <= 7)
    stem = p.name[: len(p.name) - len(suffixes)] if suffixes else p.name
    return str(p.with_name(f"{stem}-{i:05d}-of-{n:05d}{suffixes}"))


# ----------------------------------------------------------------------------- byte streams


def open_read(path: str) -> io.BufferedIOBase:
    """A binary stream of the decompressed bytes (gzip/zstd detected by magic bytes)."""
    raw = open(path, "rb")
    magic = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return raw


class AtomicWriter:
    """Binary writer to `path` through a temporary file renamed into place on success (gzip/zstd by suffix)."""

    def __init__(self, path: str, compresslevel: int = 6):
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        self._raw = open(self.tmp, "wb")
        comp = split_format(path)[1]
        if comp == "gz":
            self._f = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=compresslevel, mtime=0)
        elif comp == "zst":
            import zstandard

            self._f = zstandard.ZstdCompressor(level=3).stream_writer(self._raw, closefd=False)
        else:
            self._f = self._raw
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self._f.write(data)
        self.bytes += len(data)

    def commit(self) -> None:
        if self._f is not self._raw:
            self._f.close()
        self._raw.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        for f in (self._f, self._raw):
            try:
                f.close()
            except Exception:
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type else self.commit()


def write_json_atomic(path: str, obj: Any) -> None:
    with AtomicWriter(path) as w:
        w.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


# ----------------------------------------------------------------------------- reading in chunks


@dataclass
class Chunk:
    """Raw items of one file, as read by the main process: each item is one future document."""

    path: str
    fmt: str  # 'jsonl' | 'txt'
    lines: list[int]  # 1-based line number where each item starts
    raw: list[bytes]
    first: int  # dataset-wide ordinal of the first item (0-based; counts bad items too)


def read_chunks(files: list[str], unit: str = "line", chunk_bytes: int = CHUNK_BYTES,
                chunk_docs: int = CHUNK_DOCS, first: int = 0) -> Iterator[Chunk]:
    """Raw items of all files in order, in chunks. Items are not decoded here (the workers do that)."""
    if unit not in UNITS:
        raise DataError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    ordinal = first
    for path in files:
        fmt = split_format(path)[0]
        lines: list[int] = []
        raw: list[bytes] = []
        size = 0
        with open_read(path) as f:
            for lineno, item in _items(f, fmt, unit):
                lines.append(lineno)
                raw.append(item)
                size += len(item)
                if size >= chunk_bytes or len(raw) >= chunk_docs:
                    yield Chunk(path, fmt, lines, raw, ordinal)
                    ordinal += len(raw)
                    lines, raw, size = [], [], 0
        if raw:
            yield Chunk(path, fmt, lines, raw, ordinal)
            ordinal += len(raw)


def _items(f, fmt: str, unit: str) -> Iterator[tuple[int, bytes]]:
    if fmt == "jsonl" or unit == "line":
        for lineno, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if line.strip() or fmt == "txt":  # blank JSONL lines are no records; blank text lines are empty docs
                yield lineno, line
        return
    if unit == "file":
        yield 1, f.read()
        return
    block: list[bytes] = []
    start = 0
    for lineno, line in enumerate(f, 1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield start, b"\n".join(block)
            block = []
    if block:
        yield start, b"\n".join(block)


# ----------------------------------------------------------------------------- decoding and encoding


@dataclass
class Batch:
    """Decoded documents of one chunk, handed to a processor. `records` holds the JSON objects (None for text)."""

    texts: list[str]
    records: list[dict | None]
    path: str
    lines: list[int]
    ordinals: list[int]

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"


@dataclass
class Tally:
    """What a step did: documents in/out, per-rule counts (removed, modified, ...) and a few examples."""

    max_examples: int = MAX_EXAMPLES
    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0
    bad: int = 0
    bad_examples: list[dict] = field(default_factory=list)
    rules: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # step-specific counters (summed on merge)

    def count(self, rule: str, key: str = "removed", n: int = 1) -> None:
        r = self.rules.setdefault(rule, {"examples": []})
        r[key] = r.get(key, 0) + n

    def hit(self, rule: str, where: str, text: str | None = None, key: str = "removed", **detail) -> None:
        """Count one document for `rule` and keep it as an example while there are fewer than max_examples."""
        self.count(rule, key)
        examples = self.rules[rule]["examples"]
        if len(examples) < self.max_examples:
            ex: dict[str, Any] = {"where": where, **detail}
            if text is not None:
                ex["text"] = snippet(text)
            examples.append(ex)

    def add(self, key: str, n: float = 1) -> None:
        self.extra[key] = self.extra.get(key, 0) + n

    def bad_item(self, error: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < self.max_examples:
            self.bad_examples.append({"error": error})

    def merge(self, other: Tally) -> None:
        self.documents_in += other.documents_in
        self.documents_out += other.documents_out
        self.bytes_in += other.bytes_in
        self.bad += other.bad
        self.bad_examples.extend(other.bad_examples[: self.max_examples - len(self.bad_examples)])
        for name, r in other.rules.items():
            mine = self.rules.setdefault(name, {"examples": []})
            for k, v in r.items():
                if k == "examples":
                    mine["examples"].extend(v[: self.max_examples - len(mine["examples"])])
                else:
                    mine[k] = mine.get(k, 0) + v
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v


def snippet(text: str, n: int = SNIPPET) -> str:
    return text if len(text) <= n else text[:n] + "…"


def decode_chunk(chunk: Chunk, text_field: str, skip_bad: bool, tally: Tally) -> Batch:
    """Decode and parse the raw items; bad ones raise DataError (or are counted with skip_bad)."""
    texts: list[str] = []
    records: list[dict | None] = []
    lines: list[int] = []
    ordinals: list[int] = []
    jsonl = chunk.fmt == "jsonl"
    for k, raw in enumerate(chunk.raw):
        tally.bytes_in += len(raw) + 1
        try:
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{chunk.path}:{chunk.lines[k]}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1})") from None
            if jsonl:
                try:
                    rec = json.loads(s)
                except json.JSONDecodeError as e:
                    raise DataError(f"{chunk.path}:{chunk.lines[k]}: malformed JSON ({e.msg} at column "
                                    f"{e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{chunk.path}:{chunk.lines[k]}: expected a JSON object, got "
                                    f"{type(rec).__name__}")
                text = rec.get(text_field)
                if not isinstance(text, str):
                    what = "no" if text_field not in rec else f"a non-string ({type(text).__name__})"
                    raise DataError(f"{chunk.path}:{chunk.lines[k]}: {what} {text_field!r} field (keys: "
                                    f"{', '.join(list(rec)[:8]) or 'none'}); set --text-field")
            else:
                rec, text = None, s
        except DataError as e:
            if not skip_bad:
                raise
            tally.bad_item(str(e))
            continue
        texts.append(text)
        records.append(rec)
        lines.append(chunk.lines[k])
        ordinals.append(chunk.first + k)
    tally.documents_in += len(texts)
    return Batch(texts, records, chunk.path, lines, ordinals)


def encode_docs(texts: list[str], records: list[dict | None], out_fmt: str, text_field: str,
                unit: str = "line") -> bytes:
    """Serialise documents for the output format (records keep their other fields)."""
    parts: list[str] = []
    if out_fmt == "jsonl":
        dumps = json.dumps
        for text, rec in zip(texts, records):
            if rec is None:
                rec = {text_field: text}
            else:
                rec[text_field] = text
            parts.append(dumps(rec, ensure_ascii=False))
        return ("\n".join(parts) + "\n").encode() if parts else b""
    if unit == "paragraph":  # documents are separated by one blank line, so none may contain a blank line
        parts = ["\n".join(l for l in t.split("\n") if l.strip()) for t in texts]
        return "".join(p + "\n\n" for p in parts if p).encode()
    if unit == "file":
        return "".join(t if t.endswith("\n") else t + "\n" for t in texts).encode()
    # one document per line: line breaks inside a document become spaces
    return "".join(t.replace("\r", " ").replace("\n", " ") + "\n" for t in texts).encode()


# ----------------------------------------------------------------------------- parallel map


Processor = Callable[[Batch, Tally], list[str | None]]  # new text per document, None = removed


@dataclass
class IOSpec:
    text_field: str = "text"
    skip_bad: bool = False
    out_fmt: str = "jsonl"
    unit: str = "line"
    max_examples: int = MAX_EXAMPLES


_WORKER: dict[str, Any] = {}


def _init_worker(fn: Callable, state: Any) -> None:
    _WORKER["fn"], _WORKER["state"] = fn, state


def _call_worker(chunk: Chunk):
    return _WORKER["fn"](_WORKER["state"], chunk)


def parallel_map(fn: Callable[[Any, Chunk], Any], state: Any, chunks: Iterable[Chunk], workers: int,
                 max_in_flight: int | None = None) -> Iterator[Any]:
    """fn(state, chunk) for every chunk, results in input order. `state` is sent to each worker once.
    At most `max_in_flight` chunks are read ahead, so memory stays bounded on inputs of any size."""
    if workers <= 1:
        for chunk in chunks:
            yield fn(state, chunk)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    max_in_flight = max_in_flight or 3 * workers
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(fn, state))
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.apply_async(_call_worker, (chunk,)))
            if len(pending) >= max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _map_chunk(state: tuple[Processor, IOSpec], chunk: Chunk) -> tuple[bytes, Tally]:
    processor, spec = state
    tally = Tally(spec.max_examples)
    batch = decode_chunk(chunk, spec.text_field, spec.skip_bad, tally)
    out = processor(batch, tally)
    texts, records = [], []
    for t, r in zip(out, batch.records):
        if t is not None:
            texts.append(t)
            records.append(r)
    tally.documents_out += len(texts)
    return encode_docs(texts, records, spec.out_fmt, spec.text_field, spec.unit), tally


class Progress:
    """Documents and MB/s on stderr (tqdm), plus one summary line at the end."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.t0 = time.perf_counter()
        self.docs = 0
        self.bytes = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit=" docs", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

    def update(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{self.mb_per_s:.1f} MB/s", refresh=False)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class StepIO:
    """Where a step reads and writes, shared by all steps (the CLI's common options)."""

    inputs: list[str]
    output: str
    report: str | None = None
    text_field: str = "text"
    workers: int = 1
    shard: str | None = None
    skip_bad: bool = False
    unit: str = "line"
    progress: bool = True
    max_examples: int = MAX_EXAMPLES

    def resolve(self) -> tuple[list[str], str, str, tuple[int, int]]:
        """(this shard's files, output path, report path, shard)."""
        shard = parse_shard(self.shard)
        files = select_shard(expand_inputs(self.inputs), shard)
        output = shard_output(str(self.output), shard)
        out_abs = os.path.abspath(output)
        if any(os.path.abspath(f) == out_abs for f in files):
            raise DataError(f"{output}: the output is also an input")
        report = shard_output(self.report, shard) if self.report else output + ".report.json"
        return files, output, report, shard

    def spec(self, output: str) -> IOSpec:
        return IOSpec(self.text_field, self.skip_bad, split_format(output)[0], self.unit, self.max_examples)


def run_map(step: str, io_: StepIO, processor: Processor, options: dict | None = None,
            chunks: Iterable[Chunk] | None = None, extra_report: Callable[[Tally], dict] | None = None) -> dict:
    """Stream the inputs through `processor` on `io_.workers` processes, write the output and the report."""
    files, output, report_path, shard = io_.resolve()
    spec = io_.spec(output)
    total = Tally(io_.max_examples)
    progress = Progress(f"llmkit data {step}", io_.progress)
    chunks = read_chunks(files, io_.unit) if chunks is None else chunks
    try:
        with AtomicWriter(output) as writer:
            for data, tally in parallel_map(_map_chunk, (processor, spec), chunks, io_.workers):
                writer.write(data)
                total.merge(tally)
                progress.update(tally.documents_in + tally.bad, tally.bytes_in)
    finally:
        progress.close()
    report = build_report(step, files, output, shard, options or {}, total, progress, writer.bytes)
    if extra_report is not None:
        report.update(extra_report(total))
    finish(step, report, report_path, io_.progress)
    return report


def build_report(step: str, files: list[str], output: str, shard: tuple[int, int], options: dict, total: Tally,
                 progress: Progress, bytes_out: int) -> dict:
    rules = {}
    for name, r in total.rules.items():
        rules[name] = {k: v for k, v in r.items() if k != "examples"} | {"examples": r["examples"]}
    return {
        "step": step,
        "inputs": files,
        "output": output,
        "shard": f"{shard[0]}/{shard[1]}",
        "options": options,
        "documents_in": total.documents_in,
        "documents_out": total.documents_out,
        "documents_removed": total.documents_in - total.documents_out,
        "bad_input": {"count": total.bad, "examples": total.bad_examples},
        "rules": rules,
        **({"counts": total.extra} if total.extra else {}),
        "bytes_in": total.bytes_in,
        "bytes_out": bytes_out,
        "seconds": round(progress.seconds, 3),
        "mb_per_s": round(progress.mb_per_s, 3),
    }


def finish(step: str, report: dict, report_path: str, verbose: bool = True) -> None:
    report["report"] = report_path
    write_json_atomic(report_path, report)
    if verbose:
        bad = report["bad_input"]["count"]
        print(f"llmkit data {step}: {report['documents_in']} -> {report['documents_out']} documents"
              + (f", {bad} bad lines skipped" if bad else "")
              + f", {report['bytes_in'] / 1e6:.1f} MB in {report['seconds']:.1f} s ({report['mb_per_s']:.1f} MB/s);"
              f" report: {report_path}", file=sys.stderr)


def iter_texts(files: Iterable[str], text_field: str = "text", unit: str = "line",
               skip_bad: bool = False) -> Iterator[tuple[str, str]]:
    """(text, 'file:line') for every document of the files: for small side inputs (eval sets, examples)."""
    for chunk in read_chunks(expand_inputs(files), unit):
        batch = decode_chunk(chunk, text_field, skip_bad, Tally())
        for i, t in enumerate(batch.texts):
            yield t, batch.where(i)


def iter_records(files: Iterable[str], text_field: str = "text", unit: str = "line"
                 ) -> Iterator[tuple[str, dict | None, str]]:
    """(text, record, 'file:line') for every document of the files."""
    for chunk in read_chunks(expand_inputs(files), unit):
        batch = decode_chunk(chunk, text_field, False, Tally())
        for i, t in enumerate(batch.texts):
            yield t, batch.records[i], batch.where(i)
