"""Text normalisation and boilerplate line removal (`llmkit data clean`).

Each rule is counted in the report as the number of documents it changed ("modified"); a document left
empty is removed (rule "empty"). In order:
  nfc          Unicode NFC normalisation (composed characters, as most tokenizers and web corpora expect)
  line_endings CRLF, CR, NEL, U+2028/U+2029 -> LF
  control      C0/C1 control characters (tab and newline kept), lone surrogates, U+FFFE/U+FFFF
  zero_width   U+200B zero-width space, U+2060 word joiner, U+FEFF BOM, U+00AD soft hyphen, U+180E; ZWJ and
               ZWNJ (U+200C/U+200D) are kept because emoji and several scripts need them
  whitespace   Unicode spaces (NBSP, U+2000..U+200A, U+3000, ...) -> space; runs of spaces/tabs inside a line
               -> one space (leading indentation kept); trailing spaces stripped; at most `max_blank_lines`
               blank lines in a row; blank lines at the start and end dropped
  boilerplate  whole lines matching a pattern (assets/boilerplate.txt by default: cookie banners, "All
               rights reserved", share buttons, ...), case-insensitive, checked after whitespace clean-up
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.data.io import Batch, DataError, StepIO, Tally, run_map

ASSETS = Path(__file__).with_name("assets")
DEFAULT_BOILERPLATE = ASSETS / "boilerplate.txt"

_LINE_ENDINGS = re.compile("\r\n?|[\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")
_ZERO_WIDTH = re.compile("[\u200b\u2060\ufeff\u00ad\u180e]")
_UNICODE_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_SPACE = re.compile(r"(?<=\S)[ \t]{2,}|(?<=\S)\t")
_TRAILING = re.compile(r"[ \t]+$", re.M)


def load_patterns(path: str | Path) -> list[str]:
    """Regular expressions from a file: one a line, '#' comments and blank lines ignored; each is checked."""
    patterns = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            re.compile(line)
        except re.error as e:
            raise DataError(f"{path}:{lineno}: not a valid regular expression ({e})") from None
        patterns.append(line)
    return patterns


@dataclass
class CleanConfig:
    nfc: bool = True
    line_endings: bool = True
    control: bool = True
    zero_width: bool = True
    whitespace: bool = True
    max_blank_lines: int = 1  # blank lines allowed in a row (paragraph breaks survive)
    boilerplate: list[str] = field(default_factory=lambda: load_patterns(DEFAULT_BOILERPLATE))


class Cleaner:
    """`Cleaner(config)(batch, tally)` -> cleaned texts (None for documents left empty); `clean(text)` for one."""

    def __init__(self, config: CleanConfig | None = None):
        self.config = config or CleanConfig()
        c = self.config
        self._blank = re.compile(r"\n{%d,}" % (c.max_blank_lines + 2))
        self._blank_to = "\n" * (c.max_blank_lines + 1)
        self._boiler = None
        self.last_boilerplate = ""
        if c.boilerplate:
            body = "|".join(f"(?:{p})" for p in c.boilerplate)
            # whole (stripped) lines, with their line break, so no paragraph break is left behind
            self._boiler = re.compile(rf"^[ \t]*(?:{body})[ \t]*(?:\n|$)", re.I | re.M)

    def clean(self, text: str, changed: list[str] | None = None) -> str:
        """The cleaned text; names of the rules that changed something are appended to `changed`."""
        c = self.config
        rules: list[str] = [] if changed is None else changed
        if c.nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            rules.append("nfc")
        if c.line_endings and ("\r" in text or not text.isascii()):
            new = _LINE_ENDINGS.sub("\n", text)
            if new != text:
                text = new
                rules.append("line_endings")
        for on, rx, name in ((c.control, _CONTROL, "control"), (c.zero_width, _ZERO_WIDTH, "zero_width")):
            if on:
                new = rx.sub("", text)
                if len(new) != len(text):
                    text = new
                    rules.append(name)
        if c.whitespace:
            new = self._whitespace(text)
            if new != text:
                text = new
                rules.append("whitespace")
        if self._boiler is not None:
            new, n = self._boiler.subn("", text)
            if n:
                self.last_boilerplate = text  # for report examples
                text = self._whitespace(new) if c.whitespace else new.strip("\n")
                rules.append("boilerplate")
        return text

    def _whitespace(self, text: str) -> str:
        if not text.isascii():
            text = _UNICODE_SPACE.sub(" ", text)
        text = _INNER_SPACE.sub(" ", text)
        text = _TRAILING.sub("", text)
        text = self._blank.sub(self._blank_to, text)
        return text.strip("\n") if text[:1] == "\n" or text[-1:] == "\n" else text

    def __call__(self, batch: Batch, tally: Tally) -> list[str | None]:
        out: list[str | None] = []
        for i, text in enumerate(batch.texts):
            changed: list[str] = []
            new = self.clean(text, changed)
            for rule in changed:
                if rule == "boilerplate":
                    lines = [m.group(0).strip() for m in self._boiler.finditer(self.last_boilerplate)][:5]
                    tally.hit(rule, batch.where(i), key="modified", lines_removed=lines)
                else:
                    tally.hit(rule, batch.where(i), key="modified")
            if not new.strip():
                tally.hit("empty", batch.where(i), text)
                out.append(None)
            else:
                out.append(new)
        return out


def clean(io_: StepIO, config: CleanConfig | None = None) -> dict:
    """Clean every document of the inputs and write the output plus the JSON report."""
    config = config or CleanConfig()
    options = {k: v for k, v in vars(config).items() if k != "boilerplate"} | {
        "boilerplate_patterns": len(config.boilerplate)}
    return run_map("clean", io_, Cleaner(config), options)
