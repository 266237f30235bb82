"""Tensor, sequence, pipeline and composed parallelism against the single process (gloo, CPU, 2 and 4 processes).

Each world size is one torchrun launch that runs several layouts in turn (this file is also the worker:
`torchrun ... tests/test_parallel.py RUNS.json`), so the process start-up is paid twice, not per layout.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.cli import main
from llmkit.plan import PlanError
from llmkit.train.distributed import teardown
from test_train import packed  # noqa: F401  (the packed Tiny Shakespeare fixture the pretraining tests use)

STEPS = 5
TIED = '{"n_layer": 4, "tie_embeddings": true}'


def common(packed: Path, global_batch_per_rank: int) -> list[str]:
    # 4 layers so that pp 2 x 2 interleaved stages get one block each; fp32, the same global batch of 4
    return ["--data", str(packed), "--model", "tiny", "--model-overrides", '{"n_layer": 4}', "--seq-len", "32",
            "--max-steps", str(STEPS), "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "0", "--eval-batches",
            "2", "--save-every", "3", "--sample-tokens", "0", "--device", "cpu", "--micro-batch-size",
            str(global_batch_per_rank)]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_delta(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def launch(runs: dict[str, list[str]], nproc: int, tmp: Path) -> None:
    """Run each argument list as `llmkit pretrain` in one torchrun launch of nproc gloo processes."""
    spec = tmp / f"runs-{nproc}.json"
    spec.write_text(json.dumps(runs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, str(spec)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def single(packed: Path, out: Path, *extra: str) -> list[float]:
    assert main(["pretrain", *common(packed, 4), "--out", str(out), *extra]) == 0
    return losses(out)


@pytest.fixture(scope="module")
def reference(packed, tmp_path_factory) -> dict:
    """The single-process run every layout must reproduce; its step-3 checkpoint is written through DCP too."""
    root = tmp_path_factory.mktemp("reference")
    fp32 = single(packed, root / "single", "--dcp-checkpoint")
    return {"root": root, "fp32": fp32}


def test_two_processes_tp_and_every_pipeline_schedule(packed, reference, tmp_path):
    runs = {
        "tp2": ["--tp", "2"],
        "pp2-gpipe": ["--pp", "2", "--pp-schedule", "gpipe", "--microbatches", "2"],
        # with activation checkpointing: recomputation must not change a single bit of the loss
        "pp2-1f1b": ["--pp", "2", "--pp-schedule", "1f1b", "--microbatches", "4", "--activation-checkpointing"],
        "pp2-interleaved": ["--pp", "2", "--pp-schedule", "interleaved-1f1b", "--microbatches", "2"],
        "tp2-bf16": ["--tp", "2", "--precision", "bf16"],
        "pp2-bf16": ["--pp", "2", "--microbatches", "2", "--precision", "bf16"],
        "replicate2": ["--dp-replicate", "2", "--micro-batch-size", "2"],  # HSDP with a shard group of 1
        # one vocabulary-sharded matrix serves the embedding and the head
        "tp2-tied": ["--tp", "2", "--model-overrides", TIED],
        # a 2^40 loss scale overflows every step here: both stages must skip together and halve the scale
        "pp2-fp16": ["--pp", "2", "--microbatches", "2", "--precision", "fp16", "--fp16-init-scale", str(2.0**40)],
    }
    launch({name: common(packed, 4) + flags + ["--out", str(tmp_path / name)] for name, flags in runs.items()},
           2, tmp_path)
    for name in ("tp2", "pp2-gpipe", "pp2-1f1b", "pp2-interleaved", "replicate2"):
        assert max_delta(losses(tmp_path / name), reference["fp32"]) <= 1e-5, name
    bf16 = single(packed, tmp_path / "single-bf16", "--precision", "bf16")
    for name in ("tp2-bf16", "pp2-bf16"):  # autocast: bf16 rounding differs with the split
        assert max_delta(losses(tmp_path / name), bf16) <= 2e-2, name
    tied = single(packed, tmp_path / "single-tied", "--model-overrides", TIED)
    assert max_delta(losses(tmp_path / "tp2-tied"), tied) <= 1e-5
    fp16 = single(packed, tmp_path / "single-fp16", "--precision", "fp16", "--fp16-init-scale", str(2.0**40))
    records = [json.loads(line) for line in (tmp_path / "pp2-fp16" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in records if r.get("skipped")] == [2.0 ** (39 - k) for k in range(STEPS)]
    assert max_delta(losses(tmp_path / "pp2-fp16"), fp16) <= 2e-2
    import llmkit

    # no stage stepped on its own: the weights are the initial ones, as in the single run
    stepped, _ = llmkit.load(tmp_path / "pp2-fp16" / "model")
    unchanged, _ = llmkit.load(tmp_path / "single-fp16" / "model")
    assert all(torch.equal(p, q) for p, q in zip(stepped.state_dict().values(), unchanged.state_dict().values()))
    events = [json.loads(line) for line in (tmp_path / "pp2-interleaved" / "events.jsonl").read_text().splitlines()]
    layout = next(e for e in events if e["event"] == "parallel_layout")
    assert layout["stages_per_rank"] == 2 and layout["bubble_fraction"] == pytest.approx(1 / 5)  # (p-1)/(vm+p-1)


def test_four_processes_composed_layouts_and_resharding_checkpoints(packed, reference, tmp_path):
    base = reference["root"] / "single"
    # resume the single run's step-3 checkpoint under other layouts: drop what came after it
    for name in ("from-single", "pp2-fsdp2-from-single", "hsdp-from-single"):
        shutil.copytree(base, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-00000005")
    runs = {
        "tp2-dp2": common(packed, 2) + ["--tp", "2", "--dp-shard", "2"],
        "pp2-fsdp2": common(packed, 2) + ["--pp", "2", "--dp-shard", "2", "--microbatches", "2"],
        "hsdp": common(packed, 1) + ["--dp-replicate", "2", "--dp-shard", "2"],
        "tp2-pp2": common(packed, 4) + ["--tp", "2", "--pp", "2", "--microbatches", "2"],
        "from-single": common(packed, 4) + ["--tp", "2", "--pp", "2", "--microbatches", "2", "--resume"],
        "pp2-fsdp2-from-single": common(packed, 2) + ["--pp", "2", "--dp-shard", "2", "--microbatches", "2",
                                                      "--resume"],
        "hsdp-from-single": common(packed, 1) + ["--dp-replicate", "2", "--dp-shard", "2", "--resume"],
    }
    launch({name: args + ["--out", str(tmp_path / name)] for name, args in runs.items()}, 4, tmp_path)
    for name in runs:
        assert max_delta(losses(tmp_path / name), reference["fp32"]) <= 1e-5, name

    # the reverse: tp 2 x pp 2's step-3 checkpoint resumed by one process
    to_single = tmp_path / "to-single"
    shutil.copytree(tmp_path / "tp2-pp2", to_single)
    shutil.rmtree(to_single / "checkpoints" / "step-00000005")
    assert main(["pretrain", *common(packed, 4), "--out", str(to_single), "--resume"]) == 0
    assert max_delta(losses(to_single), reference["fp32"]) <= 1e-5

    # consolidated weights: the same model as the single run's, and transformers gives the same logits
    import llmkit
    import transformers

    model, _ = llmkit.load(tmp_path / "tp2-pp2" / "model")
    single_model, _ = llmkit.load(base / "model")
    for (name, p), q in zip(single_model.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tp2-pp2" / "model").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model.eval()(ids), atol=1e-5)


@pytest.mark.slow  # 8 gloo processes on a small CPU take ~50 s
def test_eight_processes_fsdp_tp_pp(packed, reference, tmp_path):
    args = common(packed, 2) + ["--tp", "2", "--pp", "2", "--dp-shard", "2", "--microbatches", "2"]
    launch({"3d": args + ["--out", str(tmp_path / "3d")]}, 8, tmp_path)
    assert max_delta(losses(tmp_path / "3d"), reference["fp32"]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism runs on CUDA only (ring attention "
                                                         "replaces the CUDA SDPA kernels); needs 2 GPUs")
def test_context_parallel_matches_one_gpu(packed, tmp_path):
    cuda = [a if a != "cpu" else "cuda" for a in common(packed, 4)]
    assert main(["pretrain", *cuda, "--out", str(tmp_path / "one")]) == 0
    launch({"cp2": cuda + ["--cp", "2", "--out", str(tmp_path / "cp2")]}, 2, tmp_path)
    assert max_delta(losses(tmp_path / "cp2"), losses(tmp_path / "one")) <= 1e-4  # TF32/kernel choice on GPU


@pytest.mark.parametrize("world,flags,message", [
    (4, ["--tp", "2"], "tp 2 x pp 1 x dp_shard 1 x dp_replicate 1 x cp 1 = 2, but the world size is 4"),
    (3, ["--pp", "3", "--microbatches", "4"], "pp 3 = 3 pipeline stages, but the model has only 2 layers"),
    (4, ["--tp", "4"], "tp 4 does not divide the 2 KV heads"),
    (3, ["--tp", "3"], "tp 3 does not divide the 4 attention heads"),
    (2, ["--pp", "2", "--microbatches", "3"], "microbatches 3 does not divide micro_batch_size 4"),
    (2, ["--cp", "2"], "cp 2 needs CUDA"),
    (4, ["--cp", "2", "--pp", "2", "--microbatches", "2"], "cp 2 with pp 2"),
    (2, ["--tp", "2", "--model", "tiny-gpt2"], "this model has position 'learned'"),
    (2, ["--pp", "2", "--microbatches", "2", "--model", "shakespeare"], "tied embeddings (embedding and head sit on"),
])
def test_bad_layouts_fail_before_any_process_group(packed, tmp_path, monkeypatch, capsys, world, flags, message):
    from llmkit.parallel.trainer import ParallelTrainer
    from llmkit.train.recipe import TrainConfig

    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = ["--data", str(packed), "--model", "tiny", "--micro-batch-size", "4", "--seq-len", "32", "--device", "cpu",
            *flags]
    cfg = TrainConfig(**{k.lstrip("-").replace("-", "_"): int(v) if v.isdigit() else v
                         for k, v in zip(args[::2], args[1::2])})
    with pytest.raises(PlanError, match="^bad parallel layout: ") as e:
        ParallelTrainer(cfg, tmp_path / "run")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,message", [
    ("objective", "ul2", "objective 'ul2' passes prefix lengths"),
    ("compile", True, "compile: torch.compile is not applied under the tp 2 layout"),
    ("cpu_offload", True, "cpu_offload: FSDP's CPU offload is not applied"),
])
def test_recipe_fields_a_layout_cannot_honour_fail_first(packed, tmp_path, monkeypatch, field, value, message):
    from llmkit.parallel.trainer import ParallelTrainer
    from llmkit.train.recipe import TrainConfig
    from llmkit.train.trainer import TrainError

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainConfig(data=str(packed), model="tiny", seq_len=32, micro_batch_size=4, device="cpu", tp=2,
                      **{field: value})
    with pytest.raises(TrainError, match=message):
        ParallelTrainer(cfg, tmp_path / "run")
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_stages_split_by_layer_and_keep_the_model_names():
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.parallel.pipeline import split_model
    from llmkit.plan_parallel import bubble_fraction

    def build():
        torch.manual_seed(0)
        # Mistral's sliding window and Qwen2's q/k/v biases ride along: the stages must rebuild the window mask
        return Transformer(ModelConfig.from_preset("tiny", n_layer=5, sliding_window=3, qkv_bias=True))

    full = build()
    ids = torch.randint(0, 512, (2, 8))
    expected = full(ids)
    names = set(full.state_dict())
    stages = [split_model(build(), rank, 2, 1) for rank in range(2)]
    (first,), holder0 = stages[0]
    (last,), holder1 = stages[1]
    assert list(first.model.layers) == ["0", "1", "2"] and list(last.model.layers) == ["3", "4"]
    assert set(holder0.state_dict()) | set(holder1.state_dict()) == names
    assert torch.allclose(last(first(ids)), expected, atol=1e-6)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11) and bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


def _worker(spec: str) -> None:
    """Under torchrun: run every `llmkit pretrain` argument list of the spec in turn."""
    torch.set_num_threads(1)
    for name, argv in json.loads(Path(spec).read_text()).items():
        code = main(["pretrain", *argv])
        if code != 0:
            raise SystemExit(f"layout {name} failed with exit code {code}")
    teardown()


if __name__ == "__main__":
    _worker(sys.argv[1])
