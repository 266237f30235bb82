"""Mixture-of-experts training speed: llmkit against transformers' Mixtral on the same shape and weights.

    python benchmarks/moe_gpu.py                          # GPU: 8 experts, top-2, ~1B total parameters, bf16 autocast
    OMP_NUM_THREADS=1 python benchmarks/moe_gpu.py --device cpu --tiny   # CPU smoke run at a tiny shape

Both models start from the same weights (llmkit's, saved with llmkit.save and read by
MixtralForCausalLM.from_pretrained), train on the same random batches with AdamW, the Switch balancing
loss on, fp32 weights under bf16 autocast on a GPU (fp32 on a CPU). transformers runs with each experts
implementation in --hf-experts (its default is grouped_mm where torch supports it, else eager).
Prints one JSON object: per implementation, training tokens/s, peak memory and the first losses.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable

import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.train.objectives import RouterLog, lm_loss

# ~1.0B total parameters, ~0.3B active: 8 experts of width 2816 in 13 blocks of width 1024
GPU_SHAPE = dict(vocab_size=32000, n_layer=13, n_head=16, n_kv_head=8, d_model=1024, d_ff=2816, max_seq_len=2048)
TINY_SHAPE = dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=256)


def moe_config(tiny: bool) -> ModelConfig:
    return ModelConfig.from_preset("tiny-mixtral", **(TINY_SHAPE if tiny else GPU_SHAPE), n_experts=8, moe_top_k=2,
                                   moe_aux_loss_coef=0.01)


def llmkit_loss(model: Transformer) -> Callable:
    router_log = RouterLog()

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(model(x), y) + router_log.loss(model, 1)

    return loss


def hf_loss(model) -> Callable:
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # transformers shifts the labels itself (T-1 targets, llmkit's T: the same up to one token a row) and
        # adds router_aux_loss_coef x its balancing loss
        return model(x, labels=x, output_router_logits=True).loss

    return loss


def measure(model: torch.nn.Module, loss_fn: Callable, batches: list, device: torch.device, warmup: int,
            autocast: bool) -> dict:
    """Steps over `batches` (the first `warmup` untimed): tokens/s, peak memory, the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    model.train()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    losses, start, tokens = [], 0.0, 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        with amp:
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 4))
        tokens += x.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": round(tokens / elapsed, 1), "peak_memory_gib": peak and round(peak, 2),
            "first_losses": losses[:3], "step_ms": round(1000 * elapsed / (len(batches) - warmup), 1)}


def measure_hf(path: str, impl: str, batches: list, device: torch.device, warmup: int, autocast: bool) -> dict:
    """transformers' Mixtral from the same weights with one experts implementation; an error is reported, not
    raised (grouped_mm needs a torch and GPU that have it)."""
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", experts_implementation=impl,
                                                  dtype=torch.float32).to(device)
        return measure(hf, hf_loss(hf), batches, device, warmup, autocast)
    except (KeyError, ValueError, RuntimeError) as e:
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape for a CPU smoke run")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8 on a GPU, 2 tiny)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 1024, 64 tiny)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps (default: 12)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    ap.add_argument("--hf-experts", default="grouped_mm,eager",
                    help="transformers experts implementations to run, comma-separated (default: grouped_mm,eager)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batch, seq = args.batch or (2 if args.tiny else 8), args.seq_len or (64 if args.tiny else 1024)
    cfg = moe_config(args.tiny)
    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.warmup + args.steps, batch, seq + 1), device=device)
    batches = [(row[:, :-1], row[:, 1:]) for row in data]
    autocast = device.type == "cuda"
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "shape": {k: getattr(cfg, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "moe_d_ff",
                                                  "n_experts", "moe_top_k", "vocab_size")},
           "total_params": cfg.n_params, "active_params": cfg.n_active_params, "batch": batch, "seq_len": seq,
           "precision": "bf16 autocast, fp32 weights" if autocast else "fp32", "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Transformer(cfg)
        llmkit.save(model, None, tmp)
        model = model.to(device)
        out["results"]["llmkit"] = measure(model, llmkit_loss(model), batches, device, args.warmup, autocast)
        del model
        free(device)
        for impl in args.hf_experts.split(","):
            out["results"][f"transformers-{impl}"] = measure_hf(tmp, impl, batches, device, args.warmup, autocast)
            free(device)
    ours = out["results"]["llmkit"]["tokens_per_s"]
    out["speedup_vs_transformers"] = {k: round(ours / v["tokens_per_s"], 3) for k, v in out["results"].items()
                                      if k != "llmkit" and "tokens_per_s" in v}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    print("moe_gpu.py: building and timing the models...", file=sys.stderr)
    main()
