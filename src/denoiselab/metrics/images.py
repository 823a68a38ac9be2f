"""The one image conversion of denoiselab, and the checks every metric applies to its input.

Generators and datasets produce ``float32 [B, C, H, W]`` in ``[-1, 1]``; every metric and
feature extractor consumes ``uint8 [B, 3, H, W]``. :func:`to_uint8` is the only place where
the first becomes the second:

    u = round((clamp(x, −1, 1) + 1) · 127.5)          (round, never truncate)

Double scaling (``uint8 × 255`` wrapping around, the bug in PRX's FID input) is refused on
both sides: :func:`to_uint8` rejects integer tensors and floats that look like ``[0, 255]``
or ``[0, 1]`` pixels, and NaN/inf; :func:`check_uint8_images` rejects any float tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "check_uint8_images",
    "dataset_uint8",
    "ensure_rgb",
    "from_uint8",
    "resize_uint8",
    "to_uint8",
]

# A [-1, 1] sample that overshoots a little is clamped; a non-negative tensor reaching past
# this value is almost surely a [0, 255] image that was already scaled once.
_PIXEL_RANGE_GUARD = 2.0
# From this many images on, "no value below 0 and none above 1" is read as [0, 1] pixels.
_UNIT_RANGE_MIN_IMAGES = 2


def _num_images(x: Tensor) -> int:
    """Images in ``[..., C, H, W]`` (a tensor of fewer than 3 dims counts as one)."""
    return math.prod(x.shape[:-3]) if x.dim() > 3 else 1


def _check_finite(x: Tensor) -> None:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    per_image = ~finite.reshape(_num_images(x), -1).all(1) if x.dim() > 3 else None
    where = (
        f" in {int(per_image.sum())} of {len(per_image)} images" if per_image is not None else ""
    )
    raise ValueError(
        f"to_uint8: {nan} NaN and {inf} inf values{where} (of {x.numel()} values): the "
        "network or sampler diverged; they would silently become black or white pixels"
    )


def to_uint8(x: Tensor, *, check_range: bool = True) -> Tensor:
    """Convert ``float [..., C, H, W]`` in ``[-1, 1]`` to ``uint8`` in ``[0, 255]``.

    ``u = round((clamp(x, −1, 1) + 1) · 127.5)``; ``−1 → 0``, ``0 → 128`` (round half to even
    gives 127.5 → 128), ``1 → 255``.

    What is refused, because it would silently give wrong pixels:

    - integer tensors (converted already) and non-negative floats above 2 (``[0, 255]``
      pixels: they would saturate to white);
    - NaN or inf anywhere (they would become black or white); the error counts them;
    - ``check_range`` (default): floats that all lie in ``[0, 1]`` over at least two images,
      i.e. ``[0, 1]`` pixels (they would come out as 128–255, washed-out grey). Images in
      ``[-1, 1]`` with not a single value below mid-grey in a whole batch are implausible;
      one image can be legitimately bright, so a single image is not judged. Pass
      ``check_range=False`` where a bright batch is legitimate output (e.g. PNG grids).

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: any of the float cases above; the message names the problem.
    """
    if not x.is_floating_point():
        raise TypeError(
            f"to_uint8 expects a float tensor in [-1, 1], got dtype {x.dtype}: "
            "the images are already converted; pass them to the metrics as they are"
        )
    if x.numel():
        _check_finite(x)
        lo, hi = x.min().item(), x.max().item()
        if lo >= 0 and hi > _PIXEL_RANGE_GUARD:
            raise ValueError(
                f"to_uint8 expects values in [-1, 1], got range [{lo:.3g}, {hi:.3g}]: "
                "this looks like [0, 255] pixels already scaled once"
            )
        n = _num_images(x)
        if check_range and lo >= 0 and hi <= 1 and n >= _UNIT_RANGE_MIN_IMAGES:
            raise ValueError(
                f"to_uint8: values in [0, 1] (min {lo:.3g}, max {hi:.3g}) over {n} images — "
                "expected [-1, 1]; pass 2·x − 1 for [0, 1] pixels, or check_range=False if "
                "these are [-1, 1] images with no pixel darker than mid-grey"
            )
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def from_uint8(u: Tensor) -> Tensor:
    """Inverse of :func:`to_uint8` up to quantisation: ``x = u / 127.5 − 1`` as float32."""
    check_uint8_images(u)
    return u.to(torch.float32) / 127.5 - 1.0


def check_uint8_images(images: Tensor) -> Tensor:
    """Validate metric input: a ``uint8 [B, 3, H, W]`` (or ``[B, 1, H, W]``) tensor.

    Returns the tensor unchanged. Raises ``TypeError`` for any other dtype, naming
    :func:`to_uint8` as the conversion to use, and ``ValueError`` for a wrong shape.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"expected a torch.Tensor of uint8 images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"metrics take uint8 images in [0, 255], got dtype {images.dtype}; convert "
            "[-1, 1] floats once with denoiselab.metrics.to_uint8 (never scale by 255 twice)"
        )
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images of shape [B, 3, H, W] or [B, 1, H, W], got {tuple(images.shape)}"
        )
    return images


def ensure_rgb(images: Tensor) -> Tensor:
    """``uint8 [B, 1|3, H, W] → uint8 [B, 3, H, W]``; grey images are repeated on channels."""
    check_uint8_images(images)
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Resize ``uint8 [B, 3, H, W]`` to ``float32 [B, 3, size, size]`` in ``[0, 1]``, like PIL.

    PIL's bicubic resize of an 8-bit image (what CLIP/CMMD and DINOv2 preprocessing use) is
    separable, width first, and rounds and clips to 8 bits after *each* pass, so bicubic
    overshoot is clipped in between. This reproduces it with torch's antialiased bicubic
    (the PIL kernel, a = −0.5): width pass → round/clip → height pass → round/clip → ``/ 255``.
    Matches PIL within one grey level. Images already of the requested size are only scaled.
    """
    check_uint8_images(images)
    x = images.to(torch.float32)
    height = x.shape[-2]
    for target in ((height, size), (size, size)):
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0.0, 255.0)
    return x / 255.0


def dataset_uint8(dataset: Any, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Items ``dataset[i] = (image float [C, H, W] in [-1, 1], label)`` as ``uint8 [N, 3, H, W]``
    (through :func:`to_uint8` and :func:`ensure_rgb`) and labels ``long [N]``."""
    images, labels = zip(*(dataset[int(i)] for i in indices))
    u = ensure_rgb(to_uint8(torch.stack([torch.as_tensor(im) for im in images])))
    return u, torch.tensor([int(y) for y in labels], dtype=torch.long)
