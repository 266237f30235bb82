"""NF4 (QLoRA's 4-bit NormalFloat): the codebook, quantisation error, storage cost, and QLoRA training."""

import pytest
import torch

from llmkit import peft
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.peft.nf4 import BLOCK, NF4, NF4Linear, NF4Weight, dequantize_nf4, model_nbytes, nf4_codebook, \
    quantize_nf4
from llmkit.train.objectives import lm_loss


def test_codebook_is_the_normal_quantiles():
    assert torch.allclose(nf4_codebook(), NF4, atol=1e-6)
    assert NF4[7] == 0 and NF4[0] == -1 and NF4[-1] == 1 and len(NF4) == 16


def reference_nf4(w: torch.Tensor) -> torch.Tensor:
    """Brute force: per 64-block absmax, each value to the nearest code, no double quantisation."""
    blocks = w.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    codes = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[codes] * absmax).view_as(w)


def test_quantisation_error_is_the_codebooks():
    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.02
    q = quantize_nf4(w)
    # with the exact absmax, dequantisation is the nearest-code reconstruction exactly
    blocks = w.view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    codes = torch.stack([q["packed"] >> 4, q["packed"] & 0xF], 1).view(-1, BLOCK).long()
    assert torch.equal(NF4[codes] * absmax[:, None], reference_nf4(w).view(-1, BLOCK))
    # every error is at most half the gap between the two codes around the value (times absmax), plus
    # the double-quantised absmax's own error
    d = dequantize_nf4(q, w.shape)
    ref = reference_nf4(w)
    gaps = (NF4[1:] - NF4[:-1]).max() / 2
    assert ((w - ref).abs().view(-1, BLOCK) <= gaps * absmax[:, None] + 1e-7).all()
    absmax_err = (absmax - (d.view(-1, BLOCK).abs().amax(1))).abs().max()
    assert absmax_err <= absmax.max() * 0.01
    # and the mean squared error is the codebook's expectation for Gaussian weights (Monte Carlo, same codes)
    mse, expected = (d - w).pow(2).mean(), (ref - w).pow(2).mean()
    assert abs(mse - expected) / expected < 0.02
    assert mse / w.pow(2).mean() < 0.012  # ~1% relative error: what 4-bit NF4 gives on normal data


def test_bits_per_weight_including_constants():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, d_model=128, d_ff=384, n_head=4, n_kv_head=4)
    model = Transformer(cfg)
    before = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and n != "lm_head")
    peft.apply(model, peft.LoraConfig(method="qlora", quantize=True, target_modules="q_proj,v_proj"))
    sizes = model_nbytes(model)
    assert sizes["weights"] == before
    bits = 8 * sizes["bytes"] / sizes["weights"]
    assert 4.1 <= bits <= 4.5, bits
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for n, m in model.named_modules()
                   if ".layers." in n and "lora_" not in n)


def test_nf4_linear_matches_its_dequantised_weight_and_backprops():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32)
    layer = NF4Linear(base, torch.float32)
    x = torch.randn(3, 64, requires_grad=True)
    w = layer.qweight.dequantize(torch.float32)
    y = layer(x)
    assert torch.allclose(y, torch.nn.functional.linear(x, w, base.bias), atol=1e-6)
    y.sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, -1), atol=1e-5)
    assert isinstance(layer.qweight, NF4Weight) and not any(p.requires_grad for p in layer.qweight.parameters())


def test_qlora_starts_at_the_quantised_base_and_trains_only_adapters():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=128, d_model=64, d_ff=128)
    model = Transformer(cfg)
    quantised = Transformer(cfg)
    quantised.load_state_dict(model.state_dict())
    from llmkit.peft.nf4 import quantize_model

    quantize_model(quantised.model)
    peft.apply(model, peft.LoraConfig(method="qlora", quantize=True, r=4, alpha=8))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), quantised(ids))  # B = 0: exactly the 4-bit base, computed in bf16
    report = peft.trainable_report(model)
    assert 0 < report["trainable"] < report["total"] / 5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(peft.PeftError, match="4-bit base cannot hold a merged adapter"):
        peft.merge(model)
