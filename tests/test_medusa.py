"""Medusa: tree mask and positions, tree verification against paths run alone, greedy output equal to plain
greedy (random and trained heads, several architectures), typical acceptance by hand, training through the CLI."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.medusa import (MedusaError, MedusaHeads, MedusaTrainer, TokenTree, _Acceptance, _TreeDecoder,
                                 best_path, load_heads, medusa_generate, medusa_loss, save_heads, sparse_tree,
                                 tree_attention, tree_tokens, typical_accept)
from llmkit.infer.medusa_commands import MedusaTrainConfig
from llmkit.infer.sampling import SamplingParams
from llmkit.model import Transformer, alibi_slopes
from llmkit.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATHS = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (2, 0)]
ARCHS = {"gqa-rope": {}, "alibi": dict(position="alibi"), "learned": dict(position="learned", n_kv_head=4),
         "sliding": dict(sliding_window=6), "gpt2": "tiny-gpt2"}


def tiny_model(arch: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    spec = ARCHS[arch]
    cfg = ModelConfig.from_preset(spec) if isinstance(spec, str) else ModelConfig.from_preset("tiny", **spec)
    return Transformer(cfg).eval()


def random_heads(model: Transformer, num_heads: int = 3, scale: float = 0.3) -> MedusaHeads:
    """Heads whose residual blocks are random (not the identity they start as), so every head guesses differently."""
    heads = MedusaHeads.for_model(model, num_heads)
    with torch.no_grad():
        for head in heads.heads:
            head[0].linear.weight.normal_(0, scale)
    return heads.eval()


# ----------------------------------------------------------------------------- the tree


def test_tree_mask_and_positions_match_a_naive_construction():
    tree = TokenTree.from_paths(PATHS)
    cur, n_keys = 5, 5 + tree.size + 3
    mask, positions = tree_attention(tree, cur, n_keys)
    assert mask.shape == (1, 1, tree.size, n_keys)
    for i, path_i in enumerate(tree.paths):
        assert int(positions[0, i]) == cur + len(path_i)
        for j in range(n_keys):
            if j < cur:
                want = True
            elif j < cur + tree.size:  # a tree key is visible when its path is a prefix of the query's
                path_j = tree.paths[j - cur]
                want = path_i[: len(path_j)] == path_j
            else:
                want = False
            assert bool(mask[0, 0, i, j]) == want, (i, j)


def test_tree_structure_parents_and_leaf_paths():
    tree = TokenTree.from_paths(PATHS)
    assert tree.paths[0] == () and tree.size == len(PATHS) + 1 and tree.depth == 3
    for i, path in enumerate(tree.paths[1:], 1):
        assert tree.paths[int(tree.parents[i])] == path[:-1]
    leaves = {tree.paths[int(row[(row < tree.size).sum() - 1])] for row in tree.leaf_paths}
    assert leaves == {(2, 0), (1, 0), (0, 0, 0), (0, 1, 0)}
    with pytest.raises(MedusaError, match=r"no parent \[0, 5\]"):
        TokenTree.from_paths([(0,), (0, 5, 1)])


def test_sparse_tree_keeps_the_most_likely_paths():
    acc = [[0.5, 0.7, 0.8], [0.35, 0.5, 0.58], [0.2, 0.31, 0.36]]
    rank_p = [[row[0]] + [b - a for a, b in zip(row, row[1:])] for row in acc]
    every = [p for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)]
    prob = {p: math.prod(rank_p[d][r] for d, r in enumerate(p)) for p in every}
    best = sorted(every, key=lambda p: -prob[p])[:12]
    tree = sparse_tree(acc, size=13)
    assert set(tree.paths[1:]) == set(best)


def test_tree_tokens_take_each_heads_ranked_guess():
    tree = TokenTree.from_paths(PATHS)
    head_logits = torch.randn(3, 50)
    tokens = tree_tokens(torch.tensor(7), head_logits, tree)
    order = head_logits.argsort(dim=-1, descending=True)
    assert int(tokens[0]) == 7
    for i, path in enumerate(tree.paths[1:], 1):
        assert int(tokens[i]) == int(order[len(path) - 1, path[-1]])


# ----------------------------------------------------------------------------- verification


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tree_logits_equal_each_path_run_alone(arch):
    model = tiny_model(arch)
    tree = TokenTree.from_paths(PATHS)
    prompt = torch.randint(0, model.config.vocab_size, (1, 9))
    tokens = torch.randint(0, model.config.vocab_size, (tree.size,))
    cur = prompt.shape[1]
    decoder = _TreeDecoder(model, random_heads(model), tree, _Acceptance(GenerationConfig(), 0.09, 0.3, None), False)
    with torch.no_grad():
        decoder.setup_cache(cur + tree.size)
        model.model(prompt, slots=torch.arange(cur), kv_len=cur)
        logits, _ = decoder.verify(tokens, torch.tensor(cur), cur + tree.size)
        model.clear_cache()
        for i in range(tree.size):
            chain = [i]
            while tree.parents[chain[-1]] >= 0:
                chain.append(int(tree.parents[chain[-1]]))
            alone = model(torch.cat([prompt[0], tokens[chain[::-1]]])[None])[0, -1]
            assert torch.allclose(logits[i], alone, atol=1e-5), (arch, i)


def test_alibi_tree_mask_carries_the_position_bias():
    tree = TokenTree.from_paths(PATHS)
    slopes = alibi_slopes(4)
    mask, positions = tree_attention(tree, 3, 3 + tree.size, slopes)
    i = tree.paths.index((0, 1, 0))
    j = 3 + tree.paths.index((0,))  # an ancestor at position 4, seen from position 6
    assert torch.allclose(mask[0, :, i, j], -slopes * 2)
    assert torch.isinf(mask[0, :, i, 3 + tree.paths.index((1,))]).all()


def test_best_path_is_the_longest_right_prefix():
    tree = TokenTree.from_paths(PATHS)
    ok = torch.zeros(tree.size, dtype=torch.bool)
    for path in [(), (0,), (0, 1), (0, 1, 0), (2,), (0, 0)]:
        ok[tree.paths.index(path)] = True
    path, length = best_path(tree, ok, torch.zeros(tree.size))
    assert [tree.paths[int(i)] for i in path[:length]] == [(), (0,), (0, 1), (0, 1, 0)]
    ok[tree.paths.index((0, 1, 0))] = False  # now two paths of 3 nodes: the more likely one wins, padded to D+1
    logp = torch.zeros(tree.size)
    logp[tree.paths.index((0, 0))] = -0.1
    logp[tree.paths.index((0, 1))] = -2.0
    path, length = best_path(tree, ok, logp)
    assert int(length) == 3 and [tree.paths[int(i)] for i in path] == [(), (0,), (0, 0), (0, 0)]


# ----------------------------------------------------------------------------- acceptance


def _typical_by_hand(probs: list[float], token: int, eps: float, delta: float) -> bool:
    entropy = -sum(p * math.log(p) for p in probs)
    return probs[token] > min(eps, delta * math.exp(-entropy))


def test_typical_acceptance_equals_hand_computation():
    cases = [[0.5, 0.3, 0.12, 0.08], [0.7, 0.2, 0.1], [1 / 20] * 20]
    for probs in cases:
        logits = torch.tensor(probs).log()
        for token in range(len(probs)):
            got = bool(typical_accept(logits, torch.tensor(token), temperature=1.0))
            assert got == _typical_by_hand(probs, token, 0.09, 0.3), (probs, token)
    # 0.5/0.3/0.12/0.08: H = 1.1643, 0.3 exp(-H) = 0.0936, so the bar is epsilon = 0.09: 0.12 passes, 0.08 fails
    four = torch.tensor(cases[0]).log()
    assert typical_accept(four.expand(2, -1), torch.tensor([2, 3]), 1.0).tolist() == [True, False]
    # a uniform 20-way target: H = ln 20, bar 0.3 / 20 = 0.015 < 0.05: every token is typical
    assert bool(typical_accept(torch.zeros(20), torch.tensor(13), 1.0))
    # temperature flattens first: logits [2, 0] at T=2 are p = [0.731, 0.269]
    probs = [1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))]
    assert bool(typical_accept(torch.tensor([2.0, 0.0]), torch.tensor(1), 2.0, epsilon=0.3, delta=0.5)) == \
        _typical_by_hand(probs, 1, 0.3, 0.5)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_medusa_equals_plain_greedy_with_random_heads(arch):
    model = tiny_model(arch)
    heads = random_heads(model)
    prompts = [[1, 2, 3, 4, 5], [9, 8], list(range(20, 33))]
    gen = GenerationConfig(max_new_tokens=30)
    out = medusa_generate(model, heads, prompts, gen, tree=TokenTree.from_paths(PATHS))
    assert out.tokens == generate(model, prompts, gen)
    assert out.stats.new_tokens == 90 and out.stats.forwards < 90 + 3


@pytest.fixture(scope="module")
def periodic() -> tuple[Transformer, MedusaHeads, list[int]]:
    """A tiny base trained on one repeating 13-token sequence and heads trained on it: most guesses are right."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's one_thread: a second thread only waits here
    torch.manual_seed(0)
    pattern = torch.randperm(200)[:13]
    data = pattern.repeat(40)
    model = Transformer(ModelConfig.from_preset("tiny", n_layer=1, max_seq_len=512))
    heads = MedusaHeads.for_model(model, 3)
    for params, step in ((model.parameters(), lambda x, y: model(x)), (heads.parameters(), None)):
        opt = torch.optim.AdamW(params, lr=3e-3)
        for _ in range(60):
            start = torch.randint(0, len(data) - 33, (8,))
            window = torch.stack([data[s: s + 33] for s in start])
            x, y = window[:, :-1], window[:, 1:]
            if step is not None:
                loss = torch.nn.functional.cross_entropy(step(x, y).flatten(0, 1), y.flatten())
            else:
                with torch.no_grad():
                    hidden = model.model(x)
                loss = medusa_loss(heads(hidden), y, 0.8)[0] / y.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval(), heads.eval(), pattern.tolist()


def test_greedy_medusa_equals_plain_greedy_with_trained_heads(periodic):
    model, heads, pattern = periodic
    prompts = [pattern[:5], pattern[3:11]]
    gen = GenerationConfig(max_new_tokens=48, eos_token_ids=(pattern[9],))
    out = medusa_generate(model, heads, prompts, gen, tree=TokenTree.from_paths(PATHS))
    assert out.tokens == generate(model, prompts, gen)
    long = medusa_generate(model, heads, prompts, GenerationConfig(max_new_tokens=60), tree_size=16)
    assert long.tokens == generate(model, prompts, GenerationConfig(max_new_tokens=60))
    assert long.stats.mean_accepted > 2.5 and long.stats.tokens_per_forward > 2.5
    assert long.stats.to_dict()["acceptance_by_depth"][0] > 0.8


@pytest.mark.slow  # torch.compile of the tree pass and the acceptance step: 15-80 s on 2 shared CPU cores
def test_compiled_medusa_equals_plain_greedy(periodic):
    model, heads, pattern = periodic
    prompts = [pattern[:5], pattern[2:4]]
    gen = GenerationConfig(max_new_tokens=24, compile=True)
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (0, 0, 0)])
    out = medusa_generate(model, heads, prompts, gen, tree=tree)
    assert out.tokens == generate(model, prompts, GenerationConfig(max_new_tokens=24))
    assert out.stats.mean_accepted > 2


def test_sampling_is_seeded_and_accepts_typical_tokens(periodic):
    model, heads, pattern = periodic
    gen = GenerationConfig(max_new_tokens=40, sampling=SamplingParams(temperature=0.7, top_k=20, seed=3))
    first = medusa_generate(model, heads, [pattern[:5]], gen)
    assert first.tokens == medusa_generate(model, heads, [pattern[:5]], gen).tokens
    assert len(first.tokens[0]) == 40 and first.stats.mean_accepted > 1.5


def test_unsupported_options_are_refused():
    model = tiny_model("gqa-rope")
    heads = random_heads(model, 2)
    with pytest.raises(MedusaError, match="repetition_penalty"):
        medusa_generate(model, heads, [[1, 2]], GenerationConfig(sampling=SamplingParams(0.0, repetition_penalty=1.2)))
    with pytest.raises(MedusaError, match="3 levels deep but there are only 2 heads"):
        medusa_generate(model, heads, [[1, 2]], tree=TokenTree.from_paths(PATHS))


# ----------------------------------------------------------------------------- heads on disk and training


def test_heads_round_trip_and_refuse_another_model(tmp_path):
    model = tiny_model("gqa-rope")
    heads = random_heads(model)
    save_heads(heads, tmp_path / "heads")
    again = load_heads(tmp_path / "heads", model)
    x = torch.randn(2, 64)
    assert torch.equal(heads(x), again(x))
    other = Transformer(ModelConfig.from_preset("tiny", d_model=32, d_ff=64)).eval()
    with pytest.raises(MedusaError, match=r"medusa_config.json: field 'hidden_size' is 64 but the base model's is 32"):
        load_heads(tmp_path / "heads", other)
    with pytest.raises(MedusaError, match="no medusa_config.json"):
        load_heads(tmp_path, model)
    config = json.loads((tmp_path / "heads" / "medusa_config.json").read_text())
    (tmp_path / "heads" / "medusa_config.json").write_text(json.dumps({**config, "num_heads": 4}))
    with pytest.raises(MedusaError, match=r"medusa_heads.safetensors: tensor 'heads.3.0.linear.weight' is missing"):
        load_heads(tmp_path / "heads", model)
    (tmp_path / "heads" / "medusa_config.json").write_text(json.dumps({"num_heads": 4}))
    with pytest.raises(MedusaError, match="field 'num_layers' is missing"):
        load_heads(tmp_path / "heads", model)


def test_loss_targets_are_shifted_per_head():
    labels = torch.tensor([[3, 1, 4, 1, 5, -100]])
    logits = torch.full((2, 1, 6, 8), -20.0)
    for k in range(2):  # make head k exactly right where it has a target: labels[i + k + 1]
        for i in range(6 - k - 1):
            if labels[0, i + k + 1] >= 0:
                logits[k, 0, i, labels[0, i + k + 1]] = 20.0
    loss, hits, counts = medusa_loss(logits, labels, 0.8)
    assert counts.tolist() == [4, 3] and hits[:, 0].tolist() == [4, 3] and float(loss) < 1e-6


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("medusa")
    corpus = root / "corpus.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:40_000])
    tok = train_tokenizer([corpus], "byte-bpe", 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    return llmkit.save(model, tok, root / "base")


def test_cli_train_then_generate(base_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join((DATA / "tinyshakespeare.txt").read_text()[40_000:52_000].split("\n\n")[:60]))
    out = tmp_path / "run"
    code = main(["medusa", "train", "--model", str(base_dir), "--data", str(text), "--out", str(out),
                 "--num-heads", "3", "--max-steps", "40", "--micro-batch-size", "8", "--max-seq-len", "64",
                 "--eval-every", "0", "--eval-batches", "4", "--save-every", "20", "--warmup-steps", "2",
                 "--lr", "3e-3", "--val-fraction", "0.2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 40 and records[-1]["loss"] < records[0]["loss"] and "head2_acc" in records[0]
    assert summary["val_loss"] < summary["val_loss_start"]
    assert all(a > b for a, b in zip(summary["val_head_acc"], summary["val_head_acc_start"]))
    config = json.loads((out / "medusa_config.json").read_text())
    assert config["num_heads"] == 3 and len(config["topk_accuracy"]) == 3 and len(config["topk_accuracy"][0]) == 10
    model, tok = llmkit.load(base_dir)
    heads = load_heads(out, model)
    gen = GenerationConfig(max_new_tokens=20)
    prompt = tok.encode("ROMEO:")
    assert medusa_generate(model, heads, [prompt], gen).tokens == generate(model, [prompt], gen)
    code = main(["medusa", "generate", "--model", str(base_dir), "--heads", str(out), "--prompt", "ROMEO:",
                 "--max-new-tokens", "12", "--json", "--tree-size", "24"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == tok.decode(generate(model, [prompt], GenerationConfig(12, eos_token_ids=(tok.eos_id,)))[0],
                                        skip_special_tokens=True)
    assert result["new_tokens"] <= 12 and result["mean_accepted"] >= 1.0


def test_training_resumes_exactly(base_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join((DATA / "tinyshakespeare.txt").read_text()[52_000:60_000].split("\n\n")[:30]))
    cfg = MedusaTrainConfig(model=str(base_dir), data=str(text), num_heads=2, max_steps=4, micro_batch_size=4,
                            max_seq_len=48, eval_every=0, save_every=2, warmup_steps=1, val_fraction=0.1)

    def records(run: Path) -> list[tuple]:
        return [(r["loss"], r["head1_acc"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    MedusaTrainer(cfg, tmp_path / "straight").fit()

    def kill(step: int, record: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        MedusaTrainer(cfg, tmp_path / "resumed", on_step=kill).fit()
    MedusaTrainer(cfg, tmp_path / "resumed", resume=True).fit()
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")
    x = torch.randn(3, 64)
    model, _ = llmkit.load(base_dir)
    straight, resumed = load_heads(tmp_path / "straight", model), load_heads(tmp_path / "resumed", model)
    assert torch.equal(straight(x), resumed(x))


def test_self_distillation_trains_on_the_base_own_continuations(base_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join((DATA / "tinyshakespeare.txt").read_text()[60_000:64_000].split("\n\n")[:12]))
    cfg = MedusaTrainConfig(model=str(base_dir), data=str(text), num_heads=2, max_steps=2, micro_batch_size=4,
                            max_seq_len=48, eval_every=0, warmup_steps=1, val_fraction=0.2, self_distill=10,
                            distill_prompt_tokens=6)
    trainer = MedusaTrainer(cfg, tmp_path / "run")
    example = trainer.train_data.examples[0]
    prompt = example.input_ids[:6]
    eos = (trainer.tokenizer.eos_id,) if trainer.tokenizer.eos_id is not None else ()
    reply = generate(trainer.base, [prompt], GenerationConfig(max_new_tokens=10, eos_token_ids=eos))[0]
    assert example.input_ids == (prompt + reply)[:-1] and example.labels == [-100] * 5 + reply
    assert len(trainer.val_examples) == 2 and math.isfinite(trainer.fit()["loss"])


def test_cli_refuses_heads_for_another_model(base_dir, tmp_path, capsys):
    other = Transformer(ModelConfig.from_preset("tiny", d_model=32, d_ff=64)).eval()
    save_heads(random_heads(other, 2), tmp_path / "heads")
    code = main(["medusa", "generate", "--model", str(base_dir), "--heads", str(tmp_path / "heads"), "--prompt", "A"])
    assert code == 2
    err = capsys.readouterr().err
    assert "llmkit medusa generate: error:" in err and "'hidden_size' is 32 but the base model's is 64" in err
