"""Parameter-efficient fine-tuning: one small module per family, swapped into the model by name pattern.

    model, tok = llmkit.load("base")
    model = peft.apply(model, peft.LoraConfig(r=8, alpha=16, target_modules="q_proj,v_proj"))
    print(peft.format_report(peft.trainable_report(model)))
    ... train ...
    peft.save_adapter(model, "adapter")           # adapter_config.json + adapter_model.safetensors, as PEFT
    model = peft.load_adapter(llmkit.load("base")[0], "adapter")   # also reads adapters PEFT wrote
    with peft.disabled(model): ref_logits = model(ids)              # the base model, e.g. DPO's reference
    base = peft.merge_and_unload(model)                              # LoRA/DoRA/AdaLoRA/IA3 folded in

Families: lora.py (LoRA, rsLoRA, DoRA, QLoRA on nf4.py), adalora.py, ia3.py, adapter.py (bottleneck),
bitfit.py, prompt.py (prompt tuning, P-tuning, prefix tuning, P-tuning v2).
"""

from __future__ import annotations

import importlib

METHODS = ("full", "lora", "dora", "qlora", "adalora", "adapter", "prefix", "prompt", "p-tuning", "p-tuning-v2",
           "ia3", "bitfit")
# method -> family module; adapter_config.json peft_type -> (family module, config class)
FAMILY = {"lora": "lora", "dora": "lora", "qlora": "lora", "adalora": "adalora", "ia3": "ia3", "adapter": "adapter",
          "bitfit": "bitfit", "prompt": "prompt", "p-tuning": "prompt", "prefix": "prompt", "p-tuning-v2": "prompt"}
PEFT_TYPES = {"LORA": ("lora", "LoraConfig"), "ADALORA": ("adalora", "AdaLoraConfig"), "IA3": ("ia3", "IA3Config"),
              "BOTTLENECK_ADAPTER": ("adapter", "BottleneckConfig"), "BITFIT": ("bitfit", "BitFitConfig"),
              "PROMPT_TUNING": ("prompt", "PromptConfig"), "P_TUNING": ("prompt", "PromptConfig"),
              "PREFIX_TUNING": ("prompt", "PromptConfig")}

__all__ = ["METHODS", "AdapterConfig", "PeftError", "PeftLayer", "apply", "load_adapter", "save_adapter",
           "adapter_state_dict", "disabled", "merge", "unmerge", "merge_and_unload", "trainable_report",
           "format_report", "LoraConfig", "AdaLoraConfig", "IA3Config", "BottleneckConfig", "BitFitConfig",
           "PromptConfig"]

# imported on first use, so `llmkit --help` (which reads METHODS) does not import torch
_LAZY = {"LoraConfig": "lora", "AdaLoraConfig": "adalora", "IA3Config": "ia3", "BottleneckConfig": "adapter",
         "BitFitConfig": "bitfit", "PromptConfig": "prompt", **dict.fromkeys((
             "AdapterConfig", "PeftError", "PeftLayer", "adapter_state_dict", "disabled", "format_report",
             "load_adapter_state", "merge", "merge_and_unload", "read_adapter_config", "read_adapter_weights",
             "save_adapter", "trainable_report", "unmerge"), "core")}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_family(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit.peft' has no attribute {name!r}")


def _family(module: str):
    return importlib.import_module(f"llmkit.peft.{module}")


def apply(model, config, tokenizer=None):
    """Inject `config`'s adapter into `model` (in place for layer methods; prompt methods return a wrapper)."""
    from llmkit.peft.core import PeftError

    if config.method not in FAMILY:
        raise PeftError(f"method must be one of {', '.join(m for m in METHODS if m != 'full')}, got {config.method!r}")
    if getattr(model, "peft_config", None) is not None:
        raise PeftError(f"the model already has a {model.peft_config.method} adapter")
    family = _family(FAMILY[config.method])
    if FAMILY[config.method] == "prompt":
        return family.inject(model, config, tokenizer)
    return family.inject(model, config)


def config_from_peft(d: dict, source: str = "adapter_config.json"):
    """Our config for an adapter_config.json written by PEFT or by llmkit."""
    from llmkit.peft.core import PeftError

    peft_type = d.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise PeftError(f"{source}: peft_type {peft_type!r} is not supported; llmkit reads "
                        f"{', '.join(PEFT_TYPES)}")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise PeftError(f"{source}: task_type {d['task_type']!r} is not supported (expected CAUSAL_LM)")
    module, cls = PEFT_TYPES[peft_type]
    try:
        return getattr(_family(module), cls).from_peft(d)
    except PeftError as e:
        raise PeftError(f"{source}: {e}") from None
    except (KeyError, TypeError) as e:
        raise PeftError(f"{source}: missing or malformed field {e}") from None


def load_adapter(model, path, tokenizer=None):
    """Inject the adapter saved at `path` (by llmkit or PEFT) into a base `model` and load its weights."""
    from pathlib import Path

    from llmkit.peft.core import load_adapter_state, read_adapter_config, read_adapter_weights

    d = read_adapter_config(path)
    config = config_from_peft(d, str(Path(path) / "adapter_config.json"))
    device = next(model.parameters()).device
    state = read_adapter_weights(path, device)
    model = apply(model, config, tokenizer)
    load_adapter_state(model, state, source=str(Path(path) / "adapter_model.safetensors"))
    return model
