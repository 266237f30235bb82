"""Built-in agent tools: a calculator (simpleeval: arithmetic and math functions, never Python's eval), search
over an llmkit RAG index, and Python functions a user registers by "module:function" or "path/file.py:function".
"""

from __future__ import annotations

import math
from typing import Any

from llmkit.agents.tools import Tool, ToolError, function_tool
from llmkit.user_code import load_callable

BUILTIN = ("calculator", "search")
_MATH_FUNCTIONS = {name: getattr(math, name) for name in (
    "sqrt", "exp", "log", "log10", "log2", "sin", "cos", "tan", "asin", "acos", "atan", "floor", "ceil",
    "factorial", "gcd", "hypot", "radians", "degrees")}
_FUNCTIONS = {**_MATH_FUNCTIONS, "abs": abs, "round": round, "min": min, "max": max, "pow": pow, "int": int,
              "float": float}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression (+ - * / // % **, parentheses, math functions such as sqrt, log, sin;
    constants pi and e); ToolError for anything else."""
    import simpleeval

    evaluator = simpleeval.SimpleEval(functions=_FUNCTIONS, names={"pi": math.pi, "e": math.e, "tau": math.tau})
    try:
        value = evaluator.eval(expression)
    except (simpleeval.InvalidExpression, SyntaxError, ZeroDivisionError, OverflowError, TypeError,
            ValueError) as e:
        raise ToolError(f"calculator: cannot evaluate {expression!r}: {type(e).__name__}: {e}") from None
    if not isinstance(value, (int, float, bool)):
        raise ToolError(f"calculator: {expression!r} is not a number expression")
    # 12 significant digits: binary rounding noise (0.1 + 0.2 = 0.30000000000000004) would mislead the model
    return f"{value:.12g}" if isinstance(value, float) else str(value)


def calculator_tool() -> Tool:
    return Tool("calculator", "Evaluate an arithmetic expression, e.g. '(3 + 4) * sqrt(2)'. Supports + - * / // "
                "% **, parentheses, sqrt, log, exp, sin, cos, floor, ceil, round, min, max, pi, e.",
                {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
                calculate, trusted=True)


def search_tool(index_path: str, k: int = 4, mode: str = "hybrid", **open_kwargs: Any) -> Tool:
    """Search a RAG index built with `llmkit rag index`; the index opens on first use and stays open."""
    state: dict[str, Any] = {}

    def search(query: str) -> str:
        from llmkit.rag.index import Index

        if "index" not in state:
            state["index"] = Index.open(index_path, **open_kwargs)
        hits = state["index"].search(query, k=k, mode=mode)
        if not hits:
            return "no results"
        return "\n\n".join(f"[{i}] ({h.source or h.doc_id}) {h.text}" for i, h in enumerate(hits, 1))

    return Tool("search", f"Search the document index for passages relevant to a query; returns the top {k}.",
                {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}, search)


def load_function(spec: str) -> Tool:
    """A tool from "package.module:function" or "path/to/file.py:function" (its signature and docstring
    describe it)."""
    try:
        fn = load_callable(spec, "--function")
    except ValueError as e:
        raise ToolError(str(e)) from None
    return function_tool(fn)


def builtin_tools(names: list[str], index: str | None = None, k: int = 4) -> list[Tool]:
    """The built-in tools named in `names` (calculator, search); search needs `index`."""
    tools = []
    for name in names:
        if name == "calculator":
            tools.append(calculator_tool())
        elif name == "search":
            if not index:
                raise ToolError("the search tool needs --index PATH (an index built with llmkit rag index)")
            tools.append(search_tool(index, k))
        else:
            raise ToolError(f"unknown built-in tool {name!r}; known: {', '.join(BUILTIN)} "
                            "(register your own with --function module:function)")
    return tools
