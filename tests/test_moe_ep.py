"""Expert parallelism: gloo processes, each holding its share of the experts, give the single-process run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_moe import moe_recipe
from test_train import losses, packed, run_torchrun  # noqa: F401  (the same packed shard and torchrun helper)

import llmkit
from llmkit.train.trainer import Trainer


def ep_args(packed: Path, out: Path, ep: int) -> list[str]:
    return ["--data", str(packed), "--model", "tiny-mixtral", "--seq-len", "32", "--max-steps", "6", "--warmup-steps",
            "2", "--lr", "3e-3", "--eval-every", "0", "--save-every", "3", "--sample-tokens", "8", "--device", "cpu",
            "--micro-batch-size", "2", "--ep", str(ep), "--out", str(out)]


def assert_same_run(single: Path, ep: Path) -> None:
    """Losses within 1e-5, the same per-expert loads, the same final weights (every expert gathered)."""
    a, b = losses(single), losses(ep)
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5
    loads = [[json.loads(line)["moe_load"] for line in (run / "metrics.jsonl").read_text().splitlines()]
             for run in (single, ep)]
    assert loads[0] == loads[1]
    ours, _ = llmkit.load(single / "model")
    theirs, _ = llmkit.load(ep / "model")
    for (name, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_expert_parallel_matches_single_process(packed, tmp_path):
    """One process accumulating two micro-batches of 2 windows = two processes of 2 windows each, the experts
    split between them and tokens exchanged by all-to-all; a resumed run continues exactly."""
    Trainer(moe_recipe(packed, grad_accum=2, max_steps=6, save_every=3, micro_batch_size=2, warmup_steps=2),
            tmp_path / "single").fit()
    args = ep_args(packed, tmp_path / "ep", 2)
    run_torchrun(args, 2)
    assert_same_run(tmp_path / "single", tmp_path / "ep")
    ep = losses(tmp_path / "ep")
    assert "no sample" in json.loads((tmp_path / "ep" / "metrics.jsonl").read_text().splitlines()[-1])["sample"]
    shutil.rmtree(tmp_path / "ep" / "checkpoints" / "step-00000006")
    run_torchrun(args + ["--resume"], 2)  # each rank reads its own experts back from the full checkpoint
    assert losses(tmp_path / "ep") == ep


def test_expert_parallel_groups_replicate_the_experts(packed, tmp_path):
    """4 processes, --ep 2: two groups of two, each expert on one rank of each group, its gradient summed
    over both; equal to one process accumulating the four micro-batches."""
    Trainer(moe_recipe(packed, grad_accum=4, max_steps=6, save_every=3, micro_batch_size=2, warmup_steps=2),
            tmp_path / "single").fit()
    run_torchrun(ep_args(packed, tmp_path / "ep", 2), 4)
    assert_same_run(tmp_path / "single", tmp_path / "ep")


def test_expert_parallel_needs_a_valid_degree(packed, tmp_path):
    with pytest.raises(ValueError, match="'ep'"):
        moe_recipe(packed, ep=0).validate()
    with pytest.raises(ValueError, match="'ep' works under DDP only"):
        moe_recipe(packed, ep=2, tp=2).validate()
