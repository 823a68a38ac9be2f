"""Vectorised numpy rasterisation of the ``shapes`` dataset: signed distances and textures.

Every drawable is a signed distance function (SDF, negative inside) evaluated once per pixel
centre in *pixel units*; anti-aliased coverage is ``clip(0.5 − d, 0, 1)``, i.e. a one-pixel
linear ramp across the edge. Shapes are defined in a unit frame (they fit in the unit disc,
"up" is −y as in image rows) and mapped to pixels by translation, rotation and scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Array = np.ndarray
UnitSDF = Callable[[Array, Array], Array]

# ---------------------------------------------------------------------------------------------
# Signed distances in the unit frame


def _segment_sdf(px: Array, py: Array, a: tuple[float, float], b: tuple[float, float]) -> Array:
    """Distance to segment ``a → b``, negative on its left (the side where the origin lies)."""
    ex, ey = b[0] - a[0], b[1] - a[1]
    wx, wy = px - a[0], py - a[1]
    h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = np.hypot(wx - ex * h, wy - ey * h)
    return np.where(ex * wy - ey * wx > 0, -dist, dist)


def _star_sdf(n: int, outer: float, inner: float) -> UnitSDF:
    """Exact SDF of an ``n``-fold star (or regular polygon when ``inner = outer·cos(π/n)``).

    The angle is folded into the half-sector ``[0, π/n]`` around an outer vertex (the first one
    points up); there the boundary is the one segment from the outer vertex ``(outer, 0)`` to
    the inner vertex at angle ``π/n``.
    """
    half = math.pi / n
    b = (inner * math.cos(half), inner * math.sin(half))

    def sdf(qx: Array, qy: Array) -> Array:
        phi = np.abs(np.mod(np.arctan2(qy, qx) + math.pi / 2 + half, 2 * half) - half)
        r = np.hypot(qx, qy)
        return _segment_sdf(r * np.cos(phi), r * np.sin(phi), (outer, 0.0), b)

    return sdf


def _box(px: Array, py: Array, half_x: float, half_y: float) -> Array:
    """Exact SDF of the axis-aligned box ``|x| ≤ half_x, |y| ≤ half_y``."""
    dx, dy = np.abs(px) - half_x, np.abs(py) - half_y
    return np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)


def _cross(qx: Array, qy: Array, half_width: float = 0.3, arm: float = 0.95) -> Array:
    """Plus sign: folded onto ``x ≥ y ≥ 0``, where the nearest arm is the horizontal one."""
    ax, ay = np.abs(qx), np.abs(qy)
    return _box(np.maximum(ax, ay), np.minimum(ax, ay), arm, half_width)


def _circle(qx: Array, qy: Array) -> Array:
    return np.hypot(qx, qy) - 0.9


def _ring(qx: Array, qy: Array) -> Array:
    return np.abs(np.hypot(qx, qy) - 0.71) - 0.26


def _heart(qx: Array, qy: Array, h: float = 0.75) -> Array:
    """Diamond of half-diagonal ``h`` ∪ two discs on its upper edges; fits the unit disc."""
    tip = 1.1035 * h  # bottom tip; centres the bounding box vertically
    dy = qy - (tip - h)  # diamond centre
    u, v = (qx + dy) / math.sqrt(2), (dy - qx) / math.sqrt(2)  # rotate by 45°
    diamond = _box(u, v, h / math.sqrt(2), h / math.sqrt(2))
    cx, cy = h / 2, tip - 1.5 * h
    lobes = np.hypot(np.abs(qx) - cx, qy - cy) - h / math.sqrt(2)
    return np.minimum(diamond, lobes)


def _crescent(qx: Array, qy: Array) -> Array:
    return np.maximum(np.hypot(qx, qy) - 0.92, 0.72 - np.hypot(qx - 0.5, qy))


# name -> (unit SDF, rotational symmetry order k: angles are drawn in [0, 2π/k); 0 = none drawn)
SHAPES: dict[str, tuple[UnitSDF, int]] = {
    "circle": (_circle, 0),
    "square": (_star_sdf(4, 0.99, 0.99 * math.cos(math.pi / 4)), 4),
    "triangle": (_star_sdf(3, 1.0, 0.5), 3),
    "star": (_star_sdf(5, 1.0, 0.5), 5),
    "cross": (_cross, 4),
    "ring": (_ring, 0),
    "heart": (_heart, -1),  # -1: small tilt only, a heart upside down is no longer a heart
    "crescent": (_crescent, 1),
}
HEART_MAX_TILT = 0.35  # radians


def shape_coverage(
    name: str, size: int, cx: float, cy: float, radius: float, angle: float
) -> Array:
    """Anti-aliased coverage ``[size, size]`` in ``[0, 1]`` of shape ``name``.

    ``cx, cy, radius`` are fractions of the image side; ``angle`` is in radians.
    """
    sdf, _ = SHAPES[name]
    px = (np.arange(size, dtype=np.float32) + 0.5) / size - np.float32(cx)
    py = (np.arange(size, dtype=np.float32) + 0.5)[:, None] / size - np.float32(cy)
    c, s = math.cos(angle), math.sin(angle)
    qx, qy = (c * px + s * py) / radius, (-s * px + c * py) / radius  # R(−angle)·p / radius
    return np.clip(0.5 - sdf(qx, qy) * radius * size, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Background textures: a tone map t ∈ [0, 1] that blends the background colour toward a second tone

TEXTURES = ("plain", "stripes", "checker", "dots", "gradient")


def _square_wave(u: Array, period: float) -> Array:
    """Anti-aliased ±1 square wave of ``u`` (pixels) with a one-pixel transition."""
    return np.clip(np.sin(2 * math.pi * u / period) * period / math.pi, -1.0, 1.0)


def texture_tone(kind: str, size: int, params: tuple[float, float, float, float]) -> Array:
    """Tone map ``[size, size]`` of texture ``kind``; ``params`` are four numbers in [0, 1)."""
    p_angle, p_period, p_phase, p_extra = params
    x = np.arange(size, dtype=np.float32) + 0.5
    y = x[:, None]
    angle = math.pi * p_angle
    period = size * (0.12 + 0.13 * p_period)
    u = x * math.cos(angle) + y * math.sin(angle) + period * p_phase
    v = -x * math.sin(angle) + y * math.cos(angle) + period * p_extra
    if kind == "plain":
        return np.zeros((size, size), dtype=np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * _square_wave(u, period)
    if kind == "checker":
        return 0.5 + 0.5 * _square_wave(u, period) * _square_wave(v, period)
    if kind == "dots":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return np.clip(0.5 - (np.hypot(du, dv) - period * (0.22 + 0.1 * p_extra)), 0.0, 1.0)
    if kind == "gradient":
        centred = (x - size / 2) * math.cos(2 * angle) + (y - size / 2) * math.sin(2 * angle)
        return np.clip(0.5 + centred / (size * math.sqrt(2)), 0.0, 1.0)
    raise ValueError(f"texture {kind!r}; valid: {TEXTURES}")


# ---------------------------------------------------------------------------------------------
# Colours

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.98, 0.88, 0.12),
    "green": (0.15, 0.68, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.86),
    "purple": (0.55, 0.20, 0.75),
    "pink": (0.98, 0.52, 0.72),
    "brown": (0.50, 0.30, 0.12),
    "white": (0.96, 0.96, 0.96),
    "grey": (0.50, 0.50, 0.50),
    "black": (0.06, 0.06, 0.06),
}
LUMA = np.array([0.299, 0.587, 0.114])


def second_tone(rgb: Array) -> Array:
    """The texture's other tone: the background pushed 45 % toward white or black."""
    return rgb + (1 - rgb) * 0.45 if float(rgb @ LUMA) < 0.5 else rgb * 0.55


def contrast(fg: Array, bg: Array, channels: int) -> float:
    """Smallest distance between ``fg`` and any background tone (the segment bg → second tone).

    Colour images use the RGB Euclidean distance, grey images the luma difference.
    """
    alt = second_tone(bg)
    if channels == 1:
        lo, hi = sorted((float(bg @ LUMA), float(alt @ LUMA)))
        y = float(fg @ LUMA)
        return max(lo - y, y - hi, 0.0)
    seg = alt - bg
    h = float(np.clip((fg - bg) @ seg / (seg @ seg), 0.0, 1.0))
    return float(np.linalg.norm(fg - bg - h * seg))


def contrasting_pairs(channels: int, min_contrast: float) -> dict[str, list[str]]:
    """For each background colour, the foreground colours that stand out from all its tones."""
    rgb = {k: np.array(v) for k, v in PALETTE.items()}
    return {
        bg: [fg for fg in PALETTE if contrast(rgb[fg], rgb[bg], channels) >= min_contrast]
        for bg in PALETTE
    }
