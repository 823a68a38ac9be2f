"""Training recipe of the probe classifier (see :mod:`denoiselab.metrics.probe`).

Light corruption augmentation keeps the probe's features meaningful on imperfect samples:
with probability ``aug_prob`` each image is blurred by a Gaussian of σ ~ U(0.3, blur_max)
pixels, and independently with probability ``aug_prob`` noise ``σ·n``, σ ~ U(0, noise_max),
``n ~ N(0, I)`` is added. The corruptions stay mild so that stronger ones still move the
features (FD rises monotonically with blur and noise, see the tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .images import dataset_uint8, from_uint8

__all__ = [
    "ProbeConfig",
    "ProbeNet",
    "accuracy",
    "augment",
    "gaussian_blur",
    "materialize",
    "train_net",
    "train_probe",
]

N = TypeVar("N", bound=nn.Module)


@dataclass(frozen=True)
class ProbeConfig:
    """Architecture and training recipe of the probe; every field enters the cache key."""

    width: int = 16  # channels of the first stage; stages double it at each downsampling
    steps: int = 1000
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    num_train: int = 4096  # images materialised once for training
    num_val: int = 512  # held-out images for the recorded validation accuracy
    aug_prob: float = 0.5
    blur_max: float = 1.0  # pixels
    noise_max: float = 0.15  # in [-1, 1] units
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "steps", "batch", "num_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.aug_prob <= 1.0:
            raise ValueError(f"ProbeConfig.aug_prob must be in [0, 1], got {self.aug_prob}")


class ProbeNet(nn.Module):
    """Compact CNN: ``x [B, 3, S, S]`` in [-1, 1] → ``(features [B, F], logits [B, C])``.

    Stem conv, then ``n = max(2, log2(S / 8))`` stages of (stride-2 conv, conv), channels
    ``width · 2^i``, GroupNorm + SiLU throughout; features are the global average pool of
    the last stage (``F = width · 2^n``), logits a linear head on them.
    """

    def __init__(self, num_classes: int, image_size: int, width: int) -> None:
        super().__init__()
        stages = max(2, int(math.log2(max(image_size, 8) / 8)))
        layers: list[nn.Module] = [*_conv(3, width, stride=1)]
        channels = width
        for _ in range(stages):
            layers += [
                *_conv(channels, 2 * channels, stride=2),
                *_conv(2 * channels, 2 * channels, stride=1),
            ]
            channels *= 2
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        self.feature_dim = channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.trunk(x).mean(dim=(2, 3))
        return features, self.head(features)


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride, 1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.SiLU(),
    ]


def materialize(dataset: Any, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``x [N, 3, H, W]`` in [-1, 1] on the 8-bit grid, and labels ``[N]``, of ``dataset[indices]``.

    Images pass through :func:`to_uint8` exactly as real images do for the metrics, so the
    probe sees training and evaluation inputs on the same 8-bit grid.
    """
    images, labels = dataset_uint8(dataset, indices)
    return from_uint8(images), labels


def augment(x: Tensor, cfg: ProbeConfig, generator: torch.Generator) -> Tensor:
    """Random mild blur and Gaussian noise (per sample, see module docstring); clamped to [-1, 1]."""
    b = x.shape[0]
    uniform = torch.rand(4, b, generator=generator)
    blur = uniform[0] < cfg.aug_prob
    sigma_blur = torch.where(blur, 0.3 + (cfg.blur_max - 0.3) * uniform[1], torch.full((b,), 1e-3))
    x = gaussian_blur(x, sigma_blur)
    sigma_noise = torch.where(uniform[2] < cfg.aug_prob, cfg.noise_max * uniform[3], torch.zeros(b))
    x = x + sigma_noise.view(b, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1.0, 1.0)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
    """Separable Gaussian blur of ``x [B, C, H, W]`` with per-sample ``sigma [B]`` (reflect pad)."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sigma[:, None].to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B·C, K]
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def train_probe(x_train: Tensor, y_train: Tensor, num_classes: int, cfg: ProbeConfig) -> ProbeNet:
    """Train a :class:`ProbeNet` on ``x_train [N, 3, S, S]`` with labels ``y_train [N]``: the
    cross-entropy of its logits under :func:`train_net`'s recipe."""
    return train_net(
        lambda: ProbeNet(num_classes, x_train.shape[-1], cfg.width),
        x_train,
        lambda out, idx: F.cross_entropy(out[1], y_train[idx]),
        cfg,
    )


def train_net(
    build: Callable[[], N], x: Tensor, loss: Callable[[Any, Tensor], Tensor], cfg: Any
) -> N:
    """The probes' recipe (the class probe's and the attribute probe's): AdamW and cosine
    decay over ``cfg.steps`` batches of ``cfg.batch`` images of ``x [N, 3, S, S]`` drawn with
    replacement, each augmented (:func:`augment`); minimises ``loss(build()(batch), idx)``
    (``idx [batch]``: the drawn rows of ``x``, to pick their labels). ``cfg``: a
    :class:`ProbeConfig` or anything with its recipe fields.

    Deterministic for a given ``cfg.seed`` (initialisation, batches and augmentation all
    come from seeded generators; the global RNG state is restored afterwards). Returns the
    net in eval mode, frozen.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    net.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=generator)
        value = loss(net(augment(x[idx], cfg, generator)), idx)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        schedule.step()
    return net.eval().requires_grad_(False)


@torch.inference_mode()
def accuracy(net: ProbeNet, x: Tensor, y: Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of ``net`` on ``x [N, 3, S, S]`` with labels ``y [N]``."""
    hits = sum(
        (net(x[i : i + batch])[1].argmax(1) == y[i : i + batch]).sum().item()
        for i in range(0, len(x), batch)
    )
    return hits / max(len(x), 1)
