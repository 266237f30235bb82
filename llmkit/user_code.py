"""Python functions a user names on the command line (`--reward-fn`, `--function`): "package.module:name" or
"path/to/file.py:name". Only code the user points at is run, as `python -m` would run it."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path


def load_callable(spec: str, option: str) -> Callable:
    """The function `spec` names; ValueError naming `option` and what is wrong otherwise."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"{option} {spec!r}: expected MODULE:NAME or FILE.py:NAME")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"{option} {spec!r}: {path}: no such file")
        module_spec = importlib.util.spec_from_file_location(f"llmkit_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"{option} {spec!r}: cannot import {target} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{option} {spec!r}: {target} has no function {name!r}")
    return fn
