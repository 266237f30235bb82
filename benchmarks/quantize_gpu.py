"""Weight-only int8 / int4 decode speed vs the unquantised model (batch 1, greedy, llmkit fast path).

run(device, dtype, tiny) -> dict is what benchmarks/decode_gpu.py calls for its "quantized" part:
a tinyllama-1.1b-shape model with random weights (speed does not depend on the values), or a ~1M-parameter
one with tiny=True. `--shape small` is generate_cpu.py's memory-bound CPU shape (6 layers, width 384).

  python benchmarks/quantize_gpu.py --device cpu --tiny
  python benchmarks/quantize_gpu.py --device cpu --shape small --eager
  python benchmarks/quantize_gpu.py                                 # CUDA, bf16, tinyllama-1.1b shape
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.quantize import quantize_model, weight_bytes
from llmkit.model import Transformer

SHAPES = {
    "tiny": dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, max_seq_len=512),
    "small": dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384, d_ff=1024, max_seq_len=512),
}
VARIANTS = {"base": None, "int8": dict(method="int8"), "int4": dict(method="int4", group_size=128)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tokens_per_s(model, device: str, prompt_tokens: int, new_tokens: int, repeats: int, compile: bool) -> float:
    ids = torch.randint(1, model.config.vocab_size, (prompt_tokens,)).tolist()
    gen = GenerationConfig(max_new_tokens=new_tokens, compile=compile)
    generate(model, [ids], gen)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, [ids], gen)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def run(device: str, dtype: torch.dtype, tiny: bool, shape: str | None = None, compile: bool = True,
        prompt_tokens: int = 128, new_tokens: int = 256, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    shape = shape or ("tiny" if tiny else "tinyllama-1.1b")
    cfg = ModelConfig(name=shape, **SHAPES[shape]) if shape in SHAPES else ModelConfig.from_preset(shape)
    base = Transformer(cfg).to(device=device, dtype=dtype).eval()
    result: dict = {"model": shape, "dtype": str(dtype).removeprefix("torch."), "compile": compile,
                    "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    for name, options in VARIANTS.items():
        model = base if options is None else quantize_model(copy.deepcopy(base), **options)
        tps = tokens_per_s(model, device, prompt_tokens, new_tokens, repeats, compile)
        result[name] = {"tok_s": round(tps, 1), "weight_mb": round(weight_bytes(model) / 1e6, 1)}
        log(f"{name}: {tps:.1f} tok/s, {weight_bytes(model) / 1e6:.1f} MB")
        del model
    for name in ("int8", "int4"):
        result[f"{name}_speedup"] = round(result[name]["tok_s"] / result["base"]["tok_s"], 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tiny", action="store_true", help="a ~1M-parameter model (smoke runs on CPU)")
    p.add_argument("--shape", default=None, help=f"{list(SHAPES)} or a preset name (default tinyllama-1.1b)")
    p.add_argument("--eager", action="store_true", help="plain decode loop instead of the compiled fast path")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    print(json.dumps(run(args.device, dtype, args.tiny, args.shape, not args.eager, args.prompt_tokens,
                         args.new_tokens, args.repeats)))


if __name__ == "__main__":
    main()
