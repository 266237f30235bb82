"""Parity with Hugging Face PEFT: adapters trained here load in PEFT (and PEFT's load here) with the same
logits, and merged models give the unmerged logits. Tolerance 1e-4 in fp32."""

import pytest
import torch
import transformers

import llmkit
from llmkit import peft
from llmkit.peft.adalora import RankAllocator, orthogonal_regularizer
from llmkit.train.objectives import lm_loss

hf_peft = pytest.importorskip("peft")

ATOL = 1e-4
VOCAB = 128


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # HF zero-inits biases; random ones make bias handling (IA3, DoRA) observable
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("hf") / "base"
    model.save_pretrained(out)
    return out


def hf_model(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def ours(base_dir):
    return llmkit.load(base_dir)[0]


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 11, [1] * 8 + [0] * 3])  # right padding


def logits_ours(model, ids=IDS, mask=None):
    model.eval()
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def logits_hf(model, ids=IDS, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def close(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"logits differ by {diff}"
    return diff


def train(model, steps=3, allocator=None, reg=0.0, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, steps + 1):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        if reg:
            loss = loss + reg * orthogonal_regularizer(model)
        loss.backward()
        opt.step()
        if allocator is not None:
            allocator.step(model, step)
        opt.zero_grad()
    model.eval()


LAYER_METHODS = {
    "lora": (lambda: peft.LoraConfig(r=4, alpha=8, target_modules="q_proj,v_proj,o_proj,down_proj"),
             lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
    "rslora": (lambda: peft.LoraConfig(r=4, alpha=8, rslora=True),
               lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    "dora": (lambda: peft.LoraConfig(method="dora", dora=True, r=4, alpha=8, target_modules="q_proj,k_proj,up_proj"),
             lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                        target_modules=["q_proj", "k_proj", "up_proj"])),
    "ia3": (lambda: peft.IA3Config(target_modules="k_proj,v_proj,down_proj", feedforward_modules="down_proj"),
            lambda: hf_peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"])),
    "adalora": (lambda: peft.AdaLoraConfig(init_r=6, target_r=2, total_step=4, target_modules="q_proj,v_proj"),
                lambda: hf_peft.AdaLoraConfig(init_r=6, target_r=2, total_step=4, target_modules=["q_proj", "v_proj"])),
}


@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_trained_here_loads_in_peft(base_dir, tmp_path, method):
    cfg = LAYER_METHODS[method][0]()
    model = peft.apply(ours(base_dir), cfg)
    allocator = RankAllocator(model, cfg) if method == "adalora" else None
    train(model, steps=4 if allocator else 3, allocator=allocator, reg=0.1 if allocator else 0.0)
    if allocator:  # the budget was pruned: PEFT's rank_pattern and cut tensors are what gets saved
        assert sum(int(m.rank_mask.sum()) for _, m in peft.core.peft_layers(model)) == 2 * 4
    peft.save_adapter(model, tmp_path / "adapter")
    theirs = hf_peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    assert (logits_ours(model) - logits_hf(hf_model(base_dir))).abs().max() > 1e-5  # training changed something
    close(logits_ours(model), logits_hf(theirs))
    close(logits_ours(model, mask=MASK), logits_hf(theirs, mask=MASK), MASK)


@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_peft_adapter_loads_here(base_dir, tmp_path, method):
    torch.manual_seed(3)
    theirs = hf_peft.get_peft_model(hf_model(base_dir), LAYER_METHODS[method][1]())
    if method == "adalora":  # let PEFT prune ranks so the saved config has a rank_pattern
        opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
        for step in range(4):
            theirs.train()
            ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))
            theirs(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            theirs.base_model.update_and_allocate(step + 1)
            opt.zero_grad()
    with torch.no_grad():  # move every adapter tensor away from its identity init
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    model = peft.load_adapter(ours(base_dir), tmp_path / "peft")
    reloaded = hf_peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "peft").eval()
    close(logits_ours(model), logits_hf(reloaded))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adalora"])
def test_merge_equals_unmerged_and_saves_a_plain_model(base_dir, tmp_path, method):
    model = peft.apply(ours(base_dir), LAYER_METHODS[method][0]())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    before = logits_ours(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    peft.merge(model)
    close(logits_ours(model), before)
    peft.unmerge(model)  # and back out
    for k, v in model.state_dict().items():
        assert torch.allclose(v, base_weights[k], atol=1e-6), k
    peft.merge_and_unload(model)
    assert not list(peft.core.peft_layers(model))
    llmkit.save(model, None, tmp_path / "merged")
    close(logits_hf(hf_model(tmp_path / "merged")), before)


def test_cli_merge_of_a_peft_adapter(base_dir, tmp_path):
    from llmkit.cli import main

    torch.manual_seed(4)
    theirs = hf_peft.get_peft_model(hf_model(base_dir), hf_peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                            target_modules=["v_proj", "gate_proj"]))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    expected = logits_hf(theirs)
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "peft"),
                 "--out", str(tmp_path / "merged")]) == 0
    close(logits_hf(hf_model(tmp_path / "merged")), expected)


P = 5  # virtual tokens
PROMPT_METHODS = {
    "prompt": (lambda: peft.PromptConfig(method="prompt", num_virtual_tokens=P),
               lambda: hf_peft.PromptTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")),
    "p-tuning": (lambda: peft.PromptConfig(method="p-tuning", num_virtual_tokens=P, encoder_hidden_size=16),
                 lambda: hf_peft.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16,
                                                     task_type="CAUSAL_LM")),
    "prefix": (lambda: peft.PromptConfig(method="prefix", num_virtual_tokens=P, encoder_hidden_size=16),
               lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                  encoder_hidden_size=16, task_type="CAUSAL_LM")),
    "p-tuning-v2": (lambda: peft.PromptConfig(method="p-tuning-v2", num_virtual_tokens=P),
                    lambda: hf_peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")),
}


def real_tokens(logits, method):
    """PEFT returns logits for the virtual tokens of prompt methods too; llmkit only for the real ones."""
    return logits if method in ("prefix", "p-tuning-v2") else logits[:, P:]


@pytest.mark.parametrize("method", list(PROMPT_METHODS))
def test_prompt_methods_trained_here_load_in_peft(base_dir, tmp_path, method):
    model = peft.apply(ours(base_dir), PROMPT_METHODS[method][0]())
    train(model, lr=1e-2)
    peft.save_adapter(model, tmp_path / "adapter")
    theirs = hf_peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    close(logits_ours(model), real_tokens(logits_hf(theirs), method))
    close(logits_ours(model, mask=MASK), real_tokens(logits_hf(theirs, mask=MASK), method), MASK)
    with peft.disabled(model):
        close(logits_ours(model), logits_hf(hf_model(base_dir)))


@pytest.mark.parametrize("method", list(PROMPT_METHODS))
def test_peft_prompt_adapters_load_here(base_dir, tmp_path, method):
    torch.manual_seed(5)
    theirs = hf_peft.get_peft_model(hf_model(base_dir), PROMPT_METHODS[method][1]())
    theirs.eval().save_pretrained(tmp_path / "peft")
    model = peft.load_adapter(ours(base_dir), tmp_path / "peft")
    reloaded = hf_peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "peft").eval()
    close(logits_ours(model), real_tokens(logits_hf(reloaded), method))


def test_prompt_tuning_starts_from_the_init_text(base_dir):
    class CharTokenizer:
        def encode(self, text):
            return [ord(c) % VOCAB for c in text]

    model, tok = ours(base_dir), CharTokenizer()
    tuned = peft.apply(model, peft.PromptConfig(method="prompt", num_virtual_tokens=7, init_text="def close"), tok)
    ids = tok.encode("def close")
    expected = model.model.embed_tokens.weight[torch.tensor((ids * 7)[:7])]
    assert torch.equal(tuned.prompt_encoder(), expected)
