"""Tokenize documents, separate them with EOS, and pack them into flat token shards.

A packed directory holds `index.json` and, per split, shards `train-00000.bin`, ... of uint16
(or uint32 when the vocabulary needs it) read back with numpy memmaps. `TokenWindows`
serves fixed-length training windows in a seeded order and can save and restore its exact
position, which the trainer relies on for bit-identical resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard file


class PackError(ValueError):
    """A packed dataset directory is missing or inconsistent."""


def _is_val(doc_index: int, val_fraction: float, seed: int) -> bool:
    # a stable hash of the document's position: the split does not depend on worker count or order of batches
    h = zlib.crc32(f"{seed}:{doc_index}".encode()) / 0xFFFFFFFF
    return h < val_fraction


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.shards: list[dict] = []
        self.file = None
        self.count = 0

    def write(self, ids: list[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        while arr.size:
            if self.file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.file = open(self.out / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
                self.count = 0
            take = arr[: SHARD_TOKENS - self.count]
            take.tofile(self.file)
            self.count += take.size
            self.shards[-1]["tokens"] += int(take.size)
            arr = arr[take.size:]
            if self.count == SHARD_TOKENS:
                self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def pack_documents(
    documents: Iterable[str],
    tokenizer,
    out: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    sources: list[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict:
    """Tokenize `documents`, append EOS to each, write shards + index.json atomically; returns the index."""
    from tqdm import tqdm

    if tokenizer.eos_id is None:
        raise PackError("the tokenizer has no eos token; packing needs one to separate documents")
    out = Path(out)
    if out.exists():
        raise PackError(f"{out}: already exists; remove it or choose another output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = _pack_into(documents, tokenizer, tmp, val_fraction, seed, batch_size, tqdm(
            desc="packing", unit="doc", disable=not progress))
        if sum(meta["documents"].values()) == 0:
            raise PackError(f"no documents to pack from {', '.join(sources or []) or 'the input'}")
        meta["sources"] = sources or []
        tokenizer.save(tmp / "tokenizer")  # the data carries the tokenizer it was packed with
        (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _pack_into(documents, tokenizer, tmp: Path, val_fraction: float, seed: int, batch_size: int, bar) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    writers = {s: _ShardWriter(tmp, s, dtype) for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    index = 0
    for batch in _batches(documents, batch_size):
        for ids in tokenizer.encode_batch(batch):
            split = "val" if _is_val(index, val_fraction, seed) else "train"
            writers[split].write(ids + [tokenizer.eos_id])
            docs[split] += 1
            index += 1
        bar.update(len(batch))
    bar.close()
    for w in writers.values():
        w.close()
    return {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "val_fraction": val_fraction,
        "seed": seed,
        "documents": docs,
        "tokens": {s: sum(sh["tokens"] for sh in w.shards) for s, w in writers.items()},
        "shards": {s: w.shards for s, w in writers.items()},
    }


def read_documents(files: list[str], text_field: str = "text", txt_unit: str = "paragraph",
                   skip_bad: bool = False) -> Iterator[str]:
    """Documents, streamed by llmkit.data.io: .txt (a file, paragraph or line each) and .jsonl, gzip/zstd too."""
    from llmkit.data.io import Tally, decode_chunk, expand_inputs, read_chunks

    tally = Tally()
    for chunk in read_chunks(expand_inputs(files), unit=txt_unit):
        yield from decode_chunk(chunk, text_field, skip_bad, tally).texts


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:16]


def _batches(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def read_index(path: str | Path) -> dict:
    path = Path(path)
    file = path / "index.json"
    if not file.is_file():
        raise PackError(f"{file}: missing; is {path} a directory written by `llmkit data pack`?")
    return json.loads(file.read_text())


def load_tokens(path: str | Path, split: str) -> np.ndarray:
    """All tokens of one split as one read-only array (memmapped; concatenated only across shards)."""
    path = Path(path)
    meta = read_index(path)
    if split not in meta["shards"]:
        raise PackError(f"{path}/index.json: no split {split!r}; have {sorted(meta['shards'])}")
    parts = [np.memmap(path / s["file"], dtype=meta["dtype"], mode="r") for s in meta["shards"][split] if s["tokens"]]
    if not parts:
        return np.zeros(0, dtype=meta["dtype"])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TokenWindows:
    """Fixed-length windows (seq_len + 1 tokens: inputs and shifted targets) over a packed split.

    Windows are non-overlapping; each epoch visits them in a fresh permutation drawn from
    (seed, epoch). With `world_size` ranks, every step takes `batch_size * world_size`
    consecutive windows of that order and rank r keeps its slice, so the global batch is the
    same whatever the number of processes. `state_dict()` is the exact position.
    """

    def __init__(self, path: str | Path, split: str = "train", seq_len: int = 256, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.tokens = load_tokens(path, split)
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise PackError(f"{path}: split {split!r} has {len(self.tokens)} tokens, fewer than one window of "
                            f"{seq_len + 1}; lower seq_len or pack more text")
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_windows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_windows, generator=g)

    def _take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            k = min(n - len(out), self.n_windows - self.position)
            out.extend(self._order[self.position: self.position + k].tolist())
            self.position += k
        return out

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64, for this rank."""
        windows = self._take(batch_size * self.world_size)[self.rank * batch_size:(self.rank + 1) * batch_size]
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[w * T: w * T + T + 1], dtype=np.int64) for w in windows])
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise PackError(f"data state was saved with seq_len={state['seq_len']}, seed={state['seed']}; "
                            f"this run uses seq_len={self.seq_len}, seed={self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)

    def __len__(self) -> int:
        return self.n_windows
