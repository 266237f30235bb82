"""Corpus preparation: clean, filter, dedup, PII redaction, decontamination (and pack, for token shards).

Each step is a library function taking a `StepIO` (inputs, output, workers, shard, ...) and a config, and
returning the JSON report it also writes; the `llmkit data ...` commands are thin wrappers over them.
The per-document pieces are usable on their own: `Cleaner().clean(text)`, `QualityRules(FilterConfig())
.first_failure(text)`, `PIIRedactor().redact(text)`, `dedup_texts(texts)`, `EvalIndex(items).matches(texts)`.
"""

_EXPORTS = {
    "DataError": "io", "StepIO": "io", "read_chunks": "io", "iter_texts": "io",
    "CleanConfig": "clean", "Cleaner": "clean", "clean": "clean",
    "FilterConfig": "filter", "QualityRules": "filter", "QualityFilter": "filter", "HashedClassifier": "filter",
    "PerplexityScorer": "filter", "detect_language": "filter", "train_classifier": "filter",
    "filter_corpus": "filter",
    "DedupConfig": "dedup", "MinHashConfig": "dedup", "MinHasher": "dedup", "dedup": "dedup",
    "dedup_texts": "dedup", "remove_repeated_lines": "dedup",
    "PIIConfig": "pii", "PIIRedactor": "pii", "redact_pii": "pii",
    "DecontamConfig": "decontaminate", "EvalIndex": "decontaminate", "read_eval_items": "decontaminate",
    "decontaminate": "decontaminate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # lazy, so `llmkit data --help` and `import llmkit.data.pack` do not pay for numpy or regex tables
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"llmkit.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'llmkit.data' has no attribute {name!r}")
