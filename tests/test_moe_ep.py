"""Expert parallelism: 2 gloo processes, each holding half the experts, give the single-process run."""

import json
import shutil

import pytest
import torch
from test_moe import moe_recipe
from test_train import losses, packed, run_torchrun  # noqa: F401  (the same packed shard and torchrun helper)

import llmkit
from llmkit.train.trainer import Trainer


def test_expert_parallel_matches_single_process(packed, tmp_path):
    """One process accumulating two micro-batches of 2 windows = two processes of 2 windows each, the experts
    split between them and tokens exchanged by all-to-all: losses within 1e-5, same loads, same weights, and a
    resumed run continues exactly."""
    steps = dict(max_steps=6, save_every=3, micro_batch_size=2, warmup_steps=2)
    Trainer(moe_recipe(packed, grad_accum=2, **steps), tmp_path / "single").fit()
    args = ["--data", str(packed), "--model", "tiny-mixtral", "--seq-len", "32", "--max-steps", "6", "--warmup-steps",
            "2", "--lr", "3e-3", "--eval-every", "0", "--save-every", "3", "--sample-tokens", "8", "--device", "cpu",
            "--micro-batch-size", "2", "--ep", "2", "--out", str(tmp_path / "ep")]
    run_torchrun(args, 2)
    single, ep = losses(tmp_path / "single"), losses(tmp_path / "ep")
    assert len(single) == len(ep) == 6 and max(abs(a - b) for a, b in zip(single, ep)) <= 1e-5
    loads = [[json.loads(line)["moe_load"] for line in (run / "metrics.jsonl").read_text().splitlines()]
             for run in (tmp_path / "single", tmp_path / "ep")]
    assert loads[0] == loads[1]
    assert "no sample" in json.loads((tmp_path / "ep" / "metrics.jsonl").read_text().splitlines()[-1])["sample"]
    a, _ = llmkit.load(tmp_path / "single" / "model")
    b, _ = llmkit.load(tmp_path / "ep" / "model")  # every expert gathered from its rank
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name
    shutil.rmtree(tmp_path / "ep" / "checkpoints" / "step-00000006")
    run_torchrun(args + ["--resume"], 2)  # each rank reads its own experts back from the full checkpoint
    assert losses(tmp_path / "ep") == ep


def test_expert_parallel_needs_a_matching_world(packed, tmp_path):
    with pytest.raises(ValueError, match="'ep'"):
        moe_recipe(packed, ep=0).validate()
