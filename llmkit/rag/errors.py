"""The errors llmkit.rag raises on bad input: ValueErrors whose message names the file, line or index.

The CLI prints the message on one line and exits 2 (llmkit/cli.py catches ValueError).
"""


class RagError(ValueError):
    """Base class: bad input to a rag function (the message says what and where)."""


class IngestError(RagError):
    """A document could not be read: unreadable PDF, empty file, bad JSONL line, missing field."""


class IndexNotFoundError(RagError):
    """No index at the given path or URI."""


class EmbedderMismatchError(RagError):
    """A query or an update was embedded by another model than the one the index was built with."""
