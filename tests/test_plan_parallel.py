"""The 3D-parallel planner: layout validation, per-stage parameters of built shards, memory, bubble, Megatron-LM."""

import dataclasses
import json

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.model import build_model
from llmkit.plan import (GB, PlanConfig, PlanError, activation_parts, measure_training_memory, param_breakdown, plan,
                         profiled_peak_bytes, stage_layers, validate_layout)
from llmkit.plan_parallel import (Layout, bubble_fraction, in_flight_microbatches, korthikanti_layer_bytes,
                                  plan_search, rank_activation_parts, stage_params)


@pytest.mark.parametrize("layout,message", [
    (dict(world_size=8, tp=2, pp=2, microbatches=2), "tp 2 x pp 2 x dp_shard 1 x dp_replicate 1 x cp 1 = 4, but the "
                                                     "world size is 8"),
    (dict(world_size=3, pp=3, microbatches=3), "pp 3 = 3 pipeline stages, but the model has only 2 layers"),
    (dict(world_size=3, tp=3), "tp 3 does not divide the 4 attention heads"),
    (dict(world_size=4, tp=4), "tp 4 does not divide the 2 KV heads"),
    (dict(world_size=2, pp=2, microbatches=1), "microbatches 1 < pp 2"),
    (dict(world_size=2, cp=2, seq_len=6), "cp 2 splits the sequence into 4 chunks"),
    (dict(world_size=4, pp=2, virtual_stages=2, schedule="interleaved-1f1b", microbatches=2),
     "pp 2 x 2 virtual stages = 4 pipeline stages, but the model has only 2 layers"),
])
def test_bad_layouts_get_one_message_naming_the_numbers(layout, message):
    cfg = ModelConfig.from_preset("tiny")  # 2 layers, 4 heads, 2 KV heads
    with pytest.raises(PlanError, match="^bad parallel layout: ") as e:
        validate_layout(cfg, **layout)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_layouts_pass_and_stages_balance():
    cfg = ModelConfig.from_preset("tiny")
    validate_layout(cfg, 8, tp=2, pp=2, dp_shard=2, microbatches=4)
    validate_layout(cfg, 4, dp_shard=2, dp_replicate=2)
    assert stage_layers(7, 3) == [3, 2, 2] and stage_layers(96, 16) == [6] * 16


# ----------------------------------------------------------------------------- pipeline bubble


@pytest.mark.parametrize("pp,m,v,expected", [(1, 8, 1, 0.0), (4, 8, 1, 3 / 11), (8, 8, 1, 7 / 15),
                                             (16, 192, 1, 15 / 207), (4, 8, 2, 3 / 19)])
def test_bubble_formula(pp, m, v, expected):
    # (p - 1) / (m + p - 1); interleaving v chunks: (p - 1) / (v m + p - 1) (Narayanan et al. 2021)
    assert bubble_fraction(pp, m, v) == pytest.approx(expected)


def test_in_flight_microbatches_per_schedule():
    assert [in_flight_microbatches("1f1b", 4, 8, i) for i in range(4)] == [4, 3, 2, 1]
    assert [in_flight_microbatches("gpipe", 4, 8, i) for i in range(4)] == [8] * 4
    assert in_flight_microbatches("1f1b", 4, 2, 0) == 2  # never more than there are
    # Megatron's interleaved warm-up on rank 0: 2(p-1) + (v-1)p chunk forwards + 1, each chunk 1/v of the stage
    assert in_flight_microbatches("interleaved-1f1b", 4, 8, 0, 2) == (6 + 4 + 1) / 2


# ----------------------------------------------------------------------------- Megatron-LM


def test_megatron_gpt3_175b_takes_34_days():
    """Narayanan et al. 2021, section 5.1: 175B parameters, 300B tokens, 1024 A100s at 140 TFLOP/s each, with
    recomputation: 8TP/(nX) ~ 34 days. Their layout: TP 8 x PP 16 x DP 8, batch 1536 (192 micro-batches of 1)."""
    p = plan(PlanConfig(model="gpt3-175b", gpus=1024, tp=8, pp=16, microbatches=192, recompute="full",
                        gpu="a100-80gb", tokens=300e9, tflops=140))
    n_params = p["model"]["n_params"]
    l, h, V, s = 96, 12288, 51200, 2048
    # the paper's count 12lh^2(1 + 13/(12h) + (V+s)/(12lh)) = 12lh^2 + 13lh + (V+s)h, plus the final LayerNorm
    assert n_params == 12 * l * h * h + 13 * l * h + (V + s) * h + 2 * h
    days = p["compute"]["days"]
    assert days == pytest.approx(8 * 300e9 * n_params / (1024 * 140e12) / 86400)
    assert abs(days - 34) / 34 < 0.05
    par = p["parallel"]
    assert par["bubble_fraction"] == pytest.approx(15 / 207)
    assert par["tokens_per_step"] == 1536 * 2048
    assert par["memory_gb"]["fits"] and par["interconnect"]["tp"]["in_node"]
    assert not par["interconnect"]["pp"]["in_node"] and not par["interconnect"]["dp"]["in_node"]
    # the step model adds the bubble and exposed communication to compute at the same 140 TFLOP/s
    assert par["train_days"] > days and par["time_s"]["bubble"] > 0 and par["time_s"]["tp_exposed"] > 0


def test_communication_volumes_by_hand():
    """Megatron-LM's GPT-3 layout, bytes each GPU sends per step (bf16, b = 1, s = 2048, h = 12288)."""
    p = plan(PlanConfig(model="gpt3-175b", gpus=1024, tp=8, pp=16, microbatches=192, recompute="full",
                        gpu="a100-80gb", tokens=1e9))["parallel"]
    x = 1 * 2048 * 12288 * 2  # one b x s x h activation
    volume = p["communication_gb_per_gpu_per_step"]
    # TP: per layer 2 forward + 2 backward + 2 recomputed all-reduces, plus the embedding's (first stage) or
    # the head's (last stage); a ring all-reduce sends 2(t-1)/t of the buffer
    assert volume["tp"] * GB == pytest.approx(192 * (6 * 6 + 1) * 2 * 7 / 8 * x)
    # PP: an interior stage sends each micro-batch's activation forward and its gradient back, split over TP by SP
    assert volume["pp"] * GB == pytest.approx(192 * 2 * x / 8)
    # DP: all-reduce of stage 0's gradients (6 blocks, the embedding shard, positions) over 8, plus the tied
    # embedding's gradient all-reduced with the last stage
    stage0 = stage_params(ModelConfig.from_preset("gpt3-175b"), 8, 16)[0]["total"]
    assert volume["dp"] * GB == pytest.approx(2 * 7 / 8 * 2 * stage0 + 2 * 51200 * 12288 / 8)
    cp = plan(PlanConfig(model="llama-2-7b", gpus=4, cp=4, seq_len=8192, tokens=1e9))["parallel"]
    # ring attention: K and V (32 heads x 128) of s/c tokens pass c - 1 hops forward, and K, V, dK, dV backward
    kv = 2 * (8192 // 4) * 32 * 128 * 2
    assert cp["communication_gb_per_gpu_per_step"]["cp"] * GB == pytest.approx(32 * 3 * 3 * kv)


# ----------------------------------------------------------------------------- parameters of built shards

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")  # split on dim 0
ROW = ("o_proj", "down_proj")  # weights split on dim 1, biases replicated


def _shard_numel(name: str, param: torch.Tensor, tp: int) -> int:
    """Elements rank 0 holds under Megatron TP: slice the tensor as parallelize_module would."""
    module = name.split(".")[-2]
    if module in COLUMN:
        return param.chunk(tp, 0)[0].numel()
    if module in ROW and name.endswith("weight"):
        return param.chunk(tp, 1)[0].numel()
    return param.numel()


def _stage_of(name: str, stages: list[range], pp: int) -> list[int]:
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return [i for i, r in enumerate(stages) if layer in r]
    if name.startswith(("model.embed_tokens", "model.embed_positions")):
        return [0]
    return [pp - 1]  # final norm, lm_head


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)])
def test_stage_params_equal_the_built_model_sliced(preset, tp, pp):
    cfg = ModelConfig.from_preset(preset, n_layer=5)  # 5 layers: uneven stages (3+2, 2+2+1)
    model = build_model(cfg)
    bounds, start = [], 0
    for n in stage_layers(cfg.n_layer, pp):
        bounds.append(range(start, start + n))
        start += n
    counted = [0] * pp
    for name, param in model.named_parameters():
        for stage in _stage_of(name, bounds, pp):
            counted[stage] += _shard_numel(name, param, tp)
    if cfg.tie_embeddings and pp > 1:  # the last stage keeps a copy of the tied embedding for its head
        counted[-1] += _shard_numel("lm_head.weight", model.lm_head.weight, tp)
    planned = stage_params(cfg, tp, pp)
    assert [s["total"] for s in planned] == counted
    assert [s["layers"] for s in planned] == [len(r) for r in bounds]
    if tp == 1 and pp == 1:
        assert planned[0]["total"] == sum(p.numel() for p in model.parameters()) == param_breakdown(cfg)["total"]


# ----------------------------------------------------------------------------- activations


def test_korthikanti_activation_formula_by_hand():
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B, one sequence
    sbh = s * b * h
    # table 2 of Korthikanti et al. 2022: 5as/h = 80 here
    assert korthikanti_layer_bytes(s, b, h, a) == sbh * (34 + 80)
    assert korthikanti_layer_bytes(s, b, h, a, tp=8) == sbh * (10 + 3 + 10)
    assert korthikanti_layer_bytes(s, b, h, a, tp=8, sequence_parallel=True) == pytest.approx(sbh * 114 / 8)
    assert korthikanti_layer_bytes(s, b, h, a, tp=8, recompute="selective") == sbh * 13
    assert korthikanti_layer_bytes(s, b, h, a, tp=8, sequence_parallel=True,
                                   recompute="selective") == pytest.approx(sbh * 34 / 8)
    assert korthikanti_layer_bytes(s, b, h, a, tp=8, recompute="full") == 2 * sbh
    assert korthikanti_layer_bytes(s, b, h, a) == 2_868_903_936  # 2.87 GB per layer: why 175B recomputes


def _tp_rank_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """A model whose weights and activations have exactly the shapes one TP rank holds (no SP): heads, d_ff
    and the vocabulary divided, d_model whole."""
    return dataclasses.replace(cfg, n_head=cfg.n_head // tp, n_kv_head=cfg.n_kv_head // tp, head_dim=cfg.head_dim,
                               d_ff=cfg.d_ff // tp, vocab_size=cfg.vocab_size // tp)


@pytest.mark.parametrize("sp", [False, True])
def test_tp_rank_activations_equal_a_rank_shaped_model(sp):
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, d_model=128, d_ff=256)
    rank = rank_activation_parts(cfg, Layout(tp=2, sequence_parallel=sp), 64, "bf16", "flash")
    proxy = activation_parts(_tp_rank_config(cfg, 2), 1, 64, "bf16")
    c_wide = proxy["per_layer_c_wide"] / (2 if sp else 1)
    assert rank["per_layer"] == proxy["per_layer"] - proxy["per_layer_c_wide"] + c_wide
    assert rank["logits"] == proxy["logits"] and rank["head_transient"] == proxy["head_transient"]
    assert rank["layer_input"] == proxy["layer_input"] / (2 if sp else 1)
    full = rank_activation_parts(cfg, Layout(), 64, "bf16", "flash")
    assert rank["per_layer"] < full["per_layer"] and rank["logits"] == full["logits"] / 2


def test_recompute_modes_and_formulas_order_memory():
    def activations(**kw):
        p = plan(PlanConfig(model="gpt3-175b", gpus=64, tp=8, pp=8, microbatches=8, tokens=1e9, **kw))
        return p["parallel"]["memory_gb"]["stages"][0]["activations"]

    none, full = activations(), activations(recompute="full")
    assert full < none / 10
    k_none, k_sel = (activations(activation_formula="korthikanti", recompute=r) for r in ("none", "selective"))
    assert k_sel < k_none  # the materialised softmax is what selective recomputation drops
    eager = activations(attention="eager")
    assert activations(attention="eager", recompute="selective") == pytest.approx(none)
    assert none < eager


# ----------------------------------------------------------------------------- measured memory


def _plan_tp_pp(cfg: ModelConfig, tmp_path, **kw) -> dict:
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    return plan(PlanConfig(model=str(tmp_path / "config.json"), tokens=1e6, **kw))


def test_tp_rank_memory_within_15_percent_of_measured(tmp_path):
    """TP 2, no SP, fp32 on CPU: a rank-shaped model's real AdamW step (torch's memory profiler) against the
    planner's rank 0."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, d_model=128, d_ff=256)
    measured = measure_training_memory(_tp_rank_config(cfg, 2), 2, 64)
    p = _plan_tp_pp(cfg, tmp_path, gpus=2, tp=2, dtype="fp32", micro_batch=2, seq_len=64, sequence_parallel=False)
    assert p["memory_gb"]["weights"] * GB == measured["weights"]
    print(f"TP 2 rank: predicted {p['memory_gb']['total'] * GB:.0f} B, measured {measured['total']} B")
    assert abs(p["memory_gb"]["total"] * GB - measured["total"]) / measured["total"] < 0.15


def _stage0_order(schedule: str, pp: int, microbatches: int) -> list[str]:
    """Stage 0's actions: GPipe all forwards then all backwards; 1F1B p warm-up forwards, then one backward
    and one forward in turn, then the remaining backwards."""
    warmup = microbatches if schedule == "gpipe" else min(pp, microbatches)
    order = ["F"] * warmup
    for _ in range(microbatches - warmup):
        order += ["B", "F"]
    return order + ["B"] * warmup


def _first_stage_step(cfg: ModelConfig, layers: int, microbatches: int, batch: int, seq: int, device: str,
                      schedule: str = "1f1b", pp: int = 2):
    """Pipeline stage 0: the embedding and the first `layers` blocks run the schedule's forwards and
    backwards (with a gradient as the next stage would send), then the optimizer step."""
    torch.manual_seed(0)
    stage = build_model(dataclasses.replace(cfg, n_layer=layers)).model.to(device).train()
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (microbatches, batch, seq), device=device)

    def step() -> None:
        in_flight, sent = [], 0
        for action in _stage0_order(schedule, pp, microbatches):
            if action == "F":
                in_flight.append(stage(x[sent]))
                sent += 1
            else:
                out = in_flight.pop(0)
                out.backward(torch.ones_like(out))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return stage, opt, step


@pytest.mark.parametrize("schedule,microbatches,in_flight", [("1f1b", 2, 2), ("1f1b", 4, 2), ("gpipe", 4, 4)])
def test_pp_first_stage_memory_within_15_percent_of_measured(tmp_path, schedule, microbatches, in_flight):
    """PP 2, fp32 on CPU: stage 0 keeps p (1F1B) or m (GPipe) micro-batches' activations."""
    cfg = ModelConfig.from_preset("tiny", n_layer=4, vocab_size=512, d_model=128, d_ff=256)
    stage, opt, step = _first_stage_step(cfg, 2, microbatches, 2, 64, "cpu", schedule)
    held = sum(t.numel() * t.element_size() for t in list(stage.parameters()) + [
        v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()])
    measured = held + profiled_peak_bytes(step)
    p = _plan_tp_pp(cfg, tmp_path, gpus=2, pp=2, microbatches=microbatches, pp_schedule=schedule, dtype="fp32",
                    micro_batch=2, seq_len=64)
    s0 = p["parallel"]["memory_gb"]["stages"][0]
    assert s0["in_flight_microbatches"] == in_flight
    print(f"PP 2 {schedule} m {microbatches} stage 0: predicted {s0['total'] * GB:.0f} B, measured {measured} B")
    assert abs(s0["total"] * GB - measured) / measured < 0.15, (s0, measured)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_gpu_peak_memory_within_15_percent(tmp_path, layout):
    """On one GPU (fp32, SDPA): the TP 2 rank-shaped model and the PP 2 first stage at a size where CUDA's
    own buffers are noise; predicted against torch.cuda.max_memory_allocated."""
    cfg = ModelConfig.from_preset("tiny", n_layer=4, n_head=16, n_kv_head=8, d_model=1024, d_ff=2816,
                                  vocab_size=32000, max_seq_len=1024)
    torch.cuda.empty_cache()
    if layout == "tp":
        model = build_model(_tp_rank_config(cfg, 2)).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, cfg.vocab_size // 2, (2, 1024), device="cuda")

        def step() -> None:
            logits = model(x)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        kw = dict(tp=2, sequence_parallel=False)
    else:
        _, _, step = _first_stage_step(cfg, 2, 2, 2, 1024, "cuda")
        kw = dict(pp=2, microbatches=2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    p = _plan_tp_pp(cfg, tmp_path, gpus=2, dtype="fp32", micro_batch=2, seq_len=1024, **kw)
    predicted = p["parallel"]["memory_gb"]["stages"][0]["total"] * GB
    print(f"{layout}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(predicted - measured) / measured < 0.15


# ----------------------------------------------------------------------------- search and CLI


def test_search_lists_fitting_layouts_fastest_first():
    pc = PlanConfig(model="llama-2-7b", gpus=8, global_batch=64, search=True, gpu="a100-40gb")
    r = plan_search(pc)
    assert r["fitting"] > 0 and r["evaluated"] > r["fitting"]  # some layouts do not fit in 40 GB
    steps = [x["step_s"] for x in r["layouts"]]
    assert steps == sorted(steps)
    usable = 40 * 2**30 / GB - 2
    for x in r["layouts"]:
        assert x["tp"] * x["pp"] * x["dp"] * x["cp"] == 8 and x["memory_gb"] <= usable
        assert x["micro_batch"] * x["microbatches"] * x["dp"] == 64
        again = plan(PlanConfig(model="llama-2-7b", gpus=8, gpu="a100-40gb", tokens=1e9, tp=x["tp"], pp=x["pp"],
                                micro_batch=x["micro_batch"], microbatches=x["microbatches"], zero=x["zero"],
                                recompute=x["recompute"]))
        assert again["parallel"]["time_s"]["step"] == pytest.approx(x["step_s"])
    # pure DP without sharding (a whole 7B AdamW state per GPU) cannot fit
    cfgs = [(x["tp"], x["pp"], x["zero"]) for x in r["layouts"]]
    assert (1, 1, 0) not in cfgs


def test_cli_search_json_and_table(capsys):
    from llmkit.cli import main

    assert main(["plan", "--model", "llama-2-7b", "--gpus", "8", "--global-batch", "32", "--search", "--json",
                 "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["layouts"]) == 3 and out["global_batch"] == 32
    assert main(["plan", "--model", "llama-2-7b", "--gpus", "8", "--tp", "2", "--pp", "2", "--microbatches", "4"]) == 0
    text = capsys.readouterr().out
    assert "bubble (p-1)/(m+p-1) = 20.0%" in text and "stage 1" in text and "MFU" in text


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "8", "--tp", "2", "--pp", "2", "--dp", "3"], "= 12, but --gpus is 8"),
    (["--gpus", "64", "--pp", "64", "--microbatches", "64"], "64 pipeline stages, but the model has only 32 layers"),
    (["--gpus", "3", "--tp", "3"], "tp 3 does not divide the 32 attention heads"),
])
def test_cli_bad_layout_is_one_line_and_exit_2(capsys, argv, message):
    from llmkit.cli import main

    assert main(["plan", "--model", "llama-2-7b", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_data_parallel_layout_agrees_with_the_single_gpu_count():
    """With TP = PP = CP = 1 the stage figures equal the planner's ZeRO memory (same counting both ways)."""
    for zero in range(4):
        p = plan(PlanConfig(model="tinyllama-1.1b", gpus=4, zero=zero, seq_len=2048, tokens=1e9))
        stage, memory = p["parallel"]["memory_gb"]["stages"][0], p["memory_gb"]
        for key in ("weights", "gradients", "optimizer", "activations", "total"):
            assert stage[key] == pytest.approx(memory[key])


@pytest.mark.parametrize("model,message", [("tiny-bert", "decoder-only models; tiny-bert is 'encoder'"),
                                           ("tiny-mixtral", "dense models; tiny-mixtral has 8 experts")])
def test_layouts_refuse_models_they_do_not_split(capsys, model, message):
    from llmkit.cli import main

    for extra in (["--tp", "2"], ["--search"]):
        assert main(["plan", "--model", model, "--gpus", "2", *extra]) == 2
        assert message in capsys.readouterr().err
    assert "parallel" not in plan(PlanConfig(model=model, gpus=2, tokens=1e6))  # data-parallel plans still work
