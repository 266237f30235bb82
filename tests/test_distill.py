"""Distillation: the divergences against hand computation, the top-k cache, every method end to end, errors."""

import json
import math
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.tokenizer import CHAT_TEMPLATES, train_tokenizer
from llmkit.train.distill import Distiller, TeacherCache, generalized_jsd, topk_forward_kl
from llmkit.train.distill_commands import DistillConfig
from llmkit.train.trainer import TrainError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def softmax(x: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in x]
    return [v / sum(e) for v in e]


S_LOGITS, T_LOGITS = [1.0, -0.5, 2.0, 0.3], [0.2, 1.5, -1.0, 0.7]


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_forward_and_reverse_kl_equal_hand_computation(T):
    s, t = torch.tensor([S_LOGITS]), torch.tensor([T_LOGITS])
    ps, pt = softmax(S_LOGITS, T), softmax(T_LOGITS, T)
    assert float(generalized_jsd(s, t, 0.0, T)) == pytest.approx(kl_by_hand(pt, ps), abs=1e-6)
    assert float(generalized_jsd(s, t, 1.0, T)) == pytest.approx(kl_by_hand(ps, pt), abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_equals_hand_computation(beta):
    ps, pt = softmax(S_LOGITS), softmax(T_LOGITS)
    m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
    want = beta * kl_by_hand(pt, m) + (1 - beta) * kl_by_hand(ps, m)
    got = float(generalized_jsd(torch.tensor([S_LOGITS]), torch.tensor([T_LOGITS]), beta))
    assert got == pytest.approx(want, abs=1e-6)
    assert float(generalized_jsd(torch.tensor([T_LOGITS]), torch.tensor([T_LOGITS]), beta)) == pytest.approx(0, abs=1e-7)


def test_topk_kl_with_full_k_is_forward_kl_and_renormalises():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    top = t.topk(7, dim=-1)
    full = topk_forward_kl(s, top.values, top.indices, 2.0)
    assert torch.allclose(full, generalized_jsd(s, t, 0.0, 2.0), atol=1e-6)
    top2 = t[:1].topk(2, dim=-1)
    pt = softmax(top2.values[0].tolist())  # the teacher renormalised over its two best tokens
    ps_all = softmax(s[0].tolist())
    want = sum(p * math.log(p / ps_all[i]) for p, i in zip(pt, top2.indices[0].tolist()))
    assert float(topk_forward_kl(s[:1], top2.values, top2.indices)) == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    corpus = root / "corpus.txt"
    corpus.write_text((DATA / "tinyshakespeare.txt").read_text()[:60_000])
    tok = train_tokenizer([corpus], "byte-bpe", 300, chat_template=CHAT_TEMPLATES["chatml"])
    other = train_tokenizer([corpus], "byte-bpe", 320, chat_template=CHAT_TEMPLATES["chatml"])
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, **ids))
    student = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32,
                                                  d_ff=64, **ids))
    text = root / "text.txt"
    text.write_text("\n\n".join((DATA / "tinyshakespeare.txt").read_text()[60_000:66_000].split("\n\n")[:24]))
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)})
                          + "\n" for a in range(4) for b in range(3)))
    return {"teacher": llmkit.save(teacher, tok, root / "teacher"), "student": llmkit.save(student, tok, root / "s"),
            "other": llmkit.save(student, other, root / "other"), "text": text, "qa": qa}


def config(models, method, **kw) -> DistillConfig:
    options = dict(teacher=str(models["teacher"]), student=str(models["student"]), data=str(models["text"]),
                   method=method, max_steps=3, micro_batch_size=2, max_seq_len=32, gen_tokens=6, prompt_tokens=4,
                   eval_every=0, eval_batches=2, save_every=2, warmup_steps=1, log_every=1, val_fraction=0.2)
    return DistillConfig(**{**options, **kw})


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["kd", "reverse-kl", "gkd", "seq-kd"])
def test_every_method_trains_the_student(models, tmp_path, method):
    run = Distiller(config(models, method), tmp_path / method)
    before = [p.detach().clone() for p in run.raw_model.parameters()]
    final = run.fit()
    assert len(losses(tmp_path / method)) == 3 and math.isfinite(final["loss"]) and "val_loss" in final
    assert any(not torch.equal(a, p) for a, p in zip(before, run.raw_model.parameters()))
    model, tok = llmkit.load(tmp_path / method / "model")
    assert tok is not None and model.config.vocab_size == run.teacher.config.vocab_size
    if method == "seq-kd":
        assert (tmp_path / method / "teacher_data.jsonl").read_text().count("\n") == 24


def test_kd_loss_is_the_mix_of_forward_kl_and_cross_entropy(models, tmp_path):
    run = Distiller(config(models, "kd", alpha=0.3, temperature=2.0), tmp_path / "kd")
    batch = run.train_data.next_batch()
    with torch.no_grad():
        s, t = run.logits(batch), run.teacher(batch["input_ids"])
        got = run._batch_loss(batch)
    picked = batch["labels"] != -100
    kd = generalized_jsd(s[picked], t[picked], 0.0, 2.0).sum() * 4
    ce = torch.nn.functional.cross_entropy(s[picked], batch["labels"][picked], reduction="sum")
    assert torch.allclose(got, 0.3 * kd + 0.7 * ce, rtol=1e-5)


def test_topk_teacher_cache_is_written_then_reused(models, tmp_path):
    cache = tmp_path / "top8.safetensors"
    Distiller(config(models, "kd", topk=8, teacher_cache=str(cache)), tmp_path / "a").fit()
    assert cache.is_file() and TeacherCache.load(cache).k == 8
    stamp = cache.stat().st_mtime_ns
    first = losses(tmp_path / "a")
    Distiller(config(models, "kd", topk=8, teacher_cache=str(cache)), tmp_path / "b").fit()
    assert cache.stat().st_mtime_ns == stamp and losses(tmp_path / "b") == first
    with pytest.raises(TrainError, match="top 8 logits, --topk is 4"):
        Distiller(config(models, "kd", topk=4, teacher_cache=str(cache)), tmp_path / "c")


def test_on_policy_resume_is_exact(models, tmp_path):
    Distiller(config(models, "gkd", max_steps=4), tmp_path / "straight").fit()

    def kill(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Distiller(config(models, "gkd", max_steps=4), tmp_path / "resumed", on_step=kill).fit()
    Distiller(config(models, "gkd", max_steps=4), tmp_path / "resumed", resume=True).fit()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_cot_trains_on_teacher_rationales(models, tmp_path):
    run = Distiller(config(models, "cot", data=str(models["qa"]), cot_filter=False, max_steps=2), tmp_path / "cot")
    run.fit()
    records = [json.loads(line) for line in (tmp_path / "cot" / "teacher_data.jsonl").read_text().splitlines()]
    assert len(records) == 12
    first = records[0]["messages"]
    assert first[0]["content"] == "What is 0 plus 0?"  # the student sees the question without the trigger
    assert first[-1]["role"] == "assistant" and first[-1]["content"].endswith("\nAnswer: 0")
    with pytest.raises(TrainError, match="no teacher rationale contained"):  # a random teacher is never right
        Distiller(config(models, "cot", data=str(models["qa"]), max_steps=2), tmp_path / "filtered")


def test_tokenizer_mismatch_is_a_clear_error(models, tmp_path):
    with pytest.raises(TrainError, match="tokenizer differs from the teacher's"):
        Distiller(config(models, "kd", student=str(models["other"])), tmp_path / "x")


def test_cli_with_a_preset_student(models, tmp_path, capsys):
    code = main(["distill", "--teacher", str(models["teacher"]), "--student", "tiny", "--data", str(models["text"]),
                 "--method", "kd", "--out", str(tmp_path / "run"), "--max-steps", "2", "--micro-batch-size", "2",
                 "--max-seq-len", "32", "--eval-every", "0", "--json"])
    assert code in (0, None)
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["method"] == "kd"
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_distilled_student_beats_the_same_student_alone(tmp_path):
    """Tiny Shakespeare: one student init, the same batches, with and without a trained teacher (a fast
    version of benchmarks/distill_shakespeare.py)."""
    from llmkit.train.finetune import FinetuneConfig, FineTuner

    text = (DATA / "tinyshakespeare.txt").read_text()
    for name, part in (("train", text[:300_000]), ("val", text[-40_000:])):
        records, current = [], ""
        for line in part.splitlines(keepends=True):
            current += line
            if len(current) >= 120:
                records.append(json.dumps({"text": current}))
                current = ""
        (tmp_path / f"{name}.jsonl").write_text("\n".join(records) + "\n")
    (tmp_path / "train.txt").write_text(text[:300_000])
    tok = train_tokenizer([tmp_path / "train.txt"], "byte-bpe", 300)
    ids = dict(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    data = dict(data=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"), format="text",
                max_seq_len=80, micro_batch_size=16, warmup_steps=10, eval_every=0, eval_batches=8, save_every=1000,
                weight_decay=0.0)
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.from_preset("tiny", n_layer=2, d_model=96, n_head=4, n_kv_head=4, d_ff=256, **ids))
    llmkit.save(teacher, tok, tmp_path / "teacher-init")
    teacher_val = FineTuner(FinetuneConfig(model=str(tmp_path / "teacher-init"), method="full", max_steps=200, lr=3e-3,
                                           **data), tmp_path / "teacher").fit()["val_loss"]
    torch.manual_seed(1)
    student = Transformer(ModelConfig.from_preset("tiny", n_layer=1, d_model=32, n_head=2, n_kv_head=2, d_ff=64, **ids))
    llmkit.save(student, tok, tmp_path / "student-init")
    alone = FineTuner(FinetuneConfig(model=str(tmp_path / "student-init"), method="full", max_steps=80, lr=5e-3,
                                     **data), tmp_path / "alone").fit()["val_loss"]
    distilled = Distiller(DistillConfig(teacher=str(tmp_path / "teacher" / "model"), student=str(tmp_path / "student-init"),
                                        method="kd", alpha=0.9, temperature=1.0, max_steps=80, lr=5e-3, **data),
                          tmp_path / "kd").fit()["val_loss"]
    # measured: teacher 2.93, alone 3.366, distilled 3.301
    assert teacher_val < alone and distilled < alone - 0.02
