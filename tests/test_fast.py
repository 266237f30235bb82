"""The compiled fast decode path gives the plain path's tokens, compiles once, and notices new weights."""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.infer.fast import bucket_length
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.sampling import SamplingParams
from llmkit.model import Transformer

BASE = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=256)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7]]


def build(**fields) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**BASE, **fields})).eval()


def run(model, prompts, compile, **gen):
    return generate(model, prompts, GenerationConfig(max_new_tokens=24, compile=compile, **gen))


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 64, 65, 200, 1000)] == [64, 64, 128, 256, 1024]


@pytest.mark.parametrize("fields", [dict(), dict(position="alibi", mask="prefix")], ids=["llama", "alibi-prefix-lm"])
def test_compiled_greedy_and_sampling_equal_the_plain_path(fields):
    model = build(**fields)
    assert run(model, PROMPTS[:1], True) == run(model, PROMPTS[:1], False)
    seeded = SamplingParams(temperature=0.9, top_k=10, seed=5)
    assert run(model, PROMPTS[:1], True, sampling=seeded) == run(model, PROMPTS[:1], False, sampling=seeded)


def test_left_padded_batch_compiles_to_the_same_tokens():
    model = build()
    assert run(model, PROMPTS, True) == run(model, PROMPTS, False)


def test_second_generation_reuses_the_compiled_step_and_new_weights_recompile():
    model = build()
    run(model, PROMPTS[:1], True)
    with torch.compiler.set_stance("fail_on_recompile"):  # same bucket: the traced graph and tensors again
        again = run(model, [PROMPTS[0][:5]], True)
    assert again == run(model, [PROMPTS[0][:5]], False)
    with torch.no_grad():  # an optimizer-like in-place update: frozen constants must not be served stale
        model.lm_head.weight.mul_(-1.5)
    assert run(model, PROMPTS[:1], True) == run(model, PROMPTS[:1], False)
