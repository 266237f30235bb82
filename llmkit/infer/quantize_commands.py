"""`llmkit quantize`: post-training quantisation of a checkpoint directory (see llmkit/infer/quantize.py)."""

from __future__ import annotations

import json
import sys
import time

from jsonargparse import Namespace

from llmkit.cli import Parser, _flag, _parser


def quantize_parser() -> Parser:
    p = _parser("llmkit quantize", "Quantise a checkpoint's linear layers and save it (safetensors + quantization_config).")
    p.add_argument("--model", type=str, required=True, help="checkpoint directory")
    p.add_argument("--method", type=str, required=True, help="int8, int4, gptq, awq, smoothquant or llm-int8")
    p.add_argument("--out", type=str, required=True, help="output checkpoint directory")
    p.add_argument("--group-size", type=int, default=128, help="int4/gptq/awq: input columns per scale (32, 64, 128)")
    p.add_argument("--calibration", type=str | None, default=None,
                   help="text or JSONL file for calibration (default: the bundled Tiny Shakespeare)")
    p.add_argument("--calibration-lines", type=int, default=256, help="lines of the calibration file to read")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    _flag(p, "--act-order", help="gptq: quantise columns in order of decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: dampening, a fraction of the mean Hessian diagonal")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant: migration strength")
    p.add_argument("--threshold", type=float, default=6.0, help="llm-int8: outlier activation magnitude")
    _flag(p, "--json", help="print a summary as one JSON object")
    return p


def run_quantize(args: Namespace) -> None:
    import llmkit
    from llmkit.infer.quantize import calibration_tokens, check_options, quantize_model, save_quantized, weight_bytes

    check_options(args.method, args.group_size)
    model, tokenizer = llmkit.load(args.model)
    calibration = None
    if args.method not in ("int8", "int4"):
        if tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer to tokenise calibration text for {args.method}")
        calibration = calibration_tokens(tokenizer, args.calibration, args.calibration_lines, args.seq_len)
    before, start = weight_bytes(model), time.perf_counter()
    quantize_model(model, args.method, group_size=args.group_size, calibration=calibration,
                   act_order=args.act_order, damp=args.damp, alpha=args.alpha, threshold=args.threshold)
    path = save_quantized(model, tokenizer, args.out)
    summary = {"out": str(path), "method": args.method, "bytes_before": before, "bytes_after": weight_bytes(model),
               "seconds": round(time.perf_counter() - start, 2)}
    print(f"quantised {args.model} -> {path} ({args.method})", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))


COMMANDS = {"quantize": (quantize_parser, run_quantize, "quantise a checkpoint (int8/int4/GPTQ/AWQ/SmoothQuant/LLM.int8)")}
