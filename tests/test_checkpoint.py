"""Checkpoint directories: clear errors naming file and tensor, atomic writes, tokenizer interop."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmkit
from llmkit.checkpoint import CheckpointError
from llmkit.config import ConfigError, ModelConfig
from llmkit.model import Transformer


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny"))
    llmkit.save(model, None, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_config_names_the_file(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match=r"x/config.json: missing"):
        llmkit.load(tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        llmkit.load(tmp_path / "nowhere")


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: unknown model_type 'falcon'"):
        llmkit.load(saved)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        llmkit.load(saved)


def test_wrong_shape_names_file_and_tensor(saved):
    sd = load_file(saved / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' "
                                              r"has shape \(3, 3\), expected \(128, 64\)"):
        llmkit.load(saved)


def test_missing_and_unexpected_tensors(saved):
    sd = load_file(saved / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' is missing"):
        llmkit.load(saved)
    sd["model.norm.weight"] = torch.ones(64)
    sd["model.extra.weight"] = torch.ones(2)
    save_file(sd, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight' in model.safetensors"):
        llmkit.load(saved)


def test_malformed_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        llmkit.load(saved)


def test_unsupported_hf_setting_names_the_field(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_act"] = "relu2"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'hidden_act' = 'relu2' is not supported"):
        llmkit.load(saved)


class ExplodingTokenizer:
    def save(self, path):
        raise OSError("disk full")


def test_failed_save_leaves_nothing_behind(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    with pytest.raises(OSError, match="disk full"):
        llmkit.save(model, ExplodingTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_into_existing_dir_replaces_files_and_stale_shards(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny"))
    llmkit.save(model, None, tmp_path / "out", max_shard_size=40_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    llmkit.save(model, None, tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    llmkit.load(tmp_path / "out")


def test_variants_hf_lacks_still_round_trip_as_llmkit_type(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny", position="alibi", norm_placement="deepnorm"))
    llmkit.save(model, None, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llmkit"
    again, _ = llmkit.load(tmp_path / "out")
    assert again.config == model.config


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    from transformers import AutoTokenizer

    from llmkit.tokenizer import train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 50)
    tok = train_tokenizer([corpus], "byte-bpe", 300)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    llmkit.save(model, tok, tmp_path / "out")
    _, loaded = llmkit.load(tmp_path / "out")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "Whether 'tis nobler in the mind to suffer 🎭"
    assert loaded.encode(text) == hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
