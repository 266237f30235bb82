"""The 3D-parallel planner: layout validation, per-stage parameters of built shards, memory, bubble, Megatron-LM."""

import pytest

from llmkit.config import ModelConfig
from llmkit.plan import PlanError, stage_layers, validate_layout


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
