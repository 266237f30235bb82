"""`llmkit data clean`: each normalisation rule, boilerplate patterns, and the report."""

import json

import pytest

from llmkit.cli import main
from llmkit.data.clean import CleanConfig, Cleaner, clean, load_patterns
from llmkit.data.io import DataError, StepIO


@pytest.mark.parametrize("text, expected, rule", [
    ("Cafe\u0301 au lait", "Café au lait", "nfc"),
    ("one\r\ntwo\rthree\u2028four", "one\ntwo\nthree\nfour", "line_endings"),
    ("bell\x07 and\x00 nul\x1b and c1\x9b", "bell and nul and c1", "control"),
    ("zero\u200bwidth\ufeff soft\u00adhyphen\u2060", "zerowidth softhyphen", "zero_width"),
    ("a\u00a0b\u3000c  d\t\te   \n\n\n\nnext  ", "a b c d e\n\nnext", "whitespace"),
    ("Real text.\nAll rights reserved.\nShare\nWe use cookies to improve your experience.\nMore text.",
     "Real text.\nMore text.", "boilerplate"),
])
def test_rules(text, expected, rule):
    changed = []
    assert Cleaner().clean(text, changed) == expected
    assert rule in changed


def test_clean_text_is_untouched_and_rules_switch_off():
    text = "A normal paragraph.\n\nWith two lines, and an emoji family 👨\u200d👩\u200d👧 (ZWJ kept)."
    changed = []
    assert Cleaner().clean(text, changed) == text and changed == []
    assert Cleaner(CleanConfig(nfc=False)).clean("e\u0301") == "e\u0301"
    assert Cleaner(CleanConfig(boilerplate=[])).clean("Share") == "Share"
    assert Cleaner(CleanConfig(max_blank_lines=0)).clean("a\n\n\nb") == "a\nb"
    # indentation survives (code), only inner runs collapse
    assert Cleaner().clean("def f():\n    return  1   ") == "def f():\n    return 1"


def test_boilerplate_only_matches_whole_lines():
    c = Cleaner()
    keep = "Scientists share data on Facebook groups, all rights reserved by the authors they said in the paper."
    assert c.clean(keep) == keep  # mentions, not a boilerplate line (too long / not the whole line)
    assert c.clean("Click here to subscribe\nText") == "Text"


def test_custom_patterns_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\nadvert: .*\n")
    assert load_patterns(f) == ["advert: .*"]
    assert Cleaner(CleanConfig(boilerplate=load_patterns(f))).clean("advert: buy now\nkeep") == "keep"
    f.write_text("bad(regex\n")
    with pytest.raises(DataError, match="p.txt:1: not a valid regular expression"):
        load_patterns(f)


def test_step_report_counts_rules_and_empty_docs(tmp_path):
    src = tmp_path / "in.jsonl"
    docs = ["Fine text.", "Cafe\u0301", "\u200b\u200b", "Good line.\nShare\nBack to top"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    report = clean(StepIO([str(src)], str(tmp_path / "o.jsonl"), progress=False))
    assert report["documents_in"] == 4 and report["documents_out"] == 3
    assert report["rules"]["empty"]["removed"] == 1 and report["rules"]["nfc"]["modified"] == 1
    bp = report["rules"]["boilerplate"]
    assert bp["modified"] == 1 and bp["examples"][0]["where"].endswith("in.jsonl:4")
    assert bp["examples"][0]["lines_removed"] == ["Share", "Back to top"]


def test_cli_switches(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("Share\nCafe\u0301\n")
    assert main(["data", "clean", "--input", str(src), "--output", str(tmp_path / "o.txt"), "--no-nfc",
                 "--no-default-boilerplate", "--quiet"]) == 0
    assert (tmp_path / "o.txt").read_text() == "Share\nCafe\u0301\n"
