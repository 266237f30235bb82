"""Quantisers against naive references, int4 packing, GPTQ/AWQ beat round-to-nearest, save/load round trip, CLI."""

import json

import pytest
import torch
from torch import nn

import llmkit
from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.quantize import (Int4Linear, Int8Linear, Int8OutlierLinear, QuantizeError, W8A8Linear, awq_int4,
                                   collect_input_stats, gptq_int4, int8_module, llm_int8, pack_int4, quantize_model,
                                   rtn_int4, save_quantized, smoothquant_w8a8, unpack_int4)
from llmkit.model import Transformer

BASE = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64)


def build() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**BASE)).eval()


def layer_and_inputs(n_in=128, n_out=48, outlier_channels=()):
    torch.manual_seed(1)
    layer = nn.Linear(n_in, n_out)
    # correlated inputs with uneven channel magnitudes, as real activations
    X = torch.randn(512, 16) @ torch.randn(16, n_in) + 0.3 * torch.randn(512, n_in)
    X[:, list(outlier_channels)] *= 25
    return layer, X


def stats_for(layer, X):
    wrapper = nn.Sequential(layer)
    return collect_input_stats(wrapper, {"0": layer}, X[None], batch_size=1)["0"]


def output_error(layer, new, X) -> float:
    with torch.no_grad():
        return (layer(X) - new(X)).norm().item()


def test_int8_error_at_most_half_a_step_per_element():
    layer, _ = layer_and_inputs()
    q = int8_module(layer)
    w = layer.weight.detach()
    assert q.qweight.dtype == torch.int8
    assert torch.all((q.dequantize() - w).abs() <= q.scales[:, None] / 2 + 1e-7)
    x = torch.randn(3, 5, w.shape[1])
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantize(), layer.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_group_wise_error_and_packing(group_size):
    layer, _ = layer_and_inputs(n_in=256)
    q = rtn_int4(layer, group_size)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (48, 128)  # two codes per byte
    assert q.scales.shape == (48, 256 // group_size)
    step = q.scales.repeat_interleave(group_size, 1)
    assert torch.all((q.dequantize() - layer.weight.detach()).abs() <= step / 2 + 1e-6)
    codes = torch.randint(0, 16, (7, 64))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_calibration_inputs(act_order):
    layer, X = layer_and_inputs(n_in=192)  # wider than one 128-column block: the lazy updates are used
    H = 2 * X.T @ X / len(X)
    gptq = gptq_int4(layer, H, 32, act_order=act_order)
    rtn = rtn_int4(layer, 32)
    assert output_error(layer, gptq, X) < 0.8 * output_error(layer, rtn, X)


def test_awq_beats_round_to_nearest_with_salient_channels():
    layer, X = layer_and_inputs(outlier_channels=(3, 40, 77))
    awq = awq_int4(layer, stats_for(layer, X), 32)
    assert awq.input_scale is not None
    assert output_error(layer, awq, X) < 0.9 * output_error(layer, rtn_int4(layer, 32), X)


def test_smoothquant_beats_plain_w8a8_with_activation_outliers():
    layer, X = layer_and_inputs(outlier_channels=(5, 60))
    stats = stats_for(layer, X)
    smooth = smoothquant_w8a8(layer, stats, 0.5)
    plain = int8_module(layer, W8A8Linear)
    assert output_error(layer, smooth, X) < 0.7 * output_error(layer, plain, X)


def test_llm_int8_keeps_outlier_columns_exact():
    layer, X = layer_and_inputs(outlier_channels=(2, 9))
    q = llm_int8(layer, stats_for(layer, X), threshold=6.0)
    assert set(q.outlier_idx.tolist()) >= {2, 9}
    assert torch.equal(q.dequantize()[:, q.outlier_idx], layer.weight.detach()[:, q.outlier_idx])
    only_outliers = torch.zeros(4, 128)
    only_outliers[:, q.outlier_idx] = torch.randn(4, len(q.outlier_idx)) * 30
    with torch.no_grad():
        torch.testing.assert_close(q(only_outliers), layer(only_outliers), rtol=1e-5, atol=1e-5)
    assert output_error(layer, q, X) < output_error(layer, int8_module(layer, W8A8Linear), X)


@pytest.mark.parametrize("method", ["int8", "int4", "gptq", "awq", "smoothquant", "llm-int8"])
def test_save_load_round_trip_gives_identical_logits_and_generates(method, tmp_path):
    model = build()
    calibration = torch.randint(0, 96, (4, 32))
    quantize_model(model, method, group_size=32, calibration=calibration, threshold=1.0)
    kinds = {type(m) for m in model.modules()}
    assert {Int8Linear, Int4Linear, W8A8Linear, Int8OutlierLinear} & kinds
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if ".layers." in n)
    save_quantized(model, None, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == method
    assert not list((tmp_path / "q").glob("*.bin"))
    loaded, _ = llmkit.load(tmp_path / "q")
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    out = generate(loaded, [[1, 2, 3]], GenerationConfig(max_new_tokens=5))
    assert len(out[0]) == 5


def test_quantised_model_stays_close_to_full_precision():
    model = build()
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, "int8")
        assert (model(ids) - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantised_lm_head_decodes_on_every_path():
    """skip=() quantises the head too: generate, the compiled path and the engine must not read lm_head.weight."""
    from llmkit.infer.engine import Engine, RequestOptions

    model = quantize_model(build(), "int8", skip=())
    assert isinstance(model.lm_head, Int8Linear)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))
    expected = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=6))[0]
    assert expected[0] == int(logits[0, -1].argmax())
    assert generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=6, compile=True))[0] == expected
    assert Engine(model, block_size=8).generate([[1, 2, 3]], RequestOptions(max_new_tokens=6))[0] == expected


def test_bad_method_and_group_size_are_clear_errors():
    with pytest.raises(QuantizeError, match="method 'int3'"):
        quantize_model(build(), "int3")
    with pytest.raises(QuantizeError, match="group_size 48"):
        quantize_model(build(), "int4", group_size=48)
    with pytest.raises(QuantizeError, match="needs calibration"):
        quantize_model(build(), "gptq", group_size=32)


def test_cli_quantizes_a_tiny_model(tmp_path, capsys):
    from llmkit.cli import main
    from llmkit.tokenizer import train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    tok = train_tokenizer([corpus], "byte-bpe", 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, "vocab_size": tok.vocab_size}))
    llmkit.save(model, tok, tmp_path / "m")
    rc = main(["quantize", "--model", str(tmp_path / "m"), "--method", "gptq", "--group-size", "32",
               "--calibration", str(corpus), "--seq-len", "32", "--out", str(tmp_path / "q"), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bytes_after"] < summary["bytes_before"]
    loaded, tok2 = llmkit.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Int4Linear) and tok2 is not None
    rc = main(["quantize", "--model", str(tmp_path / "m"), "--method", "int4", "--group-size", "100",
               "--out", str(tmp_path / "bad")])
    assert rc != 0 and "group_size 100" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_quantised_model_is_scored_by_the_evaluator(tmp_path):
    from llmkit.eval.lm import EvalLM
    from llmkit.tokenizer import train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    tok = train_tokenizer([corpus], "byte-bpe", 300)
    torch.manual_seed(0)
    model = quantize_model(Transformer(ModelConfig(**{**BASE, "vocab_size": tok.vocab_size})).eval(), "int8", skip=())
    [(score, _)] = EvalLM(model, tok, show_progress=False).loglikelihood_tokens([([5, 9, 3], [7, 11])])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([[5, 9, 3, 7]]))[0].float(), -1)
    assert score == pytest.approx(float(logprobs[2, 7] + logprobs[3, 11]), abs=1e-5)
