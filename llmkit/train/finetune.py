"""Supervised fine-tuning, fully or with any PEFT method, with exact resume.

    llmkit finetune --model base/ --data ../shared/data/alpaca_2k.jsonl --method lora --out runs/sft --max-steps 200
    llmkit finetune ... --resume                     # continue a killed run from its last checkpoint
    llmkit merge --model base/ --adapter runs/sft/adapter --out merged/

The loop is the pretraining Trainer's (progress bar, eval/save cadence, metrics.jsonl, TensorBoard, spike
guard, checkpoint pruning, output-dir protection); this class swaps in the SFT batch source, the
trainable-parameter set of the chosen method, and what a checkpoint holds:

  OUT/checkpoints/step-N/   adapter_config.json + adapter_model.safetensors (PEFT's layout, loadable there),
                            trainable.safetensors (every trainable tensor, e.g. prefix MLPs PEFT does not keep),
                            trainer_state-rank0.pt (optimiser, schedule, RNG, counters, AdaLoRA importance),
                            data_state.json (epoch and position in the shuffled examples)
                            -- or, for --method full, a whole model directory in place of the adapter files
  OUT/adapter/ or OUT/model/  the result, with a README.md card; OUT/metrics.jsonl one record per step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit import peft
from llmkit.card import append_card_section, model_card, write_card
from llmkit.data.sft import (SFTBatches, SFTStats, classification_labels, collate_classification, load_classification,
                             load_sft, split_val)
from llmkit.train import distributed as dist_utils
from llmkit.train.objectives import IGNORE, RouterLog, lm_loss, shift_right
from llmkit.train.optim import build_optimizer, lr_multiplier
from llmkit.train.finetune_commands import DEFAULT_TARGETS, FinetuneConfig  # noqa: F401  (FinetuneConfig: API)
from llmkit.train.trainer import STEP_DIR, Trainer, TrainError

TRAINABLE_FILE = "trainable.safetensors"


def method_config(cfg: FinetuneConfig) -> peft.AdapterConfig | None:
    """The family config for `cfg.method` (None for full fine-tuning)."""
    m, targets = cfg.method, cfg.target_modules or DEFAULT_TARGETS.get(cfg.method, "")
    if m == "full":
        return None
    if m in ("lora", "dora", "qlora"):
        return peft.LoraConfig(method=m, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                               target_modules=targets, rslora=cfg.rslora, dora=m == "dora", quantize=m == "qlora",
                               compute_dtype=cfg.qlora_compute_dtype)
    if m == "adalora":
        return peft.AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r, alpha=cfg.lora_alpha,
                                  dropout=cfg.lora_dropout, target_modules=targets, tinit=cfg.adalora_tinit,
                                  tfinal=cfg.adalora_tfinal, delta_t=cfg.adalora_delta_t,
                                  orth_reg_weight=cfg.adalora_orth_reg_weight, total_step=cfg.max_steps)
    if m == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=cfg.ia3_feedforward_modules)
    if m == "adapter":
        return peft.BottleneckConfig(size=cfg.adapter_size, target_modules=targets)
    if m == "bitfit":
        return peft.BitFitConfig()
    return peft.PromptConfig(method=m, num_virtual_tokens=cfg.num_virtual_tokens,
                             init_text=cfg.prompt_init_text or None, encoder_hidden_size=cfg.encoder_hidden_size)


class FineTuner(Trainer):
    """The pretraining loop over SFT batches and a method's trainable parameters (single process)."""

    stage = "finetune"
    task = "lm"  # set by _load_model: "lm", "classify" (encoders) or "seq2seq" (encoder-decoders)

    def __init__(self, cfg: FinetuneConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        cfg.validate()
        self.cfg, self.out, self.on_step = cfg, Path(out), on_step
        self.env = dist_utils.setup(cfg.device)
        if self.env.distributed:
            raise TrainError("llmkit finetune runs in one process; launch it without torchrun")
        self.device = self.env.device
        self._prepare_out_dir(resume, overwrite)
        model, self.tokenizer = self._load_model()
        if self.tokenizer is None:
            raise TrainError(f"{cfg.model}: no tokenizer in the checkpoint; fine-tuning needs one")
        self._set_chat_template()
        self.train_data, self.val_examples = self._load_data()
        torch.manual_seed(cfg.seed)  # adapter initialisation
        self.peft_config = method_config(cfg)
        # QLoRA on a GPU: the frozen base goes over in bf16 and is quantised there (bitsandbytes when installed)
        dtype = torch.bfloat16 if cfg.method == "qlora" and self.device.type == "cuda" else torch.float32
        model = model.to(self.device, dtype)
        model = self._apply_method(model)
        self.raw_model = self.model = self.forward = model
        if cfg.activation_checkpointing:
            self._base_model().set_activation_checkpointing(True)
        self.report = peft.trainable_report(model)
        print(f"llmkit {self.stage}: {cfg.method}: {peft.format_report(self.report)}", file=sys.stderr)
        self.optimizer = build_optimizer(model, cfg.optimizer, cfg.peak_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                         cfg.eps, cfg.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(
            s, cfg.schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.decay_fraction))
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=cfg.fp16_init_scale,
                                           enabled=cfg.precision == "fp16")
        self.allocator = None
        if cfg.method == "adalora":
            from llmkit.peft.adalora import RankAllocator

            self.allocator = RankAllocator(model, self.peft_config)
        self.step, self.tokens_seen, self.recent_losses = 0, 0, deque(maxlen=cfg.spike_window)
        self.router_log = RouterLog()  # MoE auxiliary losses and per-expert load (nothing for dense models)
        self.initial_val: dict = {}
        torch.manual_seed(cfg.seed + 1)  # dropout
        if resume:
            self._restore(self._latest_checkpoint())
        self.metrics = self._open_metrics()
        self.tb = self._tensorboard()

    # -- setup

    def _load_model(self):
        """(model, tokenizer) to train: the --model checkpoint (distillation may build one from a preset).

        A decoder learns its SFT data (task "lm"); an encoder (BERT) learns to classify labelled texts
        ("classify"); an encoder-decoder (T5) maps each prompt to its reply ("seq2seq")."""
        from llmkit.checkpoint import load

        model, tok = load(self.cfg.model)
        self.task = {"decoder": "lm", "encoder": "classify", "encoder-decoder": "seq2seq"}[model.config.architecture]
        if self.task != "lm" and (self.cfg.method != "full" or self.cfg.pack):
            raise TrainError(f"{self.cfg.model}: {model.config.architecture} models are fine-tuned with --method full "
                             "and without --pack")
        if self.cfg.pet_pattern:
            if self.task != "lm":
                raise TrainError(f"{self.cfg.model}: the PET objective (--pet-pattern) trains a decoder LM")
            self.task = "pet"  # cloze classification: llmkit.prompting.cloze
        if self.task == "classify":
            model = self._with_classifier(model)
        return model, tok

    def _with_classifier(self, model):
        """The encoder with a classification head over the data's labels (a fresh head, as HF's
        BertForSequenceClassification.from_pretrained gives an MLM checkpoint)."""
        import dataclasses

        from llmkit.model import Encoder

        self.label_names = classification_labels([f.strip() for f in self.cfg.data.split(",") if f.strip()])
        cfg = model.config
        if cfg.n_labels:
            known = cfg.extra.get("labels") or [str(i) for i in range(cfg.n_labels)]
            if known != self.label_names:
                raise TrainError(f"{self.cfg.data}: labels {self.label_names} differ from the model's {known}")
            return model
        torch.manual_seed(self.cfg.seed)
        classifier = Encoder(dataclasses.replace(cfg, n_labels=len(self.label_names),
                                                 extra={**cfg.extra, "labels": self.label_names}))
        classifier.load_state_dict(model.state_dict(), strict=False)  # all but the new pooler and classifier
        return classifier

    def _apply_method(self, model):
        """The model with the method's adapter injected (as it is for full fine-tuning); alignment keeps its
        reward and value heads trainable here."""
        return model if self.peft_config is None else peft.apply(model, self.peft_config, self.tokenizer)

    def _base_model(self):
        return getattr(self.raw_model, "base", self.raw_model)

    def _set_chat_template(self) -> None:
        from llmkit.tokenizer import CHAT_TEMPLATES

        tok, name = self.tokenizer, self.cfg.chat_template
        if name:
            tok.chat_template = CHAT_TEMPLATES.get(name, name)
        elif tok.chat_template is None:
            tok.chat_template = CHAT_TEMPLATES["chatml"]

    def _load_data(self):
        cfg, tok = self.cfg, self.tokenizer
        files = [f.strip() for f in cfg.data.split(",") if f.strip()]
        options = dict(format=cfg.format, train_on_prompt=cfg.train_on_prompt, system_prompt=cfg.system_prompt or None)
        if self.task == "classify":
            def read(names, verbose=True):
                examples = load_classification(names, tok, cfg.max_seq_len, self.label_names)
                return examples, SFTStats(records=len(examples), tokens=sum(map(len, examples)))
        elif self.task == "pet":
            from llmkit.prompting.cloze import PVP, load_pet_examples

            pvp = PVP.from_json(cfg.pet_pattern, cfg.pet_verbalizer)

            def read(names, verbose=True):
                examples, self.pet_token_ids = load_pet_examples(names, tok, cfg.max_seq_len, pvp)
                return examples, SFTStats(records=len(examples), tokens=sum(map(len, examples)))
        else:
            def read(names, verbose=True):
                return load_sft(names, tok, cfg.max_seq_len, verbose=verbose, **options)
        examples, self.data_stats = read(files)
        if cfg.val_data:
            val, _ = read([f.strip() for f in cfg.val_data.split(",")], verbose=False)
            train = examples
        else:
            train, val = split_val(examples, cfg.val_fraction, cfg.seed)
        pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        batches = SFTBatches(train, cfg.micro_batch_size, cfg.max_seq_len, pad, pack=cfg.pack, seed=cfg.seed,
                             collate_fn=collate_classification if self.task in ("classify", "pet") else None)
        return batches, val

    # -- the loop

    def fit(self) -> dict:
        if self.step == 0 and self.val_examples:
            self.initial_val = self.evaluate()
        return super().fit()

    def _accum_steps(self) -> int:
        return self.cfg.grad_accum

    def logits(self, batch: dict) -> torch.Tensor:
        """Forward one batch; packed batches carry segment and position ids so examples do not see each other."""
        ids = batch["input_ids"].to(self.device)
        if self.cfg.pack:
            return self.forward(ids, position_ids=batch["position_ids"].to(self.device),
                                segment_ids=batch["segment_ids"].to(self.device))
        return self.forward(ids)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        return self.train_data.next_batch()

    def _batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed training loss over the batch's labels (distillation swaps in its divergences)."""
        return self._task_loss(batch)

    def _task_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy over the batch's labels: next tokens, classes, or a seq2seq model's targets."""
        labels = batch["labels"].to(self.device)
        if self.task == "pet":
            from llmkit.prompting.cloze import pet_loss

            return pet_loss(self.logits(batch), batch, self.pet_token_ids)
        if self.task == "classify":
            mask = (batch["segment_ids"] > 0).long().to(self.device)
            logits = self.raw_model.classify(batch["input_ids"].to(self.device), mask)
            return F.cross_entropy(logits.float(), labels, reduction="sum")
        if self.task == "seq2seq":
            pad = self.train_data.pad_id
            inputs, mask, targets = split_prompt_reply(batch, pad)
            start = self.raw_model.config.decoder_start_token_id
            decoder_inputs = shift_right(targets, pad if start is None else start)
            logits = self.forward(inputs.to(self.device), mask.to(self.device),
                                  decoder_input_ids=decoder_inputs.to(self.device))
            return lm_loss(logits, targets.to(self.device), reduction="sum")
        return lm_loss(self.logits(batch), labels, reduction="sum")

    def _after_update(self, record: dict) -> None:
        if self.allocator is not None:  # AdaLoRA reads the gradients of this step, after the update
            record["rank_budget"] = self.allocator.step(self.raw_model, self.step + 1)

    def _train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        self.model.train()
        micro = [self._next_batch() for _ in range(cfg.grad_accum)]
        # normalise by the labelled tokens of the whole step, so accumulation gives the big-batch gradient
        n_labels = max(1, sum(int((b["labels"] != IGNORE).sum()) for b in micro))
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro:
            with self._autocast():
                loss = self._batch_loss(batch)
                aux = self.router_log.loss(self._base_model(), len(micro))
            self.scaler.scale(loss / n_labels + aux).backward()
            loss_sum += loss.detach()
        record = {"step": self.step + 1, "loss": float(loss_sum) / n_labels}
        if self.allocator is not None and self.peft_config.orth_reg_weight > 0:
            from llmkit.peft.adalora import orthogonal_regularizer

            reg = orthogonal_regularizer(self.raw_model)
            self.scaler.scale(self.peft_config.orth_reg_weight * reg).backward()
            record["orth_reg"] = float(reg.detach())
        self.scaler.unscale_(self.optimizer)
        grad_norm = dist_utils.clip_grad_norm(self.raw_model, cfg.grad_clip, self.env)
        record.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm)
        self._apply_update(record, grad_norm)
        tokens = sum(int((b["segment_ids"] > 0).sum()) for b in micro)
        self.tokens_seen += tokens
        record.update(tokens=self.tokens_seen, label_tokens=n_labels,
                      tokens_per_s=round(tokens / (time.perf_counter() - start), 1), **self.router_log.record())
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.val_examples:
            return {}
        cfg, pad = self.cfg, self.train_data.pad_id
        self.model.eval()
        total, count = 0.0, 0
        n = min(len(self.val_examples), cfg.eval_batches * cfg.micro_batch_size)
        for i in range(0, n, cfg.micro_batch_size):
            batch = self.train_data.collate_fn([[e] for e in self.val_examples[i: i + cfg.micro_batch_size]], None, pad)
            with self._autocast():
                total += float(self._task_loss(batch))
            count += int((batch["labels"] != IGNORE).sum())
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}

    # -- checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.raw_model.named_parameters() if p.requires_grad}

    def _write_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from llmkit.checkpoint import write_checkpoint_files

        if self.peft_config is None:
            write_checkpoint_files(self.raw_model, self.tokenizer, directory, "5GB")
            return
        peft.save_adapter(self.raw_model, directory, base_model=str(Path(self.cfg.model).resolve()))
        save_file(self._trainable_state(), str(directory / TRAINABLE_FILE), metadata={"format": "pt"})

    def _trainer_state(self) -> dict:
        state = super()._trainer_state()
        if self.allocator is not None:
            from llmkit.peft.adalora import rank_masks

            state["adalora"] = {"allocator": self.allocator.state_dict(), "masks": rank_masks(self.raw_model)}
        return state

    def save_checkpoint(self) -> Path:
        final = self.out / "checkpoints" / STEP_DIR.format(self.step)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            self._write_weights(tmp)
            (tmp / "data_state.json").write_text(json.dumps(self.train_data.state_dict()))
            torch.save(self._trainer_state(), tmp / "trainer_state-rank0.pt")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune_checkpoints()
        return final

    def _restore(self, path: Path) -> None:
        state_file = path / "trainer_state-rank0.pt"
        if not state_file.is_file():
            raise TrainError(f"{state_file}: missing; the checkpoint is incomplete")
        # weights_only: trainer state holds tensors and plain containers, never code
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        self._load_weights(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_loop(state, path)
        if self.allocator is not None:
            from llmkit.peft.adalora import set_rank_masks

            self.allocator.load_state_dict(state["adalora"]["allocator"])
            set_rank_masks(self.raw_model, state["adalora"]["masks"])

    def _load_weights(self, path: Path) -> None:
        if self.peft_config is None:
            from llmkit.checkpoint import load_model

            self.raw_model.load_state_dict(load_model(path, self.device).state_dict())
            return
        self._load_trainable(path)

    def _load_trainable(self, path: Path) -> None:
        """Copy the checkpoint's trainable.safetensors into the trainable parameters, refusing a different set."""
        from safetensors.torch import load_file

        saved = load_file(str(path / TRAINABLE_FILE), device=str(self.device))
        expected = self._trainable_state()
        if set(saved) != set(expected):
            odd = sorted(set(saved) ^ set(expected))[0]
            raise TrainError(f"{path / TRAINABLE_FILE}: tensor {odd!r} does not match this run's trainable "
                             "parameters; resume with the same method and options")
        with torch.no_grad():
            for name, p in self.raw_model.named_parameters():
                if name in saved:
                    p.copy_(saved[name])

    def save_final(self) -> Path:
        """The result alone: OUT/adapter (PEFT layout) or, for full fine-tuning, OUT/model; with a card."""
        target = self.out / ("model" if self.peft_config is None else "adapter")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.out))
        try:
            self._write_weights(tmp)
            (tmp / TRAINABLE_FILE).unlink(missing_ok=True)  # training state, not part of the adapter
            if self.peft_config is not None:
                self.tokenizer.save(tmp)  # the chat template it was trained with travels with the adapter
            base_card = Path(self.cfg.model) / "README.md"
            if self.peft_config is None and base_card.is_file():  # the base model's card, plus how it was tuned
                shutil.copy(base_card, tmp / "README.md")
                append_card_section(tmp, "Fine-tuning", self._card_body())
            else:
                sections = {"Fine-tuning": self._card_body()}
                write_card(tmp, model_card(self._base_model().config, self.tokenizer, sections))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _card_body(self) -> str:
        cfg, stats = self.cfg, self.data_stats
        lines = [f"- base model: `{cfg.model}`", f"- method: {cfg.method}; {peft.format_report(self.report)}",
                 f"- data: {cfg.data} ({stats.records:,} records, {stats.truncated} truncated to {cfg.max_seq_len} "
                 f"tokens; loss on {'all' if cfg.train_on_prompt else 'assistant'} tokens"
                 f"{', packed' if cfg.pack else ''})",
                 f"- steps: {self.step} of {cfg.max_steps}, lr {cfg.peak_lr:g} ({cfg.schedule}), batch "
                 f"{cfg.micro_batch_size}x{cfg.grad_accum}, precision {cfg.precision}"]
        if self.initial_val:
            lines.append(f"- validation loss before: {self.initial_val['val_loss']:.4f}")
        last = self._last_val()
        if last is not None:
            lines.append(f"- validation loss after: {last:.4f}")
        if self.peft_config is not None:
            lines.append("- load: `llmkit.peft.load_adapter(model, dir)` or "
                         "`peft.PeftModel.from_pretrained(model, dir)`; fold in with `llmkit merge`")
        return "\n".join(lines)

    def _last_val(self) -> float | None:
        path = self.out / "metrics.jsonl"
        found = None
        if path.exists():
            for line in path.read_text().splitlines():
                found = json.loads(line).get("val_loss", found)
        return found


def split_prompt_reply(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An SFT batch as a seq2seq model reads it: encoder inputs (each row's tokens up to its first target) with
    their mask, and decoder targets (the labels from there on), both right-padded."""
    inputs, targets = [], []
    for ids, labels, segments in zip(batch["input_ids"], batch["labels"], batch["segment_ids"]):
        n = int((segments > 0).sum())
        first = int((labels[:n] != IGNORE).nonzero()[0])
        if first == 0:
            raise TrainError("an encoder-decoder learns replies to prompts: plain-text records have no prompt; "
                             "use alpaca / messages records")
        inputs.append(ids[: first + 1])
        targets.append(labels[first:n])
    pad_seq = torch.nn.utils.rnn.pad_sequence
    mask = pad_seq([torch.ones_like(i) for i in inputs], batch_first=True)
    return (pad_seq(inputs, batch_first=True, padding_value=pad_id), mask,
            pad_seq(targets, batch_first=True, padding_value=IGNORE))


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """Base + adapter -> one model directory with the adapter folded into the weights."""
    import llmkit

    model, tok = llmkit.load(model_dir)
    model = peft.load_adapter(model, adapter_dir, tok)
    try:
        peft.merge_and_unload(model)
    except peft.PeftError as e:  # name the adapter, as PEFT's safe_merge does
        raise peft.PeftError(f"{adapter_dir}: {e}") from None
    adapter_tok = Path(adapter_dir) / "tokenizer.json"
    if adapter_tok.is_file():  # the tokenizer (chat template) the adapter was trained with
        from llmkit.tokenizer import Tokenizer

        tok = Tokenizer.load(adapter_dir)
    out = llmkit.save(model, tok, out)
    card = Path(adapter_dir) / "README.md"
    if card.is_file():
        shutil.copy(card, Path(out) / "README.md")
    append_card_section(out, "Merged adapter", f"- base model: `{model_dir}`\n- adapter: `{adapter_dir}` "
                        f"({model.config.name}), folded into the weights by `llmkit merge`")
    return Path(out)
