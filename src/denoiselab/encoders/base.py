"""The frozen image-encoder interface that REPA-style techniques use as a teacher.

An :class:`ImageEncoder` maps images ``x [B, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) to patch
features ``[B, N_t, D_t]`` on a known grid ``(h, w)`` (``N_t = h·w``, row-major). The
preprocessing belongs to the encoder, so every caller gets the same numbers:

    u = (x + 1) / 2                         (grey images repeated on 3 channels)
    u = bicubic_resize(u, resolution)       (antialiased, float; skipped at the same size)
    p = (u − mean) / std                    (the encoder's own per-channel statistics)
    features = tokens(p)                    (patch tokens only: CLS and register tokens removed)

It is frozen: eval mode forever, no gradients, never part of a trained module's state (a
loss term holds it outside its module tree, see :class:`denoiselab.objectives.LossTerm`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder(nn.Module):
    """Base class: subclasses set the attributes below and implement :meth:`tokens`.

    Attributes:
        kind: the registry name (``offline``, ``dinov2``, ``dinov3``, ``clip``, ``siglip``).
        name: a readable name (the directory or cache file it came from).
        weights_id: identifies the weights (a content hash); recorded beside cached features.
        dim: ``D_t``, the feature width.
        patch_size: pixels per token side at the encoder's input resolution.
        resolution: the side the images are resized to before the network.
    """

    kind: str
    name: str
    weights_id: str
    dim: int
    patch_size: int
    resolution: int

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the patch-token grid for square inputs."""
        side = self.resolution // self.patch_size
        return side, side

    def identity(self) -> dict[str, Any]:
        """What identifies these features (stored beside cached features and compared)."""
        return {
            "kind": self.kind,
            "weights_id": self.weights_id,
            "resolution": self.resolution,
            "grid": list(self.grid),
            "dim": self.dim,
            "name": self.name,
        }

    def preprocess(self, x: Tensor) -> Tensor:
        """``[-1, 1]`` images ``[B, 1|3, H, W]`` → the network's input ``[B, 3, r, r]``."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.kind} encoder expects [B, 1|3, H, W], got {tuple(x.shape)}")
        u = (x.to(self.mean.device).float().expand(-1, 3, -1, -1) + 1.0) / 2.0
        if tuple(u.shape[-2:]) != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            u = F.interpolate(u, size=size, mode="bicubic", align_corners=False, antialias=True)
        return (u - self.mean) / self.std

    def tokens(self, pixel_values: Tensor) -> Tensor:  # pragma: no cover - interface
        """Normalised input ``[B, 3, r, r]`` → patch tokens ``[B, h·w, D_t]``."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Patch features ``[B, h·w, D_t]`` of ``[-1, 1]`` images (no gradient, eval mode)."""
        return self.features(x)

    def features(self, x: Tensor) -> Tensor:
        """:meth:`forward` with the graph kept: differentiable in ``x`` (the weights stay
        frozen), for a loss on a prediction's features (``terms.pdino``)."""
        out = self.tokens(self.preprocess(x))
        h, w = self.grid
        if out.shape[1] != h * w:
            raise RuntimeError(
                f"{self.kind} encoder {self.name!r} returned {out.shape[1]} tokens, expected "
                f"{h}×{w} at resolution {self.resolution}"
            )
        return out

    def freeze(self) -> ImageEncoder:
        """Eval mode, no gradients (call once after building)."""
        super().train(False)
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> ImageEncoder:
        """A teacher stays in eval mode (dropout off, norms frozen) whatever it is asked."""
        return super().train(False)
