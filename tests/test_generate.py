"""Generation: batching, seeds, EOS, stop strings and streaming on a tiny model with a real tokenizer."""

from pathlib import Path

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, StopMatcher, generate, generate_text, stream_text
from llmkit.infer.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("tok") / "c.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:30_000] + "\nnaïve café 日本語 🎭🎉\n" * 20)
    return train_tokenizer([corpus], "byte-bpe", 400)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()


def test_batched_greedy_equals_one_by_one(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    gen = GenerationConfig(max_new_tokens=10)
    batched = generate(model, prompts, gen)
    assert batched == [generate(model, [p], gen)[0] for p in prompts]


def test_seeded_sampling_is_reproducible(model):
    gen = GenerationConfig(max_new_tokens=20, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=42))
    a, b = generate(model, [[1, 2, 3]], gen), generate(model, [[1, 2, 3]], gen)
    other = generate(model, [[1, 2, 3]], GenerationConfig(20, SamplingParams(temperature=1.0, top_p=0.9, seed=43)))
    assert a == b and a != other


def test_eos_ends_a_row_and_pads_the_rest(model):
    first = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8))[0]
    eos = first[3]
    out = generate(model, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=8, eos_token_ids=(eos,)))
    assert out[0] == first[: first.index(eos) + 1]
    assert len(out[1]) == 8 or out[1][-1] == eos


def test_stream_concatenates_to_the_batch_text(model, tok):
    # a random model emits invalid byte sequences too (U+FFFD in the final text as well); that valid
    # characters are never split across deltas is tested token by token in test_detokenize.py
    gen = GenerationConfig(max_new_tokens=40, sampling=SamplingParams(temperature=1.0, seed=3))
    for prompt in ("ROMEO:", "café 🎭"):
        deltas = list(stream_text(model, tok, prompt, gen))
        assert "".join(deltas) == generate_text(model, tok, [prompt], gen)[0]


def test_stop_strings_cut_batch_and_stream_alike(model, tok):
    gen = GenerationConfig(max_new_tokens=40, sampling=SamplingParams(temperature=1.0, seed=5))
    full = generate_text(model, tok, ["KING:"], gen)[0]
    stop = full[10:13]
    cut = GenerationConfig(40, gen.sampling, stop=(stop,))
    assert generate_text(model, tok, ["KING:"], cut)[0] == full[: full.find(stop)]
    assert "".join(stream_text(model, tok, "KING:", cut)) == full[: full.find(stop)]


def test_stop_matcher_holds_back_a_possible_stop():
    m = StopMatcher(["</s>"])
    assert m.push("hello <") == "hello "
    assert m.push("/") == ""
    assert m.push("x") == "</x"
    assert m.push(" and </s> more") == " and " and m.stopped


def test_learned_positions_refuse_to_overrun_the_context():
    small = Transformer(ModelConfig.from_preset("tiny-gpt2", max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        generate(small, [[1] * 10], GenerationConfig(max_new_tokens=10))


def test_prefix_lm_generation_uses_a_bidirectional_prompt():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", mask="prefix")).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    cached = generate(model, [prompt], GenerationConfig(max_new_tokens=6))
    uncached = generate(model, [prompt], GenerationConfig(max_new_tokens=6, use_cache=False))
    assert cached == uncached
    with torch.no_grad():  # the first token comes from logits with the prompt as a bidirectional prefix
        logits = model(torch.tensor([prompt]), prefix_len=len(prompt))
    assert cached[0][0] == int(logits[0, -1].argmax())


def test_bad_generation_settings():
    model = Transformer(ModelConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], GenerationConfig(sampling=SamplingParams(top_p=0.0)))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], GenerationConfig())


def test_logits_processors_see_the_generated_ids_and_steer_the_choice(model):
    seen = []

    def only_even_then_odd(generated, logits):
        seen.append(generated.clone())
        banned = torch.zeros_like(logits, dtype=torch.bool)
        banned[:, (generated.shape[1] % 2)::2] = True  # even ids on even steps, odd on odd steps
        return logits.masked_fill(~banned, float("-inf"))

    gen = GenerationConfig(max_new_tokens=6, logits_processors=(only_even_then_odd,))
    out = generate(model, [[1, 2, 3], [4, 5]], gen)
    assert all(tok % 2 == step % 2 for row in out for step, tok in enumerate(row))
    assert [g.shape for g in seen] == [torch.Size([2, n]) for n in range(6)]
    assert seen[-1].tolist() == [row[:5] for row in out]
