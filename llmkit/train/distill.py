"""Knowledge distillation: a teacher's distributions or outputs train a student, through the fine-tuning loop.

    llmkit distill --teacher runs/big/model --student tiny --data text.txt --method kd --out runs/kd
    llmkit distill ... --method kd --topk 32 --teacher-cache runs/teacher_top32.safetensors
    llmkit distill ... --method reverse-kl          # MiniLLM: KL(student || teacher) on the student's samples
    llmkit distill ... --method gkd --beta 0.5     # on-policy generalised JSD (Agarwal et al. 2024)
    llmkit distill ... --method seq-kd             # train on the teacher's generations (Kim & Rush 2016)
    llmkit distill --teacher T --student S --data qa.jsonl --method cot --out runs/cot   # Fine-tune-CoT

The loop is the fine-tuner's (progress, metrics.jsonl, checkpoints, exact resume, validation loss); this
class swaps in the student (a checkpoint, or a preset built with the teacher's tokenizer), the batches
(student samples for on-policy methods, teacher generations for seq-kd/cot) and the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.data.sft import SFTExample, collate, iter_sft_records
from llmkit.train.distill_commands import DistillConfig
from llmkit.train.finetune import FineTuner
from llmkit.train.objectives import IGNORE, lm_loss
from llmkit.train.trainer import TrainError

# the divergence each token-level method takes (generalised JSD's beta): forward KL, reverse KL, or in between
BETA = {"kd": 0.0, "reverse-kl": 1.0}


# ----------------------------------------------------------------------------- losses


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities [..., V]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0) -> Tensor:
    """GKD's generalised JSD per position [...]: beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s.

    beta = 0 is the forward KL(teacher || student) (word-level KD) and beta = 1 the reverse KL(student || teacher)
    (MiniLLM), the limits the JSD reaches up to a 1/beta (1/(1 - beta)) factor, as in TRL's GKD trainer.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = torch.logsumexp(torch.stack([s + torch.log(torch.tensor(1 - beta)), t + torch.log(torch.tensor(beta))]), 0)
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def topk_forward_kl(student_logits: Tensor, top_values: Tensor, top_indices: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) per position with the teacher renormalised over its top-k tokens [..., K]."""
    t = F.log_softmax(top_values.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, top_indices.long())
    return (t.exp() * (t - s)).sum(-1)


# ----------------------------------------------------------------------------- teacher top-k cache


def example_key(ids: list[int] | Tensor) -> int:
    """A 63-bit content address of a token sequence (the cache is keyed by what the teacher saw)."""
    data = torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class TeacherCache:
    """The teacher's top-k logits for every position of every training example, on disk as safetensors.

    values [N,K] (fp16) and indices [N,K] (int32) over all N positions, example e's rows at offsets[e]:offsets[e+1],
    found by `example_key` of its tokens: k floats and ints a token instead of the whole vocabulary.
    """

    def __init__(self, values: Tensor, indices: Tensor, offsets: Tensor, keys: Tensor):
        self.values, self.indices = values, indices
        self.rows = {int(k): (int(offsets[i]), int(offsets[i + 1])) for i, k in enumerate(keys)}

    @property
    def k(self) -> int:
        return self.values.shape[1]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, examples: list[SFTExample], k: int, batch_size: int, device) -> "TeacherCache":
        values, indices, lengths, keys = [], [], [], []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            ids = collate([[e] for e in chunk], None, 0)["input_ids"].to(device)
            top = teacher(ids).float().topk(k, dim=-1)
            for row, e in enumerate(chunk):
                values.append(top.values[row, : len(e)].half().cpu())
                indices.append(top.indices[row, : len(e)].int().cpu())
                lengths.append(len(e))
                keys.append(example_key(e.input_ids))
        offsets = torch.tensor([0, *lengths]).cumsum(0)
        return cls(torch.cat(values), torch.cat(indices), offsets, torch.tensor(keys))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        spans = sorted(self.rows.items(), key=lambda kv: kv[1])
        tensors = {"values": self.values, "indices": self.indices,
                   "offsets": torch.tensor([0] + [end for _, (_, end) in spans]),
                   "keys": torch.tensor([key for key, _ in spans])}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": "llmkit-teacher-topk", "k": str(self.k)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherCache":
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            return cls(t["values"], t["indices"], t["offsets"], t["keys"])
        except (KeyError, OSError, ValueError) as e:
            raise TrainError(f"{path}: not a teacher top-k cache ({e})") from None

    def lookup(self, input_ids: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) [B,T,K] for a batch of right-padded examples; padding rows are zero."""
        B, T = input_ids.shape
        values = torch.zeros(B, T, self.k, dtype=self.values.dtype)
        indices = torch.zeros(B, T, self.k, dtype=self.indices.dtype)
        for b in range(B):
            n = int((segment_ids[b] > 0).sum())
            span = self.rows.get(example_key(input_ids[b, :n].cpu()))
            if span is None:
                raise TrainError("an example has no entry in the teacher cache: it was built for other data or "
                                 "options; delete it (or pass another --teacher-cache path) to rebuild it")
            values[b, :n], indices[b, :n] = self.values[span[0]: span[1]], self.indices[span[0]: span[1]]
        return values, indices


# ----------------------------------------------------------------------------- the distiller


def check_same_tokenizer(teacher_dir: str, teacher_tok, student_dir: str, student_tok) -> None:
    """Distributions are compared token by token, so both models must read text with one tokenizer."""
    from llmkit.data.pack import tokenizer_hash

    if student_tok is None or teacher_tok is None:
        raise TrainError(f"{student_dir if student_tok is None else teacher_dir}: no tokenizer in the checkpoint; "
                         "distillation checks that teacher and student share one")
    a, b = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if a != b:
        raise TrainError(f"{student_dir}: the student's tokenizer differs from the teacher's ({teacher_dir}; hash "
                         f"{b} vs {a}): distillation needs one shared tokenizer; build the student with the "
                         "teacher's tokenizer (e.g. --student PRESET)")


class Distiller(FineTuner):
    """The fine-tuning loop training a student on a teacher's distributions (kd, reverse-kl, gkd) or outputs
    (seq-kd, cot)."""

    stage = "distill"

    def __init__(self, cfg: DistillConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        from llmkit.checkpoint import load

        cfg.validate()
        self.distill = cfg
        self.teacher, self.teacher_tokenizer = load(cfg.teacher)
        if self.teacher.config.architecture != "decoder":
            raise TrainError(f"{cfg.teacher}: distillation is built for decoder-only teachers and students")
        self.teacher.requires_grad_(False)
        self.cache: TeacherCache | None = None
        super().__init__(cfg.finetune_config(cfg.student), out, resume, overwrite, on_step)

    # -- setup

    def _load_model(self):
        from llmkit.checkpoint import load
        from llmkit.config import PRESETS, ModelConfig
        from llmkit.model import build_model

        cfg, teacher_tok = self.distill, self.teacher_tokenizer
        if Path(cfg.student).is_dir():
            model, tok = load(cfg.student)
            check_same_tokenizer(cfg.teacher, teacher_tok, cfg.student, tok)
        elif cfg.student in PRESETS:
            torch.manual_seed(cfg.seed)
            fields = {"vocab_size": self.teacher.config.vocab_size, "bos_token_id": teacher_tok.bos_id,
                      "eos_token_id": teacher_tok.eos_id, "pad_token_id": teacher_tok.pad_id,
                      "max_seq_len": max(PRESETS[cfg.student].get("max_seq_len", 0), cfg.max_seq_len + cfg.gen_tokens)}
            model, tok = build_model(ModelConfig.from_preset(cfg.student, **fields)), teacher_tok
        else:
            raise TrainError(f"--student {cfg.student!r} is neither a checkpoint directory nor a preset "
                             f"({', '.join(sorted(PRESETS))})")
        if model.config.architecture != "decoder":
            raise TrainError(f"{cfg.student}: distillation is built for decoder-only teachers and students")
        if model.config.vocab_size != self.teacher.config.vocab_size:
            raise TrainError(f"{cfg.student}: vocab_size {model.config.vocab_size} differs from the teacher's "
                             f"{self.teacher.config.vocab_size}; their logits cannot be compared")
        self.teacher.to(self.device).eval()
        return model, tok

    def _load_data(self):
        cfg = self.distill
        if cfg.method in ("seq-kd", "cot"):
            self.cfg.data = str(self._teacher_data())
        batches, val = super()._load_data()
        if cfg.method == "kd" and cfg.topk:
            self.cache = self._teacher_cache(batches.examples)
        return batches, val

    def _teacher_cache(self, examples: list[SFTExample]) -> TeacherCache:
        cfg = self.distill
        path = Path(cfg.teacher_cache) if cfg.teacher_cache else None
        if path is not None and path.is_file():
            cache = TeacherCache.load(path)
            if cache.k != cfg.topk:
                raise TrainError(f"{path}: holds the top {cache.k} logits, --topk is {cfg.topk}")
            return cache
        print(f"llmkit distill: caching the teacher's top-{cfg.topk} logits of {len(examples)} examples",
              file=sys.stderr)
        cache = TeacherCache.build(self.teacher, examples, cfg.topk, self.cfg.micro_batch_size, self.device)
        if path is not None:
            cache.save(path)
        return cache

    # -- teacher-written data (seq-kd, cot)

    def _teacher_data(self) -> Path:
        """OUT/teacher_data.jsonl: the records with the teacher's replies (kept for resume and inspection)."""
        path = self.out / "teacher_data.jsonl"
        if path.is_file():
            return path
        cfg = self.distill
        records = list(iter_sft_records(cfg.data, cfg.format))
        lines, kept = [], 0
        for i in range(0, len(records), self.cfg.micro_batch_size):
            chunk = records[i: i + self.cfg.micro_batch_size]
            replies = self._teacher_generate([self._teacher_prompt(item, where) for item, where in chunk])
            for (item, where), (prompt, reply) in zip(chunk, replies):
                record = self._teacher_record(item, prompt, reply)
                if record is not None:
                    lines.append(json.dumps(record, ensure_ascii=False))
                    kept += 1
            print(f"llmkit distill: teacher outputs {min(i + len(chunk), len(records))}/{len(records)}",
                  file=sys.stderr)
        if not lines:
            raise TrainError(f"{cfg.data}: no teacher rationale contained its record's answer "
                             f"({len(records)} checked); pass --no-cot-filter to keep them all")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
        print(f"llmkit distill: {kept} teacher-written records in {path}", file=sys.stderr)
        return path

    def _teacher_prompt(self, item: list[dict] | str, where: str) -> list[int]:
        cfg, tok = self.distill, self.teacher_tokenizer
        if isinstance(item, str):
            if cfg.method == "cot":
                raise TrainError(f"{where}: --method cot needs question/answer records (alpaca or messages), "
                                 "not plain text")
            return tok.encode(item, add_special_tokens=True)[: cfg.prompt_tokens]
        messages = _prompt_messages(item)
        if cfg.method == "cot":
            last = messages[-1]
            messages = messages[:-1] + [{**last, "content": f"{last['content']}\n{cfg.cot_trigger}"}]
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))

    def _teacher_generate(self, prompts: list[list[int]]) -> list[tuple[list[int], str]]:
        from llmkit.infer.generate import GenerationConfig, generate
        from llmkit.infer.sampling import SamplingParams

        cfg, tok = self.distill, self.teacher_tokenizer
        eos = (tok.eos_id,) if tok.eos_id is not None else ()
        gen = GenerationConfig(cfg.gen_tokens, SamplingParams(temperature=cfg.gen_temperature, seed=cfg.seed),
                               eos_token_ids=eos)
        pad = tok.pad_id if tok.pad_id is not None else 0
        outputs = generate(self.teacher, prompts, gen, pad)
        return [(p, tok.decode([t for t in out if t not in eos], skip_special_tokens=True))
                for p, out in zip(prompts, outputs)]

    def _teacher_record(self, item: list[dict] | str, prompt: list[int], reply: str) -> dict | None:
        cfg = self.distill
        if isinstance(item, str):  # seq-kd on text: the prompt's text continued by the teacher
            return {"text": self.teacher_tokenizer.decode(prompt, skip_special_tokens=True) + reply}
        messages = _prompt_messages(item)
        if cfg.method == "cot":
            answer = item[-1]["content"].strip() if item[-1]["role"] == "assistant" else ""
            if cfg.cot_filter and answer and answer not in reply:
                return None
            reply = reply.strip() + (f"\nAnswer: {answer}" if answer else "")
        return {"messages": messages + [{"role": "assistant", "content": reply}]}

    # -- batches and loss (kd, reverse-kl, gkd)

    def _next_batch(self) -> dict[str, Tensor]:
        cfg, data = self.distill, self.train_data
        # drawn from the data position, so a resumed run samples exactly as the original did
        rng = random.Random(f"{cfg.seed}-{data.epoch}-{data.cursor}")
        batch = data.next_batch()
        if cfg.method in ("reverse-kl", "gkd") and rng.random() < cfg.on_policy_fraction:
            return self._student_samples(batch, rng.randrange(2**31))
        return batch

    @torch.no_grad()
    def _student_samples(self, batch: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
        """The batch's prompts continued by the student (T = 1): GKD's and MiniLLM's on-policy sequences,
        labelled on the sampled tokens only."""
        from llmkit.infer.generate import GenerationConfig, generate
        from llmkit.infer.sampling import SamplingParams

        cfg, tok = self.distill, self.tokenizer
        prompts = [_prompt_of(ids, labels, segments, cfg.prompt_tokens)
                   for ids, labels, segments in zip(batch["input_ids"], batch["labels"], batch["segment_ids"])]
        eos = (tok.eos_id,) if tok.eos_id is not None else ()
        gen = GenerationConfig(cfg.gen_tokens, SamplingParams(temperature=1.0, seed=seed), eos_token_ids=eos)
        self.raw_model.eval()
        try:
            samples = generate(self.raw_model, prompts, gen, self.train_data.pad_id)
        finally:
            self.raw_model.train()
        examples = []
        for prompt, sample in zip(prompts, samples):
            seq = (prompt + sample)[: self.cfg.max_seq_len + 1]
            labels = [IGNORE] * (len(prompt) - 1) + seq[len(prompt):]
            examples.append(SFTExample(seq[:-1], labels, "student sample"))
        return collate([[e] for e in examples], None, self.train_data.pad_id)

    def _batch_loss(self, batch: dict[str, Tensor]) -> Tensor:
        cfg = self.distill
        if cfg.method in ("seq-kd", "cot"):
            return super()._batch_loss(batch)
        logits = self.logits(batch)
        labels = batch["labels"].to(self.device)
        picked = labels != IGNORE
        T = cfg.temperature
        if self.cache is not None:
            values, indices = self.cache.lookup(batch["input_ids"], batch["segment_ids"])
            div = topk_forward_kl(logits[picked], values.to(self.device)[picked], indices.to(self.device)[picked], T)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input_ids"].to(self.device))
            div = generalized_jsd(logits[picked], teacher_logits[picked], BETA.get(cfg.method, cfg.beta), T)
        div = div.sum() * T**2  # T^2 keeps the gradients' scale as T changes (Hinton et al. 2015)
        if cfg.method == "kd":
            return cfg.alpha * div + (1 - cfg.alpha) * lm_loss(logits, labels, reduction="sum")
        return div


def _prompt_messages(messages: list[dict]) -> list[dict]:
    """A conversation up to (not including) its last assistant turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if not prompt:
        raise TrainError("a record has no turn before its assistant reply to prompt the teacher with")
    return prompt


def _prompt_of(ids: Tensor, labels: Tensor, segments: Tensor, prompt_tokens: int) -> list[int]:
    """The tokens before the first labelled target (a chat's prompt), or the first prompt_tokens of a text."""
    n = int((segments > 0).sum())
    first = int((labels[:n] != IGNORE).nonzero()[0]) if bool((labels[:n] != IGNORE).any()) else n - 1
    end = first + 1 if first > 0 else min(prompt_tokens, n)
    return ids[:end].tolist()
