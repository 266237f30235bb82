"""The CLI: options, YAML configs, one-line errors with exit code 2, and each stage end to end."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate_text
from llmkit.infer.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    text = (DATA / "tinyshakespeare.txt").read_text()[:60_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus) -> Path:
    tok = train_tokenizer([corpus], "byte-bpe", 400)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                  bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    out = tmp_path_factory.mktemp("ckpt") / "model"
    llmkit.save(Transformer(cfg), tok, out)
    return out


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_stages_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for stage in ("generate", "chat", "tokenizer"):
        assert stage in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out and "default: 256" in out and "--top-p" in out


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--model", "m", "--prompt", "p", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "abc"], "max_new_tokens"),
    (["tokenizer", "train", "--data", "x.txt", "--out", "o", "--type", "sentencepiece"], "type"),
    (["nosuchstage"], "nosuchstage"),
])
def test_bad_options_exit_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and fragment in err


def test_bad_input_exits_2_naming_the_path(tmp_path, capsys):
    code, _, err = run(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"], capsys)
    assert code == 2 and str(tmp_path / "missing") in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(["tokenizer", "train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t")],
                       capsys)
    assert code == 2 and "empty.txt" in err
    assert not (tmp_path / "t").exists()


def test_tokenizer_train_reports_vocab_and_compression(corpus, tmp_path, capsys):
    code, out, _ = run(["tokenizer", "train", "--data", str(corpus), "--type", "bpe", "--vocab-size", "500",
                        "--out", str(tmp_path / "tok"), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["vocab_size"] == 500 and report["heldout_texts"] > 0
    assert 1.0 < report["bytes_per_token"] < 6.0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def test_generate_matches_library_and_stream_matches_batch(checkpoint, capsys):
    model, tok = llmkit.load(checkpoint)
    gen = GenerationConfig(max_new_tokens=24, sampling=SamplingParams(temperature=0.9, top_k=40, seed=7))
    expected = generate_text(model, tok, ["ROMEO:"], gen)[0]
    argv = ["generate", "--model", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "24",
            "--temperature", "0.9", "--top-k", "40", "--seed", "7"]
    code, out, _ = run(argv + ["--json"], capsys)
    assert code == 0 and json.loads(out)["text"] == expected
    code, out, _ = run(argv + ["--stream", "--compile"], capsys)  # the fast path streams the same text
    assert code == 0 and out == expected + "\n"


def test_generate_constrains_its_output_to_a_schema_regex_or_choice(checkpoint, tmp_path, capsys):
    base = ["generate", "--model", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "40",
            "--temperature", "1.0", "--seed", "3", "--json"]
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["age"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for given in (str(tmp_path / "schema.json"), json.dumps(schema)):
        code, out, err = run(base + ["--json-schema", given], capsys)
        assert code == 0, err
        assert 0 <= json.loads(json.loads(out)["text"])["age"] <= 99
    code, out, _ = run(base + ["--regex", "[A-Z][a-z]{2,5}!"], capsys)
    assert code == 0 and re.fullmatch("[A-Z][a-z]{2,5}!", json.loads(out)["text"])
    code, out, _ = run(base + ["--choice", "Aye", "Nay"], capsys)
    assert code == 0 and json.loads(out)["text"] in ("Aye", "Nay")
    for extra, message in ((["--regex", "a", "--choice", "b"], "one of"), (["--json-schema", "{oops"], "not JSON"),
                           (["--json-schema", str(tmp_path / "nope.json")], "no such file"),
                           (["--regex", "a", "--prompt-lookup", "2"], "cannot be combined")):
        code, _, err = run(base + extra, capsys)
        assert code == 2 and message in err, err


def test_yaml_config_sets_options_and_command_line_overrides(checkpoint, tmp_path, capsys):
    config = tmp_path / "gen.yaml"
    config.write_text(f"model: {checkpoint}\nprompt: 'KING:'\nmax_new_tokens: 5\n")
    code, out, _ = run(["generate", "--config", str(config), "--json"], capsys)
    assert code == 0 and json.loads(out)["prompt"] == "KING:"
    code, out, _ = run(["generate", "--config", str(config), "--prompt", "QUEEN:", "--json"], capsys)
    assert json.loads(out)["prompt"] == "QUEEN:"
    config.write_text("max_new_tokens: 5\nnot_an_option: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--config", str(config)])
    assert e.value.code == 2 and "not_an_option" in capsys.readouterr().err


def test_stop_string_cuts_output(checkpoint, capsys):
    argv = ["generate", "--model", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--json"]
    _, out, _ = run(argv, capsys)
    full = json.loads(out)["text"]
    stop = full[5:8]
    _, out, _ = run(argv + ["--stop", stop], capsys)
    assert json.loads(out)["text"] == full[: full.find(stop)]


def test_chat_keeps_history_resets_and_exits_on_eof(checkpoint, monkeypatch, capsys):
    from llmkit import cli

    import llmkit.infer.generate as g

    prompts = []
    original = g.stream_text

    def recording_stream(model, tokenizer, prompt, gen):
        prompts.append(prompt)
        return original(model, tokenizer, prompt, gen)

    monkeypatch.setattr(g, "stream_text", recording_stream)
    lines = iter(["hello", "again", "/reset", "fresh"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    args = cli.chat_parser().parse_args(["--model", str(checkpoint), "--max-new-tokens", "4", "--system", "Be brief."])
    cli.run_chat(args, read=read)
    assert len(prompts) == 3
    assert prompts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello")
    assert "hello" in prompts[1] and "again" in prompts[1]  # history kept
    assert "hello" not in prompts[2] and "fresh" in prompts[2]  # /reset forgot it


def test_console_script_chat_exits_cleanly_on_ctrl_d(checkpoint):
    exe = Path(sys.executable).parent / "llmkit"
    result = subprocess.run([str(exe), "chat", "--model", str(checkpoint), "--max-new-tokens", "4"],
                            input="hi\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
