"""``shapes``: procedurally generated coloured geometric shapes on textured backgrounds.

Image ``i`` of a dataset with seed ``s`` is a pure function of ``(s, i)``: a per-index numpy
``Generator`` draws a resolution-free :class:`ShapeSpec` (positions and sizes are fractions of
the image side), which is then rasterised at any resolution. Hence the same ``(s, i)`` shows
the same scene at 32 and at 256 pixels. Labels are balanced exactly: ``label = i mod C``.

Two difficulties (``DIFFICULTIES``), each its own sequence of draws:

- ``hard`` (the default; every result in docs/claims.md): 8 classes, shapes at random angles,
  diameters of 45–80 % of the side anywhere in the image, five background textures.
- ``easy`` (the quickstart): the 5 most distinct classes (``EASY_SHAPES``), upright, larger
  (diameters of 64–84 %), near the centre, on plain or two-tone (gradient) backgrounds.
  Colours are drawn as in ``hard``, independently of the class: only the shape tells it.

Captions and discrete attributes (shape, colour, size, position, background, texture) come
from :mod:`denoiselab.data.shapes_caption`. ``holdout_pairs`` (e.g. ``("red triangle",)``)
keeps (colour, shape) combinations out of the data for compositional tests: an image that
draws a held-out pair is re-coloured from a side stream (:func:`avoid_pairs`); every other
image, and every image when no pair is held out, stays bit-identical.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import SupportsIndex

import numpy as np
import torch
from torch import Tensor

from denoiselab.data.base import ImageDataset
from denoiselab.data.shapes_caption import (
    COLOUR_NAMES,
    POSITION_NAMES,
    SIZE_NAMES,
    compose,
    mirror_position,
    parse_pair,
    phrasing_of,
    position_bin,
    size_bin,
)
from denoiselab.data.shapes_draw import (
    HEART_MAX_TILT,
    LUMA,
    PALETTE,
    SHAPES,
    TEXTURES,
    contrasting_pairs,
    second_tone,
    shape_coverage,
    texture_tone,
)

SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
RADIUS_RANGE = (0.225, 0.40)  # shape radius / image side: diameters of 45–80 % of the image
EDGE_MARGIN = 0.02  # keep the shape this far (fraction of the side) from the image border
COLOUR_JITTER = 0.04  # per-channel uniform jitter around the palette colour
MIN_CONTRAST = {3: 0.5, 1: 0.25}  # RGB distance (colour) / luma difference (grey)
_SHAPES_STREAM = 0x5BA9E5  # stream tag: keeps these draws apart from other (seed, i) users
_TEXTURE_SUBSET_STREAM = 0x7E7  # the background draw when ``textures`` is a subset
_PAIRS = {ch: contrasting_pairs(ch, m) for ch, m in MIN_CONTRAST.items()}  # bg -> valid fgs
DIFFICULTIES = ("hard", "easy")
EASY_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
EASY_RADIUS_RANGE = (0.32, 0.42)
EASY_CENTRE_JITTER = 0.06  # centre within ±this (fraction of the side) of the image centre
EASY_TEXTURES = ("plain", "gradient")
EASY_ANGLE = {"square": math.pi / 4}  # upright: the square's SDF has a vertex up; others 0
_EASY_STREAM = 0xEA5E  # the easy draws: a stream of their own, so ``hard`` stays as it was
_HOLDOUT_STREAM = 0x401D  # re-colouring of images that drew a held-out pair


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that defines one image, independent of resolution.

    ``cx, cy, radius`` are fractions of the image side, ``angle`` is in radians,
    ``fg_rgb, bg_rgb`` are the jittered colours in ``[0, 1]``, ``texture_params`` four
    numbers in ``[0, 1)`` that set the texture's angle, period, phase and dot size.
    """

    label: int
    shape: str
    cx: float
    cy: float
    radius: float
    angle: float
    fg: str
    bg: str
    fg_rgb: tuple[float, float, float]
    bg_rgb: tuple[float, float, float]
    texture: str
    texture_params: tuple[float, float, float, float]
    radius_range: tuple[float, float] = RADIUS_RANGE  # of its difficulty: sets ``size_word``

    @property
    def size_word(self) -> str:
        """``small`` / ``medium`` / ``large`` by thirds of the radius range."""
        return SIZE_NAMES[size_bin(self.radius, self.radius_range)]

    @property
    def position_word(self) -> str:
        """Where the centre lies on a 3×3 grid (``shapes_caption.position_bin``)."""
        return POSITION_NAMES[position_bin(self.cx, self.cy)]

    def words(self, with_position: bool = True) -> dict[str, str]:
        """The attribute names of this scene (``shapes_caption`` module docstring)."""
        words = {
            "shape": self.shape,
            "colour": self.fg,
            "size": self.size_word,
            "background": self.bg,
            "texture": self.texture,
        }
        return {**words, "position": self.position_word} if with_position else words

    def caption(self, phrasing: int = 0, with_position: bool = True) -> str:
        """E.g. ``"a small red triangle in the top left on a striped blue background"``."""
        return compose(self.words(with_position), phrasing)


def _draw_angle(rng: np.random.Generator, symmetry: int) -> float:
    u = rng.random()
    if symmetry == -1:
        return (2 * u - 1) * HEART_MAX_TILT
    return 2 * math.pi * u / symmetry if symmetry > 0 else 0.0


def _jitter(rng: np.random.Generator, name: str) -> tuple[float, float, float]:
    rgb = np.clip(np.array(PALETTE[name]) + rng.uniform(-1, 1, 3) * COLOUR_JITTER, 0, 1)
    return (float(rgb[0]), float(rgb[1]), float(rgb[2]))


def draw_spec(
    seed: int, index: int, channels: int = 3, textures: tuple[str, ...] = TEXTURES
) -> ShapeSpec:
    """The scene of image ``index`` for dataset ``seed`` (pure; a fixed sequence of draws).

    ``textures``: the backgrounds to draw from. A subset changes only the background of each
    image: every other draw (class, shape geometry, colours) stays the same."""
    rng = np.random.default_rng((_SHAPES_STREAM, seed, index))
    label = index % len(SHAPE_NAMES)
    shape = SHAPE_NAMES[label]
    radius = float(rng.uniform(*RADIUS_RANGE))
    lo, hi = radius + EDGE_MARGIN, 1 - radius - EDGE_MARGIN
    cx, cy = (float(v) for v in rng.uniform(lo, hi, 2))
    angle = _draw_angle(rng, SHAPES[shape][1])
    pairs = _PAIRS[channels]
    bg = list(PALETTE)[rng.integers(len(PALETTE))]
    fg = pairs[bg][rng.integers(len(pairs[bg]))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    if textures != TEXTURES:  # a side stream: the main sequence of draws stays as it is
        side = np.random.default_rng((_SHAPES_STREAM, seed, index, _TEXTURE_SUBSET_STREAM))
        texture = textures[side.integers(len(textures))]
    p = rng.random(4)
    params = (float(p[0]), float(p[1]), float(p[2]), float(p[3]))
    fg_rgb, bg_rgb = _jitter(rng, fg), _jitter(rng, bg)
    return ShapeSpec(label, shape, cx, cy, radius, angle, fg, bg, fg_rgb, bg_rgb, texture, params)


def draw_easy_spec(seed: int, index: int, channels: int = 3) -> ShapeSpec:
    """The ``easy`` scene of image ``index``: one of ``EASY_SHAPES``, upright, large, near the
    centre, on a plain or gradient background; colours as :func:`draw_spec` (any class can
    take any contrasting pair, so colour says nothing of the class)."""
    rng = np.random.default_rng((_SHAPES_STREAM, _EASY_STREAM, seed, index))
    label = index % len(EASY_SHAPES)
    shape = EASY_SHAPES[label]
    radius = float(rng.uniform(*EASY_RADIUS_RANGE))
    cx, cy = (float(v) for v in 0.5 + rng.uniform(-1, 1, 2) * EASY_CENTRE_JITTER)
    pairs = _PAIRS[channels]
    bg = list(PALETTE)[rng.integers(len(PALETTE))]
    fg = pairs[bg][rng.integers(len(pairs[bg]))]
    texture = EASY_TEXTURES[rng.integers(len(EASY_TEXTURES))]
    p = rng.random(4)
    params = (float(p[0]), float(p[1]), float(p[2]), float(p[3]))
    fg_rgb, bg_rgb = _jitter(rng, fg), _jitter(rng, bg)
    return ShapeSpec(
        label, shape, cx, cy, radius, EASY_ANGLE.get(shape, 0.0), fg, bg, fg_rgb, bg_rgb, texture, params,
        EASY_RADIUS_RANGE,
    )  # fmt: skip


def avoid_pairs(
    spec: ShapeSpec, held_out: frozenset[tuple[str, str]], stream: tuple[int, ...], channels: int
) -> ShapeSpec:
    """``spec`` itself unless its ``(shape, colour)`` is in ``held_out``; then the same scene
    with a foreground colour drawn (seeded by ``stream``) among those that contrast with the
    background and are not held out for the shape (the background is redrawn too in the rare
    case that none is left). Geometry, texture and size never change."""
    if (spec.shape, spec.fg) not in held_out:
        return spec
    rng = np.random.default_rng((_SHAPES_STREAM, _HOLDOUT_STREAM, *stream))
    pairs = _PAIRS[channels]
    allowed = [(bg, fg) for bg in PALETTE for fg in pairs[bg] if (spec.shape, fg) not in held_out]
    same_bg = [pair for pair in allowed if pair[0] == spec.bg]
    bg, fg = (same_bg or allowed)[rng.integers(len(same_bg or allowed))]
    return recolour(spec, fg, rng, channels, bg)


def recolour(
    spec: ShapeSpec,
    colour: str,
    rng: np.random.Generator,
    channels: int = 3,
    background: str | None = None,
) -> ShapeSpec:
    """``spec`` with foreground ``colour`` (jittered from ``rng``) on ``background`` (default:
    its own if ``colour`` stands out from it, else one drawn among those it stands out from)."""
    pairs = _PAIRS[channels]
    bg = background or spec.bg
    if colour not in pairs[bg]:
        options = [b for b in PALETTE if colour in pairs[b]]
        bg = options[rng.integers(len(options))]
    fg_rgb = _jitter(rng, colour)
    bg_rgb = spec.bg_rgb if bg == spec.bg else _jitter(rng, bg)
    return dataclasses.replace(spec, fg=colour, fg_rgb=fg_rgb, bg=bg, bg_rgb=bg_rgb)


def render(spec: ShapeSpec, size: int, channels: int = 3) -> np.ndarray:
    """Rasterise ``spec`` to ``float32 [channels, size, size]`` in ``[0, 1]``."""
    bg = np.array(spec.bg_rgb, dtype=np.float32)
    alt, fg = second_tone(bg), np.array(spec.fg_rgb, dtype=np.float32)
    if channels == 1:
        bg, alt, fg = (np.atleast_1d(c @ LUMA.astype(np.float32)) for c in (bg, alt, fg))
    tone = texture_tone(spec.texture, size, spec.texture_params)
    cover = shape_coverage(spec.shape, size, spec.cx, spec.cy, spec.radius, spec.angle)
    image = np.empty((channels, size, size), dtype=np.float32)
    for c in range(channels):  # per-channel scalar blends: cheaper than [H, W, C] broadcasting
        background = bg[c] + (alt[c] - bg[c]) * tone
        image[c] = background + (fg[c] - background) * cover
    return image


class ShapesDataset(ImageDataset):
    """``num_images`` shapes images of side ``image_size``; ``difficulty`` ``"hard"`` (8 classes
    named in ``SHAPE_NAMES``) or ``"easy"`` (the 5 of ``EASY_SHAPES``; module docstring)."""

    captions_follow_flips = True  # caption(i, epoch) swaps left and right with the flip

    def __init__(
        self,
        num_images: int = 50_000,
        image_size: int = 32,
        seed: int = 0,
        channels: int = 3,
        hflip: bool = False,
        textures: tuple[str, ...] | None = None,
        difficulty: str = "hard",
        holdout_pairs: tuple[str, ...] | None = None,
    ) -> None:
        if channels not in MIN_CONTRAST:
            raise ValueError(f"channels={channels!r}; valid: 1, 3")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"shapes difficulty {difficulty!r}; valid: {', '.join(DIFFICULTIES)}")
        if difficulty == "easy" and textures:
            raise ValueError(
                f"shapes textures {list(textures)!r} apply to difficulty 'hard'; 'easy' draws "
                f"its own backgrounds ({', '.join(EASY_TEXTURES)})"
            )
        self.difficulty = difficulty
        self.textures = tuple(textures) if textures else TEXTURES
        bad = [t for t in self.textures if t not in TEXTURES]
        if bad:
            raise ValueError(f"shapes textures {bad!r}; valid: {', '.join(TEXTURES)}")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.channels, self.hflip = channels, hflip
        self.class_names = list(EASY_SHAPES if difficulty == "easy" else SHAPE_NAMES)
        self.num_classes = len(self.class_names)
        shapes = tuple(self.class_names)
        self.held_out = frozenset(parse_pair(p, shapes) for p in holdout_pairs or ())
        # What attributes(i) indexes into; easy shapes are always centred: no position.
        self.attribute_names: dict[str, tuple[str, ...]] = {
            "shape": shapes,
            "colour": COLOUR_NAMES,
            "size": SIZE_NAMES,
            **({} if difficulty == "easy" else {"position": POSITION_NAMES}),
            "background": COLOUR_NAMES,
            "texture": EASY_TEXTURES if difficulty == "easy" else self.textures,
        }

    def __len__(self) -> int:
        return self.num_images

    def spec(self, index: SupportsIndex) -> ShapeSpec:
        """The resolution-free description of image ``index``."""
        return self._spec(self._check_index(index))

    def _spec(self, index: int) -> ShapeSpec:
        if self.difficulty == "easy":
            spec = draw_easy_spec(self.seed, index, self.channels)
        else:
            spec = draw_spec(self.seed, index, self.channels, self.textures)
        return avoid_pairs(spec, self.held_out, (self.seed, index), self.channels)

    def label(self, index: SupportsIndex) -> int:
        return self.spec(index).label

    def _load(self, index: int) -> tuple[Tensor, int]:
        spec = self._spec(index)
        image = render(spec, self.image_size, self.channels)
        return torch.from_numpy(image * 2 - 1), spec.label

    def words(self, index: SupportsIndex, epoch: int | None = None) -> dict[str, str]:
        """The attribute names of image ``index`` (keys of ``attribute_names``); with an
        ``epoch`` and ``hflip`` on, of the image as ``get_item(index, epoch)`` mirrors it."""
        return self._words(self._check_index(index), self.mirrored(index, epoch))

    def _words(self, i: int, mirrored: bool) -> dict[str, str]:
        words = self.spec(i).words(with_position="position" in self.attribute_names)
        if mirrored and "position" in words:
            words["position"] = mirror_position(words["position"])
        return words

    def attributes(self, index: SupportsIndex, epoch: int | None = None) -> dict[str, int]:
        """What image ``index`` shows: ``{attribute: index into attribute_names[attribute]}``
        (``epoch``: as :meth:`words`)."""
        words = self.words(index, epoch)
        return {key: names.index(words[key]) for key, names in self.attribute_names.items()}

    def caption(self, index: SupportsIndex, epoch: int | None = None) -> str:
        """E.g. ``"a small red triangle in the top left on a striped blue background"``, in
        a phrasing drawn per image (``shapes_caption.PHRASINGS``). Without ``epoch`` it
        describes the un-flipped image; with it, the image ``get_item(index, epoch)`` returns
        (left and right swap on a mirrored one)."""
        i = self._check_index(index)
        return compose(self.words(i, epoch), phrasing_of(self.seed, i))

    def caption_variant(self, index: SupportsIndex, mirrored: bool) -> str:
        """The caption of image ``index`` (mirrored: left and right swapped), whatever
        ``hflip`` says; ``caption(i, epoch)`` is the variant ``get_item(i, epoch)`` shows."""
        i = self._check_index(index)
        return compose(self._words(i, mirrored), phrasing_of(self.seed, i))
