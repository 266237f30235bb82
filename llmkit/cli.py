"""`llmkit <stage> ...`: parses options (command line, or YAML via --config), calls the library.

Every option is declared once here with its default and help; the work happens in the
library functions each handler calls. Bad options exit 2 with one line; so does bad input
(a missing file, a malformed checkpoint) caught as one of the library's ValueErrors.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

EXIT_BAD_INPUT = 2
_BUILTIN_OPTIONS = ("help", "config", "print_config")


class Parser(ArgumentParser):
    """jsonargparse's parser with the one-line error the CLI promises (no usage dump)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        text = " ".join(line.strip() for line in message.strip().splitlines()) or "invalid arguments"
        if any(word in text for word in ("unrecognized", "not expected", "does not accept")):
            text += f"; valid options: {', '.join(self._valid_options(text))}"
        prog = self.prog.replace(" [options]", "")
        print(f"{prog}: error: {text} (see: {prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


    def _valid_options(self, message: str) -> list[str]:
        import re

        parser = self
        named = re.search(r"Subcommand '([^']+)' does not accept", message)
        if named and getattr(self, "_subcommands_action", None):  # the error came up from a stage's own parser
            parser = self._subcommands_action._name_parser_map.get(named.group(1), self)
        return sorted(a.dest for a in parser._actions if a.option_strings and a.dest not in _BUILTIN_OPTIONS)


def _parser(prog: str, description: str) -> Parser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file setting any option below; "
                        "options given after it on the command line override it")
    return parser


# ----------------------------------------------------------------------------- options


def _flag(p: Parser, name: str, help: str) -> None:
    """A boolean switch: `--name` turns it on, `--no-name` off (default off)."""
    p.add_argument(name, action=ActionYesNo(no_prefix="no-"), default=False, help=help)


def add_dataclass_options(p: Parser, cls) -> None:
    """One dashed option per dataclass field, with the field's default and `metadata["help"]`."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    # the command's own options first, then those it shares with others (a stable sort keeps each group's order)
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hints[f.name] is bool:
            p.add_argument("--" + f.name.replace("_", "-"), action=ActionYesNo(no_prefix="no-"), default=default,
                           help=f.metadata.get("help", ""))
            continue
        kwargs = {"type": hints[f.name], "default": default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        p.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _add_model_options(p: Parser, required: bool = True) -> None:
    p.add_argument("--model", type=str if required else str | None, required=required, default=None,
                   help="checkpoint directory (llmkit or Hugging Face)")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--dtype", type=str, default="auto",
                   help="float32, bfloat16, float16 or auto (bfloat16 on CUDA, float32 on CPU)")


def _add_sampling_options(p: Parser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (1 = off)")
    p.add_argument("--seed", type=int | None, default=None, help="random seed for sampling")
    p.add_argument("--stop", type=str, nargs="*", default=[], help="stop strings (the output is cut before them)")
    _flag(p, "--compile", help="compiled static-cache decode steps (fast path; the first reply pays the compile)")


def generate_parser() -> Parser:
    p = _parser("llmkit generate", "Continue a prompt with a model.")
    _add_model_options(p)
    p.add_argument("--prompt", type=str, required=True, help="text to continue (use - to read stdin)")
    _add_sampling_options(p, temperature=0.0)
    _flag(p, "--stream", help="print tokens as they are generated")
    _flag(p, "--chat", help="wrap the prompt as a user turn of the chat template")
    _flag(p, "--json", help="print one JSON object (text and token counts)")
    p.add_argument("--draft", type=str | None, default=None,
                   help="speculative decoding: a smaller checkpoint with the same tokenizer drafts tokens")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="tokens drafted per target pass (k)")
    p.add_argument("--prompt-lookup", type=int, default=0,
                   help="draft-free speculative decoding: copy drafts after the context's last N-gram (0 = off)")
    p.add_argument("--json-schema", type=str | None, default=None,
                   help="constrain the output to JSON valid for this schema (a file, or the schema as JSON text)")
    p.add_argument("--regex", type=str | None, default=None, help="constrain the output to match this regex")
    p.add_argument("--choice", type=str, nargs="*", default=[], help="constrain the output to one of these strings")
    return p


def chat_parser() -> Parser:
    p = _parser("llmkit chat", "Talk to a model in the terminal (chat template, history, /reset, Ctrl-D exits): "
                               "a local checkpoint (--model) or a running `llmkit serve` (--url).")
    _add_model_options(p, required=False)
    p.add_argument("--url", type=str | None, default=None,
                   help="an OpenAI-compatible server instead of --model, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", type=str | None, default=None,
                   help="API key for --url (default: $LLMKIT_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--system", type=str | None, default=None, help="system prompt")
    _add_sampling_options(p, temperature=0.7)
    return p


def tokenizer_train_parser() -> Parser:
    p = _parser("llmkit tokenizer train", "Train a tokenizer on text or JSONL files.")
    p.add_argument("--data", type=str, nargs="+", required=True, help="input files: .txt (line by line) or .jsonl")
    p.add_argument("--type", type=str, default="byte-bpe", choices=["bpe", "byte-bpe", "wordpiece", "unigram"],
                   help="tokenizer model")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size, special tokens included")
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--text-field", type=str, default="text", help="JSONL field holding the text")
    p.add_argument("--min-frequency", type=int, default=2, help="merges need at least this many occurrences")
    p.add_argument("--chat-template", type=str, default="chatml", choices=["chatml", "llama", "none"],
                   help="chat template stored in tokenizer_config.json")
    _flag(p, "--add-bos", help="encode(add_special_tokens=True) prepends bos")
    _flag(p, "--json", help="print the report as one JSON object")
    return p


# ----------------------------------------------------------------------------- handlers


def run_generate(args: Namespace) -> None:
    from llmkit.infer.generate import generate_text, stream_text

    model, tokenizer = _load(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    gen = _speculative_options(args, _generation_config(args, tokenizer))
    speculative = gen.draft_model is not None or gen.prompt_lookup_ngram > 0
    if (constraint := _output_constraint(args)) is not None:
        import dataclasses

        from llmkit.prompting.structured import grammar_processor

        if speculative:
            raise ValueError("--json-schema/--regex/--choice cannot be combined with --draft or --prompt-lookup")
        processor = grammar_processor(tokenizer, **constraint, stop_token_ids=gen.eos_token_ids)
        gen = dataclasses.replace(gen, logits_processors=(processor,))
    if args.stream and not args.json and not speculative:  # speculative rounds emit whole blocks: no stream
        for delta in stream_text(model, tokenizer, prompt, gen):
            print(delta, end="", flush=True)
        print()
        return
    text = generate_text(model, tokenizer, [prompt], gen)[0]
    if args.json:
        n_prompt = len(tokenizer.encode(prompt))
        print(json.dumps({"prompt": prompt, "text": text, "prompt_tokens": n_prompt,
                          "completion_tokens": len(tokenizer.encode(text))}))
    else:
        print(text)


def _output_constraint(args: Namespace) -> dict | None:
    """grammar_processor arguments from --json-schema (a file or JSON text), --regex or --choice (one of them)."""
    given = {name: value for name, value in (("json_schema", args.json_schema), ("regex", args.regex),
                                             ("choices", args.choice or None)) if value is not None}
    if len(given) > 1:
        raise ValueError("give one of --json-schema, --regex and --choice")
    if "json_schema" in given:
        text, source = given["json_schema"], "the --json-schema text"
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"--json-schema {text}: no such file (or give the schema as JSON text)")
            text, source = path.read_text(), str(path)
        try:
            given["json_schema"] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return given or None


def _speculative_options(args: Namespace, gen):
    import dataclasses

    if getattr(args, "draft", None) is None and not getattr(args, "prompt_lookup", 0):
        return gen
    draft = None
    if args.draft is not None:
        draft, _ = _load(Namespace(**{**vars(args), "model": args.draft}))
    return dataclasses.replace(gen, draft_model=draft, num_draft_tokens=args.num_draft_tokens,
                               prompt_lookup_ngram=args.prompt_lookup)


def run_chat(args: Namespace, read: Callable[[str], str] = input) -> None:
    if bool(args.model) == bool(args.url):
        raise ValueError("give exactly one of --model DIR (a local checkpoint) and --url URL (a running server)")
    reply = _remote_replies(args) if args.url else _local_replies(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("llmkit chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        parts = []
        try:
            for delta in reply(system + history):
                parts.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print(" [interrupted]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(parts)})


def _local_replies(args: Namespace) -> Callable[[list[dict]], Iterator[str]]:
    """Reply deltas from a local checkpoint, through its chat template."""
    from llmkit.infer.generate import stream_text

    model, tokenizer = _load(args)
    if tokenizer.chat_template is None:
        raise ValueError(f"{args.model}: the tokenizer has no chat_template; chat needs one")
    gen = _generation_config(args, tokenizer)
    return lambda messages: stream_text(model, tokenizer,
                                        tokenizer.apply_chat_template(messages, add_generation_prompt=True), gen)


def _remote_replies(args: Namespace) -> Callable[[list[dict]], Iterator[str]]:
    """Reply deltas streamed from a running OpenAI-compatible server (`llmkit serve`)."""
    from llmkit.serve.client import ChatClient

    client = ChatClient(args.url, args.api_key)
    return lambda messages: client.stream(messages, max_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, seed=args.seed, stop=list(args.stop))


def run_tokenizer_train(args: Namespace) -> None:
    from llmkit.tokenizer import CHAT_TEMPLATES, compression, train_tokenizer

    heldout: list[str] = []
    template = None if args.chat_template == "none" else CHAT_TEMPLATES[args.chat_template]
    tok = train_tokenizer(args.data, args.type, args.vocab_size, text_field=args.text_field,
                          min_frequency=args.min_frequency, chat_template=template, add_bos=args.add_bos,
                          heldout=heldout)
    tok.save(args.out)
    texts = [t for t in heldout if t.strip()]
    report = {"out": args.out, "type": args.type, "vocab_size": tok.vocab_size, "heldout_texts": len(texts),
              "bytes_per_token": round(compression(tok, texts), 4) if texts else None}
    if args.json:
        print(json.dumps(report))
        return
    print(f"saved {args.type} tokenizer to {args.out}: vocabulary {tok.vocab_size}", file=sys.stderr)
    if texts:
        print(f"compression on {len(texts)} held-out texts: {report['bytes_per_token']:.3f} bytes/token",
              file=sys.stderr)


def _load(args: Namespace):
    import torch

    from llmkit.checkpoint import load

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
        if dtype is None:
            raise ValueError(f"--dtype must be float32, bfloat16, float16 or auto, got {args.dtype!r}")
    model, tokenizer = load(args.model, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.json in the checkpoint; text generation needs one")
    return model, tokenizer


def _generation_config(args: Namespace, tokenizer):
    from llmkit.infer.generate import GenerationConfig
    from llmkit.infer.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    eos = [t for t in (tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")) if t is not None]
    return GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=sampling, eos_token_ids=tuple(eos),
                            stop=tuple(args.stop), compile=args.compile)


# ----------------------------------------------------------------------------- entry point

Command = tuple[Callable[[], Parser], Callable[[Namespace], None], str]  # parser factory, handler, help line

STAGES: dict[str, Command] = {
    "generate": (generate_parser, run_generate, "continue a prompt"),
    "chat": (chat_parser, run_chat, "interactive chat in the terminal"),
    "tokenizer train": (tokenizer_train_parser, run_tokenizer_train, "train a tokenizer"),
}
# each of these modules exports COMMANDS in the same shape as STAGES; they import only
# jsonargparse at the top, the heavy work inside their handlers, so --help stays fast
COMMAND_MODULES: list[str] = ["llmkit.data.pack_cli", "llmkit.train.commands", "llmkit.data.commands",
                               "llmkit.eval.commands", "llmkit.rag.commands", "llmkit.train.finetune_commands",
                               "llmkit.train.distill_commands", "llmkit.infer.quantize_commands",
                               "llmkit.align.commands", "llmkit.agents.commands",
                               "llmkit.infer.medusa_commands", "llmkit.serve.commands"]


def all_commands() -> dict[str, Command]:
    import importlib

    commands = dict(STAGES)
    for name in COMMAND_MODULES:
        commands.update(importlib.import_module(name).COMMANDS)
    return commands


def build_parser() -> Parser:
    root = Parser(prog="llmkit", description="llmkit: one toolkit for the whole life of a large language model.")
    stages = root.add_subcommands(dest="stage", required=True)
    groups: dict[str, object] = {}
    for name, (make, _, help_text) in all_commands().items():
        group, _, action = name.partition(" ")
        if not action:
            stages.add_subcommand(name, make(), help=help_text)
            continue
        if group not in groups:  # jsonargparse wants a group attached before its own subcommands
            group_parser = Parser(prog=f"llmkit {group}", description=f"llmkit {group} commands")
            stages.add_subcommand(group, group_parser, help=f"{group} commands")
            groups[group] = group_parser.add_subcommands(dest="action", required=True)
        groups[group].add_subcommand(action, make(), help=help_text)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    stage = args.stage
    sub = args[stage]
    if "action" in sub and isinstance(sub.get("action"), str):
        stage, sub = f"{stage} {sub.action}", sub[sub.action]
    handler = all_commands()[stage][1]
    try:
        handler(sub)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        # the library's typed errors (ConfigError, CheckpointError, TokenizerError, ...) carry the whole message
        print(f"llmkit {stage}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
