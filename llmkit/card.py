"""Model cards: the README.md every saved checkpoint carries, appended to by later stages."""

from __future__ import annotations

import os
from pathlib import Path

from llmkit.config import ModelConfig


def model_card(cfg: ModelConfig, tokenizer, sections: dict[str, str]) -> str:
    """Markdown: architecture and size first, then one `## title` per section (training, evaluation, ...)."""
    arch = [
        f"- parameters: {cfg.n_params:,}",
        f"- layers {cfg.n_layer}, width {cfg.d_model}, FFN {cfg.d_ff}, heads {cfg.n_head} (kv {cfg.n_kv_head}), "
        f"head dim {cfg.head_dim}",
        f"- {cfg.norm} ({cfg.norm_placement}-norm), {cfg.activation}, positions: {cfg.position}"
        + (f" (theta {cfg.rope_theta:g}, scaling {cfg.rope_scaling})" if cfg.position == "rope" else ""),
        f"- context {cfg.max_seq_len} tokens, vocabulary {cfg.vocab_size}, tied embeddings: {cfg.tie_embeddings}",
    ]
    if tokenizer is not None:
        arch.append(f"- tokenizer: {type(tokenizer.backend.model).__name__}, {tokenizer.vocab_size} tokens")
    parts = [f"# {cfg.name}", "", "A language model trained with [llmkit](https://example.invalid/llmkit).", "",
             "## Architecture", "", *arch, ""]
    for title, body in sections.items():
        parts += [f"## {title}", "", body.strip(), ""]
    parts += ["## Intended use and limitations", "",
              "A research and teaching model. It has not been aligned or evaluated for safety; its output can "
              "be wrong, biased or offensive and should not be relied on.", ""]
    return "\n".join(parts)


def write_card(directory: str | Path, text: str) -> None:
    path = Path(directory) / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_card_section(directory: str | Path, title: str, body: str) -> None:
    """Add (or replace) a `## title` section before the closing limitations section."""
    path = Path(directory) / "README.md"
    text = path.read_text() if path.is_file() else f"# {Path(directory).name}\n"
    marker = "## Intended use and limitations"
    head, sep, tail = text.partition(marker)
    head = _drop_section(head, title)
    section = f"## {title}\n\n{body.strip()}\n\n"
    write_card(directory, head + section + sep + tail if sep else text + "\n" + section)


def _drop_section(text: str, title: str) -> str:
    start = text.find(f"## {title}\n")
    if start < 0:
        return text
    end = text.find("\n## ", start + 1)
    return text[:start] + (text[end + 1:] if end >= 0 else "")
