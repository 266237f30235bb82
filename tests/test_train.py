"""Pretraining: exact resume, distributed equivalence, precision, schedules, stability, recipes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.cli import main
from llmkit.data.pack import TokenWindows, pack_documents, read_documents
from llmkit.tokenizer import train_tokenizer
from llmkit.train.objectives import IGNORE, make_batch, ul2_special_ids
from llmkit.train.optim import AdamW8bit, lr_multiplier, optimizer_state_bytes, param_groups
from llmkit.train.recipe import TrainConfig
from llmkit.train.trainer import TrainError, Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    corpus = root / "corpus.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:120_000])
    tok = train_tokenizer([corpus], "byte-bpe", 320)
    pack_documents(read_documents([str(corpus)]), tok, root / "data", val_fraction=0.1, progress=False)
    return root / "data"


def recipe(packed: Path, **overrides) -> TrainConfig:
    base = dict(model="tiny", data=str(packed), seq_len=32, micro_batch_size=4, max_steps=20, warmup_steps=3,
                lr=3e-3, eval_every=0, eval_batches=2, save_every=5, sample_tokens=0, log_every=5,
                model_overrides={"dropout": 0.1})
    base.update(overrides)
    return TrainConfig(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


@pytest.mark.parametrize("objective", ["causal", "ul2"])
def test_resume_is_bitwise_identical(packed, tmp_path, objective):
    straight = Trainer(recipe(packed, objective=objective), tmp_path / "straight")
    straight.fit()

    def kill_at_12(step, record):
        if step == 12:  # after the step-10 checkpoint, before the step-15 one: steps 11-12 are lost
            raise Killed

    with pytest.raises(Killed):
        Trainer(recipe(packed, objective=objective), tmp_path / "resumed", on_step=kill_at_12).fit()
    Trainer(recipe(packed, objective=objective), tmp_path / "resumed", resume=True).fit()
    expected = losses(tmp_path / "straight")
    assert len(expected) == 20
    assert losses(tmp_path / "resumed") == expected  # bitwise: float equality of every step's loss


def test_output_dir_is_protected(packed, tmp_path):
    Trainer(recipe(packed, max_steps=2), tmp_path / "run").fit()
    with pytest.raises(TrainError, match="not empty; pass --resume"):
        Trainer(recipe(packed, max_steps=2), tmp_path / "run")
    Trainer(recipe(packed, max_steps=2), tmp_path / "run", overwrite=True).fit()
    with pytest.raises(TrainError, match="nothing to resume"):
        Trainer(recipe(packed), tmp_path / "empty", resume=True)


def test_checkpoint_is_a_model_dir_with_card(packed, tmp_path):
    import transformers

    Trainer(recipe(packed, max_steps=5), tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000005"
    model_dir = tmp_path / "run" / "model"
    for d in (ckpt, model_dir):
        hf = transformers.AutoModelForCausalLM.from_pretrained(d)
        assert hf.num_parameters() > 0
        card = (d / "README.md").read_text()
        assert "## Architecture" in card and "## Training" in card and "Intended use" in card
    assert "validation loss" in (model_dir / "README.md").read_text()


def test_schedule_values_equal_the_formula():
    warm, total, lo = 10, 110, 0.1
    assert lr_multiplier(0, "cosine", warm, total, lo) == pytest.approx(0.1)
    assert lr_multiplier(9, "cosine", warm, total, lo) == pytest.approx(1.0)
    assert lr_multiplier(60, "cosine", warm, total, lo) == pytest.approx(lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_multiplier(110, "cosine", warm, total, lo) == pytest.approx(lo)
    assert lr_multiplier(60, "linear", warm, total, lo) == pytest.approx(1 - (1 - lo) * 0.5)
    assert lr_multiplier(50, "wsd", warm, total, lo, decay_fraction=0.2) == 1.0
    assert lr_multiplier(99, "wsd", warm, total, lo, decay_fraction=0.2) == pytest.approx(1 - (1 - lo) * 11 / 22)
    assert lr_multiplier(500, "constant", warm, total, lo) == 1.0


def test_weight_decay_skips_norms_biases_and_embeddings():
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    model = Transformer(ModelConfig.from_preset("tiny", qkv_bias=True, tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("proj.weight" in names[id(p)] or names[id(p)] == "lm_head.weight" for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in skipped and "model.norm.weight" in skipped
    assert "model.layers.0.self_attn.q_proj.bias" in skipped
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_fp16_loss_scaling_recovers_from_overflow(packed, tmp_path):
    trainer = Trainer(recipe(packed, precision="fp16", fp16_init_scale=2.0**40, max_steps=40, save_every=40,
                             model_overrides={}), tmp_path / "run")
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0].get("skipped"), "a 2^40 loss scale must overflow fp16 gradients on the first step"
    assert records[-1]["loss_scale"] < 2.0**40
    applied = [r for r in records if "skipped" not in r]
    assert len(applied) >= 10 and all(math.isfinite(r["loss"]) for r in applied)
    assert applied[-1]["loss"] < records[0]["loss"]


def test_loss_spike_rolls_back_to_the_last_checkpoint(packed, tmp_path):
    # factor 1.0 over a window of 2 calls almost any non-decreasing step a spike: the path must hold up
    trainer = Trainer(recipe(packed, spike_factor=1.0, spike_window=2, spike_rollback=True, max_steps=12,
                             save_every=4, lr=1e-2), tmp_path / "run")
    trainer.fit()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "spike_rollback"]
    assert rollbacks and all(e["restored_step"] % 4 == 0 for e in rollbacks)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # rolled-back steps were rewritten, not duplicated


def test_adamw8bit_saves_memory_and_trains_like_adamw():
    torch.manual_seed(0)
    target = torch.randn(64, 256)

    def train(opt_cls):
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.zeros(64, 256))
        opt = opt_cls([w], lr=1e-2)
        for _ in range(200):
            loss = (w - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss), optimizer_state_bytes(opt)

    loss8, bytes8 = train(AdamW8bit)
    loss32, bytes32 = train(torch.optim.AdamW)
    assert bytes8 < 0.3 * bytes32  # 2 bytes + 8/256 per value vs 8 bytes
    assert loss8 < 1.5 * loss32 + 1e-3


def test_prefix_lm_labels_skip_the_visible_prefix():
    x = torch.arange(40).view(2, 20)
    y = x + 1
    inputs, labels, extra = make_batch("prefix", x, y, torch.Generator().manual_seed(0), 100)
    prefix = extra["prefix_len"]
    for row in range(2):
        p = int(prefix[row])
        assert (labels[row, : p - 1] == IGNORE).all() and (labels[row, p - 1:] == y[row, p - 1:]).all()


def test_ul2_batches_have_mode_tokens_sentinels_and_fixed_length():
    V = 500
    ids = ul2_special_ids(V)
    x = torch.randint(0, 300, (8, 64))
    y = torch.cat([x[:, 1:], torch.randint(0, 300, (8, 1))], 1)
    inputs, labels, extra = make_batch("ul2", x, y, torch.Generator().manual_seed(0), V)
    prefix = extra["prefix_len"]
    assert inputs.shape == labels.shape == (8, 64)
    assert set(inputs[:, 0].tolist()) <= {ids["R"], ids["S"], ids["X"]}
    for row in range(8):
        p = int(prefix[row])
        assert (labels[row, : p - 1] == IGNORE).all() and (labels[row, p - 1:] != IGNORE).all()
        if inputs[row, 0] != ids["S"]:  # span corruption: each sentinel in the input reappears in the targets
            sentinels = [t for t in inputs[row, :p].tolist() if t in ids["sentinels"]]
            assert sentinels and all(s in labels[row].tolist() for s in sentinels)


def test_token_windows_state_round_trip(packed):
    a = TokenWindows(packed, seq_len=16, seed=3)
    for _ in range(5):
        a.next_batch(4)
    state = a.state_dict()
    expected = [a.next_batch(4)[0] for _ in range(50)]  # crosses an epoch boundary
    b = TokenWindows(packed, seq_len=16, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch(4)[0]) for e in expected)
    # two ranks split the same global batch
    r0 = TokenWindows(packed, seq_len=16, seed=3, rank=0, world_size=2)
    r1 = TokenWindows(packed, seq_len=16, seed=3, rank=1, world_size=2)
    single = TokenWindows(packed, seq_len=16, seed=3)
    assert torch.equal(torch.cat([r0.next_batch(2)[0], r1.next_batch(2)[0]]), single.next_batch(4)[0])


def test_bad_recipe_gives_a_clear_error(packed, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {packed}\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "learning_rate" in err and "valid options" in err and "lr" in err
    bad.write_text(f"data: {packed}\nmicro_batch_size: 0\n")
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "micro_batch_size" in capsys.readouterr().err


def run_torchrun(args: list[str], nproc: int):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "llmkit", "pretrain", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp-zero2"])
def test_distributed_matches_single_process(packed, tmp_path, parallel):
    common = ["--data", str(packed), "--model", "tiny", "--seq-len", "32", "--max-steps", "6", "--warmup-steps",
              "2", "--lr", "3e-3", "--eval-every", "0", "--save-every", "3", "--sample-tokens", "0", "--device", "cpu"]
    mode = ["--parallel", "fsdp", "--no-fsdp-reshard"] if parallel == "fsdp-zero2" else ["--parallel", parallel]
    run_torchrun(common + ["--micro-batch-size", "4", "--out", str(tmp_path / "single")], 1)
    run_torchrun(common + ["--micro-batch-size", "2", *mode, "--out", str(tmp_path / "multi")], 2)
    single, multi = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert len(single) == len(multi) == 6
    assert max(abs(a - b) for a, b in zip(single, multi)) <= 1e-5
    # the consolidated checkpoint of the sharded run holds the same model as the single run
    import llmkit

    a, _ = llmkit.load(tmp_path / "single" / "model")
    b, _ = llmkit.load(tmp_path / "multi" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-4), name
    if parallel == "fsdp":
        # resume from the step-3 checkpoint (sharded optimizer state through DCP): same steps 4-6
        import shutil

        shutil.rmtree(tmp_path / "multi" / "checkpoints" / "step-00000006")
        run_torchrun(common + ["--micro-batch-size", "2", *mode, "--out", str(tmp_path / "multi"), "--resume"], 2)
        assert losses(tmp_path / "multi") == multi


def test_batch_ramp_up_grows_the_batch(packed, tmp_path):
    Trainer(recipe(packed, grad_accum=4, batch_ramp_tokens=1000, batch_ramp_start=0.25, max_steps=12,
                   save_every=12), tmp_path / "run").fit()
    windows = [json.loads(line)["batch_windows"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert windows[0] == 4 and windows[-1] == 16 and windows == sorted(windows)


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--max-steps", "3", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "validation loss" in err and "llmkit generate --model" in err
    assert (tmp_path / "qs" / "run" / "model" / "model.safetensors").is_file()
