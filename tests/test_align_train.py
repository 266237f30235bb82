"""Alignment runs on the toy world (llmkit/align/toy.py), CPU, seconds each: a reward model learns the
preference, DPO raises held-out implicit-reward accuracy, PPO and GRPO raise a programmatic reward with
the KL to the reference bounded, and every trainer resumes exactly."""

import json
import math
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.align import toy
from llmkit.align.config import AlignConfig
from llmkit.align.dpo import DPOTrainer
from llmkit.align.grpo import GRPOTrainer
from llmkit.align.ppo import PPOTrainer
from llmkit.align.reward import RewardTrainer, load_reward_model

REWARD_FN = "llmkit.align.toy:match_reward"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("align")
    tok = toy.char_tokenizer()
    return {
        "base": str(llmkit.save(toy.tiny_policy(tok), tok, root / "base")),
        # pairs and 3-way ranked lists in one file: the reward model learns from both
        "prefs": str(toy.write_jsonl(root / "prefs.jsonl", toy.preference_records(500) + toy.ranked_records(100))),
        "pairs": str(toy.write_jsonl(root / "pairs.jsonl", toy.preference_records(600, seed=1))),
        "prompts": str(toy.write_jsonl(root / "prompts.jsonl", toy.prompt_records(400))),
        "sft": str(toy.write_jsonl(root / "sft.jsonl", [{"text": r["prompt"] + r["answer"] * 4}
                                                        for r in toy.prompt_records(64, seed=2)])),
    }


def config(world, data: str, **overrides) -> AlignConfig:
    options = dict(model=world["base"], data=world[data], max_seq_len=16, micro_batch_size=16, val_fraction=0.1,
                   lr=3e-3, warmup_steps=0, eval_every=0, save_every=1000, log_every=10, rollout_batch_size=32,
                   mini_batch_size=16, ppo_epochs=2, max_new_tokens=4, kl_coef=0.02, group_size=8)
    options.update(overrides)
    return AlignConfig(**options)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_reward_model_learns_the_preference_from_pairs_and_ranked_lists(world, tmp_path):
    trainer = RewardTrainer(config(world, "prefs", max_steps=120), tmp_path / "rm")
    final = trainer.fit()
    before, after = trainer.initial_val["val_accuracy"], final["val_accuracy"]
    print(f"reward model validation accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.75 and after >= 0.9
    # the result loads on its own and scores as the trained model did
    rm, tok = load_reward_model(tmp_path / "rm" / "model")
    ids = torch.tensor([tok.encode("abc=aaaa<eos>", add_special_tokens=True), tok.encode("abc=bcde<eos>")])
    with torch.no_grad():
        torch.testing.assert_close(rm(ids), trainer.raw_model.eval()(ids), atol=1e-6, rtol=0)
        assert float(rm(ids[:1])) > float(rm(ids[1:]))


@pytest.mark.parametrize("variant", ["dpo", "cdpo", "ipo-lora-precomputed"])
def test_dpo_raises_heldout_implicit_reward_accuracy(world, tmp_path, variant):
    options = {"dpo": {}, "cdpo": {"label_smoothing": 0.2},
               "ipo-lora-precomputed": {"loss_type": "ipo", "method": "lora", "precompute_ref": True, "lr": 1e-2}}
    trainer = DPOTrainer(config(world, "pairs", max_steps=60, **{"lr": 1e-3, **options[variant]}), tmp_path / "dpo")
    final = trainer.fit()
    before, after = trainer.initial_val["val_accuracy"], final["val_accuracy"]
    print(f"{variant}: held-out implicit reward accuracy {before:.3f} -> {after:.3f}, margin {final['val_margin']:.3f}")
    assert before <= 0.5 and after >= 0.8 and final["val_margin"] > 0
    assert (tmp_path / "dpo" / ("adapter" if "lora" in variant else "model") / "README.md").is_file()


def rl_gain(trainer) -> tuple[float, float, dict]:
    final = trainer.fit()
    return trainer.initial_val["val_reward"], final["val_reward"], final


def test_ppo_raises_the_reward_with_the_kl_bounded(world, tmp_path):
    trainer = PPOTrainer(config(world, "prompts", reward_fn=REWARD_FN, max_steps=60), tmp_path / "ppo")
    before, after, final = rl_gain(trainer)
    print(f"ppo (full, beta 0.02): reward {before:.3f} -> {after:.3f}, KL to the reference {final['val_kl']:.2f} nats")
    assert after >= before + 0.5
    assert 0 < final["val_kl"] < 15 and math.isfinite(final["value_loss"])
    policy, _ = llmkit.load(tmp_path / "ppo" / "model")  # the actor, as a plain checkpoint
    assert policy.config.vocab_size == trainer.raw_model.actor.config.vocab_size


def test_ppo_lora_on_one_shared_base_with_adaptive_kl(world, tmp_path):
    cfg = config(world, "prompts", reward_fn=REWARD_FN, max_steps=60, method="lora", lr=1e-2, adaptive_kl=True,
                 target_kl=5.0, kl_horizon=200, kl_coef=0.05, ptx_data=world["sft"], ptx_coef=0.1)
    trainer = PPOTrainer(cfg, tmp_path / "ppo")
    actor, critic = trainer.raw_model.actor, trainer.raw_model.critic
    # one copy of the base: the critic's frozen projections are the actor's tensors
    assert critic.model.layers[0].mlp.up_proj.weight is actor.model.layers[0].mlp.up_proj.weight
    assert trainer.reference is None  # the reference is the actor with its adapters off
    before, after, final = rl_gain(trainer)
    kl = [r["kl"] for r in records(tmp_path / "ppo")]
    print(f"ppo (lora, adaptive beta -> {final['kl_coef']:.3f}): reward {before:.3f} -> {after:.3f}, "
          f"KL last 20 steps {sum(kl[-20:]) / 20:.2f} (target 5)")
    assert after >= before + 0.2
    assert sum(kl[-20:]) / 20 < 2 * cfg.target_kl and final["kl_coef"] > cfg.kl_coef  # beta rose to hold the KL
    assert "ptx_loss" in final and (tmp_path / "ppo" / "adapter" / "adapter_config.json").is_file()


def test_grpo_raises_the_reward_with_the_kl_bounded(world, tmp_path):
    trainer = GRPOTrainer(config(world, "prompts", reward_fn=REWARD_FN, max_steps=60, rollout_batch_size=8,
                                 mini_batch_size=32), tmp_path / "grpo")
    before, after, final = rl_gain(trainer)
    print(f"grpo (G 8, beta 0.02): reward {before:.3f} -> {after:.3f}, KL {final['val_kl']:.2f} nats")
    assert after >= before + 0.5
    assert 0 < final["val_kl"] < 15 and final["clip_fraction"] >= 0


class Killed(Exception):
    pass


def die_after_step_5(step: int, record: dict) -> None:
    if step == 5:
        raise Killed


RESUMABLE = {
    "rm": (RewardTrainer, "prefs", {}),
    "dpo": (DPOTrainer, "pairs", {"method": "lora", "lora_dropout": 0.1}),
    "ppo": (PPOTrainer, "prompts", {"reward_fn": REWARD_FN, "method": "lora", "adaptive_kl": True,
                                    "ptx_data": "sft", "ptx_coef": 0.1, "rollout_batch_size": 8,
                                    "mini_batch_size": 4}),
    "grpo": (GRPOTrainer, "prompts", {"reward_fn": REWARD_FN, "rollout_batch_size": 2, "mini_batch_size": 8}),
}


@pytest.mark.parametrize("algorithm", list(RESUMABLE))
def test_resume_is_exact(world, tmp_path, algorithm):
    cls, data, options = RESUMABLE[algorithm]
    options = {k: world[v] if k == "ptx_data" else v for k, v in options.items()}

    def run(out, **kwargs):
        return cls(config(world, data, max_steps=6, save_every=2, eval_every=3, **options), tmp_path / out, **kwargs)

    run("straight").fit()
    with pytest.raises(Killed):  # after the step-4 checkpoint: step 5 is lost and redone
        run("resumed", on_step=die_after_step_5).fit()
    run("resumed", resume=True).fit()
    keys = ("loss", "val_loss", "val_reward", "kl_coef", "reward_mean")
    expected = [{k: r[k] for k in keys if k in r} for r in records(tmp_path / "straight")]
    assert len(expected) == 6 and expected[-1]["loss"] != expected[0]["loss"]
    assert [{k: r[k] for k in keys if k in r} for r in records(tmp_path / "resumed")] == expected
