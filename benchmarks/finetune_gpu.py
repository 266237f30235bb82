"""LoRA and QLoRA training-step speed and memory: llmkit's PEFT layers against transformers + peft.

    python benchmarks/finetune_gpu.py                      # GPU: tinyllama-1.1b shape, 4 x 1024, bf16, all variants
    python benchmarks/finetune_gpu.py --variants llmkit-qlora,hf-qlora --steps 20
    python benchmarks/finetune_gpu.py --device cpu --preset tiny --batch 2 --seq-len 64 --steps 2 --warmup 1

One random-weight model of the preset's shape is built with a fixed seed and saved (bf16) with `llmkit.save`;
every variant loads it fresh. The base is frozen in bf16 (QLoRA: 4-bit NF4 with double quantisation, computed
in bf16), LoRA r=16, alpha=32 on every block projection, adapters in fp32, bf16 autocast, AdamW on the adapters.
  llmkit-lora   llmkit Transformer + llmkit.peft LoRA
  llmkit-qlora  the same with an NF4 base (bitsandbytes kernels when installed on CUDA, else plain PyTorch)
  hf-lora       LlamaForCausalLM (sdpa) + peft LoRA
  hf-qlora      LlamaForCausalLM loaded with BitsAndBytesConfig(nf4, double quant, bf16 compute) + peft LoRA
One step = forward, fp32 cross-entropy, backward, clip 1.0, optimizer step, zero_grad on one fixed batch;
`--warmup` steps untimed, then `--steps` timed (perf_counter around torch.cuda.synchronize). peak_mem_gib:
torch.cuda.max_memory_allocated over the variant (weights, adapter grads and AdamW state, activations); on CPU,
peak RSS growth (psutil). trainable: adapter parameters; loss_step0 must agree between llmkit and hf (rtol 1e-2:
bf16). A failing variant (e.g. no bitsandbytes) reports {"error": ...}. stdout holds one JSON object only.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import traceback

import torch

import llmkit
from llmkit import peft
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.train.objectives import lm_loss
from llmkit.train.optim import build_optimizer
from pretrain_gpu import log, time_steps  # the sibling benchmark's helpers (this directory is on sys.path)

VARIANTS = ("llmkit-lora", "llmkit-qlora", "hf-lora", "hf-qlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED, RANK, ALPHA = 0, 16, 32


def build(name: str, path: str, device: torch.device):
    """(model, callable input_ids -> logits) for one variant, adapters injected, base frozen."""
    if name.startswith("llmkit"):
        model = llmkit.load(path, device=device, dtype=torch.bfloat16)[0]
        cfg = peft.LoraConfig(method="qlora" if name.endswith("qlora") else "lora", r=RANK, alpha=ALPHA,
                              target_modules=TARGETS, quantize=name.endswith("qlora"))
        model = peft.apply(model, cfg).train()
        return model, model
    import peft as hf_peft
    import transformers

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if name == "hf-qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if name == "hf-lora":
        model = model.to(device)
    model = hf_peft.get_peft_model(model, hf_peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    model.train()
    return model, lambda ids, m=model: m(input_ids=ids, use_cache=False).logits


def run(name: str, path: str, batch, args, device: torch.device) -> dict:
    model, fwd = build(name, path, device)
    opt = build_optimizer(model, "adamw", lr=1e-4, weight_decay=0.0)
    x, y = batch
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = fwd(x)
        loss = lm_loss(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if cuda:
            torch.cuda.synchronize(device)
        weights_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
        loss0, elapsed, peak = time_steps(step, args.warmup, args.steps, device)
        return {"tokens_per_s": round(args.batch * args.seq_len * args.steps / elapsed, 1),
                "step_ms": round(1000 * elapsed / args.steps, 2),
                "peak_mem_gib": None if peak is None else round(peak, 3),
                "weights_mem_gib": None if weights_gib is None else round(weights_gib, 3),
                "trainable": trainable, "loss_step0": round(loss0, 5)}
    finally:
        del model, fwd, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--preset", default="tinyllama-1.1b", help="llmkit model preset (a Llama architecture)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants must be chosen from {list(VARIANTS)}")
    if min(args.batch, args.seq_len, args.steps, args.warmup) < 1:
        parser.error("--batch, --seq-len, --steps and --warmup must be >= 1")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cfg = ModelConfig.from_preset(args.preset)
    log(f"torch {torch.__version__}, device {device_name}, preset {args.preset} ({cfg.n_params / 1e9:.2f}B params)")

    torch.manual_seed(SEED)
    with torch.device("meta"):
        base = Transformer(cfg)
    base = base.to_empty(device="cpu")
    base.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    batch = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    results = {}
    with tempfile.TemporaryDirectory() as path:
        llmkit.save(base.to(torch.bfloat16), None, path)
        del base
        gc.collect()
        for name in variants:
            log(f"[{name}] {args.warmup} warm-up + {args.steps} timed steps")
            try:
                results[name] = run(name, path, batch, args, device)
            except Exception as e:  # e.g. bitsandbytes missing: report it and go on
                log(traceback.format_exc())
                results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            log(f"[{name}] {results[name]}")

    ok = {k: v for k, v in results.items() if "tokens_per_s" in v}
    ratios = {f"{a}_vs_{b}".replace("-", "_"): round(ok[a]["tokens_per_s"] / ok[b]["tokens_per_s"], 3)
              for a in ok for b in ok if a.startswith("llmkit") and b.startswith("hf") and a[7:] == b[3:]}
    losses = {k: v["loss_step0"] for k, v in ok.items()}
    match = {k: abs(losses[k] - losses[f"hf-{k[7:]}"]) <= 1e-2 * abs(losses[k])
             for k in losses if k.startswith("llmkit") and f"hf-{k[7:]}" in losses}
    shape = {"preset": args.preset, "n_params": cfg.n_params, "batch": args.batch, "seq_len": args.seq_len,
             "steps": args.steps, "warmup": args.warmup, "lora_r": RANK, "targets": "all block projections"}
    print(json.dumps({"device": device_name, "shape": shape, "results": results, "ratios": ratios,
                      "loss_match": match}))


if __name__ == "__main__":
    main()
