"""Medusa decoding speed against the plain fast path, with acceptance figures, on a base that really learned something.

    python benchmarks/medusa_gpu.py                       # GPU: a 16-layer width-2048 base (0.7B), bf16
    python benchmarks/medusa_gpu.py --device cpu --tiny   # CPU: a 4-layer width-128 base (a few minutes)

Random weights give no acceptance, so the run trains what it measures, all on the bundled Tiny Shakespeare:
  1. a byte-level BPE tokenizer (vocabulary 512 tiny, 2048 otherwise) on the first 300k characters;
  2. the base: --base-steps of AdamW on random 128/256-token windows of the first 95% of the text (this
     script's own short loop; the loss it reached is reported);
  3. Medusa heads with `MedusaTrainer` (what `llmkit medusa train` runs) on the same 95%, in paragraphs:
     --head-steps steps, the base frozen; validation top-1 accuracy per head is reported. With
     --self-distill N the heads learn the base's own greedy continuations (N tokens after each paragraph's
     first 16) instead of the text itself (`llmkit medusa train --self-distill N`).
Then, batch 1, greedy, --new-tokens new tokens after each of --prompts prompts from the held-out last 5%:
  plain_eager   llmkit `generate` (eager static-cache decode)
  plain_fast    `generate(compile=True)`: the compiled decode step (a CUDA graph on GPU), the fast path
  medusa_eager  `medusa_generate`, tree verification pass eager
  medusa_fast   `medusa_generate(compile=True)`: the tree pass and the acceptance + cache compaction compiled
                (CUDA graphs on GPU)
tokens/s is new tokens over the wall time of whole generate calls (prefill included), the median of
--repeats rounds that time every path in turn after a warm-up that compiles. `ratio` is the faster Medusa
path over plain_fast. `tokens_match` says whether every Medusa output equals plain greedy's token for
token (exact in fp32; in bf16 a tree pass may round differently from a one-token step and flip a near tie).
Acceptance: mean tokens committed per tree pass, tokens per base forward (prefill included), and per
depth the share of tree passes that accepted a head's token there.

Called by benchmarks/decode_gpu.py as run(device, dtype, tiny) when present. Progress goes to stderr;
stdout holds one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.medusa import MedusaTrainer, load_heads, medusa_generate
from llmkit.infer.medusa_commands import MedusaTrainConfig
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer

SHAPES = {
    "tiny": dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, max_seq_len=1024),
    # ~0.7B parameters: on a GPU a decode step of this size is bound by reading the weights, Medusa's regime
    "base": dict(vocab_size=2048, n_layer=16, n_head=16, n_kv_head=4, d_model=2048, d_ff=5632, max_seq_len=1024),
}
# tiny / GPU defaults of the run's sizes
DEFAULTS = {True: dict(base_steps=600, base_lr=1e-3, head_steps=600, head_lr=3e-3, window=128, batch=16,
                       new_tokens=128, prompts=3, tree_sizes=(4, 8, 16, 64)),
            False: dict(base_steps=1500, base_lr=5e-4, head_steps=1000, head_lr=1e-3, window=256, batch=16,
                        new_tokens=256, prompts=4, tree_sizes=(16, 32, 64))}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def corpus() -> str:
    return (resources.files("llmkit") / "assets" / "tinyshakespeare.txt").read_text()


def train_base(model: Transformer, ids: torch.Tensor, sizes: dict, device: str) -> float:
    """AdamW (one-cycle schedule) on random windows; returns the mean loss of the last 20 steps."""
    steps, window, batch, lr = sizes["base_steps"], sizes["window"], sizes["batch"], sizes["base_lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    cuda = device.startswith("cuda")
    losses = []
    model.train()
    for step in range(steps):
        start = torch.randint(0, len(ids) - window - 1, (batch,))
        chunk = torch.stack([ids[s: s + window + 1] for s in start]).to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            logits = model(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"[base] step {step + 1}/{steps} loss {losses[-1]:.3f}")
    return statistics.mean(losses[-20:])


def train_heads(base_dir: Path, text_file: Path, out: Path, sizes: dict, device: str, num_heads: int) -> dict:
    cfg = MedusaTrainConfig(model=str(base_dir), data=str(text_file), num_heads=num_heads,
                            max_steps=sizes["head_steps"], micro_batch_size=sizes["batch"],
                            max_seq_len=sizes["window"], lr=sizes["head_lr"], warmup_steps=20, eval_every=0,
                            eval_batches=8, save_every=sizes["head_steps"], keep_last=1, val_fraction=0.02,
                            log_every=50, self_distill=sizes["self_distill"],
                            precision="bf16" if device.startswith("cuda") else "fp32", device=device)
    trainer = MedusaTrainer(cfg, out)
    final = trainer.fit()
    return {"steps": trainer.step, "self_distill": sizes["self_distill"],
            "loss_start": trainer.initial_val.get("val_loss"), "loss": final.get("val_loss"),
            "val_top1_start": [trainer.initial_val.get(f"val_head{k}_acc") for k in range(num_heads)],
            "val_top1": [final.get(f"val_head{k}_acc") for k in range(num_heads)]}


def build(device: str, dtype: torch.dtype, tiny: bool, workdir: Path, sizes: dict, num_heads: int):
    """(model, heads, tokenizer, held-out text, what was trained)."""
    text = corpus()
    split = int(len(text) * 0.95)
    sample = workdir / "sample.txt"
    sample.write_text(text[:300_000])
    shape = SHAPES["tiny" if tiny else "base"]
    tok = train_tokenizer([sample], "byte-bpe", shape["vocab_size"])
    ids = torch.tensor(tok.encode(text[:split]))
    torch.manual_seed(0)
    cfg = ModelConfig(name="medusa-bench", **{**shape, "vocab_size": tok.vocab_size}, eos_token_id=tok.eos_id)
    model = Transformer(cfg).to(device)
    log(f"base: {model.num_params() / 1e6:.1f}M parameters, {len(ids):,} training tokens")
    start = time.perf_counter()
    base_loss = train_base(model, ids, sizes, device)
    base_seconds = time.perf_counter() - start
    base_dir = llmkit.save(model.float().cpu(), tok, workdir / "base")
    train_file = workdir / "train.txt"
    train_file.write_text(text[:split])
    start = time.perf_counter()
    heads_report = train_heads(base_dir, train_file, workdir / "heads", sizes, device, num_heads)
    heads_report["seconds"] = round(time.perf_counter() - start, 1)
    model, tok = llmkit.load(base_dir, device=device, dtype=dtype)
    heads = load_heads(workdir / "heads", model)
    trained = {"base": {"params_m": round(model.num_params() / 1e6, 2), "steps": sizes["base_steps"],
                        "window": sizes["window"], "batch": sizes["batch"], "lr": sizes["base_lr"],
                        "final_loss": round(base_loss, 3),
                        "seconds": round(base_seconds, 1)},
               "heads": heads_report}
    return model, heads, tok, text[split:], trained


def prompts_from(tok, held_out: str, n: int) -> list[list[int]]:
    paragraphs = [p for p in held_out.split("\n\n") if len(p) > 80]
    return [tok.encode(p[:80]) for p in paragraphs[:n]]


def bench(model, heads, prompts: list[list[int]], new_tokens: int, repeats: int, device: str,
          tree_size: int) -> dict:
    eager, fast = GenerationConfig(max_new_tokens=new_tokens), GenerationConfig(max_new_tokens=new_tokens, compile=True)
    paths = {
        "plain_eager": lambda: (generate(model, prompts[:1], eager), None),
        "plain_fast": lambda: (generate(model, prompts[:1], fast), None),
        "medusa_eager": lambda: _medusa(model, heads, prompts[:1], eager, tree_size),
        "medusa_fast": lambda: _medusa(model, heads, prompts[:1], fast, tree_size),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for name, fn in paths.items():
            log(f"[decode] warm-up {name}")
            fn()
        for r in range(repeats):
            for name, fn in paths.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
        rates = {name: new_tokens / statistics.median(t) for name, t in times.items()}
        log("[decode] " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in rates.items()))
        plain = generate(model, prompts, eager)
        medusa_eager, stats = _medusa(model, heads, prompts, eager, tree_size)
        medusa_fast, _ = _medusa(model, heads, prompts, fast, tree_size)
    out = {f"{name}_tok_s": round(rate, 1) for name, rate in rates.items()}
    best = max(rates["medusa_eager"], rates["medusa_fast"])
    out.update(ratio=round(best / rates["plain_fast"], 2),
               ratio_eager=round(rates["medusa_eager"] / rates["plain_eager"], 2),
               tokens_match=plain == medusa_eager == medusa_fast, tree_size=tree_size,
               **{k: v for k, v in stats.to_dict().items() if k in ("mean_accepted", "tokens_per_forward",
                                                                     "acceptance_by_depth")})
    return out


def _medusa(model, heads, prompts, gen, tree_size):
    out = medusa_generate(model, heads, prompts, gen, tree_size=tree_size)
    return out.tokens, out.stats


def run(device: str, dtype: torch.dtype, tiny: bool, repeats: int = 5, num_heads: int = 4, **overrides) -> dict:
    sizes = {**DEFAULTS[tiny], "self_distill": 0, **{k: v for k, v in overrides.items() if v is not None}}
    with tempfile.TemporaryDirectory() as workdir:
        model, heads, tok, held_out, trained = build(device, dtype, tiny, Path(workdir), sizes, num_heads)
    prompts = prompts_from(tok, held_out, sizes["prompts"])
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "new_tokens": sizes["new_tokens"], "trained": trained}
    for size in sizes["tree_sizes"]:
        log(f"[decode] tree of {size} nodes")
        result[f"tree_{size}"] = bench(model, heads, prompts, sizes["new_tokens"], repeats, device, size)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer width-128 base (CPU runs)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree-sizes", default=None, help="comma-separated tree sizes (nodes, root included); "
                        "default: 4,8,16,64 tiny, 16,32,64 otherwise")
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own count)")
    parser.add_argument("--self-distill", type=int, default=0, help="heads learn the base's own continuations of "
                        "this many tokens (0: the text itself)")
    for name in ("base-steps", "head-steps", "new-tokens", "prompts"):
        parser.add_argument(f"--{name}", type=int, default=None, help="default: see DEFAULTS")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: run with --device cpu --tiny")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else
                                                         torch.float32)
    tree_sizes = tuple(int(s) for s in args.tree_sizes.split(",")) if args.tree_sizes else None
    result = run(args.device, dtype, args.tiny, args.repeats, args.num_heads, base_steps=args.base_steps,
                 head_steps=args.head_steps, new_tokens=args.new_tokens, prompts=args.prompts, tree_sizes=tree_sizes,
                 self_distill=args.self_distill)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
