"""The pretraining loop: accumulation, clipping, mixed precision, stability guards, exact resume.

Single process:   llmkit pretrain --config recipes/tinyshakespeare.yaml
Many processes:   torchrun --nproc-per-node 2 -m llmkit pretrain --config RECIPE.yaml --parallel fsdp

A checkpoint (OUT/checkpoints/step-N) is a model directory that transformers loads, plus
`trainer_state-rank*.pt` (optimiser, schedule, scaler, RNG, loop counters) and
`data_state.json` (the data loader's exact position): resuming from it continues exactly
as if the run had never stopped.
"""

from __future__ import annotations

import contextlib
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

from llmkit.card import model_card, write_card
from llmkit.checkpoint import load_model, write_checkpoint_files
from llmkit.config import PRESETS, ModelConfig
from llmkit.data.pack import TokenWindows, read_index, tokenizer_hash
from llmkit.model import Transformer, build_model
from llmkit.tokenizer import Tokenizer
from llmkit.train import distributed as dist_utils
from llmkit.train.objectives import OBJECTIVE_ARCHITECTURE, RouterLog, check_objective, lm_loss, make_batch
from llmkit.train.optim import build_optimizer, lr_multiplier
from llmkit.train.recipe import TrainConfig

STEP_DIR = "step-{:08d}"


class TrainError(ValueError):
    """The recipe, the data or the output directory cannot be used as asked."""


class SpikeRollback(Exception):
    """Raised inside a step when the loss spiked and the run must reload its last checkpoint."""


class Trainer:
    stage = "pretrain"  # names the progress bar and log lines

    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 on_step: Callable[[int, dict], None] | None = None):
        cfg.validate()
        self.cfg, self.out, self.on_step = cfg, Path(out), on_step
        self.env = dist_utils.setup(cfg.device)
        self.device = self.env.device
        self._prepare_out_dir(resume, overwrite)
        self.tokenizer = self._load_tokenizer()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.raw_model = self._build_model().to(self.device)
        check_objective(cfg.objective, self.raw_model.config.architecture)
        if cfg.activation_checkpointing:
            self.raw_model.set_activation_checkpointing(True)
        self.model = self._wrap_model()
        self.optimizer = build_optimizer(self._param_owner(), cfg.optimizer, cfg.lr, cfg.weight_decay,
                                         (cfg.beta1, cfg.beta2), cfg.eps, cfg.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(
            s, cfg.schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.decay_fraction))
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=cfg.fp16_init_scale,
                                           enabled=cfg.precision == "fp16")
        self.data_rank, self.data_world = self._data_shard()
        self.train_data = TokenWindows(cfg.data, "train", cfg.seq_len, cfg.seed, True, self.data_rank,
                                       self.data_world)
        self.step, self.tokens_seen, self.recent_losses = 0, 0, deque(maxlen=cfg.spike_window)
        self.router_log = RouterLog()  # MoE auxiliary losses and per-expert load (nothing for dense models)
        torch.manual_seed(cfg.seed + 1 + self.env.rank)  # dropout differs per rank, reproducibly
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if resume:
            self._restore(self._latest_checkpoint())
        self.metrics = self._open_metrics()
        self.tb = self._tensorboard()

    # -- setup

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        out = self.out
        if self.env.is_main and out.exists() and any(out.iterdir()) and not resume:
            if not overwrite:
                raise TrainError(f"{out}: output directory is not empty; pass --resume to continue the run "
                                 "in it or --overwrite to replace it")
            shutil.rmtree(out)
        dist_utils.barrier(self.env)
        if resume and not (out / "checkpoints").is_dir():
            raise TrainError(f"{out}: nothing to resume (no checkpoints/ directory)")
        out.mkdir(parents=True, exist_ok=True)

    def _wrap_model(self) -> torch.nn.Module:
        """The module the loop trains: DDP or FSDP2 under torchrun (llmkit.parallel overrides for tp/pp/cp)."""
        return dist_utils.wrap(self.raw_model, self.env, self.cfg)

    def _param_owner(self) -> torch.nn.Module:
        """The module whose parameters the optimiser steps and sharded checkpoints hold, under the model's names."""
        return self.raw_model

    def _data_shard(self) -> tuple[int, int]:
        """(rank, world size) among the processes that read different windows of the global batch."""
        return self.env.rank, self.env.world_size

    def _load_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        meta = read_index(cfg.data)
        path = cfg.tokenizer or str(Path(cfg.data) / "tokenizer")
        tok = Tokenizer.load(path)
        if tokenizer_hash(tok) != meta["tokenizer_hash"]:
            raise TrainError(f"{path}: tokenizer differs from the one {cfg.data} was packed with "
                             f"(hash {tokenizer_hash(tok)} vs {meta['tokenizer_hash']})")
        return tok

    def _build_model(self) -> Transformer:
        cfg, tok = self.cfg, self.tokenizer
        if Path(cfg.model).is_dir():
            model = load_model(cfg.model)
            if model.config.vocab_size < tok.vocab_size:
                raise TrainError(f"{cfg.model}: vocab_size {model.config.vocab_size} < tokenizer's {tok.vocab_size}")
            return model.float()
        if cfg.model not in PRESETS:
            raise TrainError(f"recipe field 'model': {cfg.model!r} is neither a checkpoint directory nor a preset "
                             f"({', '.join(sorted(PRESETS))})")
        fields = {"vocab_size": tok.vocab_size, "max_seq_len": max(cfg.seq_len, PRESETS[cfg.model].get("max_seq_len", 0)),
                  "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
                  **cfg.model_overrides}
        return build_model(ModelConfig.from_preset(cfg.model, **fields))

    def _open_metrics(self):
        if not self.env.is_main:
            return None
        self._truncate_metrics()
        return (self.out / "metrics.jsonl").open("a")

    def _truncate_metrics(self) -> None:
        """Drop records after the current step: a resumed or rolled-back run writes those steps again."""
        path = self.out / "metrics.jsonl"
        if not (self.env.is_main and path.exists()):
            return
        if getattr(self, "metrics", None):
            self.metrics.flush()
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    def _tensorboard(self):
        if not self.env.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional; metrics.jsonl has everything
            return None
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1)

    # -- the loop

    def fit(self) -> dict:
        cfg = self.cfg
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.stage, unit="step", file=sys.stderr,
                   disable=not self.env.is_main, dynamic_ncols=True)
        last: dict = {}
        t0 = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                try:
                    record = self._train_step()
                except SpikeRollback as spike:
                    self._rollback(str(spike))
                    bar.n = self.step
                    continue
                self.step += 1
                if cfg.eval_every and self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    record.update(self.evaluate())
                record["elapsed_s"] = round(time.perf_counter() - t0, 3)
                self._log(record)
                last = record
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    bar.set_postfix(_postfix(record), refresh=False)
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                if self.on_step:
                    self.on_step(self.step, record)
        finally:
            bar.close()
            if self.metrics:
                self.metrics.close()
            if self.tb:
                self.tb.close()
        if self.step == cfg.max_steps:
            self.save_final()
        return last

    def _accum_steps(self) -> int:
        cfg = self.cfg
        if not cfg.batch_ramp_tokens:
            return cfg.grad_accum
        frac = max(cfg.batch_ramp_start, min(1.0, self.tokens_seen / cfg.batch_ramp_tokens))
        return max(1, math.ceil(cfg.grad_accum * frac))

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self) -> dict:
        cfg, env = self.cfg, self.env
        start = time.perf_counter()
        self.model.train()
        accum = self._accum_steps()
        # objective noise is drawn from (seed, step), so a resumed run corrupts the same spans
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        micro = [make_batch(cfg.objective, *self.train_data.next_batch(cfg.micro_batch_size), gen,
                            self.raw_model.config.vocab_size, self.tokenizer) for _ in range(accum)]
        loss_value = self._forward_backward(micro)
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_grad_norm()
        record = {"step": self.step + 1, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": grad_norm, "batch_windows": accum * cfg.micro_batch_size * self.data_world}
        self._apply_update(record, grad_norm)
        tokens = accum * cfg.micro_batch_size * cfg.seq_len * self.data_world
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - start
        record.update(tokens=self.tokens_seen, tokens_per_s=round(tokens / elapsed, 1), **self.router_log.record())
        if cfg.precision == "fp16":
            record["loss_scale"] = self.scaler.get_scale()
        mfu = dist_utils.mfu(self.raw_model.config, cfg.seq_len, tokens / elapsed, self.device, env.world_size)
        if mfu is not None:
            record["mfu"] = round(mfu, 4)
        return record

    def _forward_backward(self, micro: list) -> float:
        """Forward and backward over one step's micro-batches; returns the global batch's mean loss."""
        env, accum = self.env, len(micro)
        # normalise by the labelled tokens of the whole global batch, so any split over ranks and
        # micro-batches gives the single-process gradient
        n_local = sum(int((labels != -100).sum()) for _, labels, _ in micro)
        n_global = dist_utils.all_reduce_sum(float(n_local), env)
        loss_sum = torch.zeros((), device=self.device)
        for i, (inputs, labels, extra) in enumerate(micro):
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            extra = {k: v.to(self.device) for k, v in extra.items()}  # prefix length, masks, decoder inputs
            with dist_utils.no_sync(self.model, env, last=i == accum - 1), self._autocast():
                logits = self.forward(inputs, **extra)
                loss = lm_loss(logits, labels, reduction="sum")
                aux = self.router_log.loss(self.raw_model, accum)
            self.scaler.scale(loss * env.world_size / n_global + aux).backward()
            loss_sum += loss.detach()
        return dist_utils.all_reduce_sum(float(loss_sum), env) / n_global

    def _clip_grad_norm(self) -> float:
        return dist_utils.clip_grad_norm(self.raw_model, self.cfg.grad_clip, self.env)

    def _apply_update(self, record: dict, grad_norm: float) -> bool:
        """Spike guard, then the optimiser step, or its skip on a non-finite loss or gradient; True if applied."""
        loss = record["loss"]
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite and self._is_spike(loss):
            self.optimizer.zero_grad(set_to_none=True)  # the spiking batch moves nothing
            if self.cfg.spike_rollback:
                raise SpikeRollback(f"step {self.step + 1}: loss {loss:.4f} spiked over its running mean")
            record["spike"] = True
        if finite:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
            self.recent_losses.append(loss)
            self._after_update(record)
        else:  # skip the update; with fp16 the scaler lowers its scale and the next step retries
            record["skipped"] = "non-finite loss or gradient"
            self._event({"event": "skip_nonfinite", "step": self.step + 1, "loss": loss, "grad_norm": grad_norm})
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _after_update(self, record: dict) -> None:
        """Hook for subclasses: runs after an applied optimiser step, while this step's gradients still exist."""

    def _is_spike(self, loss: float) -> bool:
        cfg = self.cfg
        if not cfg.spike_factor or len(self.recent_losses) < cfg.spike_window:
            return False
        return loss > cfg.spike_factor * (sum(self.recent_losses) / len(self.recent_losses))

    def _rollback(self, reason: str) -> None:
        """PaLM-style: reload the last checkpoint and skip the batches consumed since it."""
        position = self.train_data.state_dict()
        checkpoint = self._latest_checkpoint(required=False)
        if checkpoint is None:
            self._event({"event": "spike_no_checkpoint", "reason": reason, "step": self.step})
            self.recent_losses.clear()  # restart the running mean rather than reject every later step
            return
        self._restore(checkpoint)
        self.train_data.load_state_dict(position)  # keep the data position: the spiking batches are skipped
        self._truncate_metrics()
        self._event({"event": "spike_rollback", "reason": reason, "restored_step": self.step,
                     "data_position": position})

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.cfg
        self.model.eval()
        try:
            val = TokenWindows(cfg.data, "val", cfg.seq_len, shuffle=False, rank=self.data_rank,
                               world_size=self.data_world)
        except ValueError:  # no validation split (or too small): report nothing rather than fail the run
            return {}
        total, count = 0.0, 0
        for _ in range(min(cfg.eval_batches, max(1, len(val) // (cfg.micro_batch_size * self.data_world)))):
            x, y = val.next_batch(cfg.micro_batch_size)
            extra = {}
            if cfg.objective in OBJECTIVE_ARCHITECTURE:  # encoders have no causal loss: score their own objective
                x, y, extra = make_batch(cfg.objective, x, y, torch.Generator().manual_seed(cfg.seed),
                                         self.raw_model.config.vocab_size, self.tokenizer)
            loss_sum, tokens = self._eval_loss_sum(x.to(self.device), y.to(self.device),
                                                   {k: v.to(self.device) for k, v in extra.items()})
            total, count = total + loss_sum, count + tokens
        total = dist_utils.all_reduce_sum(total, self.env)
        count = dist_utils.all_reduce_sum(float(count), self.env)
        val_loss = total / count
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if self.env.is_main and cfg.sample_tokens and self.raw_model.config.architecture != "encoder":
            out["sample"] = self.sample()
        return out

    def _eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor, extra: dict) -> tuple[float, int]:
        """(summed loss, labelled tokens) this rank adds to the validation totals."""
        with self._autocast():
            logits = self.forward(x, **extra)
        return float(lm_loss(logits, y, reduction="sum")), int((y != -100).sum())

    def sample(self) -> str:
        from llmkit.infer.generate import GenerationConfig, generate_text
        from llmkit.infer.sampling import SamplingParams

        from llmkit.train.expert_parallel import expert_parallel_group

        if expert_parallel_group(self.raw_model) is not None:  # rank 0 alone cannot run the other ranks' experts
            return "(no sample: each process holds only its experts; load OUT/model to generate)"
        prompt = self.cfg.sample_prompt or "\n"
        gen = GenerationConfig(self.cfg.sample_tokens, SamplingParams(temperature=0.8, top_k=50, seed=self.cfg.seed))
        rng = torch.get_rng_state()  # sampling must not disturb the training RNG stream
        text = generate_text(self.raw_model, self.tokenizer, [prompt], gen)[0]
        torch.set_rng_state(rng)
        return prompt + text

    # -- logging

    def _log(self, record: dict) -> None:
        if not self.env.is_main:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key}", value,
                                       record["step"])
            if "sample" in record:
                self.tb.add_text("sample", record["sample"], record["step"])

    def _event(self, event: dict) -> None:
        if self.env.is_main:
            with (self.out / "events.jsonl").open("a") as f:
                f.write(json.dumps(event) + "\n")
            print(f"llmkit {self.stage}: {event['event']}: {event}", file=sys.stderr)

    # -- checkpoints

    def _card(self, extra: dict | None = None) -> str:
        meta = read_index(self.cfg.data)
        training = (f"- data: {self.cfg.data} ({meta['tokens']['train']:,} training tokens from "
                    f"{', '.join(meta.get('sources') or ['?'])})\n"
                    f"- steps: {self.step} of {self.cfg.max_steps}, tokens seen: {self.tokens_seen:,}\n"
                    f"- objective: {self.cfg.objective}, optimizer: {self.cfg.optimizer}, lr {self.cfg.lr:g}, "
                    f"schedule {self.cfg.schedule}, precision {self.cfg.precision}\n"
                    f"- recipe: `recipe.yaml` in the run directory")
        sections = {"Training": training}
        if self.recent_losses:
            sections["Results"] = f"- final training loss (mean of last {len(self.recent_losses)} steps): " \
                                  f"{sum(self.recent_losses) / len(self.recent_losses):.4f}"
            if extra:
                sections["Results"] += "".join(f"\n- {k}: {v:.4f}" for k, v in extra.items())
        return model_card(self.raw_model.config, self.tokenizer, sections)

    def save_checkpoint(self) -> Path:
        env = self.env
        final = self.out / "checkpoints" / STEP_DIR.format(self.step)
        tmp = None
        if env.is_main:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp = Path(dist_utils.broadcast_object(str(tmp) if tmp else None, env))
        state = self._full_state_dict()
        if env.is_main:
            write_checkpoint_files(self.raw_model, self.tokenizer, tmp, "5GB", state_dict=state)
            write_card(tmp, self._card())
            (tmp / "data_state.json").write_text(json.dumps(self.train_data.state_dict()))
        dist_utils.barrier(env)
        torch.save(self._trainer_state(), tmp / f"trainer_state-rank{env.rank}.pt")
        if dist_utils.sharded(env, self.cfg) or self.cfg.dcp_checkpoint:
            dist_utils.save_sharded(self._param_owner(), self.optimizer, tmp / "dcp")
        dist_utils.barrier(env)
        if env.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints()
        dist_utils.barrier(env)
        return final

    def _full_state_dict(self) -> dict | None:
        """The unsharded weights on rank 0 for safetensors; None means the raw model's own."""
        return dist_utils.model_state_for_save(self.model, self.raw_model, self.env)

    def _trainer_state(self) -> dict:
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "recent_losses": list(self.recent_losses),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(), "world_size": self.env.world_size,
        }
        if not dist_utils.sharded(self.env, self.cfg):
            state["optimizer"] = self.optimizer.state_dict()
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _prune_checkpoints(self) -> None:
        steps = sorted((self.out / "checkpoints").glob("step-*"))
        for old in steps[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _latest_checkpoint(self, required: bool = True) -> Path | None:
        steps = sorted(p for p in (self.out / "checkpoints").glob("step-*") if p.is_dir())
        if not steps:
            if required:
                raise TrainError(f"{self.out}/checkpoints: no checkpoint to resume from")
            return None
        return steps[-1]

    def _restore(self, path: Path) -> None:
        from safetensors.torch import load_file

        env = self.env
        state_file = path / f"trainer_state-rank{env.rank}.pt"
        reshardable = (path / "dcp").is_dir()
        if not state_file.is_file() and reshardable:  # written at another layout: loop state is rank 0's
            state_file = path / "trainer_state-rank0.pt"
        if not state_file.is_file():
            raise TrainError(f"{state_file}: missing; was the checkpoint written with the same number of processes?")
        # weights_only: a checkpoint's trainer state can hold tensors and plain containers, never code
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state["world_size"] != env.world_size and not reshardable:
            raise TrainError(f"{path}: written by {state['world_size']} processes, this run has {env.world_size} "
                             "(a checkpoint with a dcp/ folder reshards: see recipe field dcp_checkpoint)")
        if reshardable:  # model and optimiser by parameter name: any layout loads it
            dist_utils.load_sharded(self._param_owner(), self.optimizer, path / "dcp")
        else:
            from llmkit.checkpoint import from_hf_state_dict, hf_model_type, tie_state_dict

            raw = {}
            for f in sorted(path.glob("model*.safetensors")):
                raw.update(load_file(str(f), device=str(self.device)))
            cfg = self.raw_model.config
            sd = tie_state_dict(from_hf_state_dict(raw, cfg, hf_model_type(cfg)), cfg)
            self.raw_model.load_state_dict(sd)
            self.optimizer.load_state_dict(state["optimizer"])
        self._restore_loop(state, path)

    def _restore_loop(self, state: dict, path: Path) -> None:
        """Schedule, loss scaler, RNG, counters and data position: all a resumed run needs besides weights."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.recent_losses = deque(state["recent_losses"], maxlen=self.cfg.spike_window)
        self.train_data.load_state_dict(json.loads((path / "data_state.json").read_text()))

    def save_final(self) -> Path:
        """The trained model alone (no optimiser state) at OUT/model, with its card."""
        env = self.env
        state = self._full_state_dict()
        target = self.out / "model"
        if env.is_main:
            tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=self.out))
            write_checkpoint_files(self.raw_model, self.tokenizer, tmp, "5GB", state_dict=state)
            results = {}
            if self.metrics is not None:
                last_val = _last_with(self.out / "metrics.jsonl", "val_loss")
                if last_val:
                    results = {"validation loss": last_val["val_loss"], "validation perplexity": last_val["val_ppl"]}
            write_card(tmp, self._card(results))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        dist_utils.barrier(env)
        return target


def _last_with(path: Path, key: str) -> dict | None:
    found = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            found = record
    return found


def _postfix(record: dict) -> dict:
    out = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if "val_loss" in record:
        out["val"] = f"{record['val_loss']:.4f}"
    if "mfu" in record:
        out["mfu"] = f"{record['mfu']:.1%}"
    if "moe_load_max_min" in record:  # the most uneven MoE layer's busiest/idlest expert, and dropped assignments
        out["moe max/min"], out["dropped"] = f"{record['moe_load_max_min']:.2f}", record["moe_dropped"]
    for key in ("reward_mean", "kl", "val_reward", "val_accuracy"):  # alignment runs (llmkit/align)
        if key in record:
            out[key.removesuffix("_mean")] = f"{record[key]:.3f}"
    return out
