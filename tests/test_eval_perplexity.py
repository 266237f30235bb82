"""Perplexity: equals a direct computation with transformers on the same checkpoint; formulas; CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import llmkit
from llmkit.config import ModelConfig
from llmkit.eval.lm import EvalLM, rolling_windows
from llmkit.eval.perplexity import DataError, perplexity, perplexity_from_loglikelihood, read_texts
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
if not SHAKESPEARE.is_file():
    SHAKESPEARE = Path(llmkit.__file__).parent / "assets" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    (d / "c.txt").write_text(SHAKESPEARE.read_text()[:20000])
    tok = train_tokenizer([d / "c.txt"], "byte-bpe", 300)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, init_std=0.1,
                                  eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    llmkit.save(Transformer(cfg), tok, d / "model")
    return d / "model"


def hf_strided_loglikelihood(path, text: str, max_length: int, stride: int) -> tuple[float, int]:
    """The strided-perplexity recipe of the transformers docs on [BOS] + tokens, windows of max_length + 1 tokens.

    As in lm-eval, the last window reaches back a full window (the recipe's would start at a stride boundary).
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([[tok.bos_token_id] + tok(text)["input_ids"]])
    seq_len = ids.size(1)
    window = max_length + 1
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end  # only the tokens no earlier window scored
        inputs = ids[:, max(0, end - window):end]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs).logits.double(), -1)
        targets = inputs[0, 1:]
        lp = logprobs[0, :-1].gather(1, targets[:, None])[:, 0]
        n = min(trg_len, lp.numel())
        total += float(lp[-n:].sum())
        count += n
        prev_end = end
        if end == seq_len:
            break
    return total, count


@pytest.mark.parametrize("chars,stride", [(150, None), (900, None), (900, 16), (900, 63)])
def test_equals_direct_transformers_computation(ckpt, chars, stride):
    text = SHAKESPEARE.read_text()[5000: 5000 + chars]
    model, tok = llmkit.load(ckpt)
    lm = EvalLM(model, tok, batch_size=4, show_progress=False)
    ours = perplexity(lm, [text], stride=stride)
    ll, n = hf_strided_loglikelihood(ckpt, text, 64, stride or 64)
    assert ours["tokens"] == n == len(tok.encode(text))
    assert ours["loglikelihood"] == pytest.approx(ll, rel=1e-4)
    assert ours["token_perplexity"] == pytest.approx(math.exp(-ll / n), rel=1e-4)
    words, n_bytes = len(text.split()) + (1 if text[-1].isspace() else 0) + (1 if text[0].isspace() else 0), \
        len(text.encode())
    assert ours["bytes"] == n_bytes and ours["words"] == words
    assert ours["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-4)
    assert ours["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)


def test_stride_adds_context_not_tokens(ckpt):
    text = SHAKESPEARE.read_text()[5000:5900]
    model, tok = llmkit.load(ckpt)
    lm = EvalLM(model, tok, show_progress=False)
    disjoint, strided = perplexity(lm, [text]), perplexity(lm, [text], stride=8)
    assert disjoint["tokens"] == strided["tokens"]
    assert disjoint["loglikelihood"] != strided["loglikelihood"]


def test_bits_per_byte_formula():
    ll, tokens, words, n_bytes = -1234.5, 300, 200, 1000
    p = perplexity_from_loglikelihood(ll, tokens, words, n_bytes)
    assert p["bits_per_byte"] == pytest.approx(-ll / (n_bytes * math.log(2)))
    assert p["bits_per_byte"] == pytest.approx(math.log2(p["byte_perplexity"]))
    assert p["token_perplexity"] == pytest.approx(math.exp(1234.5 / 300))
    assert p["word_perplexity"] == pytest.approx(2 ** (p["bits_per_byte"] * n_bytes / words))


def test_rolling_windows_score_every_token_once():
    tokens = list(range(100, 237))
    for max_len, stride in [(16, None), (16, 5), (16, 1), (200, None)]:
        windows = rolling_windows(tokens, 0, max_len, stride)
        scored = [t for _, cont in windows for t in cont]
        assert scored == tokens
        for ctx, cont in windows:
            assert len(ctx) + len(cont) - 1 <= max_len  # the model input fits
    first_ctx, first_cont = rolling_windows(tokens, 0, 16)[0]
    assert first_ctx == [0] and first_cont == tokens[:16]


def test_cli_json_and_bad_input(ckpt, tmp_path, capsys):
    from llmkit.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("To be, or not to be.", "The king is dead.")))
    assert main(["eval", "perplexity", "--model", str(ckpt), "--data", str(data), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["documents"] == 2 and out["bits_per_byte"] > 0 and out["provenance"]["config_hash"]
    data.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert main(["eval", "perplexity", "--model", str(ckpt), "--data", str(data), "--quiet"]) == 2
    assert "d.jsonl:2" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such file"):
        read_texts(tmp_path / "missing.txt")
