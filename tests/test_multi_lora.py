"""Several LoRA adapters served on one base model: each request's output equals its adapter merged into the base."""

from pathlib import Path

import openai
import pytest
import torch

from llmkit import peft
from llmkit.config import ModelConfig
from llmkit.infer.engine import Engine, RequestOptions, TokenEvent
from llmkit.infer.generate import GenerationConfig, generate
from llmkit.infer.multi_lora import attach_adapters
from llmkit.model import Transformer
from llmkit.peft.core import PeftError, peft_layers
from llmkit.peft.lora import LoraConfig
from llmkit.serve import ServerConfig, ServerThread, create_app
from llmkit.serve.commands import lora_dirs
from llmkit.tokenizer import train_tokenizer

BASE = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=128)
SHARED = list(range(20, 41))  # a prefix long enough to fill blocks of 4
PROMPTS = [SHARED + [3, 1, 4], SHARED + [2, 7], [5, 9, 3]]
ADAPTERS = {"wide": LoraConfig(r=4, alpha=8.0, target_modules="all-linear"),
            "narrow": LoraConfig(r=2, alpha=4.0, rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])}


def build() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**BASE)).eval()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, str]:
    """Two trained-looking adapters (random A and B, so each changes the output), saved in PEFT's layout."""
    out = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        model = peft.apply(build(), cfg)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for _, layer in peft_layers(model):
                layer.lora_B.weight.normal_(0, 0.3)
        out[name] = str(peft.save_adapter(model, tmp_path_factory.mktemp(name) / "adapter"))
    return out


def merged(path: str) -> Transformer:
    return peft.merge_and_unload(peft.load_adapter(build(), path)).eval()


def greedy(model: Transformer, prompt: list[int], n: int = 12) -> list[int]:
    return generate(model, [prompt], GenerationConfig(max_new_tokens=n))[0]


def test_each_request_gets_its_own_adapter_in_one_batch(adapter_dirs):
    references = {0: build(), 1: merged(adapter_dirs["wide"]), 2: merged(adapter_dirs["narrow"])}
    expected = {(a, i): greedy(m, p) for a, m in references.items() for i, p in enumerate(PROMPTS)}
    assert expected[(1, 0)] != expected[(0, 0)] != expected[(2, 0)]  # the adapters do change the output
    model, names = attach_adapters(build(), adapter_dirs)
    assert names == ["wide", "narrow"]
    engine = Engine(model, block_size=4)
    got: dict[str, list[int]] = {}
    ids = {(a, i): engine.submit(p, RequestOptions(max_new_tokens=12, adapter=a),
                                 lambda e: got.setdefault(e.request_id, []).append(e.token_id))
           for a in references for i, p in enumerate(PROMPTS)}  # nine rows in one batch, three adapters mixed
    while engine.step():
        pass
    assert {key: got[rid] for key, rid in ids.items()} == expected
    # a second round: the prefix cache keeps each adapter's blocks apart (a shared block would change tokens)
    hits = engine.stats().prefix_cache_hits_total
    again = engine.generate([PROMPTS[1]], RequestOptions(max_new_tokens=12, adapter=2))[0]
    assert again == expected[(2, 1)] and engine.stats().prefix_cache_hits_total > hits


def test_logprobs_match_the_merged_model(adapter_dirs):
    reference = merged(adapter_dirs["narrow"])
    model, _ = attach_adapters(build(), adapter_dirs)
    engine = Engine(model, block_size=4)
    events: list[TokenEvent] = []
    engine.submit(PROMPTS[0], RequestOptions(max_new_tokens=6, logprobs=0, adapter=2), events.append)
    while engine.step():
        pass
    tokens = [e.token_id for e in events]
    with torch.no_grad():
        full = torch.log_softmax(reference(torch.tensor([PROMPTS[0] + tokens]))[0].float(), -1)
    expected = [float(full[len(PROMPTS[0]) - 1 + k, t]) for k, t in enumerate(tokens)]
    assert [e.logprob for e in events] == pytest.approx(expected, abs=1e-5)


def test_bad_adapters_are_refused_naming_them(adapter_dirs, tmp_path):
    model, _ = attach_adapters(build(), {"wide": adapter_dirs["wide"]})
    with pytest.raises(ValueError, match="adapter 2 does not exist"):
        Engine(model).submit([1, 2], RequestOptions(max_new_tokens=4, adapter=2), lambda e: None)
    with pytest.raises(ValueError, match="adapter 1 does not exist"):
        Engine(build()).submit([1, 2], RequestOptions(max_new_tokens=4, adapter=1), lambda e: None)
    dora = peft.apply(build(), LoraConfig(r=2, dora=True, method="dora", target_modules=["q_proj"]))
    dora_dir = peft.save_adapter(dora, tmp_path / "dora")
    with pytest.raises(PeftError, match="'d'.*only LoRA"):
        attach_adapters(build(), {"d": dora_dir})
    other = Transformer(ModelConfig(**{**BASE, "d_model": 48, "n_head": 4})).eval()
    with pytest.raises(PeftError, match="adapter 'wide': .* the base layer is"):
        attach_adapters(other, {"wide": adapter_dirs["wide"]})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    corpus.write_text((Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt").read_text()[:20_000])
    tok = train_tokenizer([corpus], "byte-bpe", 300)
    assert tok.vocab_size == BASE["vocab_size"]
    return tok


def test_the_server_routes_each_request_to_the_adapter_its_model_names(adapter_dirs, tokenizer):
    model, _ = attach_adapters(build(), adapter_dirs)
    app = create_app(model, tokenizer, ServerConfig(model_name="base"))
    thread, server = ServerThread(app), app.state.server
    url = thread.start()
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        cards = c.models.list().data
        assert [m.id for m in cards] == ["base", "wide", "narrow"] and cards[1].model_extra["parent"] == "base"
        for name, reference in (("base", build()), ("wide", merged(adapter_dirs["wide"])),
                                ("narrow", merged(adapter_dirs["narrow"]))):
            gen = GenerationConfig(max_new_tokens=8, eos_token_ids=server.eos)
            expected = tokenizer.decode(generate(reference, [PROMPTS[0]], gen)[0], skip_special_tokens=True)
            out = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
            assert out.model == name and out.choices[0].text == expected
        with pytest.raises(openai.NotFoundError, match="'base', 'wide', 'narrow'"):
            c.completions.create(model="nope", prompt=[1, 2], max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="base model"):
            c.embeddings.create(model="wide", input="hi")
    finally:
        thread.stop()
        server.engine.close()
    with pytest.raises(ValueError, match="the served model's own name"):
        create_app(attach_adapters(build(), adapter_dirs)[0], tokenizer, ServerConfig(model_name="wide"))


def test_lora_option_pairs_are_checked(adapter_dirs, tmp_path):
    assert lora_dirs([f"wide={adapter_dirs['wide']}"]) == {"wide": adapter_dirs["wide"]}
    for specs, error in (([adapter_dirs["wide"]], "NAME=DIR"), ([f"a={tmp_path}/none"], "no such adapter"),
                         ([f"a={adapter_dirs['wide']}", f"a={adapter_dirs['narrow']}"], "given twice")):
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            lora_dirs(specs)
