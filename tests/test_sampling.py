"""Sampling parity with transformers' logits processors, plus sampler statistics and validation."""

import itertools

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmkit.infer.sampling import (
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    make_generator,
    probs,
    process_logits,
    sample,
)

B, T = 4, 12


def hf_processors(p: SamplingParams) -> LogitsProcessorList:
    # Built as GenerationMixin._get_logits_processor does with do_sample=True, num_beams=1.
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k != 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs


def make_logits(kind: str, V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(B, V, generator=g) * 3
    if kind == "ties":  # a handful of distinct values: many exact ties, also at top-k / top-p boundaries
        return torch.randint(-3, 4, (B, V), generator=g).float()
    # peaked: one token dominates, the rest are far below
    logits = torch.randn(B, V, generator=g)
    logits[torch.arange(B), torch.randint(0, V, (B,), generator=g)] += 25.0
    return logits


def all_params(V: int):
    grid = itertools.product((0.7, 1.3), (0, 1, 5, 50, V + 10), (0.1, 0.5, 0.9, 1.0), (0.0, 0.05, 0.2), (1.0, 1.3, 0.8))
    for t, k, p, m, r in grid:
        yield SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r)


@pytest.mark.parametrize("kind", ["normal", "ties", "peaked"])
@pytest.mark.parametrize("V", [50, 257, 1000])
def test_probs_match_transformers(kind, V):
    seed = V  # a different seed for every vocabulary size
    logits = make_logits(kind, V, seed)
    context = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed + 1))
    for params in all_params(V):
        expected = hf_processors(params)(context, logits.clone())
        got = process_logits(logits, params, context)
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), params
        torch.testing.assert_close(probs(logits, params, context), expected.softmax(-1), atol=1e-6, rtol=0)


def test_top_p_boundary_and_min_tokens_to_keep():
    # probs 0.5, 0.25, 0.125, 0.125: the tail mass at the 0.25 token is exactly 0.5, which is <= 1 - 0.5,
    # so transformers removes it; a tiny top_p still keeps the single best token.
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    keep = torch.isfinite(process_logits(logits, SamplingParams(top_p=0.5)))
    assert keep.tolist() == [[True, False, False, False]]
    keep = torch.isfinite(process_logits(logits, SamplingParams(top_p=1e-9)))
    assert keep.sum().item() == 1


def test_repetition_penalty_counts_each_id_once_and_ignores_padding():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 0, 0, 1, -1, 7]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.randn(2, 6)
    generated = torch.tensor([[1, 1, 1, 4], [0, -1, -1, -1]])
    out = apply_presence_frequency_penalty(logits, generated, presence=0.5, frequency=0.25)
    expected = logits.clone()
    for row, ids in enumerate(generated.tolist()):  # naive: the formula of OpenAI's API reference
        for tok in set(i for i in ids if i >= 0):
            expected[row, tok] -= 0.5 + 0.25 * ids.count(tok)
    torch.testing.assert_close(out, expected)
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert sample(logits, params, generated_ids=generated).tolist() == expected.argmax(-1).tolist()


def test_dtype_and_no_context():
    logits = torch.randn(B, 100).bfloat16()
    params = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2)
    assert probs(logits, params).dtype == torch.float32
    torch.testing.assert_close(probs(logits, params), probs(logits, SamplingParams(temperature=0.8, top_p=0.9)))


def test_greedy_is_argmax_of_penalised_logits():
    logits = make_logits("normal", 300, 0)
    context = torch.randint(0, 300, (B, T))
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.2, repetition_penalty=1.5)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(context, logits.clone()).argmax(-1)
    assert torch.equal(sample(logits, params, context), expected)
    assert torch.equal(probs(logits, params, context), torch.nn.functional.one_hot(expected, 300).float())


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = make_logits("normal", 500, 1).repeat(16, 1)
    params = SamplingParams(temperature=1.3, top_k=50, seed=1234)

    def run() -> list[torch.Tensor]:
        g = make_generator(params)
        return [sample(logits, params, generator=g) for _ in range(3)]

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # the generator advances between steps
    assert make_generator(SamplingParams()) is None


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.8), SamplingParams(temperature=1.5, top_k=4, min_p=0.05), SamplingParams(top_p=0.8)],
)
def test_sample_frequencies_match_probs(params):
    N = 20_000
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.9, -2.0]])
    context = torch.tensor([[3]])
    draws = sample(logits.expand(N, -1), params, context.expand(N, -1), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / N
    expected = probs(logits, params, context)[0]
    assert (freq - expected).abs().max().item() < 0.02
    assert torch.all(freq[expected == 0] == 0)  # filtered tokens are never drawn


def test_sample_compiles_without_graph_breaks():
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    compiled = torch.compile(sample, backend="eager", fullgraph=True)
    logits, context = make_logits("normal", 200, 0), torch.randint(0, 200, (B, T))
    assert compiled(logits, params, context).shape == (B,)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("seed", "7"),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
    ],
)
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value}).validate()


def test_validate_accepts_edges():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.5, seed=0).validate()
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams().greedy
