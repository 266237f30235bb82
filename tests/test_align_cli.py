"""Reward models in transformers' layout (parity both ways), the hh-rlhf sample, preference/prompt record
formats and their errors, reward functions, and `llmkit align rm|dpo|ppo|grpo` end to end."""

import json
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.align import toy
from llmkit.align.data import load_preferences, load_prompts, pairs_of
from llmkit.align.reward import RewardModel, load_reward_model, save_reward_model
from llmkit.align.rewards import exact_answer, load_reward_fn
from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.data.io import DataError
from llmkit.model import Transformer, build_model

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_2k.jsonl"


def tiny_rm(preset: str, tok) -> RewardModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4,
                                  **({"d_ff": 64, "n_kv_head": 2} if preset == "tiny" else {}),
                                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return RewardModel.from_backbone(Transformer(cfg).model).eval()


def padded(tok, texts: list[str], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok.encode(t, add_special_tokens=True) + [tok.eos_id] for t in texts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_id)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_reward_model_scores_match_transformers_sequence_classification(tmp_path, preset):
    from transformers import AutoModelForSequenceClassification

    tok = toy.char_tokenizer()
    rm = tiny_rm(preset, tok)
    save_reward_model(rm, tok, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert type(hf).__name__ == {"tiny": "LlamaForSequenceClassification",
                                 "tiny-gpt2": "GPT2ForSequenceClassification"}[preset]
    texts = ["abc=aaaa", "d=", "cab=fe dcba"]
    with torch.no_grad():
        for left in (False, True):
            ids, mask = padded(tok, texts, left)
            # transformers counts positions from the first column unless told: give it ours for left padding
            positions = (mask.cumsum(-1) - 1).clamp(min=0) if left else None
            theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0]
            torch.testing.assert_close(rm(ids, mask), theirs, atol=1e-4, rtol=0)
        loaded, loaded_tok = load_reward_model(tmp_path / "rm")
        torch.testing.assert_close(loaded(ids, mask), rm(ids, mask), atol=1e-6, rtol=0)
        front_door, _ = llmkit.load(tmp_path / "rm")  # llmkit.load reads a reward-model directory as one
        assert isinstance(front_door, RewardModel)
        torch.testing.assert_close(front_door(ids, mask), rm(ids, mask), atol=1e-6, rtol=0)
    assert loaded_tok.encode("abc") == tok.encode("abc")


def test_a_transformers_reward_model_loads_with_the_same_scores(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = toy.char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_id)
    hf = LlamaForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    rm, _ = load_reward_model(tmp_path / "hf")
    ids, mask = padded(tok, ["abc=aaaa", "d=ef"], left=False)
    with torch.no_grad():
        torch.testing.assert_close(rm(ids, mask), hf(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not a reward model"):
        llmkit.save(Transformer(ModelConfig.from_preset("tiny", vocab_size=32)), None, tmp_path / "lm")
        load_reward_model(tmp_path / "lm")


def test_hh_rlhf_pairs_split_at_the_last_assistant_turn():
    from llmkit.tokenizer import train_tokenizer

    tok = train_tokenizer([HH], "byte-bpe", 320, text_field="chosen")
    examples, stats = load_preferences(str(HH), tok, max_seq_len=4096, max_prompt_len=4096)
    assert stats.records == len(examples) == 1812 and stats.formats == {"hh-rlhf": 1812}
    first = json.loads(HH.read_text().splitlines()[0])
    e = examples[0]
    prompt = tok.decode(e.prompt)
    assert prompt.endswith("\n\nAssistant:") and first["chosen"].startswith(prompt)
    for reply, key in zip(e.responses, ("chosen", "rejected")):  # each reply is the rest of its text, then EOS
        assert reply[-1] == tok.eos_id and prompt + tok.decode(reply[:-1]) == first[key]
    short, stats = load_preferences(str(HH), tok, max_seq_len=64, max_prompt_len=32)
    assert all(len(x.prompt) <= 32 and len(x.prompt) + max(map(len, x.responses)) <= 64 for x in short)
    assert stats.truncated > 1000
    prompts = load_prompts(str(HH), tok, max_prompt_len=4096)
    assert prompts[0].text == prompt


def test_record_formats_and_errors(tmp_path):
    tok = toy.char_tokenizer()
    data = toy.write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "ab=", "chosen": "aa", "rejected": "bb", "margin": 1.5},
        {"chosen": "ab=cc", "rejected": "ab=dd"},  # shared prefix without an Assistant marker
        {"prompt": "c=", "responses": ["ee", "aa", "bb"], "scores": [1, 3, 2]},  # sorted best first
    ])
    examples, stats = load_preferences(str(data), tok, 32, 16)
    assert stats.formats == {"pair": 1, "hh-rlhf": 1, "ranked": 1} and examples[0].margin == 1.5
    assert [tok.decode(r[:-1]) for r in examples[2].responses] == ["aa", "bb", "ee"]
    assert tok.decode(examples[1].prompt, skip_special_tokens=True) == "ab=" and len(pairs_of(examples)) == 1 + 1 + 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=f"{bad}:2: a preference record needs string 'chosen' and 'rejected'"):
        load_preferences(str(bad), tok, 32, 16)
    same = toy.write_jsonl(tmp_path / "same.jsonl", [{"chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="do not differ"):
        load_preferences(str(same), tok, 32, 16)
    prompts = load_prompts(str(toy.write_jsonl(tmp_path / "q.jsonl", [{"question": "ab=", "answer": "a"}])), tok, 8)
    assert prompts[0].text == "ab=" and prompts[0].columns == {"answer": "a"}


def test_reward_functions(tmp_path):
    assert exact_answer(["q"] * 4, ["so 3 + 4 = 7", "#### 1,234", "the answer is 7.0", "none"],
                        ["7", "#### 1234", "7", "7"]) == [1.0, 1.0, 1.0, 0.0]
    file = tmp_path / "mine.py"
    file.write_text("def shout(prompts, completions, **columns):\n    return [float(c.isupper()) for c in completions]\n")
    assert load_reward_fn(f"{file}:shout")(["p"], ["HI"]) == [1.0]
    assert load_reward_fn("llmkit.align.toy:match_reward") is toy.match_reward
    for spec, message in (("nocolon", "MODULE:NAME"), ("llmkit.align.toy:nothing", "no function"),
                          ("no_such_module_x:f", "cannot import")):
        with pytest.raises(ValueError, match=message):
            load_reward_fn(spec)


def test_align_cli_end_to_end(tmp_path, capsys):
    tok = toy.char_tokenizer()
    base = str(llmkit.save(toy.tiny_policy(tok), tok, tmp_path / "base"))
    prefs = str(toy.write_jsonl(tmp_path / "prefs.jsonl", toy.preference_records(64)))
    prompts = str(toy.write_jsonl(tmp_path / "prompts.jsonl", toy.prompt_records(64)))
    common = ["--max-seq-len", "16", "--max-steps", "3", "--micro-batch-size", "8", "--json"]

    def run(*argv) -> dict:
        assert main(list(argv) + common) == 0
        return json.loads(capsys.readouterr().out)

    rm = run("align", "rm", "--model", base, "--data", prefs, "--out", str(tmp_path / "rm"))
    assert rm["steps"] == 3 and "val_accuracy" in rm and Path(rm["result"]).name == "model"
    rl = ["--rollout-batch-size", "4", "--mini-batch-size", "4", "--max-new-tokens", "4", "--data", prompts]
    ppo = run("align", "ppo", "--model", base, "--reward-model", rm["result"], "--out", str(tmp_path / "ppo"), *rl)
    assert "val_reward" in ppo and "kl" in ppo
    assert (tmp_path / "ppo" / "tb").is_dir() and (tmp_path / "ppo" / "align.yaml").is_file()
    grpo = run("align", "grpo", "--model", base, "--reward-fn", "llmkit.align.toy:match_reward", "--group-size",
               "4", "--method", "lora", "--out", str(tmp_path / "grpo"), *rl)
    assert Path(grpo["result"]).name == "adapter"
    dpo = run("align", "dpo", "--model", base, "--data", prefs, "--out", str(tmp_path / "dpo"))
    assert "val_margin" in dpo
    record = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_fraction", "value_loss", "response_len",
                "rollout_tokens_per_s", "step_time_s"):
        assert key in record
    # bad input: one line naming the problem, exit 2
    assert main(["align", "ppo", "--model", base, "--data", prompts, "--out", str(tmp_path / "x")]) == 2
    assert "needs exactly one reward source" in capsys.readouterr().err
    bert = llmkit.save(build_model(ModelConfig.from_preset("tiny-bert", vocab_size=tok.vocab_size)), tok,
                       tmp_path / "bert")
    assert main(["align", "rm", "--model", str(bert), "--data", prefs, "--out", str(tmp_path / "z")]) == 2
    assert "align rm trains decoder-only models, got encoder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["align", "dpo", "--model", base, "--data", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert f"{bad}:1: not valid JSON" in capsys.readouterr().err
