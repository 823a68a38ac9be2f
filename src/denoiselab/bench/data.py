"""``bench --data PATH``: the input pipeline alone, and the training step fed by it.

Three rates, one run: the real ``StepLoader`` over the folder (decoding workers, pinned
memory on CUDA, prefetch) with nothing consuming its batches; the training step on a batch
already on the device (``train`` in ``bench.json``); and the training step fed batch by batch
by the loader, as ``denoiselab train`` runs it. The slower of the first two is the
bottleneck; the fed rate shows how much of it survives their overlap.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from denoiselab.data import DataConfig, build_dataset
from denoiselab.data.loader import StepLoader
from denoiselab.data.prepared import is_prepared
from denoiselab.models import model_config
from denoiselab.train.config import TrainConfig


def data_config(bc: Any) -> DataConfig:
    """The ``DataConfig`` of ``bc.data``: ``prepared`` if it holds a prepared manifest, else
    ``imagefolder``, at the model's resolution."""
    preset = model_config(bc.model)
    return DataConfig(
        name="prepared" if is_prepared(bc.data) else "imagefolder",
        root=str(bc.data),
        image_size=bc.image_size or preset.image_size,
        channels=preset.in_channels,
        num_workers="auto" if bc.workers is None else bc.workers,
    )


def _loader(tc: TrainConfig, dataset: Any, device: torch.device, seed: int) -> StepLoader:
    return StepLoader(
        dataset,
        seed=seed,
        global_batch=tc.global_batch,
        num_workers=tc.data.resolved_num_workers,
        prefetch_factor=tc.data.prefetch_factor,
        pin_memory=device.type == "cuda",
    )


def time_loader(tc: TrainConfig, device: torch.device, warmup: int, batches: int) -> dict:
    """Images/s of the loader alone over ``batches`` batches, after ``warmup`` untimed ones
    (worker start-up, first file reads)."""
    dataset = build_dataset(tc.data)
    loader = iter(_loader(tc, dataset, device, seed=0))
    tic = time.perf_counter()
    for _ in range(warmup):
        next(loader)
    start_s = time.perf_counter() - tic
    tic, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        _, images, _ = next(loader)
    seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
    del loader
    out = {
        "images": len(dataset),
        "kind": tc.data.name,
        "workers": tc.data.resolved_num_workers,
        "startup_s": start_s,
        "loader_images_per_s": batches * tc.global_batch / seconds,
        "batch_shape": list(images.shape),
    }
    if not out["workers"]:  # all the work in this process: its CPU time is the cost per image,
        # whatever else shares the machine (wall-clock rates on a loaded machine are not)
        out["images_per_cpu_s"] = batches * tc.global_batch / max(cpu, 1e-9)
    return out


def time_fed_step(tc: TrainConfig, warmup: int, batches: int) -> float:
    """Images/s of ``Trainer.train_step`` fed by the loader (a fresh iterator, as ``train``)."""
    from denoiselab.bench.timing import _synchronize
    from denoiselab.train.loop import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(tc, Path(run_dir), quiet=True)
        try:
            loader = _loader(tc, trainer.dataset, trainer.device, seed=tc.seed)
            it = iter(loader)
            for step, images, labels in itertools.islice(it, warmup):
                trainer.train_step(step, images, labels)
            _synchronize(trainer.device)
            tic = time.perf_counter()
            for step, images, labels in itertools.islice(it, batches):
                trainer.train_step(step, images, labels)
            _synchronize(trainer.device)
            return batches * tc.global_batch / (time.perf_counter() - tic)
        finally:
            trainer.close()


def bench_data(tc: TrainConfig, bc: Any, train: dict[str, Any] | None) -> dict[str, Any]:
    """The ``data`` section of ``bench.json``; with ``train`` (the step on device-resident
    batches) also the fed step and the verdict."""
    from denoiselab.train.distributed import resolve_device

    device = resolve_device(tc.device)
    warm = max(1, bc.warmup)
    out = time_loader(tc, device, warm, bc.data_batches)
    out["root"] = str(bc.data)
    if out["workers"]:
        out["per_worker_images_per_s"] = out["loader_images_per_s"] / out["workers"]
    if train is None:
        return out
    out["step_images_per_s"] = train["images_per_s"]
    out["fed_images_per_s"] = time_fed_step(tc, warm, bc.data_batches)
    loader, step = out["loader_images_per_s"], out["step_images_per_s"]
    out["bottleneck"] = "input pipeline" if loader < step else "training step"
    out["loader_over_step"] = loader / step
    return out


def data_summary(d: dict[str, Any]) -> str:
    """The ``data`` part of the summary line."""
    text = f"data {d['kind']} {d['workers']} workers: loader {d['loader_images_per_s']:.0f} img/s"
    if "images_per_cpu_s" in d:
        text += f" ({d['images_per_cpu_s']:.0f} per CPU-second)"
    if "fed_images_per_s" in d:
        text += (
            f", fed step {d['fed_images_per_s']:.1f} img/s; bottleneck: {d['bottleneck']} "
            f"(loader/step {d['loader_over_step']:.2f}×)"
        )
    return text
