"""``digits``: scikit-learn's bundled 8×8 handwritten digits, resized to any resolution.

1797 images in 10 classes, ink values 0–16 (white ink on black after scaling to [-1, 1]).
Resizing is bicubic (``torch.nn.functional.interpolate``) and clamped to the value range.
"""

from __future__ import annotations

from functools import lru_cache
from typing import SupportsIndex

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from denoiselab.data.base import ImageDataset

DIGITS_MAX = 16.0  # ink value of a fully covered pixel in load_digits


@lru_cache(maxsize=1)
def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [1797, 8, 8] in [0, 1], labels int64 [1797])`` from scikit-learn (cached)."""
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / DIGITS_MAX
    return images, np.asarray(bunch.target, dtype=np.int64)


class DigitsDataset(ImageDataset):
    """The 1797 sklearn digits as ``[channels, image_size, image_size]`` images in ``[-1, 1]``."""

    def __init__(
        self, image_size: int = 32, channels: int = 3, seed: int = 0, hflip: bool = False
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r}; valid: 1, 3")
        images, labels = load_digit_arrays()
        self._images = torch.from_numpy(images)
        self._labels = labels.tolist()
        self.image_size, self.channels, self.seed, self.hflip = image_size, channels, seed, hflip
        self.num_classes = 10
        self.class_names = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self._labels)

    def _load(self, index: int) -> tuple[Tensor, int]:
        x = self._images[index][None, None]  # [1, 1, 8, 8]
        if self.image_size != x.shape[-1]:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        x = x[0].clamp(0, 1).mul(2).sub(1)  # [1, H, W]
        return x.expand(self.channels, -1, -1).contiguous(), self._labels[index]

    def label(self, index: SupportsIndex) -> int:
        return int(self._labels[self._check_index(index)])

    def caption(self, index: SupportsIndex, epoch: int | None = None) -> str:
        """E.g. ``"a handwritten digit 7"``."""
        return f"a handwritten digit {self._labels[self._check_index(index)]}"
