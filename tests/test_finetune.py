"""Fine-tuning runs: exact resume for every method, SFT on the Alpaca sample, the CLI, packing, errors."""

import json
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit import peft
from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.tokenizer import CHAT_TEMPLATES, train_tokenizer
from llmkit.train.finetune import FinetuneConfig, FineTuner

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca_2k.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(json.loads(line)["output"] for line in ALPACA.read_text().splitlines()))
    tok = train_tokenizer([corpus], "byte-bpe", 400, chat_template=CHAT_TEMPLATES["chatml"])
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, d_model=64, d_ff=128, n_head=4, n_kv_head=2,
                                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return llmkit.save(Transformer(cfg), tok, root / "base")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca_48.jsonl"
    path.write_text("".join(ALPACA.read_text().splitlines(keepends=True)[:48]))
    return path


def run_config(base, data, method, **overrides) -> FinetuneConfig:
    options = dict(model=str(base), data=str(data), method=method, max_seq_len=48, micro_batch_size=2,
                   max_steps=6, save_every=2, eval_every=0, eval_batches=2, warmup_steps=2, lora_dropout=0.1,
                   num_virtual_tokens=4, encoder_hidden_size=16, adalora_init_r=4, adalora_target_r=2,
                   log_every=1, lr=1e-2)
    options.update(overrides)
    return FinetuneConfig(**options)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def kill_at(n):
    def on_step(step, record):
        if step == n:
            raise Killed

    return on_step


@pytest.mark.parametrize("method", peft.METHODS)
def test_resume_is_exact_for_every_method(base, small_data, tmp_path, method):
    FineTuner(run_config(base, small_data, method), tmp_path / "straight").fit()
    with pytest.raises(Killed):  # after the step-4 checkpoint: step 5 is lost and redone
        FineTuner(run_config(base, small_data, method), tmp_path / "resumed", on_step=kill_at(5)).fit()
    FineTuner(run_config(base, small_data, method), tmp_path / "resumed", resume=True).fit()
    expected = losses(tmp_path / "straight")
    assert len(expected) == 6 and expected[-1] != expected[0]
    assert losses(tmp_path / "resumed") == expected  # bitwise equal losses, step by step
    result = tmp_path / "resumed" / ("model" if method == "full" else "adapter")
    assert (result / "README.md").is_file()
    if method != "full":
        assert (result / "adapter_config.json").is_file() and not (result / "trainable.safetensors").exists()


def test_sft_on_alpaca_lowers_validation_loss(base, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(base), "--data", str(ALPACA), "--method", "full", "--out", str(out),
                 "--max-steps", "40", "--lr", "3e-3", "--max-seq-len", "96", "--micro-batch-size", "8",
                 "--eval-every", "20", "--eval-batches", "4", "--save-every", "20"])
    assert code == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["val_loss"] < summary["val_loss_start"] - 0.3, summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41)) and "val_loss" in records[-1]
    card = (out / "model" / "README.md").read_text()
    assert "## Fine-tuning" in card and "validation loss before" in card and "trainable%" in card
    assert llmkit.load(out / "model")[0].config.vocab_size == 400  # the result is a model directory


def test_cli_finetune_then_merge_matches_the_adapter(base, small_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(base), "--data", str(small_data), "--method", "dora", "--out", str(out),
                 "--max-steps", "3", "--lr", "1e-2", "--max-seq-len", "48", "--target-modules", "q_proj,v_proj,up_proj",
                 "--save-every", "3"]) == 0
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    tuned = peft.load_adapter(llmkit.load(base)[0], out / "adapter")
    with torch.no_grad():
        expected = tuned(ids)
        theirs = hf_peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                   out / "adapter").eval()
        assert (theirs(input_ids=ids).logits - expected).abs().max() <= 1e-4
    assert main(["merge", "--model", str(base), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - expected).abs().max() <= 1e-4
    assert "## Merged adapter" in (tmp_path / "m" / "README.md").read_text()


def test_bad_record_fails_with_file_and_line(base, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n\n{"instruction": "a", "output": 3}\n')
    code = main(["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "run")])
    assert code == 2
    assert f"{data}:3: alpaca record needs a string 'output' field" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_packed_rows_compute_each_example_alone(base, small_data):
    from llmkit.data.sft import SFTBatches, collate, load_sft

    model, tok = llmkit.load(base)
    examples, _ = load_sft([str(small_data)], tok, 48, verbose=False)
    batch = SFTBatches(examples[:12], 2, 96, pack=True, shuffle=False).next_batch()
    assert int(batch["segment_ids"][0].max()) >= 2
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        row, t = 0, 0
        for s in range(1, int(batch["segment_ids"][row].max()) + 1):
            n = int((batch["segment_ids"][row] == s).sum())
            alone = model(batch["input_ids"][row: row + 1, t: t + n])
            assert (packed[row, t: t + n] - alone[0]).abs().max() <= 1e-5
            t += n
    del collate
