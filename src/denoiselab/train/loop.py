"""The training loop: one readable function, progress counted in images seen.

Every random draw of step ``s`` comes from ``(seed, s, shard)`` (``shard = rank·accum + micro``)
and the batch of step ``s`` is a pure function of ``(seed, s)``: resuming at any checkpoint
reproduces the uninterrupted run bit for bit, and ``W`` DDP ranks equal one process with
``grad_accum = W``. Techniques add loss terms to the objective or register callbacks; they do
not edit this loop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from denoiselab.algorithms import TermContext
from denoiselab.config import ConfigError
from denoiselab.data import build_dataset
from denoiselab.data.loader import StepLoader
from denoiselab.images import save_grid
from denoiselab.latents import decoder_for
from denoiselab.models import JiT
from denoiselab.sampling.generate import Sampler, balanced_labels
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.allocator import retain_freed_memory
from denoiselab.train.build import (
    build_objective,
    config_yaml_with_model,
    resolve_model_config,
    run_sampler,
)
from denoiselab.train.config import TrainConfig
from denoiselab.train.distributed import all_reduce_mean, barrier, init_distributed
from denoiselab.train.ema import EMA, auto_decay
from denoiselab.train.module import TrainingModule
from denoiselab.train.optim import build_optimizer
from denoiselab.train.periodic import evaluate_network
from denoiselab.train.progress import ProgressBar, format_duration
from denoiselab.train.run import RunFolder, plot_loss
from denoiselab.train.stepclock import NO_CLOCK, StepClock


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the first such step."""


def mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 steps), so nearby tuples decorrelate."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class TrainState:
    """What callbacks see after each optimizer step (tensors stay on device)."""

    step: int
    nimg: int
    terms: dict[str, Tensor]
    model: nn.Module
    run: RunFolder


Callback = Callable[[TrainState], None]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _lr_at(step: int, base: float, warmup_steps: float, total: int, cooldown_steps: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then constant (Table 9); with
    ``cooldown_steps`` > 0, a linear fall to 0 over the last ``cooldown_steps`` of ``total``."""
    factor = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    if cooldown_steps > 0:
        factor = min(factor, max(0.0, (total - step) / cooldown_steps))
    return base * factor


class Trainer:
    """Holds the state of one run; :meth:`run` is the loop."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        resume: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        quiet: bool = False,
    ) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.quiet = quiet
        self.dist, self.device = init_distributed(cfg.device)
        if self.device.type == "cpu":
            retain_freed_memory()  # no fresh pages from the kernel every step (train.allocator)
        shards = self.dist.world_size * cfg.grad_accum
        if cfg.global_batch % shards:
            raise ConfigError(
                f"global_batch={cfg.global_batch} must be divisible by world_size × grad_accum "
                f"= {self.dist.world_size} × {cfg.grad_accum}"
            )
        if cfg.deterministic:
            if self.device.type == "cuda":  # cuBLAS is only deterministic with a fixed workspace
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.dataset = build_dataset(cfg.data)
        self.model_cfg = resolve_model_config(
            cfg,
            image_size=self.dataset.image_size,
            channels=self.dataset.channels,
            num_classes=self.dataset.num_classes,
        )
        torch.manual_seed(mix_seed(cfg.seed, 0xA11CE))
        self.model = JiT(self.model_cfg).to(self.device)
        terms = TermContext(self.model_cfg, cfg.objective, cfg.data, self.dataset, self.device)
        self.objective = build_objective(cfg, self.model_cfg.num_classes, terms).to(self.device)
        # network + loss terms: what DDP averages and the optimizer, clipping and checkpoints see
        self.module = TrainingModule(
            self.model, self.objective, torch.compile(self.model) if cfg.compile else None
        )
        self.lr = cfg.optim.resolved_lr(cfg.global_batch)
        self.warmup_steps = cfg.optim.warmup_epochs * len(self.dataset) / cfg.global_batch
        self.total_steps = cfg.steps()
        self.cooldown_steps = cfg.optim.cooldown * self.total_steps
        self.optimizer = build_optimizer(cfg.optim, self.module, self.lr, self.device)
        self.ema = EMA(self.model, cfg.ema.decays, cfg.ema.warmup)
        self.config_yaml = config_yaml_with_model(cfg, self.model_cfg)
        # latents → pixels for sample grids (identity for pixel data)
        self.decode = decoder_for(cfg.data, self.device)
        self.start_step = 0
        self.progress: ProgressBar | None = None
        if resume is not None:
            self._restore(resume)
        self.run_dir = RunFolder(out_dir, self.dist.is_main)
        self.run_dir.write_text("config.yaml", self.config_yaml)
        self.run_dir.write_meta({"world_size": self.dist.world_size, "device": str(self.device)})
        self.run_dir.truncate_metrics(self.start_step)
        self.step_module: nn.Module = self.module
        self.step_clock: StepClock = NO_CLOCK  # bench --breakdown times the step's phases
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(self.module, device_ids=ids)

    # -- checkpoints ---------------------------------------------------------------------------
    def _restore(self, path: str | Path) -> None:
        ck = ckpt_io.load_checkpoint(path)
        self.model.load_state_dict(ck.model)
        try:
            self.objective.load_state_dict(ck.objective or {})
        except RuntimeError as e:
            raise ckpt_io.CheckpointError(
                f"{ck.path}: the loss terms' state does not match this run's objective ({e})"
            ) from e
        try:
            self.optimizer.load_state_dict(ck.optimizer)
        except ValueError as e:
            raise ckpt_io.CheckpointError(
                f"{ck.path}: its optimizer state does not match this run's parameters ({e})"
            ) from e
        for decay in self.cfg.ema.decays:
            if decay not in ck.ema:
                raise ckpt_io.CheckpointError(
                    f"{ck.path}: no EMA with decay {decay} (has {sorted(ck.ema)})"
                )
            self.ema.load(decay, ck.ema[decay])
        self.start_step = ck.step
        self.log(f"resumed from {ck.path} at step {ck.step}")

    def save(self, step: int) -> None:
        if self.dist.is_main:
            ckpt_io.save_checkpoint(
                self.run_dir.checkpoints,
                step,
                config_yaml=self.config_yaml,
                model=ckpt_io.state_dict_cpu(self.model),
                ema={d: self.ema.state(d) for d in self.ema.decays},
                optimizer=self.optimizer.state_dict(),
                objective=ckpt_io.state_dict_cpu(self.objective),
                loop_state={"step": step, "nimg": step * self.cfg.global_batch},
                keep=self.cfg.keep_checkpoints,
            )
        barrier(self.dist)

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self, step: int, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Forward/backward over ``grad_accum`` micro-batches, then one AdamW step.

        Returns the detached per-term means (on device; no host synchronisation).
        ``self.step_clock`` is told when each phase ends (``train.stepclock``; a no-op
        unless ``denoiselab bench --breakdown`` installs a timer).
        """
        cfg, clock = self.cfg, self.step_clock
        lr = _lr_at(step, self.lr, self.warmup_steps, self.total_steps, self.cooldown_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.grad_accum
        micro = images.shape[0] // accum
        totals: dict[str, Tensor] = {}
        for k in range(accum):
            shard = self.dist.rank * accum + k
            seed = mix_seed(cfg.seed, step, shard)
            _seed_global(mix_seed(seed, 1), self.device)  # dropout and any other global draws
            gen = torch.Generator(self.device).manual_seed(seed)
            clock.lap("bookkeeping")
            x = images[k * micro : (k + 1) * micro].to(self.device, non_blocking=True)
            y = labels[k * micro : (k + 1) * micro].to(self.device, non_blocking=True)
            clock.lap("data")
            last = k == accum - 1
            sync = (
                contextlib.nullcontext()
                if last or not self.dist.enabled
                else self.step_module.no_sync()
            )
            with sync:
                with self.autocast():
                    terms = self.step_module(x, y, gen, nimg=step * cfg.global_batch)
                means = {name: t.mean() for name, t in terms.items()}
                loss = _total(means.values(), accum)
                clock.lap("loss")
                loss.backward()
                clock.lap("backward")
            for name, m in means.items():
                m = m.detach() if accum == 1 else m.detach() / accum
                totals[name] = totals[name] + m if name in totals else m
        clock.lap("bookkeeping")
        if cfg.optim.grad_clip is not None:
            totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                self.module.trainable(), cfg.optim.grad_clip
            ).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        self.ema.update(self.model, step)
        clock.lap("ema")
        return totals

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        total = self.total_steps
        log_every, sample_every, ckpt_every = (
            cfg.every(cfg.log_every_nimg),
            cfg.every(cfg.sample_every_nimg),
            cfg.every(cfg.ckpt_every_nimg),
        )
        eval_every = cfg.every(cfg.eval.every_nimg) if cfg.eval.every_nimg else 0
        loader = StepLoader(
            self.dataset,
            seed=cfg.seed,
            global_batch=cfg.global_batch,
            shard_index=self.dist.rank,
            num_shards=self.dist.world_size,
            start_step=self.start_step,
            num_workers=cfg.data.num_workers,
        )
        self.model.train()
        sums: dict[str, Tensor] = {}
        count = 0
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        t_last, step_last = time.perf_counter(), self.start_step
        t_start = t_last
        if self.dist.is_main and not self.quiet:
            self.progress = ProgressBar(total, self.start_step, cfg.global_batch, sys.stderr)
        for step, images, labels in loader:
            if step >= total:
                break
            terms = self.train_step(step, images, labels)
            finite = torch.isfinite(sum(terms.values()))
            first_bad = torch.where((first_bad < 0) & ~finite, step + 1, first_bad)
            for name, v in terms.items():
                sums[name] = sums.get(name, 0) + v
            count += 1
            done = step + 1
            state = TrainState(done, done * cfg.global_batch, terms, self.model, self.run_dir)
            for callback in self.callbacks:
                callback(state)
            is_last = done == total
            if self.progress is not None:
                self.progress.update(done, functools.partial(_running_loss, sums, count))
            if done % log_every == 0 or is_last:
                self._check_finite(first_bad)
                now = time.perf_counter()
                rate = (done - step_last) * cfg.global_batch / max(now - t_last, 1e-9)
                self._log_row(done, sums, count, rate, (total - done) * cfg.global_batch / rate)
                sums, count, t_last, step_last = {}, 0, now, done
            if done % sample_every == 0 or is_last:
                self.sample_grid(done)
            if eval_every and (done % eval_every == 0 or is_last):
                self.evaluate(done)
            if done % ckpt_every == 0 or is_last:
                self._check_finite(first_bad)
                self.save(done)
                if self.dist.is_main:
                    plot_loss(self.run_dir.metrics_path, self.run_dir.root / "loss.png")
        self.log(
            f"done: {total} steps in {time.perf_counter() - t_start:.1f}s → {self.run_dir.root}"
        )
        return self.run_dir.root

    def _check_finite(self, first_bad: Tensor) -> None:
        bad = int(first_bad.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"loss is not finite at step {bad} (after {bad * self.cfg.global_batch} images); "
                f"stopped; the last good checkpoint in {self.run_dir.checkpoints} is kept. "
                "Try a lower learning rate or optim.grad_clip."
            )

    def _log_row(
        self, step: int, sums: dict[str, Tensor], count: int, rate: float, eta: float
    ) -> None:
        means = {k: all_reduce_mean(v / count, self.dist).item() for k, v in sums.items()}
        loss = _loss_total(means)
        row: dict[str, Any] = {
            "step": step,
            "nimg": step * self.cfg.global_batch,
            "kimg": step * self.cfg.global_batch / 1000,
            "loss": loss,
            **{f"loss/{k}" if k != "grad_norm" else k: v for k, v in means.items()},
            **self.objective.logs(step * self.cfg.global_batch),
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": rate,
        }
        self.run_dir.log(row)
        self.log(
            f"step {step}/{self.total_steps} | kimg {row['kimg']:.1f} | loss {loss:.4f} | "
            f"{rate:.1f} img/s | ETA {format_duration(eta)}"
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision (bf16 autocast on CUDA under ``precision: auto``)."""
        return _autocast(self.device, self.cfg.precision)

    def ema_network(self, ema: float | str, step: int) -> nn.Module:
        """A fresh eval-mode network holding EMA weights after ``step`` steps: ``ema`` a
        trained decay, ``"auto"`` (:func:`~denoiselab.train.ema.auto_decay`; the raw weights
        if no EMA is kept) or ``"none"`` (the raw weights)."""
        net = JiT(self.model_cfg).to(self.device).eval()
        net.load_state_dict(self.model.state_dict())
        if ema == "none" or not self.ema.decays:
            return net
        decay = auto_decay(self.ema.decays, step) if ema == "auto" else float(ema)
        if decay not in self.ema.decays:
            raise ConfigError(f"EMA decay {ema!r} is not kept; kept: {list(self.ema.decays)}")
        self.ema.copy_to(net, decay)
        return net

    def evaluate(self, step: int) -> dict[str, float]:
        """The periodic evaluation (``cfg.eval``) of the weights at ``step``, logged to
        ``metrics.jsonl`` as ``eval/<metric>``. Under DDP every rank generates a share of the
        samples (``metrics.evaluate`` shards the batches) and all get the same values."""
        tic = time.perf_counter()
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # training's random stream stays untouched
            net = self.ema_network(self.cfg.eval.ema, step)
            values = evaluate_network(
                self.sampler(net), self.cfg, self.model_cfg.num_classes, self.device
            )
        row = {"step": step, "nimg": step * self.cfg.global_batch}
        row["kimg"] = row["nimg"] / 1000
        row.update({f"eval/{k}": v for k, v in values.items()})
        row["eval_seconds"] = time.perf_counter() - tic
        self.run_dir.log(row)  # rank 0 only
        shown = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
        self.log(f"eval step {step} | {shown} | {row['eval_seconds']:.1f}s")
        return values

    def sampler(self, net: nn.Module) -> Sampler:
        """``net`` (this run's network or an EMA copy) ready to draw decoded images under the
        run's autocast."""
        return run_sampler(
            net, self.objective, self.cfg, self.model_cfg, self.decode, self.device, self.autocast
        )

    @torch.no_grad()
    def sample_grid(self, step: int) -> None:
        """Samples from fixed noise and labels with an EMA copy, saved as ``samples/*.png``."""
        if not self.dist.is_main:
            return
        cfg = self.cfg.sample
        net = self.ema_network(cfg.ema if cfg.ema is not None else "auto", step)
        mc = self.model_cfg
        n = cfg.num_grid
        labels = balanced_labels(n, mc.num_classes)
        images = self.sampler(net)(
            labels,
            self.cfg.seed + 1,
            steps=cfg.steps,
            solver=cfg.solver,
            cfg_scale=cfg.cfg,
            interval=cfg.interval,
        )
        nrow = mc.num_classes if n % mc.num_classes == 0 and mc.num_classes <= 16 else None
        save_grid(images, self.run_dir.root / "samples" / f"step_{step:09d}.png", nrow)

    def log(self, message: str) -> None:
        if self.dist.is_main and not self.quiet:
            if self.progress is not None:
                self.progress.clear()
            print(message, file=sys.stderr, flush=True)


def _total(means: Iterable[Tensor], accum: int) -> Tensor:
    """The loss to differentiate: the sum of the term means over ``accum`` micro-batches
    (one add per extra term, no division when there is one micro-batch)."""
    it = iter(means)
    loss = next(it)
    for m in it:
        loss = loss + m
    return loss if accum == 1 else loss / accum


def _seed_global(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a step can draw from: the CPU one and,
    when training on CUDA, the CUDA ones (``torch.manual_seed`` also visits every other
    backend's generators: ~90 µs per call on CPU, more than the rest of this function)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def _loss_total(terms: dict[str, Any]) -> Any:
    """The loss: the sum of the loss terms (the gradient norm is logged beside them)."""
    return sum(v for k, v in terms.items() if k != "grad_norm")


def _running_loss(sums: dict[str, Tensor], count: int) -> float:
    """Mean loss since the last log line, this rank."""
    return float(_loss_total(sums)) / max(count, 1)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    quiet: bool = False,
) -> Path:
    """Train ``cfg`` into run folder ``out_dir`` (resuming from ``resume`` if given)."""
    return Trainer(cfg, out_dir, resume=resume, callbacks=callbacks, quiet=quiet).run()
