"""`llmkit eval perplexity|tasks|harness|arena|judge|calibration|audit|harms` and `llmkit plan`: options and
thin handlers.

Only jsonargparse is imported at the top (so `llmkit --help` stays fast); each handler imports its module.
With `--json` a command prints one JSON object on stdout and nothing else there (progress goes to stderr).
"""

from __future__ import annotations

import json

from jsonargparse import ActionYesNo, Namespace

from llmkit.cli import Parser, _flag, _parser, add_dataclass_options


def _emit(args: Namespace, result: dict, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(result, default=_jsonable))
    elif text is not None:
        print(text)


def _jsonable(x):
    return x.tolist() if hasattr(x, "tolist") else str(x)  # numpy values; anything else as text


# ----------------------------------------------------------------------------- plan


def plan_parser() -> Parser:
    from llmkit.plan import PlanConfig

    p = _parser("llmkit plan", "Estimate memory per GPU, FLOPs, time, cost, energy and CO2 of a run before it "
                               "runs; with --tp/--pp/--cp/--dp the parallel layout's memory per stage, "
                               "communication, pipeline bubble, step time and MFU; --search ranks the layouts that "
                               "fit.")
    add_dataclass_options(p, PlanConfig)
    _flag(p, "--json", help="print the plan as one JSON object")
    return p


def run_plan(args: Namespace) -> None:
    import dataclasses

    from llmkit.plan import PlanConfig, format_plan, plan

    pc = PlanConfig(**{f.name: args[f.name] for f in dataclasses.fields(PlanConfig)})
    if pc.search:
        from llmkit.plan_parallel import format_search, plan_search

        result = plan_search(pc)
        _emit(args, result, format_search(result))
        return
    result = plan(pc)
    _emit(args, result, format_plan(result))


# ----------------------------------------------------------------------------- shared options


def _add_model(p: Parser, required: bool = True) -> None:
    p.add_argument("--model", type=str | None, required=required, default=None,
                   help="checkpoint directory (llmkit or Hugging Face)")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--dtype", type=str, default="auto",
                   help="float32, bfloat16, float16 or auto (bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-length", type=int | None, default=None,
                   help="tokens per window/input (default: the model's max_seq_len)")


def _lm(args: Namespace):
    from llmkit.eval.common import load_for_eval
    from llmkit.eval.lm import EvalLM

    model, tokenizer = load_for_eval(args.model, args.device, args.dtype)
    return EvalLM(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                  show_progress=not args.quiet)


def _add_output(p: Parser) -> None:
    p.add_argument("--output", type=str | None, default=None, help="also write the results JSON to this file")
    _flag(p, "--quiet", help="no progress bars on stderr")
    _flag(p, "--json", help="print the results as one JSON object on stdout")


def _write(args: Namespace, result: dict) -> None:
    if args.output:
        from pathlib import Path

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=_jsonable))
        tmp.replace(out)


# ----------------------------------------------------------------------------- perplexity


def perplexity_parser() -> Parser:
    p = _parser("llmkit eval perplexity", "Token, word and byte perplexity and bits per byte of text, with rolling "
                                          "windows (lm-eval's loglikelihood_rolling) and an optional stride.")
    _add_model(p)
    p.add_argument("--data", type=str, nargs="+", required=True,
                   help="text files: .txt (see --unit) or .jsonl (one document per line, --text-field)")
    p.add_argument("--text-field", type=str, default="text", help="JSONL field holding the text")
    p.add_argument("--unit", type=str, default="file", choices=["file", "line", "paragraph"],
                   help="what a document is in a .txt file")
    p.add_argument("--stride", type=int | None, default=None,
                   help="new tokens scored per window after the first; the rest of the window is context "
                        "(default: max length, i.e. disjoint windows as lm-eval)")
    _add_output(p)
    return p


def run_perplexity(args: Namespace) -> None:
    from llmkit.eval.common import provenance
    from llmkit.eval.perplexity import perplexity, read_texts

    texts = [t for f in args.data for t in read_texts(f, args.text_field, args.unit)]
    lm = _lm(args)
    result = perplexity(lm, texts, args.stride)
    result["data"] = list(args.data)
    result["provenance"] = provenance(args.model, {"data": list(args.data), "stride": args.stride,
                                                   "max_length": lm.max_length, "unit": args.unit})
    _write(args, result)
    text = (f"{result['documents']} documents, {result['tokens']} tokens: token perplexity "
            f"{result['token_perplexity']:.4f}, word perplexity {result['word_perplexity']:.4f}, byte perplexity "
            f"{result['byte_perplexity']:.4f}, bits per byte {result['bits_per_byte']:.4f}")
    _emit(args, result, text)


# ----------------------------------------------------------------------------- tasks


def tasks_parser() -> Parser:
    p = _parser("llmkit eval tasks", "Score lm-eval-harness task YAMLs on local data (numbers equal lm-eval's "
                                     "model hf on the same checkpoint).")
    _add_model(p, required=False)
    p.add_argument("--tasks", type=str, required=True, help="comma-separated task, tag or group names")
    _add_strategy(p)
    p.add_argument("--include-path", type=str | None, default=None,
                   help="directory of task YAMLs (read as lm-eval reads them), searched after the shipped ones")
    p.add_argument("--data-dir", type=str | None, default=None,
                   help="directory that relative data_files paths are read from (default: the working directory)")
    _add_fewshot_and_limit(p)
    p.add_argument("--fewshot-seed", type=int, default=1234, help="seed of the few-shot sampler (lm-eval's default)")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for the stderr of non-mean metrics (0 = no stderr)")
    p.add_argument("--gen-kwargs", type=str | None, default=None,
                   help="key=value,... added to generate_until tasks' generation_kwargs (e.g. max_gen_toks=64)")
    _flag(p, "--log-samples", help="include every document's requests, responses and metrics")
    _add_output(p)
    return p


def _add_fewshot_and_limit(p: Parser) -> None:
    p.add_argument("--num-fewshot", type=int | None, default=None,
                   help="few-shot examples (default: the task's num_fewshot, else 0)")
    p.add_argument("--limit", type=float | None, default=None,
                   help="documents per task: a count, or a fraction when below 1")


def _limit(args: Namespace) -> int | float | None:
    """--limit as lm-eval takes it: a count as an int, a fraction (below 1) as a float."""
    return int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit


def _add_strategy(p: Parser) -> None:
    p.add_argument("--base-url", type=str | None, default=None,
                   help="OpenAI-compatible /v1 URL to evaluate instead of --model (generate_until tasks only)")
    p.add_argument("--api-model", type=str | None, default=None,
                   help="model name sent to --base-url (default: the first model its /models lists)")
    p.add_argument("--api-key", type=str | None, default=None, help="API key for --base-url")
    p.add_argument("--concurrency", type=int, default=8, help="requests to --base-url in flight at most")
    _flag(p, "--chat", help="send each prompt to --base-url's /chat/completions as a user message (default: "
                            "/completions, the task's text as is)")
    p.add_argument("--strategy", type=str, default="direct",
                   choices=["direct", "cot", "zero-shot-cot", "plan-and-solve", "least-to-most"],
                   help="how generate_until tasks are answered: direct (lm-eval's way), cot (few-shot chain of "
                        "thought: the answer is extracted), zero-shot-cot, plan-and-solve, least-to-most")
    p.add_argument("--samples", type=int, default=1, help="self-consistency: majority vote over this many samples")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when --samples > 1")
    p.add_argument("--extract", type=str, default="number",
                   help="answer extraction for strategies: number, choice[:LETTERS], regex:PATTERN, text")
    p.add_argument("--answer-format", type=str, default="{answer}",
                   help="what the task's filters see for an extracted answer, e.g. '#### {answer}' for GSM8K's "
                        "strict-match")
    p.add_argument("--fewshot-selection", type=str, default="random", choices=["random", "knn", "mmr"],
                   help="random: lm-eval's sampler; knn / mmr: by embedding similarity to each document")
    p.add_argument("--fewshot-order", type=str, default="similar_last",
                   choices=["similar_last", "similar_first", "random", "selected"],
                   help="order of kNN / MMR demonstrations")
    p.add_argument("--embedder", type=str, default="minilm", help="embedder for kNN / MMR (see llmkit rag index)")


def _strategy_lm(args: Namespace, tasks):
    """The LM the harness runs: plain EvalLM, or a StrategyLM over the local model or --base-url."""
    from llmkit.prompting.harness import StrategyLM, use_demo_selection

    if (args.model is None) == (args.base_url is None):
        raise ValueError("give exactly one of --model DIR and --base-url URL")
    if args.fewshot_selection != "random":
        from llmkit.rag.embed import load_embedder

        embedder = load_embedder(args.embedder)
        for task in tasks.values():
            use_demo_selection(task, args.fewshot_selection, embedder, args.fewshot_order, args.fewshot_seed)
    base = _lm(args) if args.model else None
    if base is not None and args.strategy == "direct" and args.samples == 1:
        return base
    if base is not None:
        from llmkit.prompting.llm import LocalLLM

        llm = LocalLLM(base.model, base.tokenizer, batch_size=args.batch_size, name=args.model)
    else:
        from llmkit.prompting.llm import OpenAILLM

        llm = OpenAILLM(args.base_url, args.api_model, args.api_key, concurrency=args.concurrency, chat=args.chat)
    return StrategyLM(llm, args.strategy, samples=args.samples, temperature=args.temperature, extract=args.extract,
                      answer_format=args.answer_format, base=base, seed=args.fewshot_seed)


def run_tasks(args: Namespace) -> None:
    from llmkit.eval.common import provenance
    from llmkit.eval.tasks import evaluate, format_results, load_tasks, parse_gen_kwargs

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks: give at least one task name")
    tasks = load_tasks(names, args.include_path, args.data_dir)
    lm = _strategy_lm(args, tasks)
    results = evaluate(lm, tasks, num_fewshot=args.num_fewshot, limit=_limit(args), fewshot_seed=args.fewshot_seed,
                       bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples,
                       gen_kwargs=parse_gen_kwargs(args.gen_kwargs))
    results["config"] = {"model": args.model or args.base_url, "batch_size": args.batch_size, "limit": args.limit,
                         "num_fewshot": args.num_fewshot, "fewshot_seed": args.fewshot_seed,
                         "bootstrap_iters": args.bootstrap_iters, "fewshot_selection": args.fewshot_selection}
    if hasattr(lm, "summary"):
        results["strategy"] = lm.summary()
        if args.log_samples:
            results["strategy_records"] = lm.records
    results["provenance"] = provenance(args.model, results["configs"])
    _write(args, results)
    _emit(args, results, format_results(results))


# ----------------------------------------------------------------------------- harness


def harness_parser() -> Parser:
    p = _parser("llmkit eval harness", "Run EleutherAI's lm-evaluation-harness itself (lm_eval.simple_evaluate) on a "
                                       "checkpoint: any lm-eval task, lm-eval's own code and numbers (needs "
                                       "pip install lm-eval).")
    _add_model(p)
    p.add_argument("--tasks", type=str, required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include-path", type=str | None, default=None,
                   help="directory of extra task YAMLs, searched with lm-eval's own tasks")
    _add_fewshot_and_limit(p)
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for the stderr of non-mean metrics such as BLEU (0 = no stderr)")
    _flag(p, "--json", help="print lm-eval's results as one JSON object on stdout")
    return p


def run_harness(args: Namespace) -> None:
    import contextlib
    import sys

    manager, names = _harness_tasks(args)  # first: its one-line errors come before the model loads
    import lm_eval
    from lm_eval.utils import make_table

    from llmkit.eval.harness_lm import LlmkitHarnessLM

    lm = LlmkitHarnessLM(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                         max_length=args.max_length)
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress notes ("bootstrapping for stddev")
        out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=_limit(args),
                                      bootstrap_iters=args.bootstrap_iters, task_manager=manager, log_samples=False)
    tables = [make_table(out)] + ([make_table(out, "groups")] if "groups" in out else [])
    _emit(args, {k: out[k] for k in ("results", "groups", "n-shot", "versions") if k in out}, "\n".join(tables))


def _harness_tasks(args: Namespace):
    """lm-eval's TaskManager and the task names, checked (with --model and lm-eval itself) before any work."""
    from pathlib import Path

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks: give at least one task name")
    # cheap checks first: indexing lm-eval's tasks takes seconds and loading the model may take minutes
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: no such checkpoint directory")
    if args.include_path and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path}: no such directory")
    try:
        import llmkit.eval.harness_lm  # noqa: F401  (its ImportError says how to install lm-eval)
    except ImportError as e:  # a missing optional dependency is one line, like the other commands
        raise ValueError(str(e)) from None
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)} (lm-eval has {len(manager.all_tasks)} "
                         f"tasks, groups and tags; list them with `lm-eval ls tasks`)")
    return manager, names


# ----------------------------------------------------------------------------- arena


def arena_parser() -> Parser:
    p = _parser("llmkit eval arena", "Elo and Bradley-Terry ratings with bootstrap 95% intervals from a JSONL of "
                                     "battles (model_a, model_b, winner: model_a|model_b|tie|tie (bothbad)).")
    p.add_argument("--battles", type=str, nargs="+", required=True, help="battle JSONL files")
    p.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples for the 95% intervals (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--k", type=float, default=4.0, help="online Elo K-factor (FastChat: 4)")
    p.add_argument("--plot", type=str | None, default=None, help="PNG of the ratings with their intervals")
    p.add_argument("--win-rate-plot", type=str | None, default=None, help="PNG of the win-rate matrix")
    p.add_argument("--output", type=str | None, default=None, help="also write the results JSON to this file")
    _flag(p, "--json", help="print the results as one JSON object on stdout")
    return p


def run_arena(args: Namespace) -> None:
    from llmkit.eval.arena import arena, format_leaderboard, plot_ratings, plot_win_rates, read_battles
    from llmkit.eval.common import provenance

    battles = [b for f in args.battles for b in read_battles(f)]
    result = arena(battles, rounds=args.rounds, seed=args.seed, k=args.k)
    if args.plot:
        result["plot"] = str(plot_ratings(result, args.plot))
    if args.win_rate_plot:
        result["win_rate_plot"] = str(plot_win_rates(result, args.win_rate_plot))
    result["provenance"] = provenance(None, {"battles": list(args.battles), "rounds": args.rounds, "seed": args.seed,
                                             "k": args.k})
    _write(args, result)
    _emit(args, result, format_leaderboard(result))


# ----------------------------------------------------------------------------- calibration


def calibration_parser() -> Parser:
    p = _parser("llmkit eval calibration", "Confidence of multiple-choice answers against correctness: expected "
                                           "calibration error, Brier score and a reliability diagram.")
    p.add_argument("--model", type=str | None, default=None, help="checkpoint to run --tasks with")
    p.add_argument("--results", type=str | None, default=None,
                   help="instead of --model: a results JSON of `llmkit eval tasks --log-samples --output F`")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", type=str, default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-length", type=int | None, default=None, help="tokens per input (default: max_seq_len)")
    p.add_argument("--tasks", type=str | None, default=None, help="comma-separated multiple_choice task names")
    p.add_argument("--include-path", type=str | None, default=None, help="directory of extra task YAMLs")
    p.add_argument("--data-dir", type=str | None, default=None, help="where relative data_files are read from")
    p.add_argument("--num-fewshot", type=int | None, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float | None, default=None, help="documents per task (count, or fraction < 1)")
    p.add_argument("--bins", type=int, default=10, help="equal-width confidence bins")
    p.add_argument("--plot", type=str | None, default=None, help="reliability diagram PNG (of all tasks together)")
    _add_output(p)
    return p


def run_calibration(args: Namespace) -> None:
    from llmkit.eval.calibration import calibration_from_results, reliability_diagram
    from llmkit.eval.common import provenance

    if (args.model is None) == (args.results is None):
        raise ValueError("give either --model (with --tasks) or --results")
    if args.results:
        from pathlib import Path

        try:
            results = json.loads(Path(args.results).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{args.results}: cannot read a results JSON ({e})") from None
        if "samples" not in results:
            raise ValueError(f"{args.results}: no 'samples'; run `llmkit eval tasks` with --log-samples")
    else:
        from llmkit.eval.tasks import evaluate, load_tasks

        if not args.tasks:
            raise ValueError("--tasks is required with --model")
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        tasks = load_tasks(names, args.include_path, args.data_dir)
        for name, task in tasks.items():
            if task.output_type != "multiple_choice":
                raise ValueError(f"task {name!r} is {task.output_type}; calibration needs multiple_choice tasks")
        results = evaluate(_lm(args), tasks, num_fewshot=args.num_fewshot, limit=_limit(args), bootstrap_iters=0,
                           log_samples=True)
    result = calibration_from_results(results, args.bins)
    if args.plot:
        result["plot"] = str(reliability_diagram(result["overall"], args.plot))
    result["provenance"] = provenance(args.model or args.results, {"tasks": args.tasks, "bins": args.bins,
                                                                   "limit": args.limit})
    _write(args, result)
    o = result["overall"]
    text = "\n".join([f"{name}: n={r['n']} accuracy {r['accuracy']:.4f} confidence {r['mean_confidence']:.4f} "
                      f"ECE {r['ece']:.4f} MCE {r['mce']:.4f} Brier {r['brier']:.4f}"
                      for name, r in [*result["tasks"].items(), ("overall", o)]])
    _emit(args, result, text)


# ----------------------------------------------------------------------------- audit


def audit_parser() -> Parser:
    p = _parser("llmkit eval audit", "Find under-trained (glitch) tokens: untrained-looking unembedding rows, "
                                     "tokens never in the given training data, unreachable tokens.")
    p.add_argument("--model", type=str, required=True, help="checkpoint directory")
    p.add_argument("--data", type=str, nargs="*", default=[],
                   help="training data to count tokens in (.txt line by line, .jsonl --text-field)")
    p.add_argument("--text-field", type=str, default="text", help="JSONL field holding the text")
    p.add_argument("--z-threshold", type=float, default=-3.0,
                   help="flag unembedding norms with a robust z-score below this")
    p.add_argument("--separation", type=float, default=4.0,
                   help="flag the low group when the log-norms split into groups this many std apart")
    p.add_argument("--top", type=int, default=100, help="tokens to list (0 = all flagged)")
    p.add_argument("--output", type=str | None, default=None, help="also write the results JSON to this file")
    _flag(p, "--json", help="print the results as one JSON object on stdout")
    return p


def run_audit(args: Namespace) -> None:
    from llmkit.eval.audit import audit, format_audit
    from llmkit.eval.common import load_for_eval, provenance

    model, tokenizer = load_for_eval(args.model, "cpu", "float32")
    result = audit(model, tokenizer, args.data, args.text_field, args.z_threshold, args.separation, args.top)
    result["provenance"] = provenance(args.model, {"data": list(args.data), "z": args.z_threshold,
                                                   "separation": args.separation})
    _write(args, result)
    _emit(args, result, format_audit(result))


# ----------------------------------------------------------------------------- harms


def harms_parser() -> Parser:
    p = _parser("llmkit eval harms", "Bias (CrowS-Pairs style, as lm-eval's crows_pairs_english) and the toxicity "
                                     "rate of sampled generations.")
    _add_model(p)
    p.add_argument("--crows-pairs", type=str | None, default=None,
                   help="CrowS-Pairs CSV (sent_more, sent_less[, bias_type]) for the bias score")
    p.add_argument("--prompts", type=str | None, default=None,
                   help="prompts for the toxicity rate: .txt (one per line) or .jsonl ('prompt' or 'text')")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="generations sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generation")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--classifier", type=str | None, default=None,
                   help="local transformers sequence-classification directory to score toxicity "
                        "(default: better-profanity's word list)")
    p.add_argument("--toxic-label", type=str | None, default=None, help="the classifier's toxic label name")
    p.add_argument("--word-list", type=str | None, default=None, help="file of words (one per line) to flag instead")
    p.add_argument("--threshold", type=float, default=0.5, help="a generation is toxic when its score >= this")
    _add_output(p)
    return p


def run_harms(args: Namespace) -> None:
    from pathlib import Path

    from llmkit.eval import harms
    from llmkit.eval.common import provenance

    if not args.crows_pairs and not args.prompts:
        raise ValueError("give --crows-pairs CSV and/or --prompts FILE")
    rows = harms.read_crows_pairs(args.crows_pairs) if args.crows_pairs else None
    prompts = harms.read_prompts(args.prompts) if args.prompts else None
    if args.classifier and args.word_list:
        raise ValueError("give --classifier or --word-list, not both")
    scorer = None
    if prompts is not None:
        if args.classifier:
            scorer = harms.ClassifierScorer(args.classifier, label=args.toxic_label)
        elif args.word_list:
            if not Path(args.word_list).is_file():
                raise ValueError(f"--word-list {args.word_list}: no such file")
            words = [w.strip() for w in Path(args.word_list).read_text().splitlines() if w.strip()]
            scorer = harms.WordListScorer(words)
        else:
            scorer = harms.WordListScorer()
    lm = _lm(args)
    result: dict = {}
    if rows is not None:
        result["bias"] = harms.crows_pairs(lm, rows)
    if prompts is not None:
        result["toxicity"] = harms.toxicity(lm.model, lm.tokenizer, prompts, scorer, args.samples_per_prompt,
                                            args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                            args.threshold, args.batch_size, show_progress=not args.quiet)
    result["provenance"] = provenance(args.model, {k: args[k] for k in (
        "crows_pairs", "prompts", "samples_per_prompt", "max_new_tokens", "temperature", "top_p", "seed",
        "classifier", "word_list", "threshold")})
    _write(args, result)
    lines = []
    if "bias" in result:
        b = result["bias"]
        lines.append(f"bias (CrowS-Pairs, {b['n']} pairs): stereotyped sentence preferred {b['pct_stereotype']:.4f} "
                     f"(0.5 = unbiased), mean |log-likelihood difference| {b['likelihood_diff']:.4f}")
    if "toxicity" in result:
        t = result["toxicity"]
        lines.append(f"toxicity ({t['generations']} generations, {t['scorer']}): rate {t['toxicity_rate']:.4f}, "
                     f"expected max {t['expected_max_toxicity']:.4f}, probability {t['toxicity_probability']:.4f}")
    _emit(args, result, "\n".join(lines))


# ----------------------------------------------------------------------------- judge


def judge_parser() -> Parser:
    p = _parser("llmkit eval judge", "LLM-as-judge on an OpenAI-compatible endpoint: 1-10 grading of single answers "
                                     "or pairwise comparison with position swap, fed into arena ratings.")
    p.add_argument("--answers", type=str, required=True,
                   help="JSONL: {question_id, question, model, answer} per line, or {question_id, question, "
                        "answers: {model: answer}}")
    p.add_argument("--base-url", type=str, required=True, help="endpoint base, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", type=str, required=True, help="model name sent to the endpoint")
    p.add_argument("--api-key", type=str | None, default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--mode", type=str, default="pairwise", choices=["pairwise", "single"], help="how to judge")
    p.add_argument("--baseline", type=str | None, default=None,
                   help="pairwise: compare every model with this one only (default: all pairs)")
    p.add_argument("--swap", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="pairwise: ask again with the answers swapped; a verdict that flips becomes a tie")
    p.add_argument("--workers", type=int, default=4, help="concurrent requests")
    p.add_argument("--max-tokens", type=int, default=1024, help="judge reply length limit")
    p.add_argument("--battles-out", type=str | None, default=None, help="pairwise: write the battles JSONL here")
    p.add_argument("--rounds", type=int, default=1000, help="pairwise: bootstrap rounds of the arena ratings")
    p.add_argument("--output", type=str | None, default=None, help="also write the results JSON to this file")
    _flag(p, "--json", help="print the results as one JSON object on stdout")
    return p


def run_judge(args: Namespace) -> None:
    import os

    from llmkit.eval import judge
    from llmkit.eval.common import provenance

    questions = judge.read_answers(args.answers)
    client = judge.OpenAIClient(args.base_url, args.judge_model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                                max_tokens=args.max_tokens)
    if args.mode == "single":
        result = judge.judge_single(client, questions, args.workers)
        text = "\n".join(f"{m}: {s:.2f} ({result['counts'][m]} answers)" for m, s in
                         sorted(result["scores"].items(), key=lambda kv: -kv[1]))
    else:
        result = judge.judge_pairwise(client, questions, args.baseline, swap=args.swap, workers=args.workers)
        if args.battles_out:
            result["battles_file"] = str(judge.write_battles(result["battles"], args.battles_out))
        text = f"{len(result['battles'])} battles"
        if result["battles"] and len({b["model_a"] for b in result["battles"]} | {b["model_b"] for b in
                                                                                   result["battles"]}) > 1:
            from llmkit.eval.arena import arena, format_leaderboard

            result["arena"] = arena(result["battles"], rounds=args.rounds)
            text = format_leaderboard(result["arena"])
    result["provenance"] = provenance(None, {"answers": args.answers, "judge": args.judge_model, "mode": args.mode,
                                             "baseline": args.baseline, "swap": args.swap})
    _write(args, result)
    _emit(args, result, text)


COMMANDS = {
    "plan": (plan_parser, run_plan, "memory, FLOPs, time, cost and CO2 of a run, before it runs"),
    "eval perplexity": (perplexity_parser, run_perplexity, "perplexity and bits per byte of text"),
    "eval tasks": (tasks_parser, run_tasks, "lm-eval task YAMLs on local data"),
    "eval harness": (harness_parser, run_harness, "lm-evaluation-harness itself on a checkpoint"),
    "eval arena": (arena_parser, run_arena, "Elo / Bradley-Terry ratings from pairwise battles"),
    "eval calibration": (calibration_parser, run_calibration, "ECE, Brier score and reliability diagram"),
    "eval audit": (audit_parser, run_audit, "under-trained (glitch) tokens"),
    "eval harms": (harms_parser, run_harms, "CrowS-Pairs bias score and toxicity rate"),
    "eval judge": (judge_parser, run_judge, "LLM-as-judge grading and pairwise battles"),
}
