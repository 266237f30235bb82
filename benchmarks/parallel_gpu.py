"""Tensor and pipeline parallel training: tokens/s and peak memory per GPU, against `llmkit plan`'s prediction.

    python benchmarks/parallel_gpu.py                                  # CUDA: every layout the GPUs allow
    python benchmarks/parallel_gpu.py --preset llama-134m --seq-len 1024 --micro-batch 8 --steps 20
    python benchmarks/parallel_gpu.py --device cpu --preset tiny --seq-len 64 --micro-batch 4 --steps 4  # gloo smoke

Each layout is one `torchrun` launch of this file (as its own worker) running llmkit's ParallelTrainer on the
bundled Tiny Shakespeare corpus (byte-level BPE, 2048 tokens), the same global batch for every layout:
  single   one process
  tp2      tensor + sequence parallel over 2 ranks
  pp2      2 pipeline stages, 1F1B, micro-batch split in 4 (or fewer when it is smaller)
  tp2-pp2  both (4 devices)
tokens_per_s: the median of the steps after the first (warm-up) and before the last (checkpointing).
peak_gb_per_gpu: the largest torch.cuda.max_memory_allocated over the ranks, read after the last timed step
(GB = 1e9 bytes; null on CPU). predicted_gb: `llmkit plan`'s heaviest pipeline stage (weights, gradients, AdamW
states, activations with 1F1B's in-flight micro-batches) for the same model, layout and batch.
Progress goes to stderr; stdout holds one JSON object only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

LAYOUTS = {"single": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "tp2-pp2": {"tp": 2, "pp": 2}}
GPU_KEYS = {"H200": "h200", "H100": "h100", "A100": "a100-80gb", "L40S": "l40s", "A10": "a10", "L4": "l4"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pack_corpus(root: Path) -> Path:
    from llmkit.data.pack import pack_documents, read_documents
    from llmkit.tokenizer import train_tokenizer

    corpus = str(resources.files("llmkit") / "assets" / "tinyshakespeare.txt")
    tok = train_tokenizer([corpus], "byte-bpe", 2048)
    pack_documents(read_documents([corpus]), tok, root / "data", val_fraction=0.05, progress=False)
    return root / "data"


def recipe(args, data: Path, degrees: dict) -> dict:
    microbatches = min(4, args.micro_batch) if degrees.get("pp", 1) > 1 else 1
    return dict(model=args.preset, data=str(data), seq_len=args.seq_len, micro_batch_size=args.micro_batch,
                max_steps=args.steps, warmup_steps=1, eval_every=0, eval_batches=1, save_every=args.steps,
                sample_tokens=0, log_every=args.steps, device=args.device, precision=args.precision,
                microbatches=microbatches, pp_schedule="1f1b", **degrees)


def run_layout(name: str, args, data: Path, root: Path) -> dict:
    degrees = LAYOUTS[name]
    world = degrees.get("tp", 1) * degrees.get("pp", 1)
    spec = {"recipe": recipe(args, data, degrees), "out": str(root / name), "result": str(root / f"{name}.json")}
    (root / f"{name}-spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.device == "cpu" else dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           __file__, "--worker", str(root / f"{name}-spec.json")]
    log(f"parallel_gpu: {name} on {world} process(es)")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    result = json.loads(Path(spec["result"]).read_text())
    result["predicted_gb"] = predicted_peak_gb(args, root / name / "model", spec["recipe"], world)
    if result["peak_gb_per_gpu"] and result["predicted_gb"]:
        result["measured_over_predicted"] = round(result["peak_gb_per_gpu"] / result["predicted_gb"], 3)
    return result


def predicted_peak_gb(args, model_dir: Path, rec: dict, world: int) -> float:
    from llmkit.plan import PlanConfig, plan

    m = rec["microbatches"]
    gpu = next((v for k, v in GPU_KEYS.items() if torch.cuda.is_available() and k in torch.cuda.get_device_name()),
               "h100")
    pc = PlanConfig(model=str(model_dir), gpus=world, tp=rec.get("tp", 1), pp=rec.get("pp", 1),
                    dtype="fp32" if args.precision == "fp32" else "bf16", seq_len=args.seq_len,
                    micro_batch=args.micro_batch // m, microbatches=m, gpu=gpu)
    p = plan(pc, suggestions=False)
    return p["parallel"]["memory_gb"]["max_total"] if p.get("parallel") else p["memory_gb"]["total"]


def worker(spec_path: str) -> None:
    """Under torchrun: train one layout, then gather tokens/s and every rank's peak memory to rank 0."""
    import torch.distributed as dist

    from llmkit.parallel.trainer import trainer_class
    from llmkit.train.recipe import TrainConfig

    spec = json.loads(Path(spec_path).read_text())
    cfg = TrainConfig(**spec["recipe"])
    if cfg.device == "cpu":
        torch.set_num_threads(1)
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    peak: list[float | None] = [None]
    speeds: list[float] = []

    def on_step(step: int, record: dict) -> None:
        if 1 < step < cfg.max_steps or cfg.max_steps <= 2:
            speeds.append(record["tokens_per_s"])
        if step == cfg.max_steps - 1 and cuda:  # before the final checkpoint gathers whole weights
            peak[0] = torch.cuda.max_memory_allocated() / 1e9

    trainer = trainer_class(cfg)(cfg, spec["out"], overwrite=True, on_step=on_step)
    trainer.fit()
    peaks = [peak[0]] * trainer.env.world_size
    if trainer.env.distributed:
        dist.all_gather_object(peaks, peak[0])
    if trainer.env.is_main:
        measured = [p for p in peaks if p is not None]
        Path(spec["result"]).write_text(json.dumps({
            "world": trainer.env.world_size, "tokens_per_s": round(statistics.median(speeds), 1),
            "peak_gb_per_gpu": round(max(measured), 4) if measured else None,
            "peak_gb_per_rank": [round(p, 4) for p in measured] or None,
        }))
    if trainer.env.distributed:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="model preset (default: llama-134m on CUDA, tiny on CPU)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=None, help="windows per step (the global batch)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--layouts", default=None, help="comma-separated subset of " + ",".join(LAYOUTS))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    gpu = args.device != "cpu"
    args.preset = args.preset or ("llama-134m" if gpu else "tiny")
    args.seq_len = args.seq_len or (1024 if gpu else 64)
    args.micro_batch = args.micro_batch or (8 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 4)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    devices = torch.cuda.device_count() if gpu else 4
    names = args.layouts.split(",") if args.layouts else [n for n in LAYOUTS if _world(n) <= devices]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = pack_corpus(root)
        results = {name: run_layout(name, args, data, root) for name in names}
    device = torch.cuda.get_device_name() if gpu else "cpu (gloo)"
    print(json.dumps({"device": device, "preset": args.preset, "seq_len": args.seq_len,
                      "global_batch": args.micro_batch, "precision": args.precision, "layouts": results}, indent=1))


def _world(name: str) -> int:
    degrees = LAYOUTS[name]
    return degrees.get("tp", 1) * degrees.get("pp", 1)


if __name__ == "__main__":
    main()
