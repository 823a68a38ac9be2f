"""The training loop: one readable function, progress counted in images seen.

Every random draw of step ``s`` comes from ``(seed, s, shard)`` (``shard = rank·accum + micro``)
and the batch of step ``s`` is a pure function of ``(seed, s)``: resuming at any checkpoint
reproduces the uninterrupted run bit for bit, and ``W`` DDP ranks equal one process with
``grad_accum = W``. Techniques add loss terms to the objective or register callbacks; they do
not edit this loop. What is due after a step (log row, sample grid, evaluation, checkpoint)
is ``train.schedule``'s; what a checkpoint holds is ``train.state``'s; stopping on SIGTERM or
SIGUSR1 is ``train.preempt``'s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from denoiselab.algorithms import TermContext
from denoiselab.config import ConfigError
from denoiselab.data import build_dataset
from denoiselab.data.loader import StepLoader
from denoiselab.latents import decoder_for
from denoiselab.models.registry import build_network
from denoiselab.sampling.generate import Sampler
from denoiselab.text.data import class_prompts, text_dataset
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train import state
from denoiselab.train.allocator import retain_freed_memory
from denoiselab.train.build import (
    build_objective,
    config_yaml_with_model,
    model_config_for,
    run_sampler,
    text_sampler,
)
from denoiselab.train.config import TrainConfig
from denoiselab.train.distributed import DistributedError, init_distributed, is_comm_failure
from denoiselab.train.ema import EMA
from denoiselab.train.module import TrainingModule
from denoiselab.train.optim import build_optimizer, lr_at
from denoiselab.train.parallel import build_strategy, full, uses_bf16
from denoiselab.train.periodic import (
    check_eval_ready,
    draw_grid,
    ema_network,
    evaluate_run,
    one_class_note,
)
from denoiselab.train.preempt import Preempted, StopRequest
from denoiselab.train.progress import ProgressBar, format_duration
from denoiselab.train.run import RunFolder, plot_loss
from denoiselab.train.schedule import Schedule
from denoiselab.train.seeding import mix_seed, seed_global
from denoiselab.train.stepclock import NO_CLOCK, StepClock
from denoiselab.train.tracking import require_backends
from denoiselab.train.window import (
    LossWindow,
    NonFiniteGradientError,
    NonFiniteLossError,
    loss_total,
)

__all__ = [
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "Trainer",
    "UnusedTermParametersError",
    "train",
]

PLOT_EVERY_S = 60.0  # redraw loss.png at most this often (it costs ~0.3 s), and at the end


class UnusedTermParametersError(RuntimeError):
    """A loss term left parameters without a gradient but does not declare ``may_skip``."""


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
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Trainer:
    """Holds the state of one run; :meth:`run` is the loop.

    ``resume``: a run folder (its newest checkpoint that loads; newer unreadable ones are
    reported and skipped), a checkpoint file, or a loaded :class:`~.checkpoint.Checkpoint`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        resume: str | Path | ckpt_io.Checkpoint | None = None,
        callbacks: Sequence[Callback] = (),
        quiet: bool = False,
    ) -> None:
        require_backends(cfg.log)  # a missing tracker package fails now, not after set-up
        cfg = cfg.resolved()  # noise_scale "auto" → its number, recorded in config.yaml
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.quiet = quiet
        self.dist, self.device = init_distributed(cfg.device, cfg.dist_timeout_s)
        if self.device.type == "cpu":
            retain_freed_memory()  # no fresh pages from the kernel every step (train.allocator)
        shards = self.dist.world_size * cfg.grad_accum
        if cfg.global_batch % shards:
            raise ConfigError(
                f"global_batch={cfg.global_batch} must be divisible by world_size × grad_accum "
                f"= {self.dist.world_size} × {cfg.grad_accum}"
            )
        check_eval_ready(cfg)
        if cfg.deterministic:
            if self.device.type == "cuda":  # cuBLAS is only deterministic with a fixed workspace
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.dataset = build_dataset(cfg.data)
        self.model_cfg = model_config_for(cfg, self.dataset)
        # a text run: captions as token ids instead of labels
        self.dataset = text_dataset(self.dataset, self.model_cfg)
        self._class_prompts: list[list[str]] | None = None  # class_prompts(), built on demand
        torch.manual_seed(mix_seed(cfg.seed, 0xA11CE))
        self.model = build_network(self.model_cfg).to(self.device)
        terms = TermContext(self.model_cfg, cfg.objective, cfg.data, self.dataset, self.device)
        self.objective = build_objective(cfg, self.model_cfg, terms).to(self.device)
        # network + loss terms: what DDP averages (FSDP shards) and the optimizer, clipping and
        # checkpoints see; the strategy wraps it (and may replace its parameters by shards)
        self.module = TrainingModule(self.model, self.objective)
        self.parallel = build_strategy(cfg, self.dist, self.device)
        try:
            self._build(cfg, out_dir, resume)
        except BaseException:
            self.parallel.close()
            raise

    def _build(self, cfg: TrainConfig, out_dir: str | Path, resume: Any) -> None:
        """The rest of the set-up, after the strategy exists (its own process group, if it
        made one, is released when this fails)."""
        self.step_module: nn.Module = self.parallel.wrap(self.module)
        self.lr = cfg.optim.resolved_lr(cfg.global_batch)
        self.warmup_steps = cfg.optim.warmup_epochs * len(self.dataset) / cfg.global_batch
        self.total_steps = cfg.steps()
        self.cooldown_steps = cfg.optim.cooldown * self.total_steps
        self.optimizer = build_optimizer(cfg.optim, self.module, self.lr, self.device)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.ema = EMA(self.model, cfg.ema.decays, cfg.ema.warmup)
        self.window = LossWindow(self.device)
        self.schedule = Schedule.of(cfg)
        self.config_yaml = config_yaml_with_model(cfg, self.model_cfg)
        # latents → pixels for sample grids (identity for pixel data)
        self.decode = decoder_for(cfg.data, self.device)
        self.progress: ProgressBar | None = None
        self.eval_models: dict[str, Any] = {}  # scorers periodic evaluation loaded (kept)
        self.start_step = state.resume(self, resume) if resume is not None else 0
        self.run_dir = RunFolder(out_dir, self.dist.is_main)
        state.claim_run_folder(self, resuming=resume is not None)
        self.run_dir.write_text("config.yaml", self.config_yaml)
        self.run_dir.write_meta({"world_size": self.dist.world_size, "device": str(self.device)})
        self.run_dir.truncate_metrics(self.start_step)
        self.run_dir.start_tracking(cfg.log, self.config_yaml, self.start_step)
        self.step_clock: StepClock = NO_CLOCK  # bench --breakdown times the step's phases
        if self.parallel.note:
            self.log(self.parallel.note)
        note = one_class_note(cfg.eval.metrics, self.model_cfg.num_classes)
        if note and cfg.eval.every_nimg > 0:
            self.log(note)

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int) -> Path | None:
        """Checkpoint the run after ``step`` steps (rank 0 writes; a collective)."""
        return state.save(self, step)

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(
        self, step: int, images: Tensor, labels: Tensor, extras: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Forward/backward over ``grad_accum`` micro-batches, then one optimizer step.

        ``extras``: the batch's per-sample side data, split like the images and handed to the
        loss terms. Returns the detached per-term means (on device; no host synchronisation).
        ``self.step_clock`` is told when each phase ends (``train.stepclock``; a no-op unless
        ``denoiselab bench --breakdown`` installs a timer).
        """
        cfg, clock = self.cfg, self.step_clock
        factor = lr_at(step, 1.0, self.warmup_steps, self.total_steps, self.cooldown_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        accum = cfg.grad_accum
        micro = images.shape[0] // accum
        extras = extras or {}
        totals: dict[str, Tensor] = {}
        for k in range(accum):
            shard = self.dist.rank * accum + k
            seed = mix_seed(cfg.seed, step, shard)
            seed_global(mix_seed(seed, 1), self.device)  # dropout and any other global draws
            gen = torch.Generator(self.device).manual_seed(seed)
            clock.lap("bookkeeping")
            x = images[k * micro : (k + 1) * micro].to(self.device, non_blocking=True)
            y = labels[k * micro : (k + 1) * micro].to(self.device, non_blocking=True)
            side = {n: v[k * micro : (k + 1) * micro].to(self.device) for n, v in extras.items()}
            clock.lap("data")
            last = k == accum - 1
            with self.parallel.accumulating(self.step_module, last):
                with self.autocast():
                    terms = self.step_module(x, y, gen, nimg=step * cfg.global_batch, extras=side)
                means = {name: t.mean() for name, t in terms.items()}
                loss = _total(means.values(), accum)
                clock.lap("loss")
                loss.backward()
                clock.lap("backward")
            for name, m in means.items():
                m = m.detach() if accum == 1 else m.detach() / accum
                totals[name] = totals[name] + m if name in totals else m
        clock.lap("bookkeeping")
        unused = self.module.unused_term_parameters()
        if unused:  # under DDP their gradients were not averaged: never step on them
            raise UnusedTermParametersError(
                f"step {step + 1}: loss-term parameters {unused} got no gradient; a term that "
                "may skip its parameters on some steps must set may_skip = True"
            )
        if cfg.optim.grad_clip is not None:
            totals["grad_norm"] = full(  # FSDP: a replicated DTensor → its local value
                torch.nn.utils.clip_grad_norm_(self.module.trainable(), cfg.optim.grad_clip)
            ).detach()
        self._note_gradient(step, totals.get("grad_norm"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        self.ema.update(self.model, step)
        clock.lap("ema")
        return totals

    def _note_gradient(self, step: int, norm: Tensor | None) -> None:
        """Remember (on device, no host sync) the first step whose gradient is not finite
        (the clipping norm when clipping, else one norm over all trained gradients)."""
        if norm is None:
            grads = [p.grad for p in self.module.trainable() if p.grad is not None]
            norm = full(torch.nn.utils.get_total_norm(grads))
        self.window.note_gradient(step, norm)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to the end; raises :class:`~.preempt.Preempted` after a stop request."""
        cfg = self.cfg
        loader = StepLoader(
            self.dataset,
            seed=cfg.seed,
            global_batch=cfg.global_batch,
            shard_index=self.dist.rank,
            num_shards=self.dist.world_size,
            start_step=self.start_step,
            num_workers=cfg.data.resolved_num_workers,
            prefetch_factor=cfg.data.prefetch_factor,
            pin_memory=self.device.type == "cuda",  # the step's non-blocking copies need it
        )
        self.model.train()
        t_start = time.perf_counter()
        self._clock = (t_start, self.start_step)  # time and step of the last log row
        self._plotted = t_start
        if self.dist.is_main and not self.quiet:
            self.progress = ProgressBar(
                self.total_steps, self.start_step, cfg.global_batch, sys.stderr
            )
        with StopRequest(self.dist, self.device, cfg.stop_check_steps) as self.stop:
            step = self.start_step
            try:
                for step, images, labels, extras in loader.iter_with_extras():
                    if step >= self.total_steps:
                        break
                    terms = self.train_step(step, images, labels, extras)
                    self.window.add(step, terms)
                    self._after_step(step + 1, terms)
            except RuntimeError as e:
                if not (self.dist.enabled and is_comm_failure(e)):
                    raise
                cause = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                # Released while the stop handlers still hold: torchrun SIGTERMs the surviving
                # ranks at once, and a SIGTERM after they are restored would end this process
                # (exit -15) before the message below is printed.
                self.close()
                raise DistributedError(
                    f"rank {self.dist.rank} lost the other ranks at step {step + 1} "
                    f"({cause.strip()[:200]}): one died or hung longer than "
                    f"dist_timeout_s={cfg.dist_timeout_s:g}; checkpoints in "
                    f"{self.run_dir.checkpoints} are intact: resume with --resume "
                    f"{self.run_dir.root}"
                ) from e
        elapsed = time.perf_counter() - t_start
        if self.parallel.sharded and cfg.consolidate_at_end:
            state.consolidate_newest(self)
        self.log(f"done: {self.total_steps} steps in {elapsed:.1f}s → {self.run_dir.root}")
        self.run_dir.close()
        return self.run_dir.root

    def close(self) -> None:
        """Flush the trackers and release the strategy's own process group (idempotent)."""
        self.run_dir.close()
        self.parallel.close()

    def _after_step(self, done: int, terms: dict[str, Tensor]) -> None:
        """Callbacks, then what is due after step ``done``, then a stop if one was asked."""
        info = TrainState(done, done * self.cfg.global_batch, terms, self.model, self.run_dir)
        for callback in self.callbacks:
            callback(info)
        if self.progress is not None:
            self.progress.update(done, self.window.running_loss)
        due = self.schedule.due(done)
        stopping = self.stop.agreed(done)  # a stop must be quick: it skips a grid or evaluation
        if due.log:
            self._log_row(done)
        if due.checkpoint or stopping:  # first: a grid or evaluation that fails costs no steps
            self._check_finite()
            self.save(done)
        if due.sample and not stopping:
            self.sample_grid(done)
        if due.evaluate and not stopping:
            self.evaluate(done)
        if stopping:
            self._plot(force=True)
            raise Preempted(done, self.stop.signum, self.run_dir.root)

    def _check_finite(self) -> None:
        self.window.check_finite(self.dist, self.cfg.global_batch, self.run_dir.checkpoints)

    def _log_row(self, step: int) -> None:
        self._check_finite()
        now = time.perf_counter()
        t_last, step_last = self._clock
        rate = (step - step_last) * self.cfg.global_batch / max(now - t_last, 1e-9)
        eta = (self.total_steps - step) * self.cfg.global_batch / max(rate, 1e-9)
        means = self.window.means(self.dist)
        self.window.reset()
        self._clock = (now, step)
        loss = loss_total(means)
        nimg = step * self.cfg.global_batch
        row: dict[str, Any] = {
            "step": step,
            "nimg": nimg,
            "kimg": nimg / 1000,
            "loss": loss,
            **{f"loss/{k}" if k != "grad_norm" else k: v for k, v in means.items()},
            **self.objective.logs(nimg),
            "lr": self.optimizer.param_groups[0]["lr"],
            "img_per_s": rate,
        }
        self.run_dir.log(row)
        self.log(
            f"step {step}/{self.total_steps} | kimg {row['kimg']:.1f} | loss {loss:.4f} | "
            f"{rate:.1f} img/s | ETA {format_duration(eta)}"
        )
        self._plot(force=step == self.total_steps)

    def _plot(self, force: bool) -> None:
        """Redraw ``loss.png`` from ``metrics.jsonl`` (rank 0; at most every PLOT_EVERY_S)."""
        now = time.perf_counter()
        if self.dist.is_main and (force or now - self._plotted >= PLOT_EVERY_S):
            plot_loss(self.run_dir.metrics_path, self.run_dir.root / "loss.png")
            self._plotted = now

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision (bf16 autocast on CUDA under ``precision: auto``)."""
        return _autocast(self.device, self.cfg.precision)

    def ema_network(self, ema: float | str, step: int) -> nn.Module:
        """An eval-mode copy of the network with EMA weights (``train.periodic.ema_network``)."""
        return ema_network(self, ema, step)

    def evaluate(self, step: int) -> dict[str, float]:
        """The periodic evaluation of the weights at ``step`` (``train.periodic``)."""
        return evaluate_run(self, step)

    def sampler(self, net: nn.Module) -> Sampler:
        """``net`` (this run's network or an EMA copy) ready to draw decoded images under the
        run's autocast."""
        sampler = run_sampler(
            net, self.objective, self.cfg, self.model_cfg, self.decode, self.device, self.autocast
        )
        return text_sampler(sampler, self.model_cfg, self.class_prompts)

    def class_prompts(self) -> list[list[str]]:
        """A text run's prompts per class for label-keyed grids and evaluation (built once
        per trainer: a method cache would keep every trainer alive)."""
        if self._class_prompts is None:
            self._class_prompts = class_prompts(self.dataset)
        return self._class_prompts

    def sample_grid(self, step: int) -> None:
        """Samples from fixed noise and labels with an EMA copy, saved as ``samples/*.png``."""
        draw_grid(self, step)

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


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: str | Path | ckpt_io.Checkpoint | None = None,
    callbacks: Sequence[Callback] = (),
    quiet: bool = False,
) -> Path:
    """Train ``cfg`` into run folder ``out_dir`` (resuming from ``resume`` if given)."""
    trainer = Trainer(cfg, out_dir, resume=resume, callbacks=callbacks, quiet=quiet)
    try:
        return trainer.run()
    finally:
        trainer.close()  # trackers flushed even when training stops with an error
