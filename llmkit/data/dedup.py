"""Deduplication: exact (normalised-text hash), near-duplicate (MinHash + LSH), repeated lines in a document.

Near-duplicates follow Broder (1997) as used for web corpora (GPT-3, The Pile, FineWeb): a document is the
set of its word n-grams ("shingles", default 5 words of the lower-cased, whitespace-normalised text); the
MinHash signature keeps, for each of `num_perm` hash functions, the minimum over the shingles, so two
signatures agree in a position with probability equal to the Jaccard similarity of the sets. LSH cuts the
signature into `bands` x `rows`; documents sharing one band are candidates, and a candidate pair is
accepted only when its signatures agree in >= `threshold` of the positions (an estimate of Jaccard with
standard error sqrt(J(1-J)/num_perm), 0.027 at J=0.9 with 128 permutations). Accepted pairs are joined
into clusters (union-find) and each cluster keeps its first document in input order.

Everything is vectorised over a chunk of documents with numpy, with no Python loop per shingle:
  - shingle hashes: the chunk is one UTF-8 buffer; a polynomial prefix hash modulo 2^64 gives the hash of
    any byte span in O(1) (h(s, e) = (S[e-1] - S[s-1]) * R^-s), finalised with MurmurHash3's fmix64;
  - permutations: multiply-shift hashing ((a * h + b) mod 2^64) >> 32 with odd random 64-bit a (Dietzfelbinger
    et al. 1997), min-reduced per document with `np.minimum.reduceat`;
  - LSH: band keys are sorted per band (no Python dict), clusters come from vectorised label propagation.
The signatures are datasketch-style (uint32 per permutation) but not bit-identical to datasketch's,
whose default hash (SHA-1 per shingle) is ~100x slower; the tests check estimates against exact Jaccard.

`WordHasher` (the span hashing) is shared with decontamination and the classifier filter.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from llmkit.data.io import AtomicWriter, Chunk, DataError, Progress, StepIO, Tally, build_report, decode_chunk, \
    encode_docs, finish, parallel_map, read_chunks

_U64 = np.uint64
_R = _U64(0x9E3779B97F4A7C15)  # odd, so invertible modulo 2^64
_R_INV = _U64(pow(int(_R), -1, 1 << 64))
_POW: dict[str, np.ndarray] = {}


def _powers(m: int) -> tuple[np.ndarray, np.ndarray]:
    """R^k and R^-k modulo 2^64 for k < m (cached, grown by doubling)."""
    if "r" not in _POW or len(_POW["r"]) < m:
        size = max(m, 1 << 16, 2 * len(_POW.get("r", ())))
        with np.errstate(over="ignore"):
            r = np.cumprod(np.full(size, _R, dtype=_U64), dtype=_U64)
            ri = np.cumprod(np.full(size, _R_INV, dtype=_U64), dtype=_U64)
        _POW["r"] = np.concatenate([np.ones(1, _U64), r[:-1]])
        _POW["ri"] = np.concatenate([np.ones(1, _U64), ri[:-1]])
    return _POW["r"], _POW["ri"]


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place: spreads every input bit over the whole word."""
    h ^= h >> _U64(33)
    h *= _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h *= _U64(0xC4CEB9FE1A85EC53)
    h ^= h >> _U64(33)
    return h


def normalize_text(text: str) -> str:
    """The text dedup compares: lower-cased, whitespace runs (newlines included) collapsed to one space."""
    return " ".join(text.lower().split())


class WordHasher:
    """64-bit hashes of word n-grams for a list of normalised texts (words separated by single spaces,
    no newlines), all at once. `ngrams(n)` -> (hashes, doc index of each n-gram, index of its first word)."""

    def __init__(self, norm_texts: list[str]):
        self.n_docs = len(norm_texts)
        data = ("\n".join(norm_texts) + "\n").encode("utf-8", "surrogatepass")
        buf = np.frombuffer(data, dtype=np.uint8)
        m = len(buf)
        r, self._ri = _powers(m)
        with np.errstate(over="ignore"):
            self._S = np.cumsum(buf.astype(_U64) * r[:m], dtype=_U64)
        sep = (buf == 32) | (buf == 10)
        word = ~sep
        prev_sep = np.ones(m, dtype=bool)
        prev_sep[1:] = sep[:-1]
        next_sep = np.ones(m, dtype=bool)
        next_sep[:-1] = sep[1:]
        self.starts = np.flatnonzero(word & prev_sep)
        self.ends = np.flatnonzero(word & next_sep) + 1
        self.doc = np.searchsorted(np.flatnonzero(buf == 10), self.starts)
        self.n_words = np.bincount(self.doc, minlength=self.n_docs)
        self.first_word = np.zeros(self.n_docs, dtype=np.int64)
        np.cumsum(self.n_words[:-1], out=self.first_word[1:])
        # characters (not bytes) per word: UTF-8 continuation bytes are 0b10xxxxxx
        lead = np.cumsum((buf & 0xC0) != 0x80)
        self.word_chars = lead[self.ends - 1] - lead[self.starts] + 1

    def span(self, s: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Hashes of the byte spans [s, e)."""
        S = self._S
        with np.errstate(over="ignore"):
            lo = np.where(s > 0, S[np.maximum(s - 1, 0)], _U64(0))
            h = (S[e - 1] - lo) * self._ri[s]
        return fmix64(h)

    def words(self) -> np.ndarray:
        return self.span(self.starts, self.ends)

    def ngrams(self, n: int, short: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hashes of all n-word windows, in document order. With `short`, a document of 1..n-1 words gives
        one n-gram of all its words (so short documents still get a signature)."""
        k = len(self.starts) - n + 1
        idx = np.flatnonzero(self.doc[:k] == self.doc[n - 1:]) if k > 0 else np.zeros(0, dtype=np.int64)
        h = self.span(self.starts[idx], self.ends[idx + n - 1])
        d = self.doc[idx]
        if short and n > 1:
            small = np.flatnonzero((self.n_words > 0) & (self.n_words < n))
            if len(small):
                first = self.first_word[small]
                last = first + self.n_words[small] - 1
                h = np.concatenate([h, self.span(self.starts[first], self.ends[last])])
                d = np.concatenate([d, small])
                idx = np.concatenate([idx, first])
                order = np.argsort(d, kind="stable")
                h, d, idx = h[order], d[order], idx[order]
        return h, d, idx


# ----------------------------------------------------------------------------- MinHash


def lsh_params(threshold: float, num_perm: int, target: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows (fewest candidates) whose collision probability at `threshold`,
    1 - (1 - t^r)^b, is still >= `target`. Candidates are verified on the full signature afterwards, so
    the banding only has to find them (128 perms at 0.8 -> 16 x 8: 0.95 at J=0.8, 0.9999 at J=0.9)."""
    if not 0 < threshold < 1:
        raise DataError(f"the Jaccard threshold must be in (0, 1), got {threshold}")
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= target:
            return bands, rows
    return num_perm, 1


@dataclass
class MinHashConfig:
    ngram: int = 5  # words per shingle
    num_perm: int = 128  # hash functions (signature length)
    threshold: float = 0.8  # Jaccard similarity at or above which two documents are duplicates
    bands: int = 0  # LSH bands (0 = chosen from threshold and num_perm by lsh_params)
    rows: int = 0  # rows per band (0 = chosen)
    seed: int = 1

    def __post_init__(self):
        if self.ngram < 1 or self.num_perm < 1:
            raise DataError(f"ngram and num_perm must be >= 1, got {self.ngram} and {self.num_perm}")
        if not (self.bands and self.rows):
            self.bands, self.rows = lsh_params(self.threshold, self.num_perm)
        if self.bands * self.rows > self.num_perm:
            raise DataError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")


class MinHasher:
    """Signatures [n_docs, num_perm] uint32 for batches of texts; empty documents get all-0xFFFFFFFF rows."""

    def __init__(self, config: MinHashConfig):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(0, 1 << 63, config.num_perm, dtype=_U64) << _U64(1) | _U64(1)
        self.b = rng.integers(0, 1 << 63, config.num_perm, dtype=_U64)
        self.band_mult = rng.integers(0, 1 << 63, config.rows, dtype=_U64) << _U64(1) | _U64(1)

    def signatures(self, texts: list[str], normalized: bool = False) -> np.ndarray:
        norm = texts if normalized else [normalize_text(t) for t in texts]
        n = len(norm)
        sig = np.full((self.config.num_perm, n), 0xFFFFFFFF, dtype=np.uint32)
        h, d, _ = WordHasher(norm).ngrams(self.config.ngram)
        if len(h):
            starts = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
            docs = d[starts]
            v = np.empty_like(h)
            shift = _U64(32)
            with np.errstate(over="ignore"):
                for j in range(self.config.num_perm):  # one pass per permutation over a cache-friendly row
                    np.multiply(h, self.a[j], out=v)
                    v += self.b[j]
                    v >>= shift
                    sig[j, docs] = np.minimum.reduceat(v, starts)
        return np.ascontiguousarray(sig.T)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """[n_docs, bands] uint64: one hash per band of `rows` signature values."""
        c = self.config
        keys = np.zeros((sig.shape[0], c.bands), dtype=_U64)
        with np.errstate(over="ignore"):
            for j in range(c.bands):
                k = np.full(sig.shape[0], _U64(j + 1), dtype=_U64)
                for t in range(c.rows):
                    k += sig[:, j * c.rows + t].astype(_U64) * self.band_mult[t]
                    k = fmix64(k)
                keys[:, j] = k
        return keys


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of agreeing positions (rows of two aligned signature arrays)."""
    return (np.atleast_2d(sig_a) == np.atleast_2d(sig_b)).mean(axis=1)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """[m, 2] int64 pairs (i < j) of rows sharing a band key: each row is paired with the first and with
    the previous row of its bucket (enough to connect every bucket after verification in practice)."""
    pairs = []
    for j in range(keys.shape[1]):
        order = np.argsort(keys[:, j], kind="stable")
        k = keys[order, j]
        same = np.flatnonzero(k[1:] == k[:-1]) + 1  # positions whose key equals the previous one
        if not len(same):
            continue
        run_start = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        first = run_start[np.searchsorted(run_start, same, side="right") - 1]
        pairs.append(np.stack([order[first], order[same]], axis=1))
        prev = same - 1
        extra = prev != first
        if extra.any():
            pairs.append(np.stack([order[prev[extra]], order[same[extra]]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    p = np.concatenate(pairs).astype(np.int64)
    p.sort(axis=1)
    return np.unique(p, axis=0)


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Label of every node = the smallest node of its component (vectorised label propagation)."""
    labels = np.arange(n, dtype=np.int64)
    if not len(edges):
        return labels
    u, v = edges[:, 0], edges[:, 1]
    while True:
        m = np.minimum(labels[u], labels[v])
        new = labels.copy()
        np.minimum.at(new, u, m)
        np.minimum.at(new, v, m)
        new = new[new]  # pointer jumping
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, labels):
            return labels
        labels = new


def near_duplicates(sig: np.ndarray, hasher: MinHasher, alive: np.ndarray | None = None,
                    batch: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """(label, jaccard) per row: label = the row kept for its cluster (itself when unique), jaccard = the
    estimate on the accepted edge that joined it (1.0 for rows kept). `alive` masks rows to consider."""
    n = sig.shape[0]
    rows = np.arange(n) if alive is None else np.flatnonzero(alive)
    labels = np.arange(n, dtype=np.int64)
    sim_of = np.ones(n, dtype=np.float32)
    if len(rows) < 2:
        return labels, sim_of
    keys = hasher.band_keys(np.asarray(sig[rows]))
    pairs = rows[candidate_pairs(keys)]
    sims = np.zeros(len(pairs), dtype=np.float32)
    for s in range(0, len(pairs), batch):  # gather in batches: sig may be a memory map larger than RAM
        p = pairs[s:s + batch]
        sims[s:s + batch] = estimate_jaccard(sig[p[:, 0]], sig[p[:, 1]])
    ok = sims >= hasher.config.threshold - 1e-9
    edges, sims = pairs[ok], sims[ok]
    comp = connected_components(n, edges)
    labels[rows] = comp[rows]
    if len(edges):  # a removed row's reported similarity: the best accepted edge touching it
        best = np.zeros(n, dtype=np.float32)
        np.maximum.at(best, edges[:, 0], sims)
        np.maximum.at(best, edges[:, 1], sims)
        sim_of = np.where(labels == np.arange(n), 1.0, best).astype(np.float32)
    return labels, sim_of


def exact_hash(norm_texts: list[str]) -> np.ndarray:
    """64-bit BLAKE2b of each normalised text."""
    out = np.empty(len(norm_texts), dtype=_U64)
    for i, t in enumerate(norm_texts):
        out[i] = int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return out


def remove_repeated_lines(text: str) -> tuple[str, int]:
    """Drop lines that repeat an earlier line of the same document (compared stripped; blank lines kept)."""
    lines = text.split("\n")
    if len(lines) < 2:
        return text, 0
    seen: set[str] = set()
    out = []
    for line in lines:
        key = line.strip()
        if key:
            if key in seen:
                continue
            seen.add(key)
        out.append(line)
    removed = len(lines) - len(out)
    return ("\n".join(out) if removed else text), removed


# ----------------------------------------------------------------------------- in-memory API


def dedup_texts(texts: list[str], exact: bool = True, near: bool = True, config: MinHashConfig | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicate a list in memory -> (keep mask, duplicate_of index per text: itself when kept)."""
    norm = [normalize_text(t) for t in texts]
    n = len(texts)
    dup_of = np.arange(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    if exact:
        h = exact_hash(norm)
        _, first, inv = np.unique(h, return_index=True, return_inverse=True)
        dup_of = first[inv.reshape(-1)]
        alive = dup_of == np.arange(n)
    if near:
        hasher = MinHasher(config or MinHashConfig())
        sig = hasher.signatures(norm, normalized=True)
        labels, _ = near_duplicates(sig, hasher, alive & np.array([bool(t) for t in norm]))
        near_dup = alive & (labels != np.arange(n))
        dup_of[near_dup] = labels[near_dup]
        alive &= ~near_dup
    return alive, dup_of


# ----------------------------------------------------------------------------- dataset-level dedup (two passes)


@dataclass
class DedupConfig:
    exact: bool = True  # drop documents whose normalised text equals an earlier one
    near: bool = True  # drop near-duplicates (MinHash + LSH)
    repeated_lines: bool = False  # drop lines repeated inside a document (before hashing)
    minhash: MinHashConfig | None = None
    tmp_dir: str | None = None  # where the signature memory map goes (default: beside the output)

    def __post_init__(self):
        if self.minhash is None:
            self.minhash = MinHashConfig()


KEEP, EXACT, NEAR, BAD = 0, 1, 2, 3


def _signature_chunk(state, chunk: Chunk):
    """Pass 1 in a worker: decode, normalise, hash -> arrays for the main process."""
    config, hasher, text_field, skip_bad, max_examples = state
    tally = Tally(max_examples)
    batch = decode_chunk(chunk, text_field, skip_bad, tally)
    texts = batch.texts
    if config.repeated_lines:
        texts = [remove_repeated_lines(t)[0] for t in texts]
    norm = [normalize_text(t) for t in texts]
    ex = exact_hash(norm) if config.exact else np.zeros(len(norm), dtype=_U64)
    sig = hasher.signatures(norm, normalized=True) if config.near else None
    nonempty = np.array([bool(t) for t in norm], dtype=bool)
    return (np.asarray(batch.ordinals, dtype=np.int64), np.asarray(batch.lines, dtype=np.int64), ex, sig,
            nonempty, tally, chunk.path, chunk.first + len(chunk.raw))


def _apply_chunk(state, chunk: Chunk):
    """Pass 2 in a worker: keep, drop (with examples) and write; kept records pass through byte for byte
    unless lines are edited or the format changes."""
    config, spec, reason, dup_of, sim_of, where_of = state
    tally = Tally(spec.max_examples)
    passthrough = not config.repeated_lines and spec.out_fmt == chunk.fmt and spec.unit == "line"
    first = chunk.first
    r = reason[first:first + len(chunk.raw)]
    if passthrough:
        out = []
        for k, raw in enumerate(chunk.raw):
            code = r[k]
            if code == BAD:
                continue
            tally.documents_in += 1
            tally.bytes_in += len(raw) + 1
            if code == KEEP:
                out.append(raw)
                continue
            _drop_example(tally, code, chunk, k, first + k, raw, spec, dup_of, sim_of, where_of)
        tally.documents_out = len(out)
        return (b"\n".join(out) + b"\n") if out else b"", tally
    keep_idx = [k for k in range(len(chunk.raw)) if r[k] != BAD]
    sub = Chunk(chunk.path, chunk.fmt, [chunk.lines[k] for k in keep_idx], [chunk.raw[k] for k in keep_idx], first)
    batch = decode_chunk(sub, spec.text_field, False, tally)
    batch.ordinals = [first + k for k in keep_idx]
    texts, records = [], []
    for i, text in enumerate(batch.texts):
        o = batch.ordinals[i]
        code = reason[o]
        if code != KEEP:
            _drop_example(tally, code, chunk, o - first, o, None, spec, dup_of, sim_of, where_of, text)
            continue
        if config.repeated_lines:
            new, n = remove_repeated_lines(text)
            if n:
                tally.hit("repeated_lines", batch.where(i), key="modified")
                tally.add("repeated_lines_removed", n)
                text = new
        texts.append(text)
        records.append(batch.records[i])
    tally.documents_out = len(texts)
    return encode_docs(texts, records, spec.out_fmt, spec.text_field, spec.unit), tally


def _drop_example(tally, code, chunk, k, ordinal, raw, spec, dup_of, sim_of, where_of, text=None):
    rule = "exact" if code == EXACT else "near"
    tally.count(rule)
    examples = tally.rules[rule]["examples"]
    if len(examples) >= tally.max_examples:
        return
    if text is None:
        sub = Chunk(chunk.path, chunk.fmt, [chunk.lines[k]], [raw], ordinal)
        text = decode_chunk(sub, spec.text_field, False, Tally()).texts[0]
    ex = {"where": f"{chunk.path}:{chunk.lines[k]}", "duplicate_of": where_of(int(dup_of[ordinal]))}
    if code == NEAR:
        ex["jaccard"] = round(float(sim_of[ordinal]), 4)
    ex["text"] = text[:200]
    examples.append(ex)


class _Where:
    """ordinal -> 'file:line' for report examples, from compact arrays."""

    def __init__(self, files: list[str], file_of: np.ndarray, line_of: np.ndarray):
        self.files, self.file_of, self.line_of = files, file_of, line_of

    def __call__(self, ordinal: int) -> str:
        return f"{self.files[self.file_of[ordinal]]}:{self.line_of[ordinal]}"


def dedup(io_: StepIO, config: DedupConfig | None = None) -> dict:
    """Deduplicate all input files together (dataset level): pass 1 hashes every document in parallel,
    then exact duplicates and MinHash clusters are resolved over the whole set, pass 2 writes the first
    document of every cluster. Memory: ~num_perm*4 bytes per document in a temporary memory map plus
    ~30 bytes per document in RAM; the texts themselves are never held."""

    config = config or DedupConfig()
    files, output, report_path, shard = io_.resolve()
    hasher = MinHasher(config.minhash)
    # pass 1 ------------------------------------------------------------------------------------
    P = config.minhash.num_perm
    tmp_dir = config.tmp_dir or os.path.dirname(os.path.abspath(output))
    os.makedirs(tmp_dir, exist_ok=True)
    fd, sig_path = tempfile.mkstemp(prefix=".llmkit-minhash-", suffix=".u32", dir=tmp_dir)
    progress = Progress("llmkit data dedup (hash)", io_.progress)
    total = Tally(io_.max_examples)
    ords, lines, exh, nonempty, file_ids = [], [], [], [], []
    n_items = 0
    file_index = {f: i for i, f in enumerate(files)}
    try:
        state = (config, hasher, io_.text_field, io_.skip_bad, io_.max_examples)
        results = parallel_map(_signature_chunk, state, read_chunks(files, io_.unit), io_.workers)
        with os.fdopen(fd, "wb") as sig_file:
            for o, ln, ex, sig, ne, tally, path, end in results:
                ords.append(o)
                lines.append(ln)
                exh.append(ex)
                nonempty.append(ne)
                file_ids.append(np.full(len(o), file_index[path], dtype=np.int32))
                if sig is not None:
                    sig_file.write(sig.tobytes())
                total.merge(tally)
                n_items = max(n_items, end)
                progress.update(tally.documents_in + tally.bad, tally.bytes_in)
        progress.close()
        ords_a = np.concatenate(ords) if ords else np.zeros(0, np.int64)
        n_rows = len(ords_a)
        ex_a = np.concatenate(exh) if exh else np.zeros(0, _U64)
        ne_a = np.concatenate(nonempty) if nonempty else np.zeros(0, bool)
        # resolve ------------------------------------------------------------------------------
        row_dup = np.arange(n_rows, dtype=np.int64)
        row_reason = np.full(n_rows, KEEP, dtype=np.uint8)
        row_sim = np.ones(n_rows, dtype=np.float32)
        alive = np.ones(n_rows, dtype=bool)
        if config.exact and n_rows:
            _, first, inv = np.unique(ex_a, return_index=True, return_inverse=True)
            row_dup = first[inv.reshape(-1)].astype(np.int64)
            alive = row_dup == np.arange(n_rows)
            row_reason[~alive] = EXACT
        if config.near and n_rows:
            sig = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n_rows, P))
            labels, sims = near_duplicates(sig, hasher, alive & ne_a)
            near = alive & (labels != np.arange(n_rows))
            row_dup[near] = labels[near]
            row_reason[near] = NEAR
            row_sim = sims
            del sig
    finally:
        if os.path.exists(sig_path):
            os.remove(sig_path)
    # per ordinal (bad items included) for pass 2
    n_ord = n_items
    reason = np.full(n_ord, BAD, dtype=np.uint8)
    reason[ords_a] = row_reason
    dup_of = np.zeros(n_ord, dtype=np.int64)
    dup_of[ords_a] = ords_a[row_dup]
    sim_of = np.ones(n_ord, dtype=np.float32)
    sim_of[ords_a] = row_sim
    file_of = np.zeros(n_ord, dtype=np.int32)
    line_of = np.zeros(n_ord, dtype=np.int64)
    if n_rows:
        file_of[ords_a] = np.concatenate(file_ids)
        line_of[ords_a] = np.concatenate(lines)
    where_of = _Where(files, file_of, line_of)
    # pass 2 ------------------------------------------------------------------------------------
    spec = io_.spec(output)
    progress2 = Progress("llmkit data dedup (write)", io_.progress)
    out_tally = Tally(io_.max_examples)
    try:
        with AtomicWriter(output) as writer:
            state2 = (config, spec, reason, dup_of, sim_of, where_of)
            for data, tally in parallel_map(_apply_chunk, state2, read_chunks(files, io_.unit), io_.workers):
                writer.write(data)
                out_tally.merge(tally)
                progress2.update(tally.documents_in, tally.bytes_in)
    finally:
        progress2.close()
    out_tally.bad, out_tally.bad_examples = total.bad, total.bad_examples
    progress.t0 = min(progress.t0, progress2.t0)
    progress.bytes = total.bytes_in
    options = {"exact": config.exact, "near": config.near, "repeated_lines": config.repeated_lines,
               **{f"minhash_{k}": v for k, v in asdict(config.minhash).items()}}
    report = build_report("dedup", files, output, shard, options, out_tally, progress, writer.bytes)
    report["near_duplicate_clusters"] = int(len(np.unique(row_dup[row_reason == NEAR])))
    finish("dedup", report, report_path, io_.progress)
    return report
