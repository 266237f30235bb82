"""Does distillation help? A small student trained on Tiny Shakespeare with and without a trained teacher.

    python benchmarks/distill_shakespeare.py                 # CPU, a few minutes; prints one JSON object
    python benchmarks/distill_shakespeare.py --tiny          # a smoke run in seconds
    python benchmarks/distill_shakespeare.py --methods kd,gkd --student-steps 600

1. a byte-level BPE tokenizer on the training part (the first 90% of the text, the rest is validation);
2. a teacher (4 layers, width 128) trained on the training chunks;
3. one student initialisation (1 layer, width 64), trained twice for the same steps on the same batches:
   on the data alone (cross-entropy) and distilled from the teacher (`llmkit distill --method kd`, and any
   other --methods); all report the students' validation loss (cross-entropy on the held-out chunks).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmkit
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer
from llmkit.train.distill import Distiller
from llmkit.train.distill_commands import DistillConfig
from llmkit.train.finetune import FinetuneConfig, FineTuner

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def write_chunks(text: str, path: Path, chars: int) -> int:
    """JSONL text records of about `chars` characters, cut at line ends."""
    records, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= chars:
            records.append(json.dumps({"text": current}))
            current = ""
    path.write_text("\n".join(records) + "\n")
    return len(records)


def loop_options(args, steps: int, lr: float) -> dict:
    return dict(max_seq_len=args.seq_len, micro_batch_size=args.batch, max_steps=steps, lr=lr, warmup_steps=20,
                eval_every=0, eval_batches=10_000, save_every=10_000, log_every=50, seed=0, device="cpu",
                weight_decay=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--student-steps", type=int, default=500)
    p.add_argument("--methods", default="kd", help="distillation methods to compare with the baseline")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-chars", type=int, default=0, help="characters of training text used (0 = all)")
    p.add_argument("--tiny", action="store_true", help="smoke run: a few steps on a little text")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    if args.tiny:
        args.teacher_steps, args.student_steps, args.train_chars, args.batch = 20, 10, 30_000, 4
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.out or tempfile.mkdtemp(prefix="distill-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    text = CORPUS.read_text()
    split = int(len(text) * 0.9)
    train_text, val_text = text[:split][: args.train_chars or None], text[split:]
    (root / "train.txt").write_text(train_text)
    n_train = write_chunks(train_text, root / "train.jsonl", 220)
    n_val = write_chunks(val_text[: 20_000 if args.tiny else None], root / "val.jsonl", 220)
    tok = train_tokenizer([root / "train.txt"], "byte-bpe", 512)
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    data = dict(data=str(root / "train.jsonl"), val_data=str(root / "val.jsonl"), format="text")
    t0 = time.perf_counter()

    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.from_preset("tiny", n_layer=4, d_model=128, n_head=4, n_kv_head=4, d_ff=384, **ids))
    llmkit.save(teacher, tok, root / "teacher-init")
    cfg = FinetuneConfig(model=str(root / "teacher-init"), method="full", **data,
                         **loop_options(args, args.teacher_steps, 2e-3))
    teacher_run = FineTuner(cfg, root / "teacher", overwrite=True)
    teacher_val = teacher_run.fit()["val_loss"]
    print(f"teacher: val loss {teacher_val:.4f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    torch.manual_seed(1)
    student = Transformer(ModelConfig.from_preset("tiny", n_layer=1, d_model=64, n_head=4, n_kv_head=4, d_ff=128, **ids))
    llmkit.save(student, tok, root / "student-init")
    options = loop_options(args, args.student_steps, 3e-3)
    cfg = FinetuneConfig(model=str(root / "student-init"), method="full", **data, **options)
    baseline = FineTuner(cfg, root / "student-alone", overwrite=True).fit()["val_loss"]
    print(f"student alone: val loss {baseline:.4f}", file=sys.stderr)
    distilled = {}
    for method in args.methods.split(","):
        cfg = DistillConfig(teacher=str(root / "teacher" / "model"), student=str(root / "student-init"),
                            method=method, temperature=args.temperature, alpha=args.alpha, **data, **options)
        distilled[method] = Distiller(cfg, root / f"student-{method}", overwrite=True).fit()["val_loss"]
        print(f"student + {method}: val loss {distilled[method]:.4f}", file=sys.stderr)
    print(json.dumps({
        "train_chunks": n_train, "val_chunks": n_val, "vocab_size": tok.vocab_size, "seq_len": args.seq_len,
        "batch": args.batch, "teacher_params": teacher.num_params(), "student_params": student.num_params(),
        "teacher_steps": args.teacher_steps, "student_steps": args.student_steps,
        "teacher_val_loss": round(teacher_val, 4), "student_alone_val_loss": round(baseline, 4),
        "student_distilled_val_loss": {m: round(v, 4) for m, v in distilled.items()},
        "temperature": args.temperature, "alpha": args.alpha, "seconds": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
