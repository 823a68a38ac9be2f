"""What a ``shapes`` image shows, in words: discrete attributes and a small caption grammar.

The renderer draws some parameters continuously; the attributes name them discretely:

- ``shape``: the drawn shape (the dataset's class names).
- ``colour``: the foreground palette colour drawn (``PALETTE``; the ±0.04 per-channel jitter
  keeps it the nearest palette colour of its own pixels).
- ``size``: ``small`` / ``medium`` / ``large``, thirds of the difficulty's radius range.
- ``position`` (``hard`` only; ``easy`` shapes are always near the centre): a 3×3 grid of the
  shape's centre ``(cx, cy)``: a coordinate within ``POSITION_BAND`` of the middle (0.5) is
  ``centre``, below it ``left``/``top``, above it ``right``/``bottom``.
- ``background``: the background palette colour; ``texture``: its pattern (plain, striped…).

A caption names every attribute in one of ``len(PHRASINGS)`` phrasings, e.g. ``"a small red
triangle in the top left on a striped blue background"``; datasets pick the phrasing of image
``i`` by a seeded draw of its own stream, so captions are pure in ``(seed, i)`` and never touch
the draws that make the image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from denoiselab.data.shapes_draw import PALETTE

COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
POSITION_NAMES: tuple[str, ...] = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
    "bottom right",
)  # fmt: skip
POSITION_BAND = 0.08  # |c − 0.5| ≤ this (fraction of the side) is the middle row / column
_POSITION_PHRASE = {
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "centre": "in the centre",
}
_TEXTURE_PHRASE = {
    "plain": "plain {} background",
    "stripes": "striped {} background",
    "checker": "checkered {} background",
    "dots": "dotted {} background",
    "gradient": "{} gradient background",
}
# {pos} is " in the top left" (with its leading space) or "" when position is not described.
PHRASINGS: tuple[str, ...] = (
    "a {size} {colour} {shape}{pos} on a {bg}",
    "{size} {colour} {shape}{pos}, {bg}",
    "a {bg} with a {size} {colour} {shape}{pos}",
    "a {size} {shape} in {colour}{pos} against a {bg}",
    "an image of a {size} {colour} {shape}{pos} on a {bg}",
)
_CAPTION_STREAM = 0xCA9  # the phrasing draw: a stream of its own, images never see it
_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def size_bin(radius: float, radius_range: tuple[float, float]) -> int:
    """Index in ``SIZE_NAMES``: thirds of ``radius_range``."""
    lo, hi = radius_range
    return min(max(int((radius - lo) / (hi - lo) * 3), 0), 2)


def position_bin(cx: float, cy: float) -> int:
    """Index in ``POSITION_NAMES`` of a centre ``(cx, cy)`` (fractions of the side, y down)."""
    column, row = (
        int(np.digitize(c, (0.5 - POSITION_BAND, 0.5 + POSITION_BAND))) for c in (cx, cy)
    )
    return 3 * row + column


def mirror_position(name: str) -> str:
    """The position of a horizontally mirrored scene: left and right swap."""
    return name.replace("left", "_").replace("right", "left").replace("_", "right")


def position_phrase(name: str) -> str:
    """``"top left"`` → ``"in the top left"``, ``"left"`` → ``"on the left"``."""
    return _POSITION_PHRASE.get(name, f"in the {name}")


def compose(words: Mapping[str, str], phrasing: int = 0) -> str:
    """The caption of attribute ``words`` (keys ``shape, colour, size, background, texture``
    and optionally ``position``) in phrasing ``phrasing`` of ``PHRASINGS``."""
    position = words.get("position")
    text = PHRASINGS[phrasing % len(PHRASINGS)].format(
        size=words["size"],
        colour=words["colour"],
        shape=words["shape"],
        pos=f" {position_phrase(position)}" if position else "",
        bg=_TEXTURE_PHRASE[words["texture"]].format(words["background"]),
    )
    return _ARTICLE.sub("an ", text)


def phrasing_of(seed: int, index: int) -> int:
    """The phrasing of image ``index`` of a dataset with seed ``seed`` (a seeded fair draw)."""
    return int(np.random.default_rng((_CAPTION_STREAM, seed, index)).integers(len(PHRASINGS)))


def parse_pair(text: str, shapes: tuple[str, ...]) -> tuple[str, str]:
    """``"red triangle"`` → ``("triangle", "red")``; a clear error names what is valid."""
    parts = str(text).split()
    if len(parts) != 2 or parts[0] not in COLOUR_NAMES or parts[1] not in shapes:
        raise ValueError(
            f"holdout pair {text!r}; valid: '<colour> <shape>' with colour one of "
            f"{', '.join(COLOUR_NAMES)} and shape one of {', '.join(shapes)}"
        )
    return parts[1], parts[0]
