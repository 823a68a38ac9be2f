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


def save_labelled_grid(
    images: Tensor, labels: list[str], path: str | Path, per_row: int, min_cell: int = 64
) -> None:
    """A grid of ``per_row`` images per row, each row's text (e.g. its prompt) written to the
    left of it; cells are enlarged (nearest) to at least ``min_cell`` pixels so that small
    samples stay visible beside the text. ``labels``: one per row."""
    from PIL import ImageDraw

    grid = make_grid(images, per_row)
    h_img = images.shape[-2]
    scale = max(1, -(-min_cell // h_img))
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    cell = (h_img + 2) * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = 12 + int(max((measure.textlength(t) for t in labels), default=0))
    canvas = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for row, text in enumerate(labels):
        draw.text((4, row * cell + cell // 2 - 4), text, fill="black")
    save_png(np.asarray(canvas), path)
