"""Speculative decoding speed: a draft model and prompt lookup against plain decoding.

    python benchmarks/speculative_gpu.py                       # 24-layer width-2048 target, bf16, CUDA
    python benchmarks/speculative_gpu.py --device cpu --tiny   # a 6-layer width-256 target (a smoke run)

Batch 1, greedy, a 64-token prompt, --new-tokens new tokens. Prints one JSON object:
  plain         tokens/s of `generate`: the compiled fast path (compile=True) on CUDA, eager on CPU
                (compiling on a CPU takes minutes and is not the regime speculation is built for)
  draft         speculative_generate with k drafted tokens: tokens/s, speed-up over plain,
                acceptance rate, tokens per target forward
  prompt_lookup prompt_lookup_generate (n-gram 3): the same figures
Weights are random, so a real draft would predict nothing. THE DRAFT IS SYNTHETIC: it is the target's
first quarter of layers (copied) with the target's embedding, final norm and head (shared), and the
target's remaining layers have their output projections scaled by 0.05, so the draft predicts the
target well, as a distilled draft of a trained model would. The prompt repeats a random 16-token
segment, so prompt lookup has something to copy. Every figure is the median of --repeats runs after
a warm-up. Called by benchmarks/decode_gpu.py as run(device, dtype, tiny). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.speculative import prompt_lookup_generate, speculative_generate
from llmkit.model import Transformer

SHAPES = {
    True: dict(vocab_size=512, n_layer=8, n_head=4, n_kv_head=2, d_model=256, d_ff=768, max_seq_len=1024),
    False: dict(vocab_size=32000, n_layer=24, n_head=16, n_kv_head=4, d_model=2048, d_ff=5632, max_seq_len=2048),
}
LATE_LAYER_SCALE = 0.05  # why the draft predicts the target: see the docstring


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_pair(device: str, dtype: torch.dtype, tiny: bool) -> tuple[Transformer, Transformer]:
    """The target and its draft: the target's first quarter of layers, embedding, norm and head shared."""
    torch.manual_seed(0)
    shape = SHAPES[tiny]
    target = Transformer(ModelConfig.from_preset("tiny", **shape)).to(device, dtype).eval()
    n_draft = max(1, shape["n_layer"] // 4)
    with torch.no_grad():
        for layer in target.model.layers[n_draft:]:
            layer.self_attn.o_proj.weight.mul_(LATE_LAYER_SCALE)
            layer.mlp.down_proj.weight.mul_(LATE_LAYER_SCALE)
    draft = Transformer(ModelConfig.from_preset("tiny", **{**shape, "n_layer": n_draft})).to(device, dtype).eval()
    draft.model.embed_tokens, draft.model.norm, draft.lm_head = target.model.embed_tokens, target.model.norm, target.lm_head
    # copies, not shared: each model keeps its KV cache in its own attention modules
    draft.model.layers = nn.ModuleList(copy.deepcopy(layer) for layer in target.model.layers[:n_draft])
    return target, draft


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (compiles the fast path)
    times, result = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def figures(seconds: float, out: list[list[int]], stats, plain_tps: float) -> dict:
    tps = sum(len(r) for r in out) / seconds
    return {"tokens_per_s": round(tps, 1), "speedup_vs_plain": round(tps / plain_tps, 2), **{
        key: round(value, 3) if isinstance(value, float) else value for key, value in stats.as_dict().items()}}


def run(device: str, dtype: torch.dtype, tiny: bool, repeats: int = 3, new_tokens: int | None = None,
        k: int = 4) -> dict:
    new_tokens = new_tokens or (64 if tiny else 256)
    target, draft = build_pair(device, dtype, tiny)
    segment = torch.randint(0, SHAPES[tiny]["vocab_size"], (16,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [segment * 4]
    compiled = device.startswith("cuda")
    plain_gen = GenerationConfig(max_new_tokens=new_tokens, compile=compiled)
    gen = GenerationConfig(max_new_tokens=new_tokens)
    log(f"[speculative] plain ({'compiled' if compiled else 'eager'})")
    plain_s, plain_out = timed(lambda: generate(target, prompts, plain_gen), device, repeats)
    plain_tps = sum(len(r) for r in plain_out) / plain_s
    log("[speculative] draft model")
    draft_s, (draft_out, draft_stats) = timed(lambda: speculative_generate(target, draft, prompts, gen, k), device,
                                              repeats)
    log("[speculative] prompt lookup")
    pl_s, (pl_out, pl_stats) = timed(lambda: prompt_lookup_generate(target, prompts, gen, 3, k), device, repeats)
    return {
        "device": device, "dtype": str(dtype).removeprefix("torch."), "k": k, "new_tokens": new_tokens,
        "target": {key: SHAPES[tiny][key] for key in ("n_layer", "d_model", "vocab_size")},
        "draft_is": f"a copy of the target's first {len(draft.model.layers)} layers + its shared embedding/norm/head; the target's later "
                    f"layers scaled by {LATE_LAYER_SCALE} (synthetic, random weights)",
        "plain": {"path": "compiled fast path" if compiled else "eager", "tokens_per_s": round(plain_tps, 1)},
        "draft": figures(draft_s, draft_out, draft_stats, plain_tps),
        "prompt_lookup": figures(pl_s, pl_out, pl_stats, plain_tps),
        "greedy_outputs_equal_plain": draft_out == plain_out and pl_out == plain_out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--tiny", action="store_true", help="a tiny target (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("-k", "--num-draft-tokens", type=int, default=4)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                           else torch.float32)
    print(json.dumps(run(args.device, dtype, args.tiny, args.repeats, args.new_tokens, args.num_draft_tokens)))


if __name__ == "__main__":
    main()
