"""Answer extraction from free-form model output: numbers, multiple-choice letters, regular expressions.

An answer cue ("The answer is", "Answer:", "####") wins over anything else in the text; without one the last
number (or the last choice letter) counts, as chain-of-thought evaluations do.

    extract_number("3 boxes of 4 make 12. The answer is $1,200.")   # '1200'
    extract_choice("Both look right, but (C) fits best.")           # 'C'
    extractor("regex:Final: (\\\\w+)")("... Final: yes")               # 'yes'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

_CUE = r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:|####)"
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_CUED_NUMBER = re.compile(_CUE + r"\s*:?\s*\(?(" + _NUMBER + ")", re.I)
_ANY_NUMBER = re.compile(_NUMBER)

Extractor = Callable[[str], "str | None"]


def normalize_number(text: str) -> str | None:
    """A number's canonical spelling: no $, thousands separators or trailing zeros ("1,000.50" -> "1000.5")."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The number after the last answer cue, else the last number in `text`; None when there is none."""
    cued = _CUED_NUMBER.findall(text)
    if cued:
        return normalize_number(cued[-1])
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """A multiple-choice letter: after an answer cue, else the last "(X)", else a leading "X." / "X)", else the
    last standalone capital X among `letters`."""
    cls = f"[{re.escape(letters)}]"
    patterns = (
        _CUE + r"\s*:?\s*\(?(" + cls + r")\b",
        r"\((" + cls + r")\)",
        r"^\s*(" + cls + r")(?:[.):]|\s*$)",
        r"\b(" + cls + r")\b",
    )
    for pattern in patterns:
        found = re.findall(pattern, text, re.I if pattern.startswith(_CUE) else re.M)
        if found:
            return found[-1].upper()
    return None


def extract_regex(text: str, pattern: str | re.Pattern, group: int = 1) -> str | None:
    """Group `group` (0: the whole match) of the last match of `pattern`, stripped; None without a match."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    value = matches[-1].group(group if matches[-1].re.groups >= group else 0)
    return value.strip() if value is not None else None


def extract_text(text: str) -> str | None:
    """The first non-empty line, without a leading answer cue or a trailing period."""
    for line in text.splitlines():
        line = re.sub(r"^\s*" + _CUE + r"\s*:?", "", line.strip(), flags=re.I).strip().rstrip(".").strip()
        if line:
            return line
    return None


def extractor(spec: str | Extractor) -> Extractor:
    """An extractor from a spec: "number", "choice" (A-E), "choice:ABCD", "regex:PATTERN", "text", or a function."""
    if callable(spec):
        return spec
    kind, _, arg = spec.partition(":")
    if kind == "number":
        return extract_number
    if kind == "choice":
        letters = arg or "ABCDE"
        return lambda text: extract_choice(text, letters)
    if kind == "regex":
        try:
            compiled = re.compile(arg)
        except re.error as e:
            raise ValueError(f"answer extractor regex {arg!r}: {e}") from None
        return lambda text: extract_regex(text, compiled)
    if kind == "text":
        return extract_text
    raise ValueError(f"answer extractor must be number, choice[:LETTERS], regex:PATTERN or text; got {spec!r}")
