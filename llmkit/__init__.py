"""llmkit: one PyTorch toolkit for the whole life of a large language model."""

__version__ = "0.1.0"

__all__ = ["load", "save", "ModelConfig", "Transformer", "Tokenizer"]


def __getattr__(name: str):
    # Imported lazily so `import llmkit` stays cheap (the CLI's --help must not pay for torch twice).
    if name in ("load", "save"):
        from llmkit import checkpoint

        return getattr(checkpoint, name)
    if name == "ModelConfig":
        from llmkit.config import ModelConfig

        return ModelConfig
    if name == "Transformer":
        from llmkit.model import Transformer

        return Transformer
    if name == "Tokenizer":
        from llmkit.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
