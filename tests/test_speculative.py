"""Speculative and prompt-lookup decoding: greedy equals the target's greedy; sampled output follows
the target's processed distribution (chi-square at ALPHA), and a wrong acceptance rule fails that test."""

import copy
import json

import pytest
import torch
from scipy.stats import chisquare

from llmkit.config import ModelConfig
from llmkit.infer import speculative
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.sampling import SamplingParams, probs
from llmkit.infer.speculative import lookup_ngram, prompt_lookup_generate, speculative_generate
from llmkit.model import Transformer

ALPHA = 0.001  # significance of the distribution tests
PROMPTS = [[5, 17, 3, 99, 5, 17], [42], [7, 8, 9, 7, 8, 9, 7, 8]]


def build(seed: int, preset: str = "tiny", **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset(preset, **overrides)).eval()


def greedy(n: int = 12, eos: tuple[int, ...] = ()) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, eos_token_ids=eos)


@pytest.fixture(scope="module")
def target() -> Transformer:
    return build(0)


@pytest.mark.parametrize("draft_kind", ["smaller", "gqa", "random"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_target_greedy(target, draft_kind, k):
    draft = {"smaller": build(1, n_layer=1, d_model=32, n_head=2, n_kv_head=2, d_ff=64),
             "gqa": build(2, n_kv_head=1), "random": build(3)}[draft_kind]
    out, stats = speculative_generate(target, draft, PROMPTS, greedy(), k=k)
    assert out == generate(target, PROMPTS, greedy())
    assert stats.drafted > 0 and stats.tokens_per_forward > 0


def test_gpt2_like_target_and_draft():
    target, draft = build(4, "tiny-gpt2"), build(5, "tiny-gpt2", n_layer=1)
    out, _ = speculative_generate(target, draft, PROMPTS, greedy(), k=4)
    assert out == generate(target, PROMPTS, greedy())


def test_draft_equal_to_target_accepts_everything(target):
    out, stats = speculative_generate(target, copy.deepcopy(target), PROMPTS, greedy(13), k=4)
    assert out == generate(target, PROMPTS, greedy(13))
    assert stats.acceptance_rate == 1.0
    # 13 tokens: rounds of 5 (4 drafted + bonus), 5, then 3 (k shrinks to fit), + a prefill for the
    # two prompts longer than one token
    assert stats.target_forwards == 3 * 3 + 2


def test_draft_sharing_layers_with_target_is_refused(target):
    with pytest.raises(ValueError, match="shares transformer layers"):
        speculative_generate(target, target, PROMPTS, greedy())


def test_random_draft_accepts_little(target):
    _, stats = speculative_generate(target, build(3), PROMPTS, greedy(), k=4)
    assert stats.acceptance_rate < 0.5


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_prompt_lookup_greedy_equals_target_greedy(target, ngram):
    out, stats = prompt_lookup_generate(target, PROMPTS, greedy(16), ngram=ngram, k=3)
    assert out == generate(target, PROMPTS, greedy(16))
    assert stats.drafted > 0


def test_generate_front_door(target):
    plain = generate(target, PROMPTS, greedy())
    assert generate(target, PROMPTS, GenerationConfig(max_new_tokens=12, draft_model=build(3),
                                                      num_draft_tokens=3)) == plain
    assert generate(target, PROMPTS, GenerationConfig(max_new_tokens=12, prompt_lookup_ngram=2)) == plain


def test_lookup_ngram_takes_latest_match():
    assert lookup_ngram([1, 2, 3, 1, 2, 4, 1, 2], 2, 3) == [4, 1, 2]
    assert lookup_ngram([1, 2, 3], 2, 3) == []


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_max_new_tokens_is_exact(target, n):
    out, _ = speculative_generate(target, copy.deepcopy(target), PROMPTS, greedy(n), k=4)
    assert [len(row) for row in out] == [n] * len(PROMPTS)


def test_stops_at_eos(target):
    plain = generate(target, PROMPTS, greedy(12))
    eos = plain[0][4]  # the fifth token of the first row: it stops there (or earlier, at an earlier occurrence)
    for out in (speculative_generate(target, copy.deepcopy(target), PROMPTS, greedy(12, (eos,)), k=4)[0],
                prompt_lookup_generate(target, PROMPTS, greedy(12, (eos,)), k=4)[0]):
        assert out == generate(target, PROMPTS, greedy(12, (eos,)))
        assert out[0][-1] == eos and len(out[0]) <= 5


def test_context_overflow_is_refused():
    target = build(4, "tiny-gpt2", max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        speculative_generate(target, build(5, "tiny-gpt2", max_seq_len=16), [[1, 2, 3]], greedy(14))


def test_vocab_mismatch_is_one_clear_error(target):
    with pytest.raises(ValueError, match="draft vocab_size 100 != target vocab_size 512"):
        speculative_generate(target, build(1, vocab_size=100), PROMPTS, greedy())


# -- distributions: 2 generated tokens over an 8-token vocabulary, k=1 (a drafted token, then the
# correction or bonus), so both the accept/reject and the bonus paths are tested.

def peaked(seed: int) -> Transformer:
    model = build(seed, vocab_size=8)
    with torch.no_grad():  # random init is near uniform: sharpen it so draft and target differ
        model.lm_head.weight.mul_(30)
    return model


def exact_pairs(target: Transformer, prompt: list[int], sp: SamplingParams) -> torch.Tensor:
    """The target's exact probability of every (t1, t2) pair [64] under processed sampling."""
    with torch.no_grad():
        first = probs(target(torch.tensor([prompt]))[:, -1], sp, torch.tensor([prompt]))[0]
        rows = []
        for t1 in range(8):
            ctx = torch.tensor([prompt + [t1]])
            rows.append(first[t1] * probs(target(ctx)[:, -1], sp, ctx, ctx[:, len(prompt):])[0])
    return torch.stack(rows).flatten().double()


def chi_square_p(target, draft, sp: SamplingParams, n: int, prompt: tuple[int, ...] = (1, 2, 3)) -> float:
    """p-value of n sampled pairs against the exact pairs; draft None means prompt lookup."""
    gen, prompt = GenerationConfig(max_new_tokens=2, sampling=sp), list(prompt)
    if draft is None:
        out, stats = prompt_lookup_generate(target, [prompt] * n, gen, ngram=2, k=1)
    else:
        out, stats = speculative_generate(target, draft, [prompt] * n, gen, k=1)
    assert stats.drafted > 0
    observed = torch.zeros(64, dtype=torch.float64)
    for a, b in out:
        observed[a * 8 + b] += 1
    expected = exact_pairs(target, prompt, sp) * n
    assert observed[expected == 0].sum() == 0, "a token the processed target distribution excludes was sampled"
    # cells expected below 5 are pooled so the chi-square approximation holds
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp[keep].sum().item()).pvalue)


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0, seed=0), SamplingParams(temperature=1.0, top_k=3, seed=1)])
def test_sampled_output_follows_target_distribution(sp):
    assert chi_square_p(peaked(10), peaked(11), sp, 3000) > ALPHA


def test_prompt_lookup_sampling_follows_target_distribution():
    # the prompt's last token 1 occurred before, so every sample starts from a drafted token (q one-hot)
    assert chi_square_p(peaked(10), None, SamplingParams(temperature=1.0, seed=2), 3000, (1, 2, 1, 2, 1)) > ALPHA


def test_wrong_acceptance_rule_fails_the_same_test(monkeypatch):
    monkeypatch.setattr(speculative, "_verify", lambda p, q, token, generator: None)  # accept every draft
    assert chi_square_p(peaked(10), peaked(11), SamplingParams(temperature=1.0, seed=0), 3000) < ALPHA


def test_cli_draft_and_prompt_lookup_match_plain_greedy(tmp_path, capsys):
    import llmkit
    from llmkit.cli import main
    from llmkit.tokenizer import train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40)
    tok = train_tokenizer([corpus], "byte-bpe", 300)
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        llmkit.save(build(seed, vocab_size=tok.vocab_size, n_layer=layers), tok, tmp_path / name)
    base = ["generate", "--model", str(tmp_path / "target"), "--prompt", "to be or", "--max-new-tokens", "10", "--json"]
    texts = []
    for extra in ([], ["--draft", str(tmp_path / "draft"), "--num-draft-tokens", "3"], ["--prompt-lookup", "2"]):
        assert main(base + extra) == 0
        texts.append(json.loads(capsys.readouterr().out)["text"])
    assert texts[0] == texts[1] == texts[2]
