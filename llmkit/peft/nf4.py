"""4-bit NormalFloat weights (QLoRA, Dettmers et al. 2023), in plain PyTorch so they run anywhere.

A weight is cut into blocks of 64 values; each block stores one absmax and 64 4-bit codes indexing the
NF4 codebook (quantiles of a standard normal, rescaled to [-1, 1], with an exact zero). Double
quantisation stores the fp32 absmax constants themselves in 8 bits: their mean is subtracted and each
block of 256 of them keeps one fp32 scale. Bits per weight: 4 + 8/64 + 32/(64*256) ~= 4.127.

On CUDA with bitsandbytes installed, its fused 4-bit kernels do the quantisation and the matmul instead
(same format choices: NF4, block 64, compressed statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmax constants per fp32 scale (double quantisation)
# bitsandbytes' NF4 table (functional.py `get_4bit_type("nf4")`): `nf4_codebook()` rebuilds it from normal quantiles
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2  # a value maps to the nearest code: bucketize against the midpoints


def nf4_codebook(offset: float = 0.9677083) -> Tensor:
    """NF4 from its definition: 8 positive and 7 negative normal quantiles (asymmetric, so 0 is exact), / max."""
    normal = lambda p: torch.special.ndtri(p.double())  # noqa: E731
    pos = normal(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.abs().max()).float()


def quantize_nf4(w: Tensor) -> dict[str, Tensor]:
    """Packed codes (2 per byte) and the double-quantised absmax constants of `w` (any shape)."""
    flat = w.detach().float().reshape(-1)
    blocks = F.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1).clamp_min(1e-12)
    codes = torch.bucketize(blocks / absmax[:, None], _MIDPOINTS.to(w.device)).to(torch.uint8).view(-1)
    packed = (codes[0::2] << 4) | codes[1::2]  # first value in the high nibble, as bitsandbytes packs
    offset = absmax.mean()
    groups = F.pad(absmax - offset, (0, (-absmax.numel()) % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    scale = groups.abs().amax(1).clamp_min(1e-12) / 127
    absmax_q = torch.round(groups / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[: absmax.numel()]
    return {"packed": packed, "absmax_q": absmax_q, "absmax_scale": scale, "absmax_offset": offset.reshape(1)}


def dequantize_nf4(q: dict[str, Tensor], shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
    packed = q["packed"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1).long()
    n_abs = q["absmax_q"].numel()
    groups = F.pad(q["absmax_q"].float(), (0, (-n_abs) % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    absmax = (groups * q["absmax_scale"][:, None]).view(-1)[:n_abs] + q["absmax_offset"]
    values = NF4.to(packed.device)[codes].view(-1, BLOCK) * absmax[:, None]
    return values.view(-1)[: shape.numel()].view(shape).to(dtype)


def _bitsandbytes():
    try:
        import bitsandbytes

        return bitsandbytes
    except ImportError:
        return None


class NF4Weight(nn.Module):
    """A frozen weight matrix held in NF4; `linear(x)` computes x @ W.T in `compute_dtype` (bf16 by default)."""

    def __init__(self, weight: Tensor, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.shape = weight.shape
        self.n_weights = weight.numel()  # counted by the trainable-parameter report
        self.compute_dtype = compute_dtype
        self.bnb_state = None
        bnb = _bitsandbytes() if weight.is_cuda else None
        if bnb is not None:
            packed, self.bnb_state = bnb.functional.quantize_4bit(
                weight.detach().to(compute_dtype), blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
            self.register_buffer("packed", packed)
            return
        for name, tensor in quantize_nf4(weight).items():
            self.register_buffer(name, tensor)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.compute_dtype
        if self.bnb_state is not None:
            return _bitsandbytes().functional.dequantize_4bit(self.packed, self.bnb_state).to(dtype)
        q = {k: getattr(self, k) for k in ("packed", "absmax_q", "absmax_scale", "absmax_offset")}
        return dequantize_nf4(q, self.shape, dtype)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.bnb_state is not None:
            y = _bitsandbytes().matmul_4bit(x.to(self.compute_dtype), self.packed.t(), quant_state=self.bnb_state)
        else:
            y = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        return y if bias is None else y + bias.to(y.dtype)

    def nbytes(self) -> int:
        """Bytes of the stored weight, constants included."""
        own = sum(b.numel() * b.element_size() for b in self.buffers())
        if self.bnb_state is not None:
            state = self.bnb_state
            own += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                own += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
        return own

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, nf4 block {BLOCK}, double-quantised absmax, compute {self.compute_dtype}"


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T that dequantises W again in backward instead of keeping the full-precision copy alive."""

    @staticmethod
    def forward(ctx, x: Tensor, qweight: NF4Weight) -> Tensor:
        ctx.qweight = qweight
        return F.linear(x, qweight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.qweight.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: what QLoRA makes of the layers it does not adapt."""

    def __init__(self, base: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qweight = NF4Weight(base.weight, compute_dtype)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.qweight.linear(x, self.bias).to(x.dtype)


def quantize_model(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ("lm_head",)
                   ) -> nn.Module:
    """Replace every nn.Linear (except `skip`) by an NF4Linear, in place."""
    from llmkit.peft.core import swap

    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            swap(model, name, NF4Linear(m, compute_dtype))
    return model


def model_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes and weight count of the NF4 weights of a model (for bits-per-weight figures)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Weight)]
    return {"bytes": sum(m.nbytes() for m in layers), "weights": sum(m.n_weights for m in layers)}
