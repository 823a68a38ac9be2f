"""Scoring a network for a suite: final evaluation, periodic probe evaluation, sample grids.

Every variant is scored by the same :class:`EvalSpec`: the same metrics, sample count,
labels, seeds, solver and reference statistics (cached by content hash), so differences
come from training alone. :class:`PeriodicEval` is a training callback that scores the EMA
weights cheaply every ``every_nimg`` images and appends a row to ``eval.jsonl``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from denoiselab.ablate.files import append_jsonl, rewrite_jsonl
from denoiselab.ablate.suite import OPTIONAL_METRICS, PROBE_METRICS, EvalSpec
from denoiselab.metrics import evaluate
from denoiselab.metrics.extractors import resolve_extractor_path
from denoiselab.metrics.images import to_uint8
from denoiselab.sampling.generate import Sampler, balanced_labels
from denoiselab.train.config import TrainConfig
from denoiselab.train.ema import auto_decay
from denoiselab.train.periodic import scored_metrics
from denoiselab.train.schedule import crosses

GRID_SEED_TAG = 0x6A1D  # the grid noise seed is eval.seed + this: apart from eval batches
_NEEDS_PACKAGE = {"inception": "torch_fidelity", "clip": "transformers", "dinov2": "transformers"}


@dataclass
class Scorer:
    """A network ready to sample (:class:`Sampler`) and the run config whose ``sample``
    section fills the settings an :class:`EvalSpec` leaves open."""

    sampler: Sampler
    cfg: TrainConfig

    def sample(self, labels: Tensor, seed: int, spec: EvalSpec, steps: int | None) -> Tensor:
        """``[-1, 1]`` pixel samples ``[B, C, H, W]`` for ``labels`` from the noise of ``seed``."""
        s = self.cfg.sample
        return self.sampler(
            labels,
            seed,
            steps=steps or spec.steps or s.steps,
            solver=spec.solver or s.solver,
            cfg_scale=s.cfg if spec.cfg is None else spec.cfg,
            interval=spec.interval or s.interval,
            eta=s.eta,
        )

    def generator(self, spec: EvalSpec, steps: int | None) -> Callable[[int, Tensor, int], Tensor]:
        """``generate(n, labels, seed) -> uint8 [n, C, H, W]`` as ``metrics.evaluate`` wants."""

        def gen(n: int, labels: Tensor, seed: int) -> Tensor:
            return to_uint8(self.sample(labels[:n], seed, spec, steps).cpu())

        return gen

    def score(
        self, spec: EvalSpec, metrics: list[str], num: int, steps: int | None = None
    ) -> dict[str, Any]:
        """``metrics.evaluate`` of ``num`` class-balanced samples (the suite's reference set);
        on data of one class ``acc_probe`` is skipped (``train.periodic.scored_metrics``)."""
        return evaluate(
            self.generator(spec, steps),
            metrics=scored_metrics(metrics, self.sampler.num_classes),
            num=num,
            dataset_cfg=eval_data_config(self.cfg, spec),
            num_classes=self.sampler.num_classes,
            batch=spec.batch,
            seed=spec.seed,
            extractor_paths=spec.extractor_paths,
            cache_dir=spec.cache_dir,
            num_ref=spec.num_ref or spec.num,
            probe_config=spec.probe_config(),
            device=self.sampler.device,
        )

    @torch.no_grad()
    def grid(self, spec: EvalSpec) -> Tensor:
        """``grid_num`` samples from the suite's fixed noise and balanced labels (CPU)."""
        labels = balanced_labels(spec.grid_num, self.sampler.num_classes)
        return self.sample(labels, spec.seed + GRID_SEED_TAG, spec, None)


def eval_data_config(cfg: TrainConfig, spec: EvalSpec) -> Any:
    """The real data the metrics compare with: the training data in pixels (the source images
    of a latent cache), at ``spec.image_size``."""
    from denoiselab.latents import pixel_data_config

    data = pixel_data_config(cfg.data)
    if spec.image_size is None or spec.image_size == data.image_size:
        return data
    return dataclasses.replace(data, image_size=spec.image_size)


def final_metrics(spec: EvalSpec) -> list[str]:
    """The metrics of the final evaluation; ``"auto"`` adds those whose weights are local."""
    if spec.metrics != "auto":
        return list(spec.metrics)
    found = list(PROBE_METRICS)
    if spec.image_size is not None:  # a resized reference suits the probe only
        return found
    for metric, kind in OPTIONAL_METRICS.items():
        has_package = importlib.util.find_spec(_NEEDS_PACKAGE[kind]) is not None
        path = resolve_extractor_path(kind, spec.extractor_paths.get(kind), spec.cache_dir)
        if has_package and path is not None:
            found.append(metric)
    return found


def ema_decay(spec: EvalSpec, decays: tuple[float, ...], step: int) -> float | None:
    """The EMA decay the spec asks for after ``step`` steps (``None``: raw weights)."""
    if spec.ema == "none" or not decays:
        return None
    if spec.ema == "auto":
        return auto_decay(decays, step)
    if spec.ema not in decays:
        raise ValueError(f"eval.ema={spec.ema!r} is not a trained decay; available: {decays}")
    return float(spec.ema)


class PeriodicEval:
    """Training callback: score the EMA weights every ``every_nimg`` images (the rule of
    ``denoiselab.train.schedule``) and at the end; 0: never, not even at the end (as the
    training loop's ``eval.every_nimg``).

    Rows ``{"step", "nimg", "kimg", <metrics>, "seconds"}`` are appended to ``path``.
    :meth:`attach` binds the callback to its ``Trainer`` (for the EMA, objective and
    device) and drops rows past the step the trainer resumes from.
    """

    def __init__(
        self, path: Path, spec: EvalSpec, every_nimg: int, global_batch: int, total_steps: int
    ) -> None:
        self.path, self.spec = path, spec
        self.every_nimg, self.global_batch, self.total = every_nimg, global_batch, total_steps
        self.trainer: Any = None

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer
        start = trainer.start_step
        rewrite_jsonl(self.path, lambda row: row.get("step", 0) <= start)

    def __call__(self, state: Any) -> None:
        due = crosses(state.step, self.every_nimg, self.global_batch)
        if self.every_nimg <= 0 or (not due and state.step != self.total):
            return
        tr, tic = self.trainer, time.perf_counter()
        decay = ema_decay(self.spec, tr.ema.decays, state.step)
        net = tr.ema_network("none" if decay is None else decay, state.step)
        scorer = Scorer(tr.sampler(net), tr.cfg)
        result = scorer.score(
            self.spec,
            self.spec.periodic_metrics,
            self.spec.periodic_num,
            self.spec.periodic_steps,
        )
        row = {"step": state.step, "nimg": state.nimg, "kimg": state.nimg / 1000}
        row.update(result["metrics"])
        row["seconds"] = time.perf_counter() - tic
        append_jsonl(self.path, row)
