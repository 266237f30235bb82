"""What every evaluation shares: loading a model for scoring, and the provenance block of a results JSON."""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from pathlib import Path
from typing import Any


def load_for_eval(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) in eval mode; device auto = CUDA when available, dtype auto = fp32 (bf16 on CUDA)."""
    import torch

    from llmkit.checkpoint import load

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
              "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    model, tokenizer = load(path, device=device, dtype=dtypes[dtype])
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json in the checkpoint; evaluation needs one")
    return model.eval(), tokenizer


def config_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (functions by module and name) of a task or run config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_stable).encode()).hexdigest()


def _stable(x: Any) -> str:
    if callable(x):
        return f"{getattr(x, '__module__', '?')}.{getattr(x, '__qualname__', repr(x))}"
    return repr(x)


def provenance(model_path: str | Path | None = None, config: Any = None) -> dict[str, Any]:
    """Model path, config hash, library versions and date for a results JSON."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("llmkit", "torch", "transformers", "tokenizers", "sacrebleu", "rouge-score", "lm_eval"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    out: dict[str, Any] = {
        "model": str(Path(model_path).resolve()) if model_path is not None else None,
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if config is not None:
        out["config_hash"] = config_hash(config)
    return out
