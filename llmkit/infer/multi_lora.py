"""Many LoRA adapters served at once on one base model, each request choosing its own (S-LoRA / Punica's idea).

Every adapted linear layer keeps the base weight once and the adapters stacked, A [N+1, r, in] and
B [N+1, out, r] (slot 0 is all zeros: the base model; smaller ranks are zero-padded), and adds to row b
of a batch s_i B_i A_i x for that row's adapter i, as two batched matmuls over the gathered adapters:

    model, names = attach_adapters(model, {"sql": "runs/sql/adapter", "poems": "runs/poems/adapter"})
    engine = Engine(model)                                   # the engine sets each row's adapter per forward
    engine.submit(ids, RequestOptions(adapter=names.index("sql") + 1), on_event)

Adapters are PEFT/llmkit LoRA or rsLoRA directories (adapter_config.json + adapter_model.safetensors);
DoRA and the other methods change more than a low-rank delta and are refused. Outputs equal the adapter
merged into the base (tested), without merging or copying the base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from llmkit.peft.core import PEFT_PREFIX, PeftError, read_adapter_config, read_adapter_weights, swap


class AdapterRows:
    """Which adapter each row of the batch in flight uses (0: none); set by the engine around each forward."""

    def __init__(self, names: list[str]):
        self.names = names
        self.index: Tensor | None = None  # [B] long; None when no row uses an adapter


class MultiLoRALinear(nn.Module):
    """A base linear layer (plain or quantised) plus stacked LoRA adapters, one chosen per batch row."""

    def __init__(self, base: nn.Module, rows: AdapterRows, A: Tensor, B: Tensor, scaling: Tensor):
        super().__init__()
        self.base, self.rows = base, rows
        self.register_buffer("A", A, persistent=False)  # [N+1, r, in]
        self.register_buffer("B", B * scaling.view(-1, 1, 1), persistent=False)  # [N+1, out, r], scaled

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        index = self.rows.index
        if index is None:  # the engine leaves it unset when every row is the base's (no device sync per layer)
            return y
        h = x.to(self.A.dtype).reshape(x.shape[0], -1, x.shape[-1])  # [B, T, in]
        delta = torch.bmm(torch.bmm(h, self.A[index].transpose(1, 2)), self.B[index].transpose(1, 2))
        return y + delta.reshape(*y.shape).to(y.dtype)


def attach_adapters(model: nn.Module, adapters: dict[str, str | Path]) -> tuple[nn.Module, list[str]]:
    """Put every adapter of `adapters` (name -> directory) on `model` in place; returns the model and the
    adapter names, in slot order (adapter i is RequestOptions(adapter=i + 1))."""
    from llmkit.peft import config_from_peft
    from llmkit.peft.lora import LoraConfig

    if not adapters:
        raise PeftError("no adapters given")
    device = next(model.parameters()).device
    deltas: dict[str, dict[int, tuple[Tensor, Tensor, float]]] = {}  # module -> slot -> (A, B, scaling)
    for slot, (name, path) in enumerate(adapters.items(), start=1):
        config = config_from_peft(read_adapter_config(path), f"{path}/adapter_config.json")
        if not isinstance(config, LoraConfig) or config.dora or config.method != "lora":
            raise PeftError(f"adapter {name!r} ({path}): only LoRA/rsLoRA adapters can be served together, "
                            f"not {config.method}")
        for module, (a, b) in _lora_pairs(read_adapter_weights(path, device), f"adapter {name!r} ({path})").items():
            deltas.setdefault(module, {})[slot] = (a, b, config.scaling)
    rows = AdapterRows(list(adapters))
    modules = dict(model.named_modules())
    for module, by_slot in deltas.items():
        base = modules.get(module)
        if base is None or not hasattr(base, "in_features"):
            raise PeftError(f"{_owner(by_slot, rows)}: the base model has no linear layer {module!r}")
        swap(model, module, _stacked(base, rows, by_slot, len(adapters), module))
    model.adapter_rows = rows
    return model, rows.names


def _lora_pairs(state: dict[str, Tensor], source: str) -> dict[str, tuple[Tensor, Tensor]]:
    """module name -> (A [r, in], B [out, r]) from PEFT-named tensors."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        for kind in ("lora_A", "lora_B"):
            if name.endswith(f".{kind}.weight"):
                parts.setdefault(name[: -len(f".{kind}.weight")], {})[kind] = value
                break
        else:
            raise PeftError(f"{source}: unexpected tensor {key!r} (a LoRA adapter holds lora_A/lora_B weights)")
    for module, pair in parts.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise PeftError(f"{source}: {module} has {sorted(pair)} but needs lora_A and lora_B")
    return {module: (pair["lora_A"], pair["lora_B"]) for module, pair in parts.items()}


def _stacked(base: nn.Module, rows: AdapterRows, by_slot: dict, n: int, module: str) -> MultiLoRALinear:
    r = max(a.shape[0] for a, _, _ in by_slot.values())
    device = next(iter(by_slot.values()))[0].device
    A = torch.zeros(n + 1, r, base.in_features, device=device)
    B = torch.zeros(n + 1, base.out_features, r, device=device)
    scaling = torch.zeros(n + 1, device=device)
    for slot, (a, b, s) in by_slot.items():
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features or b.shape[1] != a.shape[0]:
            raise PeftError(f"adapter {rows.names[slot - 1]!r}: {module} has A {tuple(a.shape)} and B "
                            f"{tuple(b.shape)}, the base layer is {base.in_features} -> {base.out_features}")
        A[slot, : a.shape[0]], B[slot, :, : b.shape[1]], scaling[slot] = a.float(), b.float(), s
    return MultiLoRALinear(base, rows, A, B, scaling)


def _owner(by_slot: dict, rows: AdapterRows) -> str:
    return "adapter " + ", ".join(repr(rows.names[slot - 1]) for slot in by_slot)
