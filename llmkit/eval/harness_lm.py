"""llmkit checkpoints inside EleutherAI's lm-evaluation-harness, as LitGPT and torchtune wrap theirs.

Importing this module registers the model name `llmkit` with lm-eval:

    import lm_eval
    import llmkit.eval.harness_lm  # noqa: F401  (registers "llmkit")

    lm_eval.simple_evaluate(model="llmkit", model_args="pretrained=DIR,batch_size=4", tasks=["hellaswag"])

or wrap a model already in memory: `simple_evaluate(model=LlmkitHarnessLM(model=m, tokenizer=t), ...)`.
The scoring itself is `llmkit.eval.lm.EvalLM`, which mirrors lm-eval's `HFLM`, so model `llmkit` and model
`hf` give the same numbers on the same checkpoint. lm-eval is a test dependency, not a runtime one, so it is
imported here only.
"""

from __future__ import annotations

from pathlib import Path

from llmkit.eval.common import load_for_eval
from llmkit.eval.lm import EvalLM

try:
    # lm-eval registers its own models ("hf", "vllm", ...) only while its registry is empty: do it before
    # adding ours, or they would vanish
    import lm_eval.models  # noqa: F401
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:
    raise ImportError(f"llmkit.eval.harness_lm needs lm-evaluation-harness: pip install lm-eval ({e})") from e


@register_model("llmkit")
class LlmkitHarnessLM(LM):
    """lm-eval's three request types answered by an llmkit model through `EvalLM`."""

    def __init__(self, pretrained: str | Path | None = None, model=None, tokenizer=None, device: str = "auto",
                 dtype: str = "auto", batch_size: int | str = 8, max_length: int | None = None):
        """Load `pretrained` (a checkpoint directory) on `device` in `dtype`, or wrap `model` and `tokenizer`
        as they are (device and dtype apply to loading only)."""
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("give exactly one of pretrained=DIR and model= (a loaded model, with tokenizer=)")
        if pretrained is not None:
            model, tokenizer = load_for_eval(pretrained, device, dtype)
        self.lm = EvalLM(model, tokenizer, batch_size=_batch_size(batch_size), max_length=max_length)
        self._device = self.lm.device

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        return self.lm.loglikelihood([req.args for req in requests])

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        return self.lm.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        return self.lm.generate_until([req.args for req in requests])


def _batch_size(value: int | str) -> int:
    # lm-eval's CLI hands batch sizes over as text and may say "auto"; llmkit has no batch-size search
    if str(value).isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"batch_size must be a positive integer, got {value!r}")
