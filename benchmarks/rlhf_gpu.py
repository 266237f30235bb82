"""RLHF step speed: llmkit's PPO and GRPO steps, and TRL's GRPOTrainer when it is installed.

    python benchmarks/rlhf_gpu.py                              # GPU: tinyllama-1.1b shape, bf16 autocast
    python benchmarks/rlhf_gpu.py --variants ppo-lora,trl-grpo-lora --steps 5
    python benchmarks/rlhf_gpu.py --device cpu --tiny          # a tiny shape on a CPU, seconds

A random-weight model of the shape is built with a fixed seed and saved with `llmkit.save`, with a
word-level tokenizer covering its whole vocabulary; its backbone with a fresh head is saved as the reward
model. Prompts are --prompt-len random words. Every variant samples up to --new-tokens reply tokens per
prompt at temperature 1 (a random model rarely samples EOS; the mean reply tokens per step are reported).
  ppo-lora / ppo-full     llmkit PPO: actor, critic, reference and reward model; lora = actor and critic
                          adapters (r 16, all block projections) on one shared frozen base
  grpo-lora / grpo-full   llmkit GRPO with the same reward model, --group samples per prompt, beta 0.02
  trl-grpo-lora / -full   TRL's GRPOTrainer on the same checkpoint, reward model, batch and options
                          (loss_type grpo, beta 0.02, no gradient checkpointing, HF generate)
TRL 1.x has no PPOTrainer any more, so PPO has no TRL row. A llmkit step is the trainer's own `_train_step`
(rollout with decode_tokens: batched, left-padded, static KV cache, in the fp32 weights with TF32 matmuls;
scoring and one epoch of updates under bf16 autocast), timed
after --warmup untimed steps; rollout_tokens_per_s is reply tokens over the sampling time alone (from the
step's record); for TRL, step times come from a callback and tokens/s is reply tokens over the step time.
peak_mem_gib: torch.cuda.max_memory_allocated. A failing variant reports {"error": ...}. stdout holds one
JSON object only; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import llmkit
from llmkit.align.config import AlignConfig
from llmkit.align.reward import RewardModel, save_reward_model
from llmkit.config import ModelConfig
from llmkit.model import Transformer

VARIANTS = ("ppo-lora", "grpo-lora", "trl-grpo-lora", "ppo-full", "grpo-full", "trl-grpo-full")
TINY = dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=256)
LORA_R, LORA_ALPHA, BETA, LR = 16, 32, 0.02, 1e-6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` tokens: pad, bos, eos, unk, then w4, w5, ..."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from llmkit.tokenizer import Tokenizer

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab_size)])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens(specials)
    return Tokenizer(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build_world(root: Path, args) -> dict:
    """Policy checkpoint, reward model and prompt file for every variant."""
    shape = TINY if args.tiny else {}
    preset = "tiny" if args.tiny else "tinyllama-1.1b"
    base_cfg = ModelConfig.from_preset(preset, **shape)
    tok = word_tokenizer(base_cfg.vocab_size)
    cfg = ModelConfig.from_preset(preset, **shape, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Transformer(cfg)
    log(f"rlhf_gpu: {preset} shape, {model.num_params() / 1e6:.1f}M parameters")
    llmkit.save(model.to(torch.bfloat16), tok, root / "policy")
    save_reward_model(RewardModel.from_backbone(model.model).to(torch.bfloat16), tok, root / "rm")
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(4, cfg.vocab_size)}" for _ in range(args.prompt_len))
               for _ in range(args.prompts * (args.warmup + args.steps + 2))]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"policy": str(root / "policy"), "rm": str(root / "rm"), "prompts": str(root / "prompts.jsonl"),
            "prompt_texts": prompts, "config": cfg}


def align_config(world: dict, algorithm: str, method: str, args) -> AlignConfig:
    grpo = algorithm == "grpo"
    samples = args.prompts
    return AlignConfig(model=world["policy"], data=world["prompts"], method=method, reward_model=world["rm"],
                       val_fraction=0.0, max_seq_len=args.prompt_len + args.new_tokens,
                       max_prompt_len=args.prompt_len, rollout_batch_size=args.prompts // args.group if grpo
                       else args.prompts, group_size=args.group, mini_batch_size=samples, micro_batch_size=args.micro,
                       ppo_epochs=1, max_new_tokens=args.new_tokens, kl_coef=BETA, lr=LR, lora_r=LORA_R,
                       lora_alpha=LORA_ALPHA, precision="bf16" if args.device == "cuda" else "fp32",
                       max_steps=args.warmup + args.steps + 1, save_every=10**6, eval_every=0, warmup_steps=0,
                       schedule="constant", device=args.device)


def run_llmkit(name: str, world: dict, args, out: Path) -> dict:
    from llmkit.align.grpo import GRPOTrainer
    from llmkit.align.ppo import PPOTrainer

    algorithm, method = name.split("-")
    cls = PPOTrainer if algorithm == "ppo" else GRPOTrainer
    trainer = cls(align_config(world, algorithm, method, args), out / name, overwrite=True)
    records = []
    for i in range(args.warmup + args.steps):
        record = trainer._train_step()  # the loop's step without its checkpoint and validation cadence
        trainer.step += 1
        if i >= args.warmup:
            records.append(record)
        log(f"rlhf_gpu: {name} step {i}: {record['step_time_s']:.3f} s, "
            f"{record['rollout_tokens_per_s']:.0f} rollout tok/s, reward {record['reward_mean']:.3f}")
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    return {"step_time_s": round(mean("step_time_s"), 4), "rollout_tokens_per_s": round(mean("rollout_tokens_per_s"), 1),
            "step_tokens_per_s": round(mean("tokens_per_s"), 1), "samples_per_step": args.prompts,
            "reply_tokens_per_step": round(mean("response_len") * args.prompts, 1),
            "trainable": trainer.report["trainable"]}


def run_trl(name: str, world: dict, args, out: Path) -> dict:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    method = name.rsplit("-", 1)[1]
    cuda = args.device == "cuda"
    times: list[float] = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    # fp32 weights under bf16 autocast (bf16=True), as the llmkit trainers hold them
    model = transformers.AutoModelForCausalLM.from_pretrained(world["policy"], dtype=torch.float32)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(world["rm"], dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(world["policy"])
    config = GRPOConfig(output_dir=str(out / name), per_device_train_batch_size=args.prompts,
                        num_generations=args.group, max_completion_length=args.new_tokens,
                        max_steps=args.warmup + args.steps, learning_rate=LR, beta=BETA, loss_type="grpo",
                        num_iterations=1, temperature=1.0, gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda,
                        report_to="none", logging_steps=1, save_strategy="no", lr_scheduler_type="constant",
                        disable_dropout=True)
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear")
    dataset = Dataset.from_list([{"prompt": p} for p in world["prompt_texts"]])
    trainer = GRPOTrainer(model=model, reward_funcs=rm, args=config, train_dataset=dataset, processing_class=tok,
                          reward_processing_classes=tok, peft_config=peft_config, callbacks=[StepTimes()])
    with contextlib.redirect_stdout(sys.stderr):  # transformers prints its log dicts on stdout
        trainer.train()
    timed = times[args.warmup:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    reply_tokens = lengths[-1] * args.prompts
    step = sum(timed) / len(timed)
    return {"step_time_s": round(step, 4), "step_tokens_per_s": round(reply_tokens / step, 1),
            "samples_per_step": args.prompts, "reply_tokens_per_step": round(reply_tokens, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 model instead of tinyllama-1.1b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--prompts", type=int, default=16, help="samples per step (grpo: --group per prompt)")
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--micro", type=int, default=8, help="sequences per forward pass in the updates")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls outside autocast (llmkit's sampling)
    if args.tiny:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 16), min(args.new_tokens, 16)
    results: dict = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                     "shape": "tiny" if args.tiny else "tinyllama-1.1b", "prompts": args.prompts, "group": args.group,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = build_world(root, args)
        for name in args.variants.split(","):
            log(f"rlhf_gpu: {name}")
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                result = (run_trl if name.startswith("trl") else run_llmkit)(name, world, args, root)
                if args.device == "cuda":
                    result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except Exception as e:  # one variant failing (e.g. TRL missing) must not lose the others' figures
                traceback.print_exc(file=sys.stderr)
                result = {"error": f"{type(e).__name__}: {e}"}
            results["variants"][name] = result
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
