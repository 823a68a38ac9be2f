"""The two timed workloads, built from the real code paths.

- training: ``Trainer.train_step`` (objective + backward + AdamW + EMA) of a real ``Trainer``;
- sampling: Heun over ``ClassifierFreeGuidance`` — the two calls ``sampling.generate`` makes —
  so that the network evaluations can be counted.

Time convention: t = 1 is data, t = 0 is noise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from denoiselab.data import DataConfig
from denoiselab.models import JiT, JiTConfig, model_config
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.sampling.generate import balanced_labels, compile_for_sampling, noise_for
from denoiselab.sampling.guidance import ClassifierFreeGuidance
from denoiselab.sampling.solvers import sample
from denoiselab.train.build import resolve_model_config
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import Trainer


def bench_train_config(
    model: str,
    image_size: int | None,
    batch: int,
    dtype: str,
    compile_: bool,
    device: str,
    *,
    data: DataConfig | None = None,
    **parallel: object,
) -> TrainConfig:
    """A ``TrainConfig`` for preset ``model`` on a built-in dataset (no download), or on
    ``data`` (``bench --data``). ``parallel``: ``strategy``, ``activation_checkpointing``,
    ``compile_mode`` (``TrainConfig`` fields).

    The class count follows the dataset (``digits``: 10 classes, chosen when the preset has
    10; else ``shapes``: 8). It sizes only the class-embedding table, a lookup: FLOPs and
    speed do not depend on it.
    """
    preset = model_config(model)
    if preset.in_channels not in (1, 3):
        raise ValueError(
            f"bench runs pixel models (1 or 3 channels); {model} has {preset.in_channels}"
        )
    size = image_size or preset.image_size
    name = "digits" if preset.num_classes == 10 else "shapes"
    if data is None:
        data = DataConfig(name=name, image_size=size, channels=preset.in_channels)
    return TrainConfig(
        data=data,
        model={"name": model, "image_size": size},
        global_batch=batch,
        precision="bf16" if dtype == "bf16" else "fp32",
        compile=compile_,
        device=device,
        **parallel,  # type: ignore[arg-type]
    )


def resolved_model_config(cfg: TrainConfig) -> JiTConfig:
    """The network a ``Trainer`` would build for ``cfg`` (without building the dataset)."""
    classes = 10 if cfg.data.name == "digits" else 8
    size, channels = cfg.data.image_size, cfg.data.channels
    return resolve_model_config(cfg, image_size=size, channels=channels, num_classes=classes)


@dataclass
class TrainWorkload:
    """One call = one optimizer step of the real ``Trainer`` on a fixed batch on device."""

    trainer: Trainer
    images: Tensor
    labels: Tensor
    step: int = 0

    @classmethod
    def build(cls, cfg: TrainConfig, run_dir: Path) -> TrainWorkload:
        trainer = Trainer(cfg, run_dir, quiet=True)
        mc, dev = trainer.model_cfg, trainer.device
        gen = torch.Generator().manual_seed(0)
        shape = (cfg.global_batch, mc.in_channels, mc.image_size, mc.image_size)
        images = (torch.rand(shape, generator=gen) * 2 - 1).to(dev)
        labels = torch.randint(0, mc.num_classes, (cfg.global_batch,), generator=gen).to(dev)
        return cls(trainer, images, labels)

    def __call__(self) -> None:
        self.trainer.train_step(self.step, self.images, self.labels)
        self.step += 1


@dataclass
class SampleWorkload:
    """One call = Heun sampling of ``len(labels)`` images with CFG and its interval.

    ``images_evaluated`` holds the network's per-image evaluations of the last call (the
    unconditional half counts inside the interval only).
    """

    net: nn.Module
    objective: DenoisingObjective
    labels: Tensor
    noise: Tensor
    steps: int
    cfg_scale: float
    interval: tuple[float, float]
    bf16: bool
    images_evaluated: int = field(default=0)

    @classmethod
    def build(
        cls, mc: JiTConfig, device: torch.device, *, batch: int, compile_: bool, **kwargs: object
    ) -> SampleWorkload:
        net = _trained_like(JiT(mc)).to(device).eval()
        objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), mc.num_classes)
        objective = objective.to(device)
        labels = balanced_labels(batch, mc.num_classes).to(device)
        shape = (mc.in_channels, mc.image_size, mc.image_size)
        noise = noise_for(1, batch, shape, objective.cfg.noise_scale, device)
        runner = compile_for_sampling(net) if compile_ else net
        return cls(runner, objective, labels, noise, **kwargs)  # type: ignore[arg-type]

    def guidance(self) -> ClassifierFreeGuidance:
        null = self.objective.condition  # the null class: labels [B] (models.condition)
        return ClassifierFreeGuidance(
            self.net, self.objective.velocity, self.labels, null, self.cfg_scale, self.interval
        )

    @torch.no_grad()
    def __call__(self, steps: int | None = None) -> Tensor:
        fn = self.guidance()
        with self.autocast():
            images = sample(fn, self.noise, steps or self.steps, "heun")
        self.images_evaluated = fn.images_evaluated
        return images

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast as in ``Trainer.sample_grid``, or nothing for fp32."""
        device = self.noise.device.type
        return (
            torch.autocast(device, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        )


@torch.no_grad()
def _trained_like(net: JiT, std: float = 0.02) -> JiT:
    """Move every weight off its init: adaLN-Zero makes an untrained JiT output exactly 0, a
    constant that a compiler could fold away; a benchmark must time the dense network."""
    gen = torch.Generator().manual_seed(0)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)
    return net
