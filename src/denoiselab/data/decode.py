"""Any image file PIL can open → 8-bit RGB or grey, with the conversions PIL gets wrong fixed.

``Image.convert("RGB")`` alone is wrong for three kinds of files found in real photo folders:

- 16-bit grey (``I;16*``, and ``I`` from 16-bit PNGs): PIL *clips* values above 255, so nearly
  every pixel turns white. Here ``u8 = round(v / 257)`` maps ``0 … 65535`` onto ``0 … 255``.
- Transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent index): PIL drops
  alpha and keeps whatever colour the transparent pixels happen to store (often black).
  Here they are composited over a white background: ``u8 = round(c·a + 255·(1 − a))``,
  ``a = alpha / 255``.
- Floating-point pixels (``F``) have no defined range: refused (the caller skips the file).

CMYK and the other modes go through PIL's own conversion.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

BACKGROUND = 255  # transparent pixels become white
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class UnsupportedImageError(ValueError):
    """The file decodes, but its pixels have no defined 8-bit meaning (e.g. float images)."""


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UnsupportedImageError(
            f"mode {image.mode!r} with values in [{values.min()}, {values.max()}]: expected a "
            "16-bit image (0 … 65535)"
        )
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")  # round(v/257)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = rgba[..., :3] * alpha + BACKGROUND * (1.0 - alpha)
    return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")


def to_8bit(image: Image.Image, channels: int) -> Image.Image:
    """``image`` (any mode) as mode ``"RGB"`` (``channels=3``) or ``"L"`` (``channels=1``)."""
    target = "RGB" if channels == 3 else "L"
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        image = _sixteen_bit_to_l(image)
    elif image.mode == "F":
        raise UnsupportedImageError("32-bit float pixels (mode 'F') have no defined 8-bit range")
    elif _has_alpha(image):
        image = _composite_on_white(image)
    return image if image.mode == target else image.convert(target)
