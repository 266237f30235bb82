"""Post-training quantisation: a module swap plus a state-dict transform (never an edit to model.py).

Methods (all replace the decoder's nn.Linear layers; the embedding and lm_head stay in full precision):
  int8         weight-only, per output channel, symmetric (round to nearest)
  int4         weight-only, group-wise asymmetric (min/max), two values packed per byte (round to nearest)
  gptq         int4 group-wise; GPTQ column-by-column with Hessian error compensation, optional act-order
  awq          int4 group-wise after an activation-aware per-input-channel scale search (kept as input scale)
  smoothquant  W8A8: smoothing factor alpha moves activation outliers into the weights; int8 activations
               are simulated (per-token dynamic quantise/dequantise) since no int8 GEMM kernel is assumed
  llm-int8     LLM.int8(): input columns whose calibration activations exceed a threshold stay in full
               precision, the rest is int8 with vector-wise (per row / per token) scales

`quantize_model` quantises IN PLACE and returns the same model. `save_quantized` writes a checkpoint whose
config.json carries a Hugging Face-like `quantization_config`; `llmkit.load` rebuilds the quantised modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("int8", "int4", "gptq", "awq", "smoothquant", "llm-int8")
GROUP_SIZES = (32, 64, 128)


class QuantizeError(ValueError):
    pass


# ----------------------------------------------------------------------------- primitive quantisers


def quantize_int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: w ~ q * scale[:, None], |error| <= scale / 2."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_params(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric min/max (scale, zero) per group of `group_size` input columns: [out, in / group_size] each."""
    g = w.reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    return scale, torch.round(-lo / scale)


def quantize_int4(w: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """Integer codes 0..15 of w given per-group (scale, zero), same shape as w."""
    s, z = scale.repeat_interleave(group_size, 1), zero.repeat_interleave(group_size, 1)
    return torch.clamp(torch.round(w / s) + z, 0, 15)


def pack_int4(codes: Tensor) -> Tensor:
    """[out, in] codes 0..15 -> [out, in / 2] uint8, the even column in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def fake_quant_int4(w: Tensor, group_size: int) -> Tensor:
    scale, zero = int4_params(w, group_size)
    codes = quantize_int4(w, scale, zero, group_size)
    return (codes - zero.repeat_interleave(group_size, 1)) * scale.repeat_interleave(group_size, 1)


def fake_quant_tokens_int8(x: Tensor) -> Tensor:
    """Per-token dynamic symmetric int8 quantise -> dequantise (simulated int8 activations)."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / scale).clamp(-127, 127) * scale


# ----------------------------------------------------------------------------- modules


class QuantLinear(nn.Module):
    """Base: bias and an optional per-input-channel `input_scale` (x / s; the weight was multiplied by s)."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, input_scale: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", input_scale)

    def scaled_input(self, x: Tensor) -> Tensor:
        return x if self.input_scale is None else x / self.input_scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantLinear):
    """Weight-only int8 per output channel; activations stay in their dtype."""

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, input_scale: Tensor | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias, input_scale)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x = self.scaled_input(x)
        if x.device.type == "cpu" and torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            # one token on a CPU: inductor fuses cast, product and sum into one pass over the int8 bytes
            # (measured 3x faster than the fp32 matvec; aten's _weight_int8pack_mm was 4x slower than fp32 here)
            y = (x.unsqueeze(-2) * self.qweight.to(x.dtype)).sum(-1) * self.scales.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        # scale after the matmul (gpt-fast's form): torch.compile fuses the int8 -> dtype cast into the matmul
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(QuantLinear):
    """Weight-only int4, group-wise asymmetric, two codes per byte; dequantised to the activation dtype."""

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None = None,
                 input_scale: Tensor | None = None):
        super().__init__(qweight.shape[1] * 2, qweight.shape[0], bias, input_scale)
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        g = self.group_size
        codes = unpack_int4(self.qweight).to(dtype)
        return (codes - self.zeros.to(dtype).repeat_interleave(g, 1)) * self.scales.to(dtype).repeat_interleave(g, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.scaled_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            packed, scales_zeros = self._cpu_kernel_weights(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), packed, self.group_size,
                                                           scales_zeros).reshape(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _cpu_kernel_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The CPU int4 kernel's layout, built once per weight/dtype (not saved: the checkpoint keeps the plain one).

        The kernel computes (q - 8) * scale + zero_f, so zero_f = (8 - zero) * scale gives our (q - zero) * scale.
        """
        if torch.compiler.is_compiling():  # traced: inductor's freezing folds the repacking into a constant
            return self._repack_for_cpu(dtype)
        key = (self.qweight.data_ptr(), dtype)
        if getattr(self, "_cpu_cache_key", None) != key:
            self._cpu_cache, self._cpu_cache_key = self._repack_for_cpu(dtype), key
        return self._cpu_cache

    def _repack_for_cpu(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight).to(torch.int32), 1)
        scale = self.scales.float()
        zero_f = (8 - self.zeros.float()) * scale
        return packed, torch.stack([scale.T, zero_f.T], -1).contiguous().to(dtype)


class W8A8Linear(Int8Linear):
    """SmoothQuant: int8 weights per channel and per-token int8 activations (simulated: quantise/dequantise)."""

    def forward(self, x: Tensor) -> Tensor:
        x = fake_quant_tokens_int8(self.scaled_input(x))
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Int8OutlierLinear(Int8Linear):
    """LLM.int8(): outlier input columns in full precision, the rest int8 (row-wise weights, per-token inputs)."""

    def __init__(self, qweight: Tensor, scales: Tensor, outlier_idx: Tensor, outlier_weight: Tensor,
                 bias: Tensor | None = None, input_scale: Tensor | None = None):
        super().__init__(qweight, scales, bias, input_scale)
        self.register_buffer("outlier_idx", outlier_idx)
        self.register_buffer("outlier_weight", outlier_weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = super().dequantize(dtype)
        w[:, self.outlier_idx] = self.outlier_weight.to(dtype)
        return w

    def forward(self, x: Tensor) -> Tensor:
        x = self.scaled_input(x)
        regular = x.index_fill(-1, self.outlier_idx, 0)
        y = F.linear(fake_quant_tokens_int8(regular), Int8Linear.dequantize(self, x.dtype))
        y = y + F.linear(x[..., self.outlier_idx], self.outlier_weight.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


MODULE_FOR_METHOD = {"int8": Int8Linear, "int4": Int4Linear, "gptq": Int4Linear, "awq": Int4Linear,
                     "smoothquant": W8A8Linear, "llm-int8": Int8OutlierLinear}


# ----------------------------------------------------------------------------- calibration statistics


@dataclass
class InputStats:
    """What the calibration pass saw at one linear layer's input."""
    hessian: Tensor  # sum of x x^T (GPTQ's H = 2 X X^T / n up to the constant)
    abs_sum: Tensor  # per input channel (AWQ)
    abs_max: Tensor  # per input channel (SmoothQuant, LLM.int8)
    samples: Tensor  # up to `max_samples` input rows (AWQ loss)
    count: int = 0


@torch.no_grad()
def collect_input_stats(model: nn.Module, layers: dict[str, nn.Linear], calibration: Tensor,
                        max_samples: int = 512, batch_size: int = 8) -> dict[str, InputStats]:
    stats: dict[str, InputStats] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats.get(name)
            if s is None:
                n = x.shape[1]
                s = stats[name] = InputStats(torch.zeros(n, n), torch.zeros(n), torch.zeros(n), x[:0])
            s.hessian += x.T @ x
            s.abs_sum += x.abs().sum(0)
            s.abs_max = torch.maximum(s.abs_max, x.abs().amax(0))
            s.samples = torch.cat([s.samples, x[: max_samples - len(s.samples)]])
            s.count += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for i in range(0, len(calibration), batch_size):
            model(calibration[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return stats


def calibration_tokens(tokenizer, path: str | Path | None = None, n_lines: int = 256, seq_len: int = 128,
                       text_field: str = "text") -> Tensor:
    """[N, seq_len] token ids from a text or JSONL file (default: the bundled Tiny Shakespeare)."""
    from importlib import resources

    path = Path(path) if path else Path(str(resources.files("llmkit") / "assets" / "tinyshakespeare.txt"))
    if not path.is_file():
        raise QuantizeError(f"{path}: calibration file not found")
    lines = path.read_text().splitlines()[: n_lines * 4]
    if path.suffix == ".jsonl":
        lines = [json.loads(line)[text_field] for line in lines if line.strip()]
    ids = tokenizer.encode("\n".join(lines[:n_lines]))
    n = len(ids) // seq_len
    if n == 0:
        raise QuantizeError(f"{path}: fewer than {seq_len} tokens of calibration text")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


# ----------------------------------------------------------------------------- per-layer algorithms


def rtn_int4(layer: nn.Linear, group_size: int, input_scale: Tensor | None = None) -> Int4Linear:
    w = layer.weight.detach().float()
    if input_scale is not None:
        w = w * input_scale
    scale, zero = int4_params(w, group_size)
    return _int4_module(layer, quantize_int4(w, scale, zero, group_size), scale, zero, input_scale)


def _int4_module(layer: nn.Linear, codes: Tensor, scale: Tensor, zero: Tensor, input_scale: Tensor | None) -> Int4Linear:
    bias = None if layer.bias is None else layer.bias.detach().clone()
    return Int4Linear(pack_int4(codes), scale, zero.to(torch.uint8), bias, input_scale)


def int8_module(layer: nn.Linear, cls=Int8Linear, input_scale: Tensor | None = None) -> Int8Linear:
    w = layer.weight.detach().float()
    q, scale = quantize_int8_rows(w if input_scale is None else w * input_scale)
    return cls(q, scale, None if layer.bias is None else layer.bias.detach().clone(), input_scale)


def gptq_int4(layer: nn.Linear, hessian: Tensor, group_size: int, damp: float = 0.01, block_size: int = 128,
              act_order: bool = False) -> Int4Linear:
    """GPTQ (Frantar et al. 2022): quantise columns in order, spreading each one's error over the later ones."""
    W = layer.weight.detach().float().clone()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0])
    # upper Cholesky factor of H^-1: row i holds the update directions for the columns after i
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # groups follow the ORIGINAL column order so the saved layout is the plain group-wise one
    scale, zero = int4_params(layer.weight.detach().float(), group_size)
    codes = torch.zeros_like(W)
    n_cols = W.shape[1]
    for start in range(0, n_cols, block_size):
        end = min(start + block_size, n_cols)
        W1, Err = W[:, start:end].clone(), torch.zeros(W.shape[0], end - start)
        for i in range(end - start):
            col = perm[start + i]
            g = col // group_size
            if not act_order and col % group_size == 0:
                # params of a group from the error-compensated weights, as the reference implementation
                s, z = int4_params(torch.cat([W1[:, i:], W[:, end:]], 1)[:, :group_size], group_size)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            s, z = scale[:, g], zero[:, g]
            q = torch.clamp(torch.round(W1[:, i] / s) + z, 0, 15)
            codes[:, start + i] = q
            err = (W1[:, i] - (q - z) * s) / Hinv[start + i, start + i]
            W1[:, i:] -= err[:, None] * Hinv[start + i, start + i:end][None, :]
            Err[:, i] = err
        W[:, end:] -= Err @ Hinv[start:end, end:]  # lazy batch update of the remaining columns
    codes = codes[:, torch.argsort(perm)]
    return _int4_module(layer, codes, scale, zero, None)


def awq_int4(layer: nn.Linear, stats: InputStats, group_size: int, grid: int = 20) -> Int4Linear:
    """AWQ (Lin et al. 2023): search s = mean|x|^a over a grid of a, minimising ||W X - Q(W s)(X / s)||."""
    W, X = layer.weight.detach().float(), stats.samples
    x_mean = (stats.abs_sum / max(stats.count, 1)).clamp(min=1e-6)
    reference = X @ W.T
    best, best_scale = float("inf"), None
    for a in (i / grid for i in range(grid)):
        s = x_mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = (reference - (X / s) @ fake_quant_int4(W * s, group_size).T).pow(2).mean().item()
        if err < best:
            best, best_scale = err, s
    return rtn_int4(layer, group_size, None if best_scale is None or torch.all(best_scale == 1) else best_scale)


def smoothquant_w8a8(layer: nn.Linear, stats: InputStats, alpha: float) -> W8A8Linear:
    """SmoothQuant (Xiao et al. 2022): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); W s and X / s."""
    w_max = layer.weight.detach().float().abs().amax(0).clamp(min=1e-5)
    s = (stats.abs_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    return int8_module(layer, W8A8Linear, s)


def llm_int8(layer: nn.Linear, stats: InputStats | None, threshold: float) -> Int8OutlierLinear:
    """LLM.int8() (Dettmers et al. 2022): columns whose activations ever exceed `threshold` stay full precision."""
    w = layer.weight.detach().float()
    idx = (torch.nonzero(stats.abs_max > threshold).flatten() if stats is not None
           else torch.zeros(0, dtype=torch.long))
    regular = w.index_fill(1, idx, 0)
    q, scale = quantize_int8_rows(regular)
    bias = None if layer.bias is None else layer.bias.detach().clone()
    return Int8OutlierLinear(q, scale, idx, w[:, idx].clone(), bias)


# ----------------------------------------------------------------------------- whole model


def target_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if type(m) is nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)}


def check_options(method: str, group_size: int) -> None:
    if method not in METHODS:
        raise QuantizeError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if method in ("int4", "gptq", "awq") and group_size not in GROUP_SIZES:
        raise QuantizeError(f"group_size {group_size}: expected one of {GROUP_SIZES}")


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, *, group_size: int = 128, calibration: Tensor | None = None,
                   act_order: bool = False, damp: float = 0.01, alpha: float = 0.5, threshold: float = 6.0,
                   skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace the model's nn.Linear layers (except `skip`) IN PLACE; returns the same model.

    `calibration`: [N, T] token ids, needed by gptq, awq, smoothquant and llm-int8 (see `calibration_tokens`).
    """
    check_options(method, group_size)
    layers = target_linears(model, skip)
    if method in ("int4", "gptq", "awq"):
        bad = [n for n, m in layers.items() if m.in_features % group_size]
        if bad:
            raise QuantizeError(f"group_size {group_size} does not divide the input width of {bad[0]}")
    stats = {}
    if method not in ("int8", "int4"):
        if calibration is None:
            raise QuantizeError(f"method {method!r} needs calibration data (token ids)")
        stats = collect_input_stats(model, layers, calibration.to(next(model.parameters()).device))
    for name, layer in layers.items():
        device, dtype = layer.weight.device, layer.weight.dtype
        layer = layer.float().cpu()
        if method == "int8":
            new = int8_module(layer)
        elif method == "int4":
            new = rtn_int4(layer, group_size)
        elif method == "gptq":
            s = stats[name]
            new = gptq_int4(layer, 2 * s.hessian / s.count, group_size, damp=damp, act_order=act_order)
        elif method == "awq":
            new = awq_int4(layer, stats[name], group_size)
        elif method == "smoothquant":
            new = smoothquant_w8a8(layer, stats[name], alpha)
        else:
            new = llm_int8(layer, stats.get(name), threshold)
        _set_module(model, name, _cast_floats(new, dtype).to(device))
    model.quantization_config = {"quant_method": method, "bits": 4 if method in ("int4", "gptq", "awq") else 8,
                                 "group_size": group_size if method in ("int4", "gptq", "awq") else None,
                                 "act_order": act_order if method == "gptq" else None,
                                 "alpha": alpha if method == "smoothquant" else None,
                                 "threshold": threshold if method == "llm-int8" else None,
                                 "modules": sorted(layers)}
    return model


def _cast_floats(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    for name, buf in module.named_buffers():
        if buf is not None and buf.is_floating_point():
            setattr(module, name, buf.to(dtype))
    return module


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ----------------------------------------------------------------------------- save / load


def save_quantized(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write the quantised model as a checkpoint dir (safetensors) with `quantization_config` in config.json."""
    import os

    from llmkit.checkpoint import save

    if not hasattr(model, "quantization_config"):
        raise QuantizeError("model is not quantised: call quantize_model first")
    path = save(model, tokenizer, path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = model.quantization_config
    config["dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, config_file)
    return path


def convert_for_loading(model: nn.Module, quantization_config: dict, state_dict: dict[str, Tensor]) -> None:
    """Swap the named nn.Linear layers for empty quantised modules shaped after the checkpoint's tensors."""
    method = quantization_config.get("quant_method")
    if method not in MODULE_FOR_METHOD:
        raise QuantizeError(f"config.json quantization_config.quant_method {method!r}: expected one of {METHODS}")
    cls = MODULE_FOR_METHOD[method]
    names = [f for f in ("qweight", "scales", "zeros", "outlier_idx", "outlier_weight") if f in
             cls.__init__.__code__.co_varnames]
    for name in quantization_config["modules"]:
        try:
            tensors = [state_dict[f"{name}.{f}"] for f in names]
        except KeyError as e:
            raise QuantizeError(f"quantised tensor {e.args[0]!r} missing from the checkpoint") from None
        like = {k: torch.empty_like(state_dict[f"{name}.{k}"], device="meta")
                for k in ("bias", "input_scale") if f"{name}.{k}" in state_dict}
        empty = [torch.empty_like(t, device="meta") for t in tensors]
        _set_module(model, name, cls(*empty, like.get("bias"), like.get("input_scale")))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what one decode step streams, roughly)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
