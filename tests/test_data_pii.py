"""`llmkit data pii`: every type on a table of positive strings and tricky negatives; counts in the report."""

import json

import pytest

from llmkit.cli import main
from llmkit.data.io import DataError, StepIO
from llmkit.data.pii import TYPES, PIIConfig, PIIRedactor, iban_valid, luhn_valid, redact_pii

POSITIVE = [
    ("Mail me at john.doe+spam@example.co.uk today.", "EMAIL"),
    ("contact: a_b@sub.domain.org", "EMAIL"),
    ("call +1 (555) 123-4567 now", "PHONE"),
    ("London office +44 20 7946 0958.", "PHONE"),
    ("Berlin +49 30 1234567", "PHONE"),
    ("Paris 0033 1 42 68 53 00", "PHONE"),
    ("ring 020 7946 0958", "PHONE"),
    ("(555) 123-4567", "PHONE"),
    ("tel. 555-123-4567", "PHONE"),
    ("toll free 1-800-555-0199", "PHONE"),
    ("server 192.168.1.20 is down", "IPV4"),
    ("resolver 8.8.8.8.", "IPV4"),
    ("addr 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "IPV6"),
    ("link-local fe80::1 here", "IPV6"),
    ("loopback ::1", "IPV6"),
    ("2001:db8::ff00:42:8329", "IPV6"),
    ("mapped ::ffff:192.0.2.128", "IPV6"),
    ("card 4111 1111 1111 1111 ok", "CREDIT_CARD"),
    ("card 4111-1111-1111-1111", "CREDIT_CARD"),
    ("mastercard 5500005555555559", "CREDIT_CARD"),
    ("amex 378282246310005", "CREDIT_CARD"),
    ("ssn 123-45-6789", "SSN"),
    ("ssn 123 45 6789", "SSN"),
    ("iban DE89 3704 0044 0532 0130 00 please", "IBAN"),
    ("GB82WEST12345698765432", "IBAN"),
    ("FR14 2004 1010 0505 0001 3M02 606", "IBAN"),
    ("see https://example.com/a?b=c.", "URL"),
    ("www.foo.org/page", "URL"),
]

NEGATIVE = [
    "version 1.2.3.4 released",  # version strings that look like IPs
    "upgrade to v1.2.3.4",
    "Python 3.11.2 and 1.2.3.4.5",
    "256.1.1.1 is not an address",
    "01.02.03.04",
    "4111 1111 1111 1112",  # fails Luhn
    "1234567812345678",
    "order 1234-5678-9012-3456",
    "000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000",  # never-issued SSNs
    "DE89 3704 0044 0532 0130 01",  # bad IBAN checksum
    "XX89 3704 0044 0532 0130 00",  # unknown country
    "meeting at 12:30:45",
    "MAC 00:1a:2b:3c:4d:5e",
    "std::vector<int> and a::b",
    "date 2023-01-15 and 15/01/2023",
    "ISBN 978-3-16-148410-0",
    "user@localhost",
    "pi is 3.14159",
    "the years 1999 and 2004",
    "order #12345 shipped",
    "call ext. 1234",
]


@pytest.mark.parametrize("text, kind", POSITIVE)
def test_positive(text, kind):
    out, counts = PIIRedactor(PIIConfig(types=list(TYPES))).redact(text)
    assert counts == {kind: 1}, (out, counts)
    assert f"<{kind}>" in out


@pytest.mark.parametrize("text", NEGATIVE)
def test_negative(text):
    out, counts = PIIRedactor(PIIConfig(types=list(TYPES))).redact(text)
    assert counts == {} and out == text


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")
    assert not iban_valid("DE8937040044053201300")  # wrong length for Germany


def test_urls_off_by_default_and_placeholder_format():
    text = "write to a@b.com or see https://x.org/p"
    assert PIIRedactor().redact(text)[0] == "write to <EMAIL> or see https://x.org/p"
    out, _ = PIIRedactor(PIIConfig(types=["EMAIL", "URL"], placeholder="[{type}]")).redact(text)
    assert out == "write to [EMAIL] or see [URL]"
    with pytest.raises(DataError, match="unknown PII type"):
        PIIConfig(types=["NAME"])


def test_mixed_document_and_report(tmp_path, capsys):
    doc = ("Hi, I'm Ann (ann@corp.com, +1 415 555 0132). My card is 4111 1111 1111 1111, SSN 123-45-6789, "
           "IBAN GB82 WEST 1234 5698 7654 32. Server 10.0.0.7 and 2001:db8::1 run version 2.4.1.0.")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": "nothing here"}) + "\n")
    assert main(["data", "pii", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    out = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["text"]
    assert report["counts"] == {"EMAIL": 1, "PHONE": 1, "CREDIT_CARD": 1, "SSN": 1, "IBAN": 1, "IPV4": 1, "IPV6": 1}
    assert "ann@corp.com" not in out and "4111" not in out and "version 2.4.1.0" in out
    assert report["rules"]["EMAIL"]["documents"] == 1 and "<EMAIL>" in report["rules"]["EMAIL"]["examples"][0]["context"]
    assert "ann@corp.com" not in json.dumps(report)  # examples never show the original


def test_step_api(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("mail a@b.io\nplain\n")
    r = redact_pii(StepIO([str(src)], str(tmp_path / "o.txt"), progress=False))
    assert (tmp_path / "o.txt").read_text() == "mail <EMAIL>\nplain\n" and r["counts"] == {"EMAIL": 1}
