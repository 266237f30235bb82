"""Pretraining step speed: llmkit against transformers' LlamaForCausalLM on the same weights.

    python benchmarks/pretrain_gpu.py            # GPU: llama-134m, 16 x 1024, bf16, all five variants
    python benchmarks/pretrain_gpu.py --variants llmkit,hf-compile --steps 50
    python benchmarks/pretrain_gpu.py --device cpu --preset tiny --batch 2 --seq-len 64 --steps 3   # CPU smoke

The llmkit model is built with a fixed seed and saved with `llmkit.save`; every variant starts from those
weights (llmkit: a deep copy; transformers: `AutoModelForCausalLM.from_pretrained` of the saved directory)
and gets its own fused AdamW. Variants:
  llmkit          llmkit `Transformer`, eager
  llmkit-compile  the same under `torch.compile`
  hf-eager        LlamaForCausalLM, attn_implementation="eager"
  hf-sdpa         LlamaForCausalLM, attn_implementation="sdpa"
  hf-compile      LlamaForCausalLM (sdpa) under `torch.compile`

One training step = forward under bf16 autocast (fp32 weights, as the trainer's `precision: bf16`), fp32
cross-entropy (`lm_loss`), backward, clip_grad_norm 1.0, optimizer step, zero_grad, on one fixed random
batch. `--warmup` steps (compilation included) are not timed; then `--steps` steps are timed as a whole
(perf_counter around torch.cuda.synchronize). MFU is the trainer's: (6N + 12·L·H·D·T) FLOPs per token over
the device's dense bf16 peak; transformers gets the same FLOP count since the architecture is the same.
peak_mem_gib: torch.cuda.max_memory_allocated over the variant's steps (weights, grads, AdamW state and
activations); on CPU, the peak RSS growth sampled with psutil (null without psutil).

Issue goal (H100, llama-134m, 16 x 1024, bf16): llmkit >= 50% MFU and >= 1.4x transformers compiled
(transformers measured ~17.6% MFU eager, ~36.6% compiled). A variant that fails (e.g. torch.compile without
a working compiler) reports {"error": ...} instead of stopping the run.
Progress goes to stderr; stdout holds one JSON object only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import threading
import time
import traceback

import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.train.distributed import mfu
from llmkit.train.objectives import lm_loss
from llmkit.train.optim import build_optimizer

VARIANTS = ("llmkit", "llmkit-compile", "hf-eager", "hf-sdpa", "hf-compile")
SEED = 0
LOSS_RTOL = 1e-3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PeakRSS:
    """Peak resident-set growth of this process while in the block, sampled every 20 ms (CPU runs)."""

    def __init__(self):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.proc = psutil.Process(os.getpid()) if psutil else None
        self.gib = None

    def __enter__(self):
        if self.proc:
            self.base = self.peak = self.proc.memory_info().rss
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.proc:
            self.done.set()
            self.thread.join()
            self.gib = (self.peak - self.base) / 2**30


def build_variant(name: str, base: Transformer, path: str, device: torch.device):
    """(module to optimise, callable input_ids -> logits) for one variant, on a fresh copy of the weights."""
    if name.startswith("llmkit"):
        model = copy.deepcopy(base).to(device).train()
        fwd = model
    else:
        import transformers

        attn = "eager" if name == "hf-eager" else "sdpa"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn).to(device).train()
        fwd = lambda ids, m=model: m(input_ids=ids, use_cache=False).logits  # noqa: E731
    if name.endswith("compile"):
        fwd = torch.compile(fwd)
    return model, fwd


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float, float | None]:
    """(step-0 loss, seconds for `steps` timed steps after `warmup` untimed ones, peak memory GiB)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        loss0 = step().item()  # same weights and batch for every variant: losses must agree here
        for _ in range(warmup - 1):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else rss.gib
    return loss0, elapsed, peak


def run_variant(name, base, path, batch, args, device, amp_dtype) -> dict:
    model, fwd = build_variant(name, base, path, device)
    opt = build_optimizer(model, "adamw", lr=1e-4)
    x, y = batch
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            logits = fwd(x)
        loss = lm_loss(logits, y)  # fp32 cross-entropy, outside autocast as in the trainer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        loss0, elapsed, peak = time_steps(step, args.warmup, args.steps, device)
        tok_s = args.batch * args.seq_len * args.steps / elapsed
        util = mfu(base.config, args.seq_len, tok_s, device, 1)
        return {"tokens_per_s": round(tok_s, 1), "mfu": None if util is None else round(util, 4),
                "peak_mem_gib": None if peak is None else round(peak, 3),
                "step_ms": round(1000 * elapsed / args.steps, 2), "loss_step0": round(loss0, 6)}
    finally:
        del model, fwd, opt
        if name.endswith("compile"):
            torch._dynamo.reset()  # compiled graphs hold on to the model's parameters
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def ratios(results: dict) -> dict:
    """tokens/s of each llmkit variant over each transformers variant, e.g. llmkit_vs_hf_compile."""
    ok = {k: v["tokens_per_s"] for k, v in results.items() if "tokens_per_s" in v}
    return {f"{a}_vs_{b}".replace("-", "_"): round(ok[a] / ok[b], 3)
            for a in ok if a.startswith("llmkit") for b in ok if b.startswith("hf")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--preset", default="llama-134m", help="llmkit model preset (a Llama architecture)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1; compiles, gives step-0 loss)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="autocast dtype; default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown or no variant(s) {unknown}; choose from {list(VARIANTS)}")
    if min(args.batch, args.seq_len, args.steps, args.warmup) < 1:
        parser.error("--batch, --seq-len, --steps and --warmup must be >= 1")
    cfg = ModelConfig.from_preset(args.preset)
    if args.seq_len > cfg.max_seq_len:
        parser.error(f"--seq-len {args.seq_len} exceeds preset {args.preset!r} max_seq_len {cfg.max_seq_len}")

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    import transformers

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device_name}, {dtype}")
    torch.manual_seed(SEED)
    base = Transformer(cfg)
    g = torch.Generator().manual_seed(SEED + 1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(device)
    batch = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    shape = {"preset": args.preset, "n_params": cfg.n_params, "d_model": cfg.d_model, "n_layer": cfg.n_layer,
             "n_head": cfg.n_head, "vocab_size": cfg.vocab_size, "batch": args.batch, "seq_len": args.seq_len,
             "dtype": dtype, "steps": args.steps, "warmup": args.warmup}
    log(f"shape {shape}")

    results = {}
    with tempfile.TemporaryDirectory() as path:
        llmkit.save(base, None, path)
        for name in variants:
            log(f"[{name}] running {args.warmup} warm-up + {args.steps} timed steps")
            try:
                results[name] = run_variant(name, base, path, batch, args, device, amp_dtype)
            except Exception as e:  # report (e.g. no compiler for torch.compile) and go on with the others
                log(traceback.format_exc())
                results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"[{name}] {results[name]}")

    losses = {k: v["loss_step0"] for k, v in results.items() if "loss_step0" in v}
    ref = next(iter(losses.values()), None)
    loss_match = None if len(losses) < 2 else all(abs(l - ref) <= LOSS_RTOL * abs(ref) for l in losses.values())
    log(f"loss_match: {loss_match} (step-0 losses {losses}, rtol {LOSS_RTOL})")
    print(json.dumps({"device": device_name, "shape": shape, "results": results, "ratios": ratios(results),
                      "loss_match": loss_match}))


if __name__ == "__main__":
    main()
