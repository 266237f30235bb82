"""`llmkit quickstart`: tokenizer -> packed data -> a small model trained on CPU -> a sample.

Tiny Shakespeare (public domain, from karpathy/char-rnn) ships inside the package.
"""

from __future__ import annotations

import math
import shutil
import sys
from importlib import resources
from pathlib import Path

import yaml

from llmkit.data.pack import pack_documents, read_documents
from llmkit.tokenizer import compression, train_tokenizer
from llmkit.train.recipe import TrainConfig
from llmkit.train.trainer import TrainError, Trainer

MARKER = ".llmkit-quickstart"


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def quickstart(out: str | Path = "runs/quickstart", max_steps: int | None = None, device: str = "auto") -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise TrainError(f"{out}: exists and was not made by quickstart; choose another --out")
        shutil.rmtree(out)  # a previous quickstart's output: start over
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    corpus = str(resources.files("llmkit") / "assets" / "tinyshakespeare.txt")

    say("[1/4] training a byte-level BPE tokenizer on Tiny Shakespeare")
    heldout: list[str] = []
    tok = train_tokenizer([corpus], "byte-bpe", 2048, heldout=heldout)
    tok.save(out / "tokenizer")
    say(f"      vocabulary {tok.vocab_size}, {compression(tok, [t for t in heldout if t.strip()]):.2f} "
        "bytes/token on held-out lines")

    say("[2/4] packing the text into token shards (one document per paragraph, 5% validation)")
    meta = pack_documents(read_documents([corpus]), tok, out / "data", val_fraction=0.05, sources=[corpus],
                          progress=False)
    say(f"      {meta['tokens']['train']:,} training and {meta['tokens']['val']:,} validation tokens")

    recipe = yaml.safe_load((resources.files("llmkit") / "recipes" / "tinyshakespeare.yaml").read_text())
    cfg = TrainConfig(**recipe, data=str(out / "data"), device=device)
    if max_steps is not None:
        cfg.max_steps = max_steps
        cfg.eval_every = cfg.save_every = max(1, max_steps)
    say(f"[3/4] pretraining a {cfg.model} model for {cfg.max_steps} steps "
        f"({cfg.micro_batch_size}x{cfg.seq_len} tokens each)")
    trainer = Trainer(cfg, out / "run")
    (out / "run" / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    say(f"      {trainer.raw_model.num_params():,} parameters on {trainer.device}")
    final = trainer.fit()

    model_dir = out / "run" / "model"
    say("[4/4] done")
    say(f"      validation loss {final['val_loss']:.4f}, perplexity {math.exp(final['val_loss']):.2f}")
    say("      sample:\n")
    say("\n".join("        " + line for line in final["sample"].splitlines()))
    say("\n      next:")
    say(f"        llmkit generate --model {model_dir} --prompt 'ROMEO:' --temperature 0.8 --top-k 50 --stream")
    say(f"        llmkit chat --model {model_dir}")
    say(f"        python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('{model_dir}')\"")
    return final
