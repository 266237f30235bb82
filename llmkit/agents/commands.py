"""`llmkit agent`: a ReAct agent with built-in tools (calculator, search over a RAG index) and registered Python
functions, against a local checkpoint or an OpenAI-compatible endpoint; `--replay TRACE` re-runs a trace.

Only jsonargparse is imported at the top (so `llmkit --help` stays fast); the handler imports the rest.
"""

from __future__ import annotations

import json
import sys

from jsonargparse import Namespace

from llmkit.cli import Parser, _flag, _parser


def agent_parser() -> Parser:
    p = _parser("llmkit agent", "Solve a task with a ReAct agent: think, call tools, observe, until a final "
                                "answer or a budget runs out. Every step goes to a JSONL trace.")
    p.add_argument("task", type=str | None, default=None, nargs="?", help="the task (omit with --replay)")
    p.add_argument("--model", type=str | None, default=None, help="llmkit / Hugging Face checkpoint directory")
    p.add_argument("--base-url", type=str | None, default=None,
                   help="OpenAI-compatible /v1 URL (its native tool calling is used) instead of --model")
    p.add_argument("--api-key", type=str | None, default=None, help="API key for --base-url")
    p.add_argument("--api-model", type=str | None, default=None,
                   help="model name sent to --base-url (default: the first model its /models lists)")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", type=str, default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--tools", type=str, default="calculator",
                   help="comma-separated built-in tools: calculator, search (search needs --index); '' for none")
    p.add_argument("--index", type=str | None, default=None, help="RAG index (llmkit rag index) for the search tool")
    p.add_argument("--search-k", type=int, default=4, help="passages the search tool returns")
    p.add_argument("--function", type=str, nargs="*", default=[],
                   help="register Python functions as tools: module:function or path/file.py:function "
                        "(parameters from the signature and type hints, description from the docstring)")
    p.add_argument("--max-steps", type=int, default=8, help="model turns at most")
    p.add_argument("--max-tokens", type=int, default=4096, help="generated tokens at most, over all steps")
    p.add_argument("--step-tokens", type=int, default=512, help="generated tokens at most per step")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--trace", type=str | None, default=None, help="write every step to this JSONL file")
    p.add_argument("--replay", type=str | None, default=None,
                   help="run a trace again from its recorded replies and observations (no model needed)")
    _flag(p, "--rerun-tools", help="with --replay: run the tools again instead of using recorded observations")
    _flag(p, "--verbose", help="print each step to stderr")
    _flag(p, "--json", help="print the result (answer, stop reason, steps) as one JSON object")
    return p


def _tools(args: Namespace):
    from llmkit.agents.builtin import builtin_tools, load_function

    names = [t.strip() for t in args.tools.split(",") if t.strip()]
    return builtin_tools(names, args.index, args.search_k) + [load_function(f) for f in args.function]


def _llm(args: Namespace):
    from llmkit.prompting.llm import LocalLLM, OpenAILLM

    if (args.model is None) == (args.base_url is None):
        raise ValueError("give exactly one of --model DIR and --base-url URL")
    if args.base_url:
        return OpenAILLM(args.base_url, args.api_model, args.api_key, concurrency=1)
    from llmkit.eval.common import load_for_eval

    model, tokenizer = load_for_eval(args.model, args.device, args.dtype)
    return LocalLLM(model, tokenizer, name=args.model)


def run_agent(args: Namespace) -> None:
    from llmkit.agents.react import Agent, replay

    if args.replay:
        result = replay(args.replay, _tools(args) if args.rerun_tools else None, trace=args.trace)
    else:
        if not args.task:
            raise ValueError("give a TASK (or --replay TRACE)")
        agent = Agent(_llm(args), _tools(args), max_steps=args.max_steps, max_tokens=args.max_tokens,
                      step_tokens=args.step_tokens, temperature=args.temperature, trace=args.trace,
                      verbose=args.verbose and not args.json)
        result = agent.run(args.task)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    print(result.answer if result.answer is not None else "(no final answer)")
    print(f"stopped: {result.stop_reason} after {len(result.steps)} steps, {result.tokens} generated tokens"
          + (f"; trace: {args.trace}" if args.trace else ""), file=sys.stderr)


COMMANDS = {"agent": (agent_parser, run_agent, "a ReAct agent with tools (calculator, RAG search, your functions)")}
