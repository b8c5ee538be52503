"""The epoch loop: distil the frozen original into the patched copy while its keep rate warms up.

AdamW (no decay on biases, norms, position and class tokens), cosine LR with warm-up, gradient
clipping and accumulation, autocast, optional ``torch.compile``, DDP; a tqdm bar per epoch, one
JSONL line per optimizer step, an evaluation on the held-out set before training and after every
epoch (the lowest KL kept as ``<output>/best``), checkpoints
every ``checkpoint_every`` steps, at every epoch end and when ``max_steps`` stops the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..bench.quality import compare
from ..deploy.atomic import write_atomically
from ..deploy.persist import save_pretrained
from ..families import find_family
from ..graph.state import get_config, reorganizers, set_keep
from . import checkpoint
from .distributed import Context, barrier, gather, mean
from .loss import finetune_loss
from .schedule import keep_at, lr_at

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
BEST_NAME = "best.json"
"""With a validation set: the evaluation of ``<output>/best``, the lowest validation KL of the run."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the step counts default to fractions of the run when ``None``."""

    epochs: int = 1
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    """LR warm-up; default 5 % of the optimizer steps."""
    keep_warmup: int | None = None
    """Keep-rate warm-up; default half of the optimizer steps."""
    temperature: float = 2.0
    ce_weight: float = 1.0
    distill_only: bool = False
    clip_grad: float | None = None
    grad_accum_steps: int = 1
    amp: str | None = None
    torchcompile: bool = False
    channels_last: bool = False
    max_steps: int | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 1

    def resolved(self, total_steps: int) -> tuple[int, int]:
        """``(lr warm-up steps, keep warm-up steps)`` for a run of ``total_steps``."""
        warmup = -(-total_steps // 20) if self.warmup_steps is None else self.warmup_steps  # ceil(5 %)
        keep_warmup = total_steps // 2 if self.keep_warmup is None else self.keep_warmup
        return warmup, keep_warmup


@dataclass
class Position:
    """Where the run is: optimizer steps done, current epoch, micro-batches consumed in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class JsonlLog:
    """One JSON object per line, rank 0 only; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if self._step(ln) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    @staticmethod
    def _step(line: str) -> float:
        """A line's step; a line torn by a kill counts as past any checkpoint."""
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            return math.inf

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


def keeps_every_token(student: nn.Module) -> bool:
    """Whether no reorganizer drops a token at its current keep rate (at the built input size).

    The student then computes exactly the teacher's function: the distillation loss is zero up
    to rounding, and AdamW would turn that rounding noise into full-size steps.
    """
    family = find_family(student)
    tokens = family.num_tokens(student) - family.num_prefix_tokens(student)
    return not any(m.reduction.drops(tokens, m.keep) for m in reorganizers(student))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW as timm builds it: no weight decay on 1-D parameters and ``no_weight_decay()`` names."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def validate(teacher: nn.Module, student: nn.Module, val, target, position: Position, log: JsonlLog) -> dict:
    """Student top-1, teacher top-1 and their agreement over the held-out batches (rank 0).

    The student is measured at its ``target`` keep rates, as it will be deployed, even while the
    warm-up has not reached them; the next step sets the scheduled rate again.
    """
    set_keep(student, target)
    student.eval()
    sums = {"teacher_top1": 0.0, "student_top1": 0.0, "agreement": 0.0, "mean_kl": 0.0}
    count = 0
    for images, labels, _ in val:
        c = compare(teacher, student, images, labels, progress=False)
        for key, value in zip(sums, (c.top1_original, c.top1_patched, c.agreement, c.mean_kl)):
            sums[key] += value * c.images
        count += c.images
    student.train()
    result = {"images": count, **{k: v / count for k, v in sums.items()}, "keep": list(target)}
    print(
        f"epoch {position.epoch} (step {position.step}, keep {result['keep']}): "
        f"student top-1 {100 * result['student_top1']:.1f} %, teacher top-1 {100 * result['teacher_top1']:.1f} %, "
        f"agreement {100 * result['agreement']:.1f} %, KL {result['mean_kl']:.4f} on {count} images",
        flush=True,
    )
    log.write({"step": position.step, "epoch": position.epoch, "eval": result})
    return result


class Trainer:
    """Owns the models, optimizer and position of one fine-tuning run."""

    def __init__(self, teacher, student, loader, cfg: TrainConfig, ctx: Context, output: Path, identity: dict):
        self.teacher, self.student, self.loader, self.cfg, self.ctx = teacher, student, loader, cfg, ctx
        self.output, self.identity = output, identity
        self.target = list(get_config(student).keep)
        batches = loader.batch_sampler
        self.steps_per_epoch = batches.steps_per_epoch
        self.total_steps = cfg.epochs * batches.steps_per_epoch
        self.lr_warmup, self.keep_warmup = cfg.resolved(self.total_steps)
        self.global_batch = batches.batch_size * ctx.world_size * cfg.grad_accum_steps
        memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
        teacher.to(ctx.device, memory_format=memory).eval().requires_grad_(False)
        student.to(ctx.device, memory_format=memory).train()
        self.memory_format = memory
        self.optimizer = build_optimizer(student, cfg)
        self.amp_dtype = AMP_DTYPES[cfg.amp] if cfg.amp else None
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype is torch.float16)
        self.ddp = DistributedDataParallel(student) if ctx.distributed else student
        self.forward = self.ddp
        self.position = Position()
        self.idle = False

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything but the weights that an exact resume needs (collective under DDP)."""
        return {
            "identity": self.identity,
            "step": self.position.step,
            "epoch": self.position.epoch,
            "batch": self.position.batch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": gather(checkpoint.rng_state(), self.ctx),
            "schedule": {"total_steps": self.total_steps, "lr_warmup": self.lr_warmup, "keep_warmup": self.keep_warmup},
        }

    def save(self) -> None:
        state = self.state()  # every rank joins the RNG gather
        if self.ctx.is_main:
            checkpoint.save(self.output, self.position.step, self.student, state, keep_last=self.cfg.keep_checkpoints)
        barrier(self.ctx)

    def resume(self, directory: Path) -> None:
        state = checkpoint.load_state(directory)
        checkpoint.check_same_run(state.get("identity", {}), self.identity, directory)
        checkpoint.load_weights(self.student, directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = Position(state["step"], state["epoch"], state["batch"])
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.ctx.rank] if len(rng) == self.ctx.world_size else rng[0])

    # -- one optimizer step ------------------------------------------------------------------
    def _prepare_step(self) -> float:
        step = self.position.step
        set_keep(self.student, keep_at(step, self.target, self.keep_warmup))
        if self.cfg.torchcompile and self.forward is self.ddp and step >= self.keep_warmup:
            # Compiled only once the keep rate is final: every warm-up value would recompile.
            self.forward = torch.compile(self.ddp)
        lr = lr_at(step, self.cfg.lr, self.total_steps, self.lr_warmup, self.cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Nothing to learn while the student is the teacher and there are no labels: skip the step.
        self.idle = keeps_every_token(self.student) and (self.cfg.distill_only or not self.cfg.ce_weight)
        return lr

    def _micro_step(self, images, labels, last: bool) -> tuple[torch.Tensor, ...]:
        if self.idle:
            return (torch.zeros((), device=self.ctx.device),) * 3
        x = images.to(self.ctx.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        y = None if self.cfg.distill_only else labels.to(self.ctx.device, non_blocking=True)
        sync = contextlib.nullcontext() if last or not self.ctx.distributed else self.ddp.no_sync()
        with sync, torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            parts = finetune_loss(
                self.forward(x), teacher_logits, y, temperature=self.cfg.temperature, ce_weight=self.cfg.ce_weight
            )
            self.scaler.scale(parts.total / self.cfg.grad_accum_steps).backward()
        return tuple(p.detach() for p in parts)

    def _optimizer_step(self) -> None:
        if self.idle:
            return
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, val=None, resumed: bool = False) -> dict:
        """Train to the end of the last epoch or to ``max_steps``; returns the evaluations."""
        from .data import start_epoch

        cfg, pos, ctx = self.cfg, self.position, self.ctx
        log = JsonlLog(self.output / "log.jsonl", ctx.is_main, pos.step if resumed else None)
        evals = []
        if val is not None and ctx.is_main and not resumed:
            evals.append(validate(self.teacher, self.student, val, self.target, pos, log))
            self._keep_if_best(evals[-1], pos)
        barrier(ctx)
        accum = cfg.grad_accum_steps
        stopped = cfg.max_steps is not None and pos.step >= cfg.max_steps
        while pos.epoch < cfg.epochs and not stopped:
            start_epoch(self.loader, pos.epoch, pos.batch)
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=pos.batch // accum,
                desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
                disable=not ctx.is_main,
                dynamic_ncols=True,
            )
            sums, micro, skipped, tick = None, 0, 0, time.perf_counter()
            for images, labels, skips in self.loader:
                if micro == 0:
                    lr = self._prepare_step()
                micro += 1
                parts = self._micro_step(images, labels, last=micro == accum)
                sums = parts if sums is None else tuple(a + b for a, b in zip(sums, parts))
                skipped += int(skips.sum())
                pos.batch += 1
                if micro < accum:
                    continue
                self._optimizer_step()
                pos.step += 1
                loss, kd, ce = (mean(s / accum, ctx).item() for s in sums)
                skipped = round(mean(torch.tensor(float(skipped)), ctx).item() * ctx.world_size)  # all ranks
                speed = self.global_batch / (time.perf_counter() - tick)
                record = {
                    "step": pos.step,
                    "epoch": pos.epoch,
                    "lr": lr,
                    "keep": list(get_config(self.student).keep),
                    "loss": loss,
                    "distill": kd,
                    "ce": ce,
                    "img_per_s": speed,
                    "skipped_images": skipped,
                }
                log.write(record)
                keep = record["keep"][0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", keep=f"{keep:.3f}", img_s=f"{speed:.1f}")
                bar.update()
                stopped = cfg.max_steps is not None and pos.step >= cfg.max_steps
                if stopped or (cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0):
                    self.save()
                if stopped:
                    break
                sums, micro, skipped, tick = None, 0, 0, time.perf_counter()
            bar.close()
            if stopped:
                break
            pos.epoch, pos.batch = pos.epoch + 1, 0
            self.save()
            if val is not None and ctx.is_main:
                evals.append(validate(self.teacher, self.student, val, self.target, pos, log))
                self._keep_if_best(evals[-1], pos)
            barrier(ctx)
        return {"evals": evals, "step": pos.step, "epoch": pos.epoch, "finished": pos.epoch >= cfg.epochs}

    def _keep_if_best(self, result: dict, position: Position) -> None:
        """Save the student as ``<output>/best`` when its validation KL to the teacher is the lowest
        so far (the first evaluation, before any step, is the patched model untouched), so that a
        run that makes things worse still leaves its best model behind."""
        record = self.output / BEST_NAME
        best = json.loads(record.read_text()) if record.is_file() else None
        if best is not None and result["mean_kl"] >= best["mean_kl"]:
            return
        save_pretrained(self.student, self.output / "best", overwrite=True)  # the run's own, replaced when bettered
        chosen = {"step": position.step, "epoch": position.epoch, **result}
        write_atomically(record, lambda tmp: Path(tmp).write_text(json.dumps(chosen, indent=2) + "\n"))
        print(
            f"step {position.step}: lowest validation KL so far ({result['mean_kl']:.4f}), saved {self.output / 'best'}"
        )

    def save_final(self) -> Path | None:
        """The deliverable: the student at its target keep rate, as ``<output>/final``."""
        set_keep(self.student, self.target)
        path = None
        if self.ctx.is_main:
            path = save_pretrained(self.student, self.output / "final", overwrite=True)  # a resumed run's too
        barrier(self.ctx)
        return path
