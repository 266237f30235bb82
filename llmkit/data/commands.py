"""`llmkit data clean|filter|dedup|pii|decontaminate`: options and thin handlers over llmkit.data.

Only jsonargparse is imported at the top (so `llmkit --help` stays fast); each handler imports its module.
"""

from __future__ import annotations

import sys

from jsonargparse import ActionYesNo, Namespace

from llmkit.cli import Parser, _flag, _parser


def _switch(p: Parser, name: str, default: bool, help: str) -> None:
    """`--name` / `--no-name` with an explicit default."""
    p.add_argument(name, action=ActionYesNo(no_prefix="no-"), default=default, help=help)


def _add_io(p: Parser) -> None:
    p.add_argument("--input", type=str, nargs="+", required=True,
                   help="input files (.jsonl/.txt, optionally .gz/.zst), directories or glob patterns")
    p.add_argument("--output", type=str, required=True,
                   help="output file; its suffix picks the format (.jsonl[.gz|.zst] or .txt[.gz|.zst]); "
                        "'{shard}' is replaced by the shard index")
    p.add_argument("--report", type=str | None, default=None, help="JSON report path (default: OUTPUT.report.json)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--shard", type=str | None, default=None,
                   help="i/n: process only input files i, i+n, i+2n, ... (0 <= i < n), e.g. one slice per machine")
    p.add_argument("--text-field", type=str, default="text", help="JSONL field holding the document text")
    p.add_argument("--unit", type=str, default="line", choices=["line", "paragraph", "file"],
                   help="what a document is in plain-text files: a line, a block of non-blank lines, a whole file")
    _flag(p, "--skip-bad", help="skip malformed lines (bad JSON, missing field, invalid UTF-8), counting them in "
                                "the report, instead of stopping with an error")
    p.add_argument("--max-examples", type=int, default=3, help="examples kept per rule in the report")
    _flag(p, "--quiet", help="no progress bar or summary line on stderr")
    _flag(p, "--json", help="print the report as one JSON object on stdout")


def _io(args: Namespace):
    from llmkit.data.io import StepIO

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    return StepIO(inputs=list(args.input), output=args.output, report=args.report, text_field=args.text_field,
                  workers=args.workers, shard=args.shard, skip_bad=args.skip_bad, unit=args.unit,
                  progress=not args.quiet, max_examples=args.max_examples)


def _done(args: Namespace, report: dict) -> None:
    if args.json:
        import json

        print(json.dumps(report))


# ----------------------------------------------------------------------------- clean


def clean_parser() -> Parser:
    p = _parser("llmkit data clean", "Normalise text (NFC, control and zero-width characters, whitespace, line "
                                     "endings) and remove boilerplate lines.")
    _add_io(p)
    _switch(p, "--nfc", True, "Unicode NFC normalisation")
    _switch(p, "--line-endings", True, "CRLF, CR, U+2028/2029 -> LF")
    _switch(p, "--control", True, "remove control characters (tab and newline kept)")
    _switch(p, "--zero-width", True, "remove zero-width space, word joiner, BOM, soft hyphen")
    _switch(p, "--whitespace", True, "Unicode spaces -> space, collapse runs inside lines, strip line ends")
    p.add_argument("--max-blank-lines", type=int, default=1, help="blank lines allowed in a row")
    p.add_argument("--boilerplate", type=str, nargs="*", default=[],
                   help="files of line patterns (regular expressions matched against whole lines)")
    _switch(p, "--default-boilerplate", True, "also use the bundled patterns (llmkit/data/assets/boilerplate.txt)")
    return p


def run_clean(args: Namespace) -> None:
    from llmkit.data.clean import DEFAULT_BOILERPLATE, CleanConfig, clean, load_patterns

    patterns = load_patterns(DEFAULT_BOILERPLATE) if args.default_boilerplate else []
    for f in args.boilerplate:
        patterns += load_patterns(f)
    config = CleanConfig(nfc=args.nfc, line_endings=args.line_endings, control=args.control,
                         zero_width=args.zero_width, whitespace=args.whitespace,
                         max_blank_lines=args.max_blank_lines, boilerplate=patterns)
    _done(args, clean(_io(args), config))


# ----------------------------------------------------------------------------- filter


def filter_parser() -> Parser:
    from llmkit.data.filter import RULE_NAMES, RULES  # a table of constants, no heavy imports

    p = _parser("llmkit data filter", "Quality filtering: Gopher/C4 heuristics (word counts, symbols, repetition), "
                                      "language, blocklist, classifier and perplexity filters.")
    _add_io(p)
    for rule, field, default, help_text in RULES:
        t = int | None if isinstance(default, int) or field in ("max_curly_braces",) else float | None
        p.add_argument("--" + field.replace("_", "-"), type=t, default=default,
                       help=f"[{rule}] {help_text}; null disables")
    p.add_argument("--skip-rules", type=str, nargs="*", default=[], help=f"rules to turn off: {', '.join(RULE_NAMES)}")
    p.add_argument("--languages", type=str, nargs="*", default=[],
                   help="keep only these languages (ISO 639 codes, fastText lid.176); empty = no language filter")
    p.add_argument("--min-language-score", type=float, default=0.65, help="smallest language-ID probability kept")
    p.add_argument("--blocklist", type=str, nargs="*", default=[],
                   help="term files for the blocklist filter ('default' = bundled English list); empty = off")
    p.add_argument("--blocklist-min-hits", type=int, default=1, help="matches that remove a document")
    p.add_argument("--classifier", type=str | None, default=None,
                   help="classifier .npz to apply (or to write, with --classifier-positive/--classifier-negative)")
    p.add_argument("--classifier-positive", type=str, nargs="*", default=[], help="files of good example documents")
    p.add_argument("--classifier-negative", type=str, nargs="*", default=[], help="files of bad example documents")
    p.add_argument("--classifier-threshold", type=float, default=0.5, help="smallest positive-class probability kept")
    p.add_argument("--classifier-bits", type=int, default=20, help="log2 of the hashed feature count (training)")
    p.add_argument("--perplexity-model", type=str | None, default=None,
                   help="llmkit/HF checkpoint directory for the perplexity filter; unset = off")
    p.add_argument("--perplexity-min-percentile", type=float, default=0.0, help="lowest perplexity percentile kept")
    p.add_argument("--perplexity-max-percentile", type=float, default=90.0, help="highest perplexity percentile kept")
    p.add_argument("--perplexity-max-tokens", type=int, default=512, help="tokens scored per document")
    p.add_argument("--perplexity-batch-size", type=int, default=16, help="documents per forward pass")
    p.add_argument("--perplexity-device", type=str, default="cpu", help="cpu or cuda")
    return p


def run_filter(args: Namespace) -> None:
    from llmkit.data.filter import RULES, FilterConfig, filter_corpus, train_classifier

    classifier = args.classifier
    if args.classifier_positive or args.classifier_negative:
        classifier = classifier or args.output + ".classifier.npz"
        clf = train_classifier(args.classifier_positive, args.classifier_negative, args.text_field, args.unit,
                               bits=args.classifier_bits)
        clf.save(classifier)
        if not args.quiet:
            print(f"llmkit data filter: trained classifier saved to {classifier}", file=sys.stderr)
    thresholds = {field: args[field] for _, field, _, _ in RULES}
    config = FilterConfig(**thresholds, skip_rules=list(args.skip_rules), languages=list(args.languages),
                          min_language_score=args.min_language_score, blocklist=list(args.blocklist),
                          blocklist_min_hits=args.blocklist_min_hits, classifier=classifier,
                          classifier_threshold=args.classifier_threshold, perplexity_model=args.perplexity_model,
                          perplexity_min_percentile=args.perplexity_min_percentile,
                          perplexity_max_percentile=args.perplexity_max_percentile,
                          perplexity_max_tokens=args.perplexity_max_tokens,
                          perplexity_batch_size=args.perplexity_batch_size,
                          perplexity_device=args.perplexity_device)
    _done(args, filter_corpus(_io(args), config))


# ----------------------------------------------------------------------------- dedup


def dedup_parser() -> Parser:
    p = _parser("llmkit data dedup", "Dataset-level deduplication across all inputs: exact (normalised text hash) "
                                     "and near-duplicate (MinHash + LSH), keeping the first document of each cluster.")
    _add_io(p)
    _switch(p, "--exact", True, "drop documents whose normalised text repeats an earlier one")
    _switch(p, "--near", True, "drop near-duplicates (MinHash + LSH)")
    _flag(p, "--repeated-lines", help="also drop lines repeated inside a document")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (signature length)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity at which documents are duplicates")
    p.add_argument("--bands", type=int, default=0, help="LSH bands (0 = chosen from threshold and num-perm)")
    p.add_argument("--rows", type=int, default=0, help="rows per LSH band (0 = chosen)")
    p.add_argument("--seed", type=int, default=1, help="seed of the hash functions")
    p.add_argument("--tmp-dir", type=str | None, default=None,
                   help="directory for the signature file (default: the output's directory)")
    return p


def run_dedup(args: Namespace) -> None:
    from llmkit.data.dedup import DedupConfig, MinHashConfig, dedup

    mh = MinHashConfig(ngram=args.ngram, num_perm=args.num_perm, threshold=args.threshold, bands=args.bands,
                       rows=args.rows, seed=args.seed)
    config = DedupConfig(exact=args.exact, near=args.near, repeated_lines=args.repeated_lines, minhash=mh,
                         tmp_dir=args.tmp_dir)
    _done(args, dedup(_io(args), config))


# ----------------------------------------------------------------------------- pii


def pii_parser() -> Parser:
    p = _parser("llmkit data pii", "Replace personal data (e-mails, phones, IPs, credit cards, SSNs, IBANs, "
                                   "optionally URLs) by typed placeholders such as <EMAIL>.")
    _add_io(p)
    p.add_argument("--types", type=str, nargs="+",
                   default=["EMAIL", "IBAN", "CREDIT_CARD", "SSN", "IPV6", "IPV4", "PHONE"],
                   help="PII types to redact (EMAIL URL IBAN CREDIT_CARD SSN IPV6 IPV4 PHONE)")
    _flag(p, "--urls", help="also redact URLs")
    p.add_argument("--placeholder", type=str, default="<{type}>", help="replacement; {type} is the PII type")
    return p


def run_pii(args: Namespace) -> None:
    from llmkit.data.pii import PIIConfig, redact_pii

    types = list(args.types) + (["URL"] if args.urls and "URL" not in args.types else [])
    _done(args, redact_pii(_io(args), PIIConfig(types=types, placeholder=args.placeholder)))


# ----------------------------------------------------------------------------- decontaminate


def decontaminate_parser() -> Parser:
    p = _parser("llmkit data decontaminate", "Drop (or report) training documents sharing an n-gram with "
                                             "evaluation data (GPT-3 style, 13-grams by default).")
    _add_io(p)
    p.add_argument("--eval", type=str, nargs="+", required=True, help="evaluation files (.jsonl or .txt)")
    p.add_argument("--eval-field", type=str, nargs="+", default=["text"],
                   help="JSONL fields of an evaluation item (strings or lists of strings, joined)")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram")
    p.add_argument("--min-ngram", type=int, default=8,
                   help="evaluation items shorter than --ngram words are matched whole down to this many words")
    p.add_argument("--mode", type=str, default="drop", choices=["drop", "report"],
                   help="drop contaminated documents, or keep them and only report")
    return p


def run_decontaminate(args: Namespace) -> None:
    from llmkit.data.decontaminate import DecontamConfig, decontaminate

    config = DecontamConfig(eval_files=list(args.eval), eval_fields=list(args.eval_field), ngram=args.ngram,
                            min_ngram=args.min_ngram, mode=args.mode)
    _done(args, decontaminate(_io(args), config))


COMMANDS = {
    "data clean": (clean_parser, run_clean, "normalise text and remove boilerplate lines"),
    "data filter": (filter_parser, run_filter, "quality, language, blocklist, classifier and perplexity filters"),
    "data dedup": (dedup_parser, run_dedup, "exact and MinHash near-duplicate removal across all inputs"),
    "data pii": (pii_parser, run_pii, "replace personal data by typed placeholders"),
    "data decontaminate": (decontaminate_parser, run_decontaminate, "remove n-gram overlaps with evaluation sets"),
}
