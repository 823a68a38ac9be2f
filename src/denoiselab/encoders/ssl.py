"""Self-supervised training of the offline teacher: SimCLR on augmented views, no labels.

Why this recipe (docs/architecture.md, "Teachers"): REPA's teachers (DINOv2/v3) are ViTs
trained without labels; the offline teacher is one too, small enough to train in minutes on a
CPU. It must not be the probe that scores ``acc_probe`` / ``fd_probe`` (a CNN *classifier*
trained *with* labels, :mod:`denoiselab.metrics.probe_train`): a student aligned to its own
judge would make a measured gain circular. Different architecture (ViT vs CNN), different
objective (contrastive, label-free vs cross-entropy on classes).

SimCLR (Chen et al. 2020), for a batch of B images and two random views of each::

    z = normalize(head(mean over tokens of ViT(view)))            [2B, d]
    s_ij = z_i · z_j / τ                                           (i ≠ j)
    L = mean_i −log( exp(s_{i,p(i)}) / Σ_{j≠i} exp(s_ij) )         p(i) = the other view of i

Views (all drawn from one seeded generator, see :func:`two_views`): a random resized crop
(area 35–100 %, aspect 3/4–4/3) with a random mirror, brightness/contrast/saturation jitter
of ±40 %, grey with probability 0.2 and Gaussian noise σ ≤ 0.1. Colours and crops change,
the shape stays: the features learn what a shape is, which the class labels also encode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SSLConfig:
    """Architecture and recipe of the offline teacher; every field enters its cache key.

    Defaults: a 4-block ViT of width 64 on 8-pixel patches (a 4×4 grid at 32 px, the
    quickstart network's), 400 SimCLR steps of 64 images (128 views); its cost and k-NN
    accuracy are in BENCHMARKS.md."""

    patch: int = 8
    width: int = 64
    depth: int = 4
    heads: int = 4
    head_dim: int = 64  # output of the projection head (discarded after training)
    steps: int = 400
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    temperature: float = 0.2
    num_train: int = 8192  # images materialised once for training
    max_epochs: float = 30.0  # at most this many passes over them (caps tiny data sets)
    num_val: int = 512  # held-out images for the recorded k-NN accuracy
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("patch", "width", "depth", "heads", "head_dim", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"offline teacher: {name}={getattr(self, name)!r} must be >= 1")
        if self.width % self.heads:
            raise ValueError(
                f"offline teacher: width={self.width} is not divisible by heads={self.heads}"
            )
        if self.batch < 2 or not self.temperature > 0 or not self.lr > 0 or not self.max_epochs > 0:
            raise ValueError("offline teacher: need batch >= 2, temperature, lr and max_epochs > 0")


class TinyViT(nn.Module):
    """``x [B, 3, S, S]`` (normalised) → patch tokens ``[B, (S/p)², width]`` after a final
    LayerNorm. Patchify conv, learned positions, pre-norm Transformer blocks, no CLS token."""

    def __init__(self, cfg: SSLConfig, image_size: int) -> None:
        super().__init__()
        if image_size % cfg.patch:
            raise ValueError(f"offline teacher: image side {image_size} % patch {cfg.patch} != 0")
        n = (image_size // cfg.patch) ** 2
        self.embed = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.blocks(tokens))


def two_views(x: Tensor, gen: torch.Generator) -> Tensor:
    """Two augmented views of ``x [B, 3, S, S]`` in ``[0, 1]`` → ``[2B, 3, S, S]`` in ``[0, 1]``."""
    return torch.cat([_augment(x, gen), _augment(x, gen)])


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    b = x.shape[0]
    r = torch.rand(10, b, generator=gen)
    area = 0.35 + 0.65 * r[0]
    aspect = torch.exp(math.log(4 / 3) * (2 * r[1] - 1))
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    tx, ty = (1 - sx) * (2 * r[2] - 1), (1 - sy) * (2 * r[3] - 1)
    flip = torch.where(r[4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    grey = v.mean(1, keepdim=True)
    jitter = lambda u: (1 + 0.8 * (u - 0.5)).view(b, 1, 1, 1)  # noqa: E731 - ±40 %
    v = v * jitter(r[5])  # brightness
    v = (v - v.mean((1, 2, 3), keepdim=True)) * jitter(r[6]) + v.mean((1, 2, 3), keepdim=True)
    v = grey + (v - grey) * jitter(r[7])  # saturation
    v = torch.where((r[8] < 0.2).view(b, 1, 1, 1), v.mean(1, keepdim=True).expand_as(v), v)
    v = v + 0.1 * r[9].view(b, 1, 1, 1) * torch.randn(v.shape, generator=gen)
    return v.clamp(0, 1)


def nt_xent(z: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss for ``z [2B, d]`` (rows ``i`` and ``i ± B`` are the two views of one image)."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, positive)


def train_ssl(x: Tensor, cfg: SSLConfig, mean: Tensor, std: Tensor, log=None) -> TinyViT:
    """Train a :class:`TinyViT` on ``x [N, 3, S, S]`` in ``[0, 1]`` with SimCLR (AdamW, cosine
    schedule). Deterministic for ``cfg.seed``; the global RNG is left untouched."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = TinyViT(cfg, x.shape[-1])
        head = nn.Sequential(
            nn.Linear(cfg.width, 2 * cfg.width), nn.GELU(), nn.Linear(2 * cfg.width, cfg.head_dim)
        )
    steps = min(cfg.steps, max(1, math.ceil(cfg.max_epochs * x.shape[0] / cfg.batch)))
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, steps // 20)
    for step in range(steps):
        factor = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor
        idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=gen)
        views = (two_views(x[idx], gen) - mean) / std
        loss = nt_xent(head(net(views).mean(1)), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and ((step + 1) % max(1, steps // 10) == 0):
            log(f"offline teacher: step {step + 1}/{steps} | SimCLR loss {loss.item():.3f}")
    return net.eval().requires_grad_(False)


@torch.no_grad()
def knn_accuracy(
    train_f: Tensor, train_y: Tensor, val_f: Tensor, val_y: Tensor, k: int = 20
) -> float:
    """Top-1 accuracy of a cosine k-NN vote (features ``[N, D]``): does the label-free
    embedding put images of one class together? Recorded with the teacher, not a claim."""
    a, b = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    nearest = (b @ a.T).topk(min(k, len(a)), dim=1).indices
    votes = F.one_hot(train_y[nearest], int(train_y.max()) + 1).sum(1)
    return float((votes.argmax(1) == val_y).float().mean())
