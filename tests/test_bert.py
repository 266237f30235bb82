"""BERT family: parity with transformers both ways, MLM masking, sentence embeddings, classification."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM, BertConfig, BertForMaskedLM, \
    BertForSequenceClassification, BertModel, BertTokenizerFast

import llmkit
from llmkit.config import ModelConfig
from llmkit.data.pack import pack_documents, read_documents
from llmkit.model import Encoder
from llmkit.tokenizer import train_tokenizer
from llmkit.train.objectives import mask_tokens
from llmkit.train.recipe import TrainConfig
from llmkit.train.trainer import Trainer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TOL = 1e-4


def hf_bert(cls=BertForMaskedLM, **kw):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **kw)
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def word_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer over the words w0 ... w91 after BERT's five special tokens (97 ids)."""
    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(92))]
    return BertTokenizerFast(vocab={name: i for i, name in enumerate(names)})


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding, as BERT batches are
    types = torch.zeros(2, 11, dtype=torch.long)
    types[:, 5:] = 1
    return ids, mask, types


def test_bert_mlm_parity_hf_to_llmkit_and_back(tmp_path):
    ref = hf_bert()
    ref.save_pretrained(tmp_path / "hf")
    model, _ = llmkit.load(tmp_path / "hf")
    assert isinstance(model, Encoder)
    ids, mask, types = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = model(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= TOL
    llmkit.save(model, None, tmp_path / "ours")
    back = BertForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (again[real] - got[real]).abs().max() <= TOL


def test_llmkit_bert_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = Encoder(ModelConfig.from_preset("tiny-bert", vocab_size=101)).eval()
    llmkit.save(model, None, tmp_path / "ours")
    ref = BertForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask, types = batch()
    with torch.no_grad():
        diff = (ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
                - model(ids, attention_mask=mask, token_type_ids=types))
    assert diff[mask.bool()].abs().max() <= TOL


def test_sequence_classification_parity(tmp_path):
    ref = hf_bert(BertForSequenceClassification, num_labels=3)
    ref.save_pretrained(tmp_path / "hf")
    model, _ = llmkit.load(tmp_path / "hf")
    assert model.config.n_labels == 3
    ids, mask, types = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = model.classify(ids, attention_mask=mask, token_type_ids=types)
    assert (got - want).abs().max() <= TOL


def test_embeddings_ignore_padding():
    torch.manual_seed(0)
    model = Encoder(ModelConfig.from_preset("tiny-bert", vocab_size=101)).eval()
    ids = torch.randint(0, 101, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        alone, with_pad = model.embed(ids), model.embed(padded, mask)
    assert (alone - with_pad).abs().max() <= 1e-5


def test_bert_checkpoint_is_a_rag_embedder(tmp_path):
    from llmkit.rag.embed import load_embedder

    hf_tok = word_tokenizer()
    hf_bert().save_pretrained(tmp_path / "bert")
    hf_tok.save_pretrained(tmp_path / "bert")
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11"]
    embedder = load_embedder(str(tmp_path / "bert"))
    got = torch.from_numpy(embedder.embed(texts))
    ref = BertModel.from_pretrained(tmp_path / "bert").eval()
    enc = hf_tok(texts, padding=True, return_tensors="pt")  # [CLS] ... [SEP], right-padded
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert got.shape == (3, 32) and (got - want).abs().max() <= TOL


def test_mlm_masking_proportions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 256), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True  # [CLS] is never picked
    inputs, labels = mask_tokens(ids, vocab_size=1000, mask_id=3, generator=g, special=special)
    picked = labels != -100
    assert not picked[:, 0].any()
    assert (labels[picked] == ids[picked]).all() and (labels[~picked] == -100).all()
    assert (inputs[~picked] == ids[~picked]).all()
    n = picked.sum().item()
    assert abs(n / ids[:, 1:].numel() - 0.15) < 0.01
    as_mask = (inputs[picked] == 3).float().mean().item()
    kept = (inputs[picked] == ids[picked]).float().mean().item()
    random = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    corpus = root / "corpus.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:60_000])
    tok = train_tokenizer([corpus], "byte-bpe", 320)
    pack_documents(read_documents([str(corpus)]), tok, root / "data", val_fraction=0.1, progress=False)
    return root / "data"


# encoder pretraining through `llmkit pretrain`: BERT's masked LM and T5's span corruption
@pytest.mark.parametrize("objective,preset,hf_class", [("mlm", "tiny-bert", AutoModelForMaskedLM),
                                                       ("span", "tiny-t5", AutoModelForSeq2SeqLM)])
def test_pretraining_encoders_learns_resumes_and_loads_in_transformers(packed, tmp_path, objective, preset, hf_class):
    def recipe():
        return TrainConfig(model=preset, objective=objective, data=str(packed), seq_len=32, micro_batch_size=4,
                           max_steps=16, warmup_steps=2, lr=3e-3, eval_every=0, eval_batches=2, save_every=8,
                           sample_tokens=4, log_every=4)

    Trainer(recipe(), tmp_path / "a").fit()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-4:]) / 4
    assert last < first - 0.5 and "val_loss" in records[-1]
    def kill(step, record):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after the step-8 checkpoint: steps 9-10 are redone
        Trainer(recipe(), tmp_path / "b", on_step=kill).fit()
    Trainer(recipe(), tmp_path / "b", resume=True).fit()
    resumed = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert resumed == pytest.approx([r["loss"] for r in records], abs=1e-5)
    assert hf_class.from_pretrained(tmp_path / "a" / "model") is not None


def test_objective_must_match_the_architecture(packed, tmp_path):
    with pytest.raises(ValueError, match="objective 'mlm' trains a encoder model"):
        Trainer(TrainConfig(model="tiny", objective="mlm", data=str(packed), seq_len=32, max_steps=1), tmp_path)


def test_finetune_trains_a_sequence_classifier_from_an_mlm_checkpoint(tmp_path):
    from llmkit.train.finetune import FinetuneConfig, FineTuner

    hf_bert().save_pretrained(tmp_path / "bert")
    word_tokenizer().save_pretrained(tmp_path / "bert")
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(120):  # "low" texts use the words w0-w39, "high" ones w50-w89
        label = ("low", "high")[i % 2]
        ids = (torch.randint(0, 40, (6,), generator=rng) + (50 if label == "high" else 0)).tolist()
        lines.append(json.dumps({"text": " ".join(f"w{i}" for i in ids), "label": label}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = FinetuneConfig(model=str(tmp_path / "bert"), data=str(tmp_path / "train.jsonl"), method="full",
                         max_steps=60, micro_batch_size=8, lr=3e-3, eval_every=0, save_every=60, warmup_steps=5,
                         val_fraction=0.2, eval_batches=10)
    tuner = FineTuner(cfg, tmp_path / "run")
    start = tuner.evaluate()["val_loss"]
    final = tuner.fit()
    assert final["val_loss"] < start - 0.3
    model, tok = llmkit.load(tmp_path / "run" / "model")
    assert model.config.n_labels == 2 and model.config.extra["labels"] == ["high", "low"]
    ref = BertForSequenceClassification.from_pretrained(tmp_path / "run" / "model").eval()
    assert ref.config.id2label == {0: "high", 1: "low"}
    enc = BertTokenizerFast.from_pretrained(tmp_path / "bert")(["w0 w5 w9", "w3 w4 w5"], return_tensors="pt")
    with torch.no_grad():
        assert (ref(**enc).logits - model.classify(enc["input_ids"], enc["attention_mask"])).abs().max() <= TOL
