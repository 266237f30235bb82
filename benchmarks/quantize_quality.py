"""Validation perplexity of a Tiny Shakespeare model under every quantisation method (JSON on stdout).

Without --model it first trains the quickstart model (llmkit.train.quickstart, ~2.2M parameters, a few
minutes on 2 CPU cores). Calibration: the first --calibration-lines lines of the corpus; evaluation: the last
--eval-lines lines (the quickstart's 5% validation split holds other paragraphs, so these were trained on
only where they overlap; the comparison between methods is what counts).

  python benchmarks/quantize_quality.py --steps 300 --group-size 64
  python benchmarks/quantize_quality.py --model runs/quickstart/run/model
Goals (issue 9): int8 <= +1%, GPTQ/AWQ int4 <= +5% relative, both better than round-to-nearest int4.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

import llmkit
from llmkit.infer.quantize import calibration_tokens, quantize_model

METHODS = {"int8": "int8", "int4_rtn": "int4", "gptq_int4": "gptq", "awq_int4": "awq",
           "smoothquant_w8a8": "smoothquant", "llm_int8": "llm-int8"}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        batch = ids[i:i + batch_size]
        logits = model(batch[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def eval_tokens(tokenizer, lines: int, seq_len: int) -> torch.Tensor:
    text = "\n".join((resources.files("llmkit") / "assets" / "tinyshakespeare.txt").read_text().splitlines()[-lines:])
    ids = tokenizer.encode(text)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a trained checkpoint (default: train the quickstart model)")
    p.add_argument("--steps", type=int, default=300, help="training steps when no --model is given")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (the quickstart width is 192)")
    p.add_argument("--calibration-lines", type=int, default=512)
    p.add_argument("--eval-lines", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model
        if model_dir is None:
            from llmkit.train.quickstart import quickstart

            quickstart(Path(work) / "qs", max_steps=args.steps, device="cpu")
            model_dir = Path(work) / "qs" / "run" / "model"
        model, tokenizer = llmkit.load(model_dir)
    calibration = calibration_tokens(tokenizer, None, args.calibration_lines, args.seq_len)
    val = eval_tokens(tokenizer, args.eval_lines, args.seq_len + 1)
    base = perplexity(model, val)
    result = {"model": str(args.model or f"quickstart, {args.steps} steps"), "group_size": args.group_size,
              "calibration_sequences": len(calibration), "eval_tokens": val[:, 1:].numel(), "fp32": round(base, 4)}
    for name, method in METHODS.items():
        quantized = quantize_model(copy.deepcopy(model), method, group_size=args.group_size, calibration=calibration,
                                   act_order=args.act_order)
        ppl = perplexity(quantized, val)
        result[name] = {"ppl": round(ppl, 4), "relative": round(ppl / base - 1, 4)}
        print(f"{name}: {ppl:.4f} ({ppl / base - 1:+.2%})", file=sys.stderr, flush=True)
    result["goals"] = {"int8_le_1pct": result["int8"]["relative"] <= 0.01,
                       "gptq_le_5pct": result["gptq_int4"]["relative"] <= 0.05,
                       "awq_le_5pct": result["awq_int4"]["relative"] <= 0.05,
                       "gptq_beats_rtn": result["gptq_int4"]["ppl"] < result["int4_rtn"]["ppl"],
                       "awq_beats_rtn": result["awq_int4"]["ppl"] < result["int4_rtn"]["ppl"]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
