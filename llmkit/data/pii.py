"""PII redaction (`llmkit data pii`): typed placeholders for personal data, counts per type in the report.

Types, applied in this order (a later detector never sees text an earlier one replaced):
  EMAIL        local@domain.tld
  URL          http(s)://... or www.... (off by default: most URLs in web text are not personal)
  IBAN         2-letter country + 2 check digits + BBAN, spaces allowed in groups of 4; the length must
               match the country and the ISO 13616 mod-97 checksum must be 1
  CREDIT_CARD  13-19 digits (spaces or dashes between groups), issuer prefix 2-6, Luhn checksum valid
  SSN          US social security number AAA-GG-SSSS (dashes or spaces), excluding the ranges the SSA never
               issues (area 000, 666, 900-999; group 00; serial 0000)
  IPV6         full or compressed hex groups, validated by `ipaddress` (so MAC addresses, times and C++
               `a::b` do not match)
  IPV4         four octets 0-255 without leading zeros, not part of a longer dotted number (1.2.3.4.5) and
               not a version string (v1.2.3.4, "version 1.2.3.4")
  PHONE        international (+CC ..., 00CC ...), North American ((555) 123-4567, 555-123-4567, 1-800-...),
               and national numbers with a trunk 0 (020 7946 0958); 7-15 digits in total
Replacements are `<TYPE>` (e.g. `<EMAIL>`); `placeholder` changes the format ("[{type}]", ...).
Report examples show the redacted text only, never the original.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from llmkit.data.io import Batch, DataError, StepIO, Tally, run_map

TYPES = ("EMAIL", "URL", "IBAN", "CREDIT_CARD", "SSN", "IPV6", "IPV4", "PHONE")
DEFAULT_TYPES = tuple(t for t in TYPES if t != "URL")

# IBAN length per country (ISO 13616 registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'`]+")
_IBAN = re.compile(r"\b([A-Z]{2})(\d{2})((?: ?[A-Z0-9]){11,30})")
_CARD = re.compile(r"(?<![\d.-])(?:\d[ -]?){12,18}\d(?![\d-]|\.\d)")
_SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)")
_VERSION_BEFORE = re.compile(r"(?:\b(?:v|ver|version|release|build|firmware|update|rev|revision)\.?\s*:?\s*)$", re.I)
_PHONE = re.compile(
    r"(?<![\w+.-])(?<!\d )(?:"  # not glued to a word or to a preceding group of digits
    r"(?:\+|00)[1-9]\d{0,2}[ .-]?(?:\(0?\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # international
    r"|(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American
    r"|\(?0\d{1,4}\)?[ -]\d{3,4}[ -]?\d{3,4}"  # national, trunk prefix 0
    r")(?![\w]|[.-]\d)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Country length and ISO 7064 mod-97-10 checksum (spaces removed, upper case)."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


@dataclass
class PIIConfig:
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    placeholder: str = "<{type}>"

    def __post_init__(self):
        unknown = [t for t in self.types if t not in TYPES]
        if unknown:
            raise DataError(f"unknown PII type(s) {', '.join(unknown)}; types: {', '.join(TYPES)}")
        if "{type}" not in self.placeholder:
            raise DataError(f"the placeholder must contain {{type}}, got {self.placeholder!r}")


class PIIRedactor:
    """`redact(text)` -> (text, {type: count}); as a processor, counts per type go to the report."""

    def __init__(self, config: PIIConfig | None = None):
        self.config = config or PIIConfig()
        self.types = [t for t in TYPES if t in self.config.types]  # fixed order, whatever the user's order
        self.ph = {t: self.config.placeholder.format(type=t) for t in TYPES}

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}
        has_digit = any(c.isdigit() for c in text) if len(text) < 64 else _DIGIT.search(text) is not None
        for t in self.types:
            if t == "EMAIL" and "@" not in text:
                continue
            if t not in ("EMAIL", "URL") and not has_digit:
                continue
            text, n = getattr(self, f"_{t.lower()}")(text)
            if n:
                counts[t] = n
        return text, counts

    def _sub(self, rx: re.Pattern, text: str, kind: str, check=None) -> tuple[str, int]:
        n = 0
        ph = self.ph[kind]

        def repl(m: re.Match) -> str:
            nonlocal n
            if check is not None and not check(m):
                return m.group(0)
            n += 1
            return ph

        return rx.sub(repl, text), n

    def _email(self, text):
        return self._sub(_EMAIL, text, "EMAIL")

    def _url(self, text):
        n = 0
        ph = self.ph["URL"]

        def repl(m):
            nonlocal n
            url = m.group(0)
            tail = ""
            while url and url[-1] in ".,;:!?)]}'\"":  # trailing punctuation belongs to the sentence
                tail = url[-1] + tail
                url = url[:-1]
            n += 1
            return ph + tail

        return _URL.sub(repl, text), n

    def _iban(self, text):
        n = 0
        ph = self.ph["IBAN"]

        def repl(m):
            nonlocal n
            country, check, rest = m.group(1), m.group(2), m.group(3)
            need = IBAN_LENGTHS.get(country)
            if need is None:
                return m.group(0)
            taken, chars = 0, 0
            for ch in rest:  # take exactly the BBAN length, so a following word is not swallowed
                if taken == need - 4:
                    break
                chars += 1
                if ch != " ":
                    taken += 1
            body = rest[:chars]
            if taken != need - 4 or rest[chars:chars + 1].isalnum():
                return m.group(0)
            if not iban_valid(country + check + body.replace(" ", "")):
                return m.group(0)
            n += 1
            return ph + rest[chars:]

        return _IBAN.sub(repl, text), n

    def _credit_card(self, text):
        def check(m):
            s = m.group(0)
            digits = s.replace(" ", "").replace("-", "")
            if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
                return False
            if ("-" in s and " " in s) or "  " in s or "--" in s:
                return False
            return luhn_valid(digits)

        return self._sub(_CARD, text, "CREDIT_CARD", check)

    def _ssn(self, text):
        return self._sub(_SSN, text, "SSN")

    def _ipv6(self, text):
        def check(m):
            s = m.group(0)
            if s.count(":") < 2 or not any(c in "0123456789abcdefABCDEF" for c in s):
                return False
            try:
                ipaddress.IPv6Address(s)
            except ValueError:
                return False
            return True

        return self._sub(_IPV6, text, "IPV6", check)

    def _ipv4(self, text):
        def check(m):
            return _VERSION_BEFORE.search(text, max(0, m.start() - 20), m.start()) is None

        return self._sub(_IPV4, text, "IPV4", check)

    def _phone(self, text):
        def check(m):
            digits = sum(c.isdigit() for c in m.group(0))
            return 7 <= digits <= 15

        return self._sub(_PHONE, text, "PHONE", check)

    def __call__(self, batch: Batch, tally: Tally) -> list[str | None]:
        out: list[str | None] = []
        for i, text in enumerate(batch.texts):
            new, counts = self.redact(text)
            for t, n in counts.items():
                tally.add(t, n)
                k = new.find(self.ph[t])
                tally.hit(t, batch.where(i), key="documents", context=new[max(0, k - 80):k + 80])
            out.append(new)
        return out


_DIGIT = re.compile(r"\d")


def redact_pii(io_: StepIO, config: PIIConfig | None = None) -> dict:
    """Redact the inputs and write the output plus the report (counts per type under "counts")."""
    config = config or PIIConfig()
    return run_map("pii", io_, PIIRedactor(config), {"types": config.types, "placeholder": config.placeholder})
