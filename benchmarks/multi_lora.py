"""Serving many LoRA adapters on one base model: one mixed batch against an adapter at a time.

    python benchmarks/multi_lora.py                            # tinyllama-1.1b shape, bf16, CUDA
    python benchmarks/multi_lora.py --device cpu --tiny        # a 4-layer width-256 model (a smoke run)

--adapters random LoRA adapters (rank --rank on every linear layer, saved in PEFT's layout), --requests
requests spread evenly over them, each a --prompt-tokens prompt and --new-tokens greedy tokens. Rows:
  llmkit_mixed       the engine with every adapter attached (llmkit.infer.multi_lora): all requests in one
                     continuous batch, each row with its own adapter
  llmkit_base        the same engine and requests with no adapter (the cost of the per-row deltas)
  peft_switching     transformers + peft with every adapter loaded (PeftModel.load_adapter), one adapter's
                     requests at a time (set_adapter, then one batched `generate`), as a plain server would
Every adapter row's tokens are checked against peft's. Prints one JSON object with seconds, tokens/s and
the ratio of llmkit_mixed to peft_switching. Progress goes to stderr.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import llmkit
from llmkit import peft
from llmkit.config import ModelConfig
from llmkit.infer.engine import Engine, RequestOptions
from llmkit.infer.multi_lora import attach_adapters
from llmkit.model import Transformer
from llmkit.peft.core import peft_layers
from llmkit.peft.lora import LoraConfig
from prefix_cache import SHAPES, chosen_dtype, log, model_parser, sync  # the same shapes and helpers (a sibling)

def make_adapters(cfg: ModelConfig, n: int, rank: int, workdir: Path) -> dict[str, str]:
    dirs = {}
    for i in range(n):
        torch.manual_seed(0)
        model = peft.apply(Transformer(cfg), LoraConfig(r=rank, alpha=2.0 * rank, target_modules="all-linear"))
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in peft_layers(model):
                layer.lora_B.weight.normal_(0, 0.02)
        dirs[f"adapter{i}"] = str(peft.save_adapter(model, workdir / f"adapter{i}"))
    return dirs


def run_engine(model, prompts: list[list[int]], adapters: list[int], new_tokens: int, device: str
               ) -> tuple[float, list[list[int]]]:
    engine = Engine(model, max_batch_size=len(prompts), prefix_caching=False)
    options = [RequestOptions(max_new_tokens=new_tokens, adapter=a) for a in adapters]

    def once() -> list[list[int]]:
        out: dict[str, list[int]] = {}
        ids = [engine.submit(p, o, lambda e: out.setdefault(e.request_id, []).append(e.token_id))
               for p, o in zip(prompts, options)]
        while engine.step():
            pass
        return [out[i] for i in ids]

    once()  # warm-up
    sync(device)
    start = time.perf_counter()
    tokens = once()
    sync(device)
    seconds = time.perf_counter() - start
    engine.close()
    return seconds, tokens


def run_peft(path: str, dirs: dict[str, str], prompts, adapters, new_tokens: int, device: str, dtype):
    import transformers
    from peft import PeftModel

    transformers.utils.logging.disable_progress_bar()
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    names = list(dirs)
    model = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    model.eval()

    def once() -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(prompts)
        for slot, name in enumerate(names, start=1):
            rows = [i for i, a in enumerate(adapters) if a == slot]
            model.set_adapter(name)
            x = torch.tensor([prompts[i] for i in rows], device=device)  # equal lengths: no padding
            with torch.no_grad():
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            for i, row in zip(rows, gen[:, x.shape[1]:].tolist()):
                out[i] = row
        return out

    once()
    sync(device)
    start = time.perf_counter()
    tokens = once()
    sync(device)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    dtype = chosen_dtype(args)
    cfg = ModelConfig.from_preset("tiny", **SHAPES[args.tiny])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.requests)]
    adapters = [1 + i % args.adapters for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        path = llmkit.save(Transformer(cfg), None, Path(workdir) / "base")
        dirs = make_adapters(cfg, args.adapters, args.rank, Path(workdir))
        model, _ = llmkit.load(path, device=args.device, dtype=dtype)
        model, _ = attach_adapters(model, dirs)
        log(f"{args.requests} requests over {args.adapters} rank-{args.rank} adapters, {args.prompt_tokens} + "
            f"{args.new_tokens} tokens; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        mixed_s, mixed = run_engine(model, prompts, adapters, args.new_tokens, args.device)
        base_s, _ = run_engine(model, prompts, [0] * len(prompts), args.new_tokens, args.device)
        peft_s, reference = run_peft(str(path), dirs, prompts, adapters, args.new_tokens, args.device, dtype)
    total = args.requests * args.new_tokens
    match = sum(a == b for a, b in zip(mixed, reference))
    log(f"llmkit mixed {mixed_s:.3f}s, base {base_s:.3f}s, peft switching {peft_s:.3f}s; "
        f"{match}/{len(prompts)} requests equal peft's tokens")
    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "adapters": args.adapters, "rank": args.rank,
        "requests": args.requests, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "llmkit_mixed": {"seconds": round(mixed_s, 3), "tokens_per_s": round(total / mixed_s, 1)},
        "llmkit_base": {"seconds": round(base_s, 3), "tokens_per_s": round(total / base_s, 1)},
        "peft_switching": {"seconds": round(peft_s, 3), "tokens_per_s": round(total / peft_s, 1)},
        "requests_matching_peft": match,
        "ratio_mixed_vs_peft": round(peft_s / mixed_s, 2), "adapter_overhead": round(mixed_s / base_s, 2),
    }))


if __name__ == "__main__":
    main()
