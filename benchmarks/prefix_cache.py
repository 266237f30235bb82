"""Prefix caching: requests that share a long prompt prefix (a system prompt, a tool list, a document).

    python benchmarks/prefix_cache.py                         # tinyllama-1.1b shape, bf16, CUDA
    python benchmarks/prefix_cache.py --device cpu --tiny     # a 4-layer width-256 model (a smoke run)

--requests requests, each the same --prefix-tokens tokens followed by its own --question-tokens, each
decoding --new-tokens greedy tokens. Three arrival patterns:
  cold_burst  all requests at once on an empty cache (the engine prefills the shared prefix once and lets the
              others wait for it, as for the n choices of one prompt)
  sequential  one request at a time (users taking turns): seconds per request, mostly prefill
  burst       one request, then all the others at once (a warm cache, then a batch)
Rows (same weights, same tokens; every row is checked to produce the same greedy tokens):
  llmkit_cached     the engine with prefix caching (the default)
  llmkit_uncached   the engine with prefix_caching=False
  hf_generate       transformers `generate` per request (sequential only)
  hf_prefix_reuse   transformers' own recipe for a shared prefix: the prefix's DynamicCache computed
                    once and deep-copied into each `generate` call as past_key_values (sequential only)
Prints one JSON object with seconds, tokens/s, prompt tokens computed, and ratios to llmkit_uncached
and to hf_prefix_reuse. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time

import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.infer.engine import Engine, RequestOptions
from llmkit.model import Transformer

SHAPES = {
    True: dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, d_model=256, d_ff=768, max_seq_len=2048),
    False: dict(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, d_model=2048, d_ff=5632, max_seq_len=2048),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_parser(doc: str) -> argparse.ArgumentParser:
    """--device, --tiny and --dtype, as this benchmark and its siblings take them."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer width-256 model (smoke runs, CPU)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    return parser


def chosen_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def build(device: str, dtype: torch.dtype, tiny: bool, workdir: str):
    """The llmkit model, a same-weights twin (an engine attaches its cache to its model) and transformers' copy."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **SHAPES[tiny])
    model = Transformer(cfg)
    path = llmkit.save(model, None, f"{workdir}/model")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    twin, _ = llmkit.load(path, device=device, dtype=dtype)
    return model.to(device, dtype).eval(), twin.eval(), hf


def workload(args, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, vocab, (args.prefix_tokens,), generator=g).tolist()
    return [prefix + torch.randint(0, vocab, (args.question_tokens,), generator=g).tolist()
            for _ in range(args.requests)]


def engine_rows(engine: Engine, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[dict, list]:
    """Cold burst, sequential, then burst, on a fresh engine; the figures and the tokens."""
    options = RequestOptions(max_new_tokens=new_tokens)
    vocab = engine.model.config.vocab_size
    engine.generate([[(t + 1) % vocab for t in prompts[0]]], options)  # warm-up on a prompt sharing no block
    out: dict = {}
    before = engine.stats()
    sync(device)
    start = time.perf_counter()
    cold = engine.generate(prompts, options)
    sync(device)
    out["cold_burst"] = _figures(time.perf_counter() - start, cold, prompts, engine, before)
    before = engine.stats()
    sync(device)
    start = time.perf_counter()
    tokens = [engine.generate([p], options)[0] for p in prompts]
    sync(device)
    out["sequential"] = _figures(time.perf_counter() - start, tokens, prompts, engine, before)
    before = engine.stats()
    sync(device)
    start = time.perf_counter()
    burst = engine.generate(prompts[:1], options) + engine.generate(prompts[1:], options)
    sync(device)
    out["burst"] = _figures(time.perf_counter() - start, burst, prompts, engine, before)
    return out, tokens


def _figures(seconds: float, tokens: list[list[int]], prompts: list[list[int]], engine: Engine, before) -> dict:
    after = engine.stats()
    computed = (after.prefix_cache_queries_total - before.prefix_cache_queries_total) - \
        (after.prefix_cache_hits_total - before.prefix_cache_hits_total)
    return {"seconds": round(seconds, 3), "seconds_per_request": round(seconds / len(prompts), 4),
            "tokens_per_s": round(sum(map(len, tokens)) / seconds, 1), "prompt_tokens_computed": computed,
            "prompt_tokens": sum(map(len, prompts))}


def hf_rows(hf, prompts: list[list[int]], prefix_len: int, new_tokens: int, device: str) -> tuple[dict, dict, list]:
    def gen(ids: list[int], past=None) -> list[int]:
        x = torch.tensor([ids], device=device)
        out = hf.generate(x, attention_mask=torch.ones_like(x), past_key_values=past, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    gen(prompts[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    plain = [gen(p) for p in prompts]
    sync(device)
    plain_s = time.perf_counter() - start

    with torch.no_grad():  # the prefix's cache, once; each request continues from a copy of it
        prefix_cache = hf(torch.tensor([prompts[0][:prefix_len]], device=device), use_cache=True).past_key_values
    gen(prompts[0], copy.deepcopy(prefix_cache))  # warm-up
    sync(device)
    start = time.perf_counter()
    reused = [gen(p, copy.deepcopy(prefix_cache)) for p in prompts]
    sync(device)
    reuse_s = time.perf_counter() - start
    if reused != plain:
        raise SystemExit("transformers with a reused prefix cache decoded other tokens than without")
    n = len(prompts)
    total = sum(map(len, plain))
    return ({"seconds": round(plain_s, 3), "seconds_per_request": round(plain_s / n, 4),
             "tokens_per_s": round(total / plain_s, 1), "prompt_tokens_computed": sum(map(len, prompts))},
            {"seconds": round(reuse_s, 3), "seconds_per_request": round(reuse_s / n, 4),
             "tokens_per_s": round(total / reuse_s, 1),
             "prompt_tokens_computed": sum(len(p) - prefix_len for p in prompts)}, plain)


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    dtype = chosen_dtype(args)
    with tempfile.TemporaryDirectory() as workdir:
        model, twin, hf = build(args.device, dtype, args.tiny, workdir)
    prompts = workload(args, model.config.vocab_size)
    log(f"{args.requests} requests: {args.prefix_tokens} shared + {args.question_tokens} own tokens, "
        f"{args.new_tokens} new; {model.num_params() / 1e6:.1f}M parameters, {args.device}, {dtype}")
    rows, tokens = {}, {}
    for name, m, caching in (("llmkit_cached", model, True), ("llmkit_uncached", twin, False)):
        engine = Engine(m, block_size=args.block_size, max_batch_size=args.requests, prefix_caching=caching)
        rows[name], tokens[name] = engine_rows(engine, prompts, args.new_tokens, args.device)
        engine.close()
        log(f"[{name}] {rows[name]}")
    hf_plain, hf_reuse, tokens["hf"] = hf_rows(hf, prompts, args.prefix_tokens, args.new_tokens, args.device)
    log(f"[hf] generate {hf_plain}; prefix reuse {hf_reuse}")
    if not tokens["llmkit_cached"] == tokens["llmkit_uncached"] == tokens["hf"]:
        raise SystemExit("the rows decoded different tokens")
    cached, uncached = rows["llmkit_cached"], rows["llmkit_uncached"]
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "params_m": round(model.num_params() / 1e6, 1),
        "requests": args.requests, "prefix_tokens": args.prefix_tokens, "question_tokens": args.question_tokens,
        "new_tokens": args.new_tokens, **rows, "hf_generate": {"sequential": hf_plain},
        "hf_prefix_reuse": {"sequential": hf_reuse}, "tokens_match": True,
        "ratios": {
            "sequential_cached_vs_uncached": round(uncached["sequential"]["seconds"] / cached["sequential"]["seconds"], 2),
            "burst_cached_vs_uncached": round(uncached["burst"]["seconds"] / cached["burst"]["seconds"], 2),
            "cold_burst_cached_vs_uncached": round(uncached["cold_burst"]["seconds"] / cached["cold_burst"]["seconds"],
                                                   2),
            "sequential_cached_vs_hf_prefix_reuse": round(hf_reuse["seconds"] / cached["sequential"]["seconds"], 2),
            "sequential_cached_vs_hf_generate": round(hf_plain["seconds"] / cached["sequential"]["seconds"], 2),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
