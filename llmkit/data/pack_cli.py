"""`llmkit data pack`: tokenize text/JSONL files into token shards for pretraining."""

from __future__ import annotations

import json
import sys

from jsonargparse import Namespace

from llmkit.cli import Parser, _flag, _parser


def pack_parser() -> Parser:
    p = _parser("llmkit data pack", "Tokenize documents, separate them with EOS, write token shards + index.json.")
    p.add_argument("--input", type=str, nargs="+", required=True, help="text or JSONL files (gzip/zstd too)")
    p.add_argument("--output", type=str, required=True, help="output directory (must not exist)")
    p.add_argument("--tokenizer", type=str, required=True, help="tokenizer directory (llmkit or Hugging Face)")
    p.add_argument("--text-field", type=str, default="text", help="JSONL field holding the text")
    p.add_argument("--unit", type=str, default="paragraph", choices=["file", "paragraph", "line"],
                   help="what one document is in a plain-text file")
    _flag(p, "--skip-bad", help="count and skip malformed lines instead of stopping at the first")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in the validation split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    _flag(p, "--json", help="print the index as one JSON object")
    return p


def run_pack(args: Namespace) -> None:
    from llmkit.data.pack import pack_documents, read_documents
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    docs = read_documents(args.input, text_field=args.text_field, txt_unit=args.unit, skip_bad=args.skip_bad)
    meta = pack_documents(docs, tok, args.output, val_fraction=args.val_fraction, seed=args.seed, sources=args.input)
    if args.json:
        print(json.dumps(meta))
    else:
        print(f"packed {sum(meta['documents'].values())} documents into {args.output}: "
              f"{meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens ({meta['dtype']})",
              file=sys.stderr)


COMMANDS = {"data pack": (pack_parser, run_pack, "tokenize and pack documents into token shards")}
