"""Prompt templates: task description, contextual information, demonstrations and the input as separate Jinja
parts, rendered as plain text with clear separators or as chat messages for the model's chat template.

    t = PromptTemplate(instruction="Classify the sentiment.", input="Review: {{ text }}", output="{{ label }}",
                       answer_prefix="Sentiment:")
    t.render({"text": "Great film"}, demos=[{"text": "Dull", "label": "negative"}])
    # 'Classify the sentiment.\\n\\nReview: Dull\\nSentiment: negative\\n\\nReview: Great film\\nSentiment:'
    t.messages({"text": "Great film"}, demos=[...])   # system, then user/assistant per demonstration, then user
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class PromptError(ValueError):
    """A template, an example or a budget that cannot be used; the message says which part and why."""


@lru_cache
def _compile(source: str) -> jinja2.Template:
    # Sandboxed (templates may come from users' YAML), strict (a misspelt field is an error, not "").
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(source)


def render_part(source: str, values: dict, part: str) -> str:
    """Render one Jinja part; PromptError names the part and the fields that were available."""
    try:
        return _compile(source).render(**values)
    except jinja2.TemplateError as e:
        raise PromptError(f"prompt template part {part!r} ({source[:60]!r}) failed on fields {sorted(values)}: "
                          f"{e}") from None


@dataclass
class PromptTemplate:
    instruction: str = ""  # the task description (Jinja over the query's fields)
    input: str = "{{ input }}"  # one example's question (Jinja over its fields)
    output: str = "{{ output }}"  # one example's answer (Jinja over its fields)
    context: str = "{{ context }}"  # contextual information (Jinja over {"context": ...}); skipped when None
    answer_prefix: str = ""  # plain text: between the input and the answer, e.g. "Answer:"
    separator: str = "\n\n"  # between parts and between demonstrations
    io_separator: str = "\n"  # between an input and its answer prefix

    def instruction_text(self, query: dict) -> str:
        return render_part(self.instruction, query, "instruction") if self.instruction else ""

    def context_text(self, context: str | None) -> str:
        return render_part(self.context, {"context": context}, "context") if context else ""

    def demonstration(self, example: dict) -> str:
        """One solved example as plain text."""
        answer = render_part(self.output, example, "output")
        return self.question(example) + (" " if self.answer_prefix else "") + answer

    def question(self, example: dict) -> str:
        """An example's input followed by the answer prefix (what the model completes)."""
        text = render_part(self.input, example, "input")
        return text + self.io_separator + self.answer_prefix if self.answer_prefix else text

    def render(self, query: dict, demos: Sequence[dict] = (), context: str | None = None) -> str:
        """Plain text: instruction, context, demonstrations, then the query, joined by `separator`."""
        parts = [self.instruction_text(query), self.context_text(context), *map(self.demonstration, demos),
                 self.question(query)]
        return self.separator.join(p for p in parts if p)

    def messages(self, query: dict, demos: Sequence[dict] = (), context: str | None = None) -> list[dict]:
        """Chat messages: a system turn (instruction + context), a user/assistant pair per demonstration, then
        the query as the last user turn."""
        system = self.separator.join(p for p in (self.instruction_text(query), self.context_text(context)) if p)
        out = [{"role": "system", "content": system}] if system else []
        for demo in demos:
            out.append({"role": "user", "content": render_part(self.input, demo, "input")})
            out.append({"role": "assistant", "content": render_part(self.output, demo, "output")})
        out.append({"role": "user", "content": render_part(self.input, query, "input")})
        return out


def fit_demonstrations(template: PromptTemplate, query: dict, demos: Sequence[dict],
                       count_tokens: Callable[[str], int], budget: int, context: str | None = None,
                       render: Callable[..., str] | None = None) -> list[dict]:
    """The longest prefix of `demos` (given most important first) whose prompt fits in `budget` tokens.

    Demonstrations are dropped from the end of the list; the instruction, the context and the query never
    are: if they alone exceed the budget, PromptError says by how much.
    """
    render = render or template.render
    bare = count_tokens(render(query, [], context))
    if bare > budget:
        raise PromptError(f"the prompt without demonstrations takes {bare} tokens, over the budget of {budget}; "
                          "shorten the instruction, the context or the input")
    lo, hi = 0, len(demos)  # prompt length grows with the prefix length: binary search the longest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(render(query, list(demos[:mid]), context)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return list(demos[:lo])
