"""The continuous-batching engine: same tokens as the plain path, whatever a request is batched with."""

import threading

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.infer.engine import Engine, QueueFull, RequestOptions, TokenEvent
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.sampling import SamplingParams
from llmkit.model import Transformer

BASE = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=128)
PROMPTS = [[5, 9, 3], [7] * 11, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [42]]


def build(**fields) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**BASE, **fields})).eval()


def alone(model, prompt, n, sampling=SamplingParams(temperature=0.0), eos=()):
    return generate(model, [prompt], GenerationConfig(max_new_tokens=n, sampling=sampling, eos_token_ids=eos))[0]


@pytest.mark.parametrize("fields", [dict(), dict(position="alibi"), dict(sliding_window=6),
                                    dict(position="learned"), dict(mask="prefix"), dict(n_kv_head=1)],
                         ids=["llama-gqa", "alibi", "sliding-window", "learned", "prefix-lm", "mqa"])
def test_batched_greedy_equals_each_request_alone(fields):
    model = build(**fields)
    expected = [alone(model, p, 20) for p in PROMPTS]
    engine = Engine(model, block_size=4)
    assert engine.generate(PROMPTS, RequestOptions(max_new_tokens=20)) == expected
    assert engine.stats().kv_blocks_used == 0  # every block came back


def test_preemption_under_a_small_pool_keeps_outputs():
    model = build()
    expected = [alone(model, p, 24) for p in PROMPTS]
    engine = Engine(model, block_size=4, num_blocks=14, max_batch_size=4)  # far less than 4 x 41 tokens
    assert engine.generate(PROMPTS, RequestOptions(max_new_tokens=24)) == expected
    assert engine.stats().preemptions_total > 0 and engine.stats().kv_blocks_used == 0


def test_requests_join_and_leave_between_steps():
    model = build()
    engine = Engine(model, block_size=4)
    out: dict[str, list[int]] = {}

    def collect(e: TokenEvent):
        if e.token_id is not None:
            out.setdefault(e.request_id, []).append(e.token_id)

    short = engine.submit(PROMPTS[0], RequestOptions(max_new_tokens=3), collect)
    long = engine.submit(PROMPTS[1], RequestOptions(max_new_tokens=15), collect)
    for _ in range(5):
        engine.step()
    assert engine.stats().running == 1  # the short one left after 3 tokens
    late = engine.submit(PROMPTS[2], RequestOptions(max_new_tokens=10), collect)
    while engine.step():
        pass
    assert out[short] == alone(model, PROMPTS[0], 3)
    assert out[long] == alone(model, PROMPTS[1], 15)
    assert out[late] == alone(model, PROMPTS[2], 10)


def test_per_request_sampling_matches_the_plain_seeded_path():
    model = build()
    hot = SamplingParams(temperature=1.3, top_k=20, seed=7)
    nucleus = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, seed=3)
    penalised = SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5)
    engine = Engine(model, block_size=8)
    events: dict[str, list[int]] = {}
    ids = [engine.submit(PROMPTS[i], RequestOptions(max_new_tokens=12, sampling=s),
                         lambda e: events.setdefault(e.request_id, []).append(e.token_id))
           for i, s in enumerate([hot, nucleus, penalised])]
    while engine.step():
        pass
    for i, (rid, s) in enumerate(zip(ids, [hot, nucleus, penalised])):
        assert events[rid] == alone(model, PROMPTS[i], 12, s)


def test_events_stream_tokens_then_finish_reasons():
    model = build()
    first = alone(model, PROMPTS[0], 6)
    eos = first[3]
    engine = Engine(model)
    events: list[TokenEvent] = []
    engine.submit(PROMPTS[0], RequestOptions(max_new_tokens=6, eos_token_ids=(eos,)), events.append)
    engine.submit(PROMPTS[3], RequestOptions(max_new_tokens=2), events.append)
    while engine.step():
        pass
    by_req = {}
    for e in events:
        by_req.setdefault(e.request_id, []).append(e)
    stopped, capped = by_req.values()
    assert [e.token_id for e in stopped] == first[: first.index(eos) + 1]
    assert [e.finish_reason for e in stopped] == [None] * first.index(eos) + ["stop"]
    assert [e.finish_reason for e in capped] == [None, "length"]
    assert [e.completion_tokens for e in capped] == [1, 2] and capped[0].prompt_tokens == 1


def test_logprobs_are_the_models_log_softmax():
    model = build()
    engine = Engine(model)
    events: list[TokenEvent] = []
    engine.submit(PROMPTS[0], RequestOptions(max_new_tokens=4, logprobs=3), events.append)
    while engine.step():
        pass
    tokens = [e.token_id for e in events]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([PROMPTS[0] + tokens]))[0].float(), -1)
    for k, e in enumerate(events):
        row = full[len(PROMPTS[0]) - 1 + k]
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        values, ids = row.topk(3)
        assert [t for t, _ in e.top_logprobs] == ids.tolist()
        assert [v for _, v in e.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)


def test_logits_processor_steers_one_request_only():
    model = build()
    engine = Engine(model)

    def odd_only(generated, logits):
        assert generated.shape[0] == 1 and logits.shape == (1, 96)
        return logits.masked_fill(torch.arange(96) % 2 == 0, float("-inf"))

    steered, plain = engine.generate([PROMPTS[0]], RequestOptions(max_new_tokens=8, logits_processor=odd_only))[0], \
        engine.generate([PROMPTS[0]], RequestOptions(max_new_tokens=8))[0]
    assert all(t % 2 == 1 for t in steered) and plain == alone(model, PROMPTS[0], 8)


def test_cancel_frees_blocks_and_reports():
    model = build()
    engine = Engine(model, block_size=4)
    events: list[TokenEvent] = []
    rid = engine.submit(PROMPTS[2], RequestOptions(max_new_tokens=50), events.append)
    queued = engine.submit(PROMPTS[0], RequestOptions(max_new_tokens=5), events.append)
    engine.step()
    engine.cancel(rid)
    engine.cancel(queued)
    assert not engine.step()
    finals = [e for e in events if e.finish_reason]
    assert {(e.request_id, e.finish_reason, e.token_id) for e in finals} == {(rid, "cancelled", None),
                                                                             (queued, "cancelled", None)}
    assert engine.stats().kv_blocks_used == 0


def test_full_queue_rejects_with_retry_after_and_bad_requests_are_named():
    engine = Engine(build(), max_waiting=2)
    for _ in range(2):
        engine.submit([1, 2], RequestOptions(max_new_tokens=2), lambda e: None)
    with pytest.raises(QueueFull) as full:
        engine.submit([1, 2], RequestOptions(max_new_tokens=2), lambda e: None)
    assert full.value.retry_after > 0
    for prompt, opts, msg in [([], RequestOptions(), "empty"), ([1] * 100, RequestOptions(max_new_tokens=40), "context"),
                              ([1], RequestOptions(max_new_tokens=0), "max_new_tokens"),
                              ([1], RequestOptions(logprobs=21), "logprobs"),
                              ([500], RequestOptions(max_new_tokens=2), "token ids"),
                              ([1], RequestOptions(sampling=SamplingParams(top_p=0)), "top_p")]:
        with pytest.raises(ValueError, match=msg):
            engine.submit(prompt, opts, lambda e: None)


def test_background_thread_serves_concurrent_submitters():
    model = build()
    engine = Engine(model, max_batch_size=3, block_size=4)
    engine.start()
    results, done = {}, threading.Barrier(len(PROMPTS) + 1)

    def client(i):
        got, finished = [], threading.Event()

        def on_event(e):
            if e.token_id is not None:
                got.append(e.token_id)
            if e.finish_reason:
                finished.set()

        engine.submit(PROMPTS[i], RequestOptions(max_new_tokens=10), on_event)
        finished.wait(30)
        results[i] = got
        done.wait()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    done.wait()
    engine.close()
    assert results == {i: alone(model, p, 10) for i, p in enumerate(PROMPTS)}


# ----------------------------------------------------------------------------- prefix caching

SYSTEM = list(range(20, 41))  # 21 tokens: five whole blocks of 4 and one token more
QUESTIONS = [SYSTEM + [3, 1, 4], SYSTEM + [2, 7], SYSTEM + [9] * 6]


def run_with_logprobs(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    events: list[TokenEvent] = []
    engine.submit(prompt, RequestOptions(max_new_tokens=n, logprobs=0), events.append)
    while engine.step():
        pass
    return [e.token_id for e in events], [e.logprob for e in events]


@pytest.mark.parametrize("fields", [dict(), dict(position="alibi"), dict(sliding_window=6),
                                    dict(position="learned"), dict(n_kv_head=1)],
                         ids=["llama-gqa", "alibi", "sliding-window", "learned", "mqa"])
def test_prefix_cache_reuses_shared_blocks_with_the_same_logits(fields):
    model = build(**fields)
    expected = [alone(model, p, 12) for p in QUESTIONS]  # before an engine attaches its paged cache to the model
    cached, plain = Engine(model, block_size=4), Engine(build(**fields), block_size=4, prefix_caching=False)
    for k, prompt in enumerate(QUESTIONS):
        tokens, logprobs = run_with_logprobs(cached, prompt, 12)
        ref_tokens, ref_logprobs = run_with_logprobs(plain, prompt, 12)
        assert tokens == ref_tokens == expected[k]
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-5)
        # the first request computes everything; later ones reuse the five whole blocks of the shared prefix
        assert cached.stats().prefix_cache_hits_total == 20 * k
    stats = cached.stats()
    assert stats.prefix_cache_queries_total == sum(map(len, QUESTIONS)) and stats.kv_blocks_used == 0
    assert stats.kv_blocks_cached > 0 and plain.stats().kv_blocks_cached == 0


def test_a_follow_up_turn_reuses_the_reply_blocks_too():
    model, twin = build(), build()
    engine = Engine(model, block_size=4)
    first = QUESTIONS[0]
    reply = engine.generate([first], RequestOptions(max_new_tokens=13))[0]
    follow_up = first + reply + [5, 6]  # 24 prompt + 13 reply + 2: blocks up to the reply's last full one
    hits = engine.stats().prefix_cache_hits_total
    assert engine.generate([follow_up], RequestOptions(max_new_tokens=8))[0] == alone(twin, follow_up, 8)
    assert engine.stats().prefix_cache_hits_total - hits == 36  # (24 + 13 - 1) // 4 blocks: the reply's last
    # token was sampled, never fed back, so its block was not full


def test_cached_blocks_are_evicted_when_the_pool_needs_them():
    model, twin = build(), build()
    engine = Engine(model, block_size=4, num_blocks=12, max_batch_size=2)
    assert engine.generate([QUESTIONS[0]], RequestOptions(max_new_tokens=8))[0] == alone(twin, QUESTIONS[0], 8)
    assert engine.stats().kv_blocks_cached == 7  # 24 + 8 tokens, the last never fed back: 7 full blocks
    other = list(range(50, 90))  # 40 tokens + 4 new: 11 blocks, 5 free and 6 evicted from the 7 cached
    assert engine.generate([other], RequestOptions(max_new_tokens=4))[0] == alone(twin, other, 4)
    assert engine.stats().kv_blocks_used == 0
    hits = engine.stats().prefix_cache_hits_total
    assert engine.generate([QUESTIONS[1]], RequestOptions(max_new_tokens=8))[0] == alone(twin, QUESTIONS[1], 8)
    # a finished request's tail blocks go first: only the shared prefix's first block survived the eviction
    assert engine.stats().prefix_cache_hits_total == hits + 4


def test_identical_prompts_in_one_prefill_and_preemption_stay_exact():
    model = build()
    expected = alone(model, QUESTIONS[2], 16)
    engine = Engine(model, block_size=4, num_blocks=16, max_batch_size=3)  # too few blocks for three at once
    assert engine.generate([QUESTIONS[2]] * 3, RequestOptions(max_new_tokens=16)) == [expected] * 3
    assert engine.stats().preemptions_total > 0 and engine.stats().kv_blocks_used == 0
    hits = engine.stats().prefix_cache_hits_total
    assert engine.generate([QUESTIONS[2]], RequestOptions(max_new_tokens=16)) == [expected]
    assert engine.stats().prefix_cache_hits_total - hits == 24  # (27 - 1) // 4 blocks


def test_a_prefix_lm_never_reuses_blocks():
    engine = Engine(build(mask="prefix"), block_size=4)
    engine.generate([QUESTIONS[0], QUESTIONS[1]], RequestOptions(max_new_tokens=4))
    engine.generate([QUESTIONS[0]], RequestOptions(max_new_tokens=4))
    assert not engine.prefix_caching and engine.stats().prefix_cache_hits_total == 0


def test_block_allocator_counts_references_and_evicts_least_recently_used():
    from llmkit.infer.paged import BlockAllocator

    pool = BlockAllocator(4)
    a = pool.allocate(3)
    tokens = [1, 2, 3, 4, 5, 6]  # blocks of 2: [1, 2] [3, 4] [5, 6]
    uid = pool.register(a, tokens, 0, 2, 0)
    shared, shared_uid = pool.match(tokens, 2, 3)
    assert shared == a and shared_uid == uid and pool.free == 1  # held twice now, nothing idle
    pool.release(a)
    assert pool.free == 1 and pool.cached == 0  # still held once
    pool.release(shared)
    assert pool.free == 4 and pool.cached == 3  # idle but cached: counted as free
    assert pool.match([1, 2, 3, 9], 2, 2) == ([a[0]], pool.match([1, 2], 2, 1)[1])  # the longest common prefix
    pool.release([a[0]] * 2)
    taken = pool.allocate(2)  # one free block, then the least recently used idle one: the tail [5, 6]
    assert a[2] in taken and pool.match(tokens, 2, 3)[0] == a[:2]
    pool.release(a[:2])
    assert pool.allocate(4) is None and pool.free == 2
    pool.release(taken)
    pool.allocate(4)  # evicts [1, 2] and [3, 4]: a new [3, 4] block under a new [1, 2] never matches the old child
    assert pool.match(tokens, 2, 3) == ([], 0)


# ----------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("fields", [dict(), dict(position="alibi"), dict(sliding_window=6), dict(mask="prefix")],
                         ids=["llama-gqa", "alibi", "sliding-window", "prefix-lm"])
def test_chunked_prefill_gives_the_same_tokens_and_logprobs(fields):
    model = build(**fields)
    prompts = PROMPTS + [list(range(1, 60))]
    expected = [alone(model, p, 10) for p in prompts]
    chunked = Engine(model, block_size=4, max_prefill_tokens=5)  # every prompt over 5 tokens takes several steps
    whole = Engine(build(**fields), block_size=4)
    assert chunked.generate(prompts, RequestOptions(max_new_tokens=10)) == expected
    for prompt in prompts:
        tokens, logprobs = run_with_logprobs(chunked, prompt, 6)
        ref_tokens, ref_logprobs = run_with_logprobs(whole, prompt, 6)
        assert tokens == ref_tokens and logprobs == pytest.approx(ref_logprobs, abs=1e-5)


def test_a_long_prompt_does_not_stall_requests_already_decoding():
    model, twin = build(), build()
    engine = Engine(model, block_size=4, max_prefill_tokens=8)
    steps: dict[str, list[int]] = {}
    step = [0]

    def record(e: TokenEvent):
        if e.token_id is not None:
            steps.setdefault(e.request_id, []).append(step[0])

    short = engine.submit(PROMPTS[0], RequestOptions(max_new_tokens=30), record)
    engine.step()
    long_prompt = list(range(1, 81))  # 80 tokens: ten steps of 8
    long = engine.submit(long_prompt, RequestOptions(max_new_tokens=3), record)
    while engine.step():
        step[0] += 1
    # the short request got a token in every step while the long prompt was prefilled chunk by chunk
    assert steps[short][:12] == [0, 0] + list(range(10)) and steps[long][0] == 9
    assert len(steps[short]) == 30 and len(steps[long]) == 3
    tokens = engine.generate([long_prompt], RequestOptions(max_new_tokens=3))[0]
    assert tokens == alone(twin, long_prompt, 3)


def test_a_failing_logits_processor_ends_only_its_own_request():
    model, twin = build(), build()
    engine = Engine(model, block_size=4)
    calls = [0]

    def breaks_on_the_third_token(generated, logits):
        calls[0] += 1
        if calls[0] == 3:
            raise ValueError("token breaks the grammar")
        return logits

    events: dict[str, list[TokenEvent]] = {}
    bad = engine.submit(PROMPTS[0], RequestOptions(max_new_tokens=8, logits_processor=breaks_on_the_third_token),
                        lambda e: events.setdefault(e.request_id, []).append(e))
    good = engine.submit(PROMPTS[1], RequestOptions(max_new_tokens=8),
                         lambda e: events.setdefault(e.request_id, []).append(e))
    while engine.step():
        pass
    assert [e.finish_reason for e in events[bad]] == [None, None, "error"]
    assert [e.token_id for e in events[good]] == alone(twin, PROMPTS[1], 8)
    assert engine.stats().kv_blocks_used == 0


def test_choices_of_one_prompt_wait_for_the_first_prefill_and_share_it():
    model = build()
    engine, plain = Engine(model, block_size=4), Engine(build(), block_size=4, prefix_caching=False)
    prompt = QUESTIONS[2]  # 27 tokens: 6 whole blocks can be shared
    samplings = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]

    def run(e: Engine) -> list[list[int]]:
        out: dict[str, list[int]] = {}
        ids = [e.submit(prompt, RequestOptions(max_new_tokens=10, sampling=s),
                        lambda ev: out.setdefault(ev.request_id, []).append(ev.token_id)) for s in samplings]
        while e.step():
            pass
        return [out[i] for i in ids]

    assert run(engine) == run(plain)  # n seeded choices at once: the same samples, cache or not
    stats = engine.stats()
    assert stats.prefix_cache_hits_total == 3 * 24  # the first choice computed the prompt, three reused it
    assert stats.kv_blocks_used == 0


def test_int8_kv_cache_keeps_the_tokens_in_about_a_quarter_of_the_bytes():
    from llmkit.infer.paged import PagedKVCache

    model, twin = build(), build()
    full, int8 = Engine(model, block_size=4), Engine(twin, block_size=4, kv_cache_dtype="int8")
    for prompt in PROMPTS + QUESTIONS:
        tokens, logprobs = run_with_logprobs(full, prompt, 12)
        q_tokens, q_logprobs = run_with_logprobs(int8, prompt, 12)
        assert q_tokens == tokens
        # per-token, per-head absmax int8: keys and values within 0.4% of their largest entry
        assert q_logprobs == pytest.approx(logprobs, abs=2e-2)
    caches = [m for m in twin.modules() if isinstance(m, PagedKVCache)]
    fp_caches = [m for m in model.modules() if isinstance(m, PagedKVCache)]
    D = model.config.head_dim  # an int8 per entry plus one fp32 scale per token and head, against fp32 entries
    assert sum(c.bytes() for c in caches) / sum(c.bytes() for c in fp_caches) == pytest.approx((D + 4) / (4 * D))
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(build(), kv_cache_dtype="fp4")
