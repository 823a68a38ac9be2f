"""Writing images: PNG files and grids from ``[-1, 1]`` tensors (PIL; no torchvision).

These show whatever a sampler produced, so a batch that happens to be all brighter than
mid-grey is written as it is (``to_uint8(..., check_range=False)``); NaN/inf still fail.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from denoiselab.io import atomic_write
from denoiselab.metrics.images import to_uint8


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """``[B, C, H, W]`` in ``[-1, 1]`` → one ``uint8 [H', W', 3]`` array, ``nrow`` per row."""
    u8 = to_uint8(images.detach().float().cpu(), check_range=False)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    b, c, h, w = u8.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = u8[i]
    return grid.permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write an ``uint8 [H, W, 3]`` array atomically (temporary file, then rename)."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> None:
    save_png(make_grid(images, nrow), path)


def save_images(images: Tensor, directory: str | Path, start: int = 0) -> list[Path]:
    """One PNG per image, named ``000000.png``… from index ``start``."""
    directory = Path(directory)
    u8 = to_uint8(images.detach().float().cpu(), check_range=False)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    paths = []
    for i, img in enumerate(u8):
        p = directory / f"{start + i:06d}.png"
        save_png(img.permute(1, 2, 0).numpy(), p)
        paths.append(p)
    return paths
