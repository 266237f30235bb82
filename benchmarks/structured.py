"""Per-token cost of constrained decoding (xgrammar masks, llmkit.prompting.structured) against unconstrained
decoding of the same model, prompt and sampler.

    python benchmarks/structured.py --device cpu --tiny            # 4 layers, width 128, vocab 2048
    python benchmarks/structured.py --device cpu                   # 6 layers, width 384, vocab 8192
    python benchmarks/structured.py --device cuda --repeats 5      # 12 layers, width 768, vocab 16384

A byte-level BPE tokenizer is trained on the bundled Tiny Shakespeare at the shape's vocabulary size, and a
random model of that vocabulary is built with a fixed seed. Each constraint (a JSON Schema of an array of
records, OpenAI's json_object, a regex) and the unconstrained baseline decode batch 1 from the same 16-token
prompt with seeded temperature-1 sampling for up to --new-tokens tokens (the baseline ignores EOS; a grammar
may finish earlier). ms/token = wall time of one `generate` call / tokens generated, median of the repeats,
runs alternating. `overhead` = constrained ms/token / baseline ms/token - 1 (goal <= 0.10). `mask_ms` is the
time inside the processor per token (matcher advance, bitmask fill, mask applied), measured separately.
Progress goes to stderr; stdout holds one JSON object only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.prompting.structured import grammar_processor
from llmkit.tokenizer import train_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "llmkit" / "assets" / "tinyshakespeare.txt"
SHAPES = {
    "tiny": dict(vocab_size=2048, n_layer=4, n_head=4, d_model=128, d_ff=384),
    "small": dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384, d_ff=1024),
    "gpu": dict(vocab_size=16384, n_layer=12, n_head=12, d_model=768, d_ff=2048),
}
RECORDS = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags"]}}
CONSTRAINTS = {
    "json_schema": {"json_schema": RECORDS},
    "json_object": {"json_object": True},
    "regex": {"regex": r"([A-Za-z ,']{1,40}[.!?]\n){1,200}"},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timed:
    """Wraps a processor and adds up the time spent inside it."""

    def __init__(self, proc, device: torch.device):
        self.proc, self.device, self.seconds = proc, device, 0.0
        self.stop_ids = proc.stop_ids

    def __call__(self, generated, logits):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = self.proc(generated, logits)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t
        return out


def run_once(model, prompt, new_tokens: int, device, proc=None) -> tuple[float, int]:
    gen = GenerationConfig(max_new_tokens=new_tokens, sampling=SamplingParams(temperature=1.0, seed=0),
                           eos_token_ids=tuple(proc.stop_ids) if proc else (),
                           logits_processors=(proc,) if proc else ())
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = generate(model, [prompt], gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, len(out[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU shape")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = "tiny" if args.tiny else ("gpu" if device.type == "cuda" else "small")
    dims = SHAPES[shape]
    log(f"training a {dims['vocab_size']}-token byte-level BPE on {CORPUS.name}")
    tok = train_tokenizer([CORPUS], type="byte-bpe", vocab_size=dims["vocab_size"])
    torch.manual_seed(0)
    cfg = ModelConfig(name=f"bench-{shape}", max_seq_len=args.new_tokens + 64, **{**dims,
                                                                                 "vocab_size": tok.vocab_size})
    model = Transformer(cfg).to(device).eval()
    prompt = tok.encode("First Citizen:\nBefore we proceed any further, hear me speak.")[:16]
    procs = {name: grammar_processor(tok, **kw) for name, kw in CONSTRAINTS.items()}
    runs = {"none": None, **procs}
    for proc in runs.values():  # warm-up (the compiled grammar's caches, the allocator)
        run_once(model, prompt, 16, device, proc)
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, proc in runs.items():
            seconds, n = run_once(model, prompt, args.new_tokens, device, proc)
            times[name].append(seconds / n * 1e3)
            tokens[name].append(n)
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} ms/tok" for k, v in times.items()))
    base = statistics.median(times["none"])
    result = {"device": str(device), "shape": shape, "params": cfg.n_params, "vocab_size": tok.vocab_size,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "baseline_ms_per_token": round(base, 4), "constraints": {}}
    for name, proc in procs.items():
        timed = Timed(proc, device)
        _, n = run_once(model, prompt, args.new_tokens, device, timed)
        ms = statistics.median(times[name])
        result["constraints"][name] = {"ms_per_token": round(ms, 4), "overhead": round(ms / base - 1, 4),
                                       "mask_ms_per_token": round(timed.seconds / n * 1e3, 4),
                                       "tokens": statistics.median(tokens[name])}
    result["max_overhead"] = max(c["overhead"] for c in result["constraints"].values())
    result["goal_overhead_le_0.10"] = result["max_overhead"] <= 0.10
    print(json.dumps(result))


if __name__ == "__main__":
    main()
