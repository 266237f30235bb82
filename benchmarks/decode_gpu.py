"""Decode speed on a GPU: llmkit's fast path against transformers, the bandwidth bound, the engine.

    python benchmarks/decode_gpu.py                       # tinyllama-1.1b shape, bf16, CUDA
    python benchmarks/decode_gpu.py --device cpu --tiny   # the same code at a tiny shape (a smoke run)

One run prints one JSON object with:
  decode       batch 1, a 128-token prompt, 256 new greedy tokens: llmkit `generate(compile=True)`
               (a CUDA-graphed static-cache step), llmkit eager, transformers `generate` with its
               default dynamic cache and with cache_implementation="static"; tokens/s and ratios.
  bound        the memory-bandwidth bound: bytes of weights a decode step reads (every parameter but
               the embedding table, of which it reads one row) against the measured copy bandwidth
               (2 x bytes / time of a large device-to-device copy); llmkit's share of it.
  engine       continuous-batching throughput (llmkit.infer.engine) at batch 1, 8 and 64: that many
               requests of 128 prompt + 256 new tokens submitted at once, generated tokens/s.
  quantized    int8 / int4 weight-only decode speed-ups (benchmarks/quantize_gpu.py), when present.
  speculative  draft-model and prompt-lookup speed-ups (benchmarks/speculative_gpu.py), when present.
  medusa       Medusa-head speed-ups over the fast path (benchmarks/medusa_gpu.py), when present.
Weights are random (speed does not depend on them); every figure is the median of --repeats runs
after a warm-up that compiles. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.infer.engine import Engine, RequestOptions
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.model import Transformer

TINY = dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, max_seq_len=512)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Bytes/s of a large on-device copy, counting the read and the write."""
    n = (1 << 30 if device.startswith("cuda") else 1 << 26) // torch.tensor([], dtype=dtype).element_size()
    src = torch.empty(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = median_time(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() * src.element_size() / seconds


def weight_bytes_per_token(model: Transformer) -> int:
    embed = model.model.embed_tokens.weight
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    # the table itself is read in full only as the (tied) head; a lookup reads one row
    return total - (0 if tied else embed.numel() * embed.element_size()) + embed.shape[1] * embed.element_size()


def hf_generate(hf, prompt: torch.Tensor, new_tokens: int, static: bool) -> list[int]:
    extra = {"cache_implementation": "static"} if static else {}
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)
    return out[0, prompt.shape[1]:].tolist()


def bench_decode(model: Transformer, path: str, args, dtype: torch.dtype) -> dict:
    import transformers

    device = args.device
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt_tokens), device=device)
    ids = prompt[0].tolist()
    runs = {
        "llmkit": lambda: generate(model, [ids], GenerationConfig(max_new_tokens=args.new_tokens, compile=True))[0],
        "llmkit_eager": lambda: generate(model, [ids], GenerationConfig(max_new_tokens=args.new_tokens))[0],
        "hf_dynamic": lambda: hf_generate(hf, prompt, args.new_tokens, static=False),
        "hf_static": lambda: hf_generate(hf, prompt, args.new_tokens, static=True),
    }
    tokens, rates = {}, {}
    with torch.inference_mode():
        for name, fn in runs.items():
            log(f"[decode] warm-up {name}")
            tokens[name] = fn()
            fn()
            rates[name] = args.new_tokens / median_time(fn, device, args.repeats)
            log(f"[decode] {name}: {rates[name]:.1f} tok/s")
    out = {f"{name}_tok_s": round(r, 1) for name, r in rates.items()}
    out.update(ratio_vs_hf_dynamic=round(rates["llmkit"] / rates["hf_dynamic"], 2),
               ratio_vs_hf_static=round(rates["llmkit"] / rates["hf_static"], 2),
               greedy_tokens_match_hf_dynamic=tokens["llmkit"] == tokens["hf_dynamic"])
    return out


def bench_engine(model: Transformer, args) -> dict:
    out = {}
    for batch in args.engine_batches:
        prompts = [torch.randint(1, model.config.vocab_size, (args.prompt_tokens,)).tolist() for _ in range(batch)]
        engine = Engine(model, max_batch_size=batch)
        options = RequestOptions(max_new_tokens=args.new_tokens)
        engine.generate(prompts[:1], RequestOptions(max_new_tokens=4))  # warm-up
        seconds = median_time(lambda: engine.generate(prompts, options), args.device, max(1, args.repeats // 2))
        engine.close()
        out[f"batch_{batch}_tok_s"] = round(batch * args.new_tokens / seconds, 1)
        log(f"[engine] batch {batch}: {out[f'batch_{batch}_tok_s']} tok/s")
    return out


def optional_part(module: str, args, dtype) -> dict | None:
    """Figures from a sibling benchmark that exposes run(device, dtype, tiny) -> dict, if it exists."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        part = importlib.import_module(module)
    except ModuleNotFoundError:
        log(f"[{module}] not present; skipped")
        return None
    return part.run(args.device, dtype, args.tiny)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a ~1M-parameter model (smoke runs, CPU)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: quantized,speculative,medusa")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: run with --device cpu --tiny for a smoke run")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else
                                                         torch.float32)
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", **TINY) if args.tiny else ModelConfig.from_preset("tinyllama-1.1b")
    model = Transformer(cfg).to(device=args.device, dtype=dtype).eval()
    log(f"{cfg.name}: {model.num_params() / 1e6:.1f}M parameters, {dtype}, {args.device}")
    result: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "model": cfg.name, "dtype": str(dtype).removeprefix("torch.")}
    with tempfile.TemporaryDirectory() as workdir:
        path = llmkit.save(model, None, f"{workdir}/model")
        result["decode"] = bench_decode(model, str(path), args, dtype)
    bandwidth = copy_bandwidth(args.device, dtype)
    bound = bandwidth / weight_bytes_per_token(model)
    result["bound"] = {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "bound_tok_s": round(bound, 1),
                       "fraction_of_bound": round(result["decode"]["llmkit_tok_s"] / bound, 3)}
    result["engine"] = bench_engine(model, args)
    skip = set(args.skip.split(","))
    for part, module in (("quantized", "quantize_gpu"), ("speculative", "speculative_gpu"), ("medusa", "medusa_gpu")):
        if part not in skip and (figures := optional_part(module, args, dtype)) is not None:
            result[part] = figures
    print(json.dumps(result))


if __name__ == "__main__":
    main()
