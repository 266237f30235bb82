"""What every PEFT family shares: finding target layers by name, swapping them in, the on/off switch,
the trainable-parameter report, and PEFT's adapter directory format.

A family module (lora.py, ia3.py, ...) holds a config dataclass, its layer class and `inject`. Layers keep
the base layer's parameters under their own names (`q_proj.weight` stays `q_proj.weight`), so a base
checkpoint loads into an injected model unchanged and the adapter's tensors are the only new keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
# the projections of a block that "all-linear" means (lm_head is excluded, as in PEFT)
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PeftError(ValueError):
    """An adapter, its config or its targets cannot be used as asked; the message names which."""


@dataclass
class AdapterConfig:
    """Fields and hooks every family config has; a family config adds its own fields (one level, no deeper)."""

    method: str = ""
    mergeable = True  # False for methods that change the inputs (prompts, prefixes), not the weights

    def to_peft(self, model: nn.Module) -> dict:  # pragma: no cover - every family implements it
        """adapter_config.json: PEFT's fields for PEFT's methods."""
        raise NotImplementedError

    def extra_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Adapter tensors that live outside PeftLayers (BitFit's biases), PEFT-named."""
        return {}

    def load_extra_state(self, model: nn.Module, state: dict[str, Tensor], source: str) -> None:
        pass

    def on_unload(self, model: nn.Module) -> None:
        """Called when the adapter is merged away for good."""


class PeftLayer(nn.Module):
    """A base layer plus an adapter. Subclasses keep the base's `weight`/`bias` as their own attributes.

    `disabled` turns the adapter off (the layer computes the base layer alone), so one model can serve as
    its own frozen reference (DPO). `merged` means the adapter is folded into `weight`.
    """

    adapter_names: tuple[str, ...] = ()  # attributes saved in the adapter file (parameters or submodules)

    def __init__(self):
        super().__init__()
        self.disabled = False
        self.merged = False

    def adapter_state(self) -> dict[str, Tensor]:
        """Tensors of this layer's adapter, keyed by PEFT's suffixes (`lora_A.weight`, `ia3_l`, ...)."""
        out = {}
        for name in self.adapter_names:
            obj = getattr(self, name)
            if isinstance(obj, nn.Module):
                out.update({f"{name}.{k}": v for k, v in obj.state_dict().items()})
            elif obj is not None:
                out[name] = obj.detach()
        return out

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        own = self.adapter_state()
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise PeftError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, "
                                f"expected {tuple(own[key].shape)}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)

    def merged_weight(self) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - every subclass implements these
        """The (weight, bias) with the adapter folded in, computed without touching the layer."""
        raise NotImplementedError

    def delta_unmerge(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the (merged) weight and bias."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        out.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return out


# ----------------------------------------------------------------------------- targets


def target_names(model: nn.Module, targets: str | list[str] | tuple[str, ...], kinds=(nn.Linear,)) -> list[str]:
    """Names of the modules of type `kinds` that `targets` selects, PEFT's way.

    A list (or a comma-separated string) selects a module whose name equals an entry or ends with
    "." + entry; a string starting with "re:" is a regular expression that must match the whole name;
    "all-linear" is every projection of every block.
    """
    if isinstance(targets, str) and targets.startswith("re:"):
        pattern = re.compile(targets[3:])
        match = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    else:
        names = resolve_targets(targets)
        match = lambda name: any(name == t or name.endswith("." + t) for t in names)  # noqa: E731
    found = [name for name, m in model.named_modules() if isinstance(m, kinds) and match(name)]
    if not found:
        raise PeftError(f"target modules {targets!r} match no layer of the model; layer names look like "
                        f"{_example_names(model)}")
    return found


def resolve_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """A list of suffix names: "q_proj,v_proj" -> ["q_proj", "v_proj"]; "all-linear" -> every block projection."""
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    out = []
    for t in names:
        out.extend(BLOCK_LINEARS if t == "all-linear" else [t])
    return [t for t in dict.fromkeys(out) if t]


def _example_names(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)  # an eval-mode model stays in eval mode (adapter dropout off)
    setattr(parent, child, new)


def suffixes(names: list[str]) -> list[str]:
    """The last name component of each module, in order, without repeats (what adapter_config.json lists)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def freeze_all_but(model: nn.Module, keep) -> None:
    """requires_grad only for the parameters whose name satisfies `keep(name)`."""
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)))


def peft_layers(model: nn.Module) -> Iterator[tuple[str, PeftLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, PeftLayer):
            yield name, m


# ----------------------------------------------------------------------------- switches and reports


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Within the block, the model computes as its base model (adapters off); e.g. DPO's reference pass."""
    layers = [m for m in model.modules() if hasattr(m, "disabled")]
    merged = [m for m in layers if getattr(m, "merged", False)]
    if merged:
        raise PeftError("adapters are merged into the weights; unmerge them before disabling")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(layers, before):
            m.disabled = state


def trainable_report(model: nn.Module) -> dict:
    """Trainable and total parameter counts (shared tensors counted once; quantised bases by weight count)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(getattr(m, "n_weights", 0) for m in model.modules())  # NF4 bases hold buffers, not parameters
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def format_report(report: dict) -> str:
    return (f"trainable params: {report['trainable']:,} || all params: {report['total']:,} || "
            f"trainable%: {report['percent']:.4f}")


# ----------------------------------------------------------------------------- merging


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place (reversible with `unmerge`); refuses NaN/inf results."""
    for name, layer in peft_layers(model):
        if layer.merged:
            continue
        weight, bias = layer.merged_weight()  # computed aside, as PEFT's safe_merge: a refusal changes nothing
        if not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
            raise PeftError(f"merging the adapter of {name} gives NaN or inf weights; the adapter is broken")
        with torch.no_grad():
            layer.weight.data = weight.to(layer.weight.dtype)
            if bias is not None:
                layer.bias.data = bias.to(layer.bias.dtype)
        layer.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in peft_layers(model):
        if layer.merged:
            layer.delta_unmerge()
            layer.merged = False
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters in and put plain nn.Linear layers back: a base model again, savable with llmkit.save."""
    if getattr(model, "peft_config", None) is not None and not getattr(model.peft_config, "mergeable", True):
        raise PeftError(f"{model.peft_config.method} adapters are not a change of the weights: they cannot be "
                        "merged into the base model")
    merge(model)
    for name, layer in list(peft_layers(model)):
        swap(model, name, layer.to_linear())
    if getattr(model, "peft_config", None) is not None:
        model.peft_config.on_unload(model)
        model.peft_config = None
    return model


# ----------------------------------------------------------------------------- saving and loading


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors with PEFT's key names (`base_model.model.<module>.<suffix>`)."""
    cfg = getattr(model, "peft_config", None)
    if cfg is None:
        raise PeftError("the model has no adapter (call llmkit.peft.apply first)")
    if hasattr(model, "prompt_state"):  # prompt-learning wrappers store one table
        return model.prompt_state()
    out = {}
    for name, layer in peft_layers(model):
        out.update({f"{PEFT_PREFIX}{name}.{k}": v for k, v in layer.adapter_state().items()})
    out.update(cfg.extra_state(model))
    return out


def save_adapter(model: nn.Module, path: str | Path, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT's layout) atomically.

    base_model: the base checkpoint's path or hub id, recorded as PEFT's `base_model_name_or_path`.
    """
    from safetensors.torch import save_file

    cfg = model.peft_config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = {k: v.detach().contiguous().clone() for k, v in adapter_state_dict(model).items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {**cfg.to_peft(model), "base_model_name_or_path": base_model}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if path.exists():
            for file in tmp.iterdir():
                os.replace(file, path / file.name)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_adapter_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise PeftError(f"{file}: missing; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PeftError(f"{file}: not valid JSON ({e})") from None


def read_adapter_weights(path: str | Path, device="cpu") -> dict[str, Tensor]:
    path = Path(path)
    file = path / WEIGHTS_NAME
    if file.is_file():
        from safetensors.torch import load_file

        return load_file(str(file), device=str(device))
    legacy = path / "adapter_model.bin"  # older PEFT versions
    if legacy.is_file():
        return torch.load(legacy, map_location=device, weights_only=True)
    raise PeftError(f"{file}: missing")


def load_adapter_state(model: nn.Module, state: dict[str, Tensor], source: str = "adapter") -> None:
    """Copy PEFT-named tensors into an injected model; a missing or unexpected key fails naming it."""
    if hasattr(model, "load_prompt_state"):
        model.load_prompt_state(state, source)
        return
    layers = dict(peft_layers(model))
    extra = model.peft_config.extra_state(model)
    by_layer: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key in extra:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        layer = next((n for n in _prefixes(name) if n in layers), None)
        if layer is None or not key.startswith(PEFT_PREFIX):
            raise PeftError(f"{source}: unexpected tensor {key!r} (no adapter layer of that name in the model)")
        by_layer.setdefault(layer, {})[name[len(layer) + 1:]] = value
    for name, layer in layers.items():
        expected = set(layer.adapter_state())
        got = by_layer.get(name, {})
        missing = sorted(expected - set(got))
        if missing:
            raise PeftError(f"{source}: tensor {PEFT_PREFIX}{name}.{missing[0]} is missing")
        unexpected = sorted(set(got) - expected)
        if unexpected:
            raise PeftError(f"{source}: unexpected tensor {PEFT_PREFIX}{name}.{unexpected[0]}")
        try:
            layer.load_adapter_state(got)
        except PeftError as e:
            raise PeftError(f"{source}: {name}: {e}") from None
    model.peft_config.load_extra_state(model, {k: v for k, v in state.items() if k in extra}, source)


def _prefixes(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])
