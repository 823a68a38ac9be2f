"""``shapes`` difficulties: ``hard`` (the default) stays bit-identical, ``easy`` is what it says.

The digests below were taken from the renderer at commit a39733c, before ``difficulty``
existed: any change to the ``hard`` draws or rasterisation changes them.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
import pytest

from denoiselab.data import DataConfig, ShapesDataset, build_dataset
from denoiselab.data.config import class_names
from denoiselab.data.shapes import (
    EASY_CENTRE_JITTER,
    EASY_RADIUS_RANGE,
    EASY_SHAPES,
    EASY_TEXTURES,
    SHAPE_NAMES,
)

HARD_DIGESTS = {  # sha256 over images 0,1,2,3,5,8,13,21,34,55,99 (float32 bytes + label byte)
    "default": ("a9d7e8e5d2c8284314070305478c6171efe8f1590c8d1bcbaac6873160e6d8b1", {}),
    "grey": ("7af3b792ca86ba0b9cba8dcc409e4ef9f820f586e8c32a5609e4626776caf5a8", {"channels": 1}),
    "plain": (
        "bd69cdf4b6d4bb4d9388058345f5a96cb23368c7ac4faa59bcd26fee65044d67",
        {"textures": ("plain",)},
    ),
    "64px_seed3": (
        "b6e148e4ff2cd3e869102edc1483c78a3706e93bedce518bab93553b4c064364",
        {"image_size": 64, "seed": 3},
    ),
}


def _digest(ds: ShapesDataset) -> str:
    h = hashlib.sha256()
    for i in (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 99):
        x, y = ds[i]
        h.update(x.numpy().tobytes())
        h.update(bytes([y]))
    return h.hexdigest()


@pytest.mark.parametrize("case", sorted(HARD_DIGESTS))
def test_hard_shapes_are_bit_identical_to_before_difficulty_existed(case: str) -> None:
    digest, kwargs = HARD_DIGESTS[case]
    assert _digest(ShapesDataset(num_images=100, **kwargs)) == digest
    explicit = ShapesDataset(num_images=100, difficulty="hard", **kwargs)
    assert _digest(explicit) == digest
    assert DataConfig(difficulty="hard") == DataConfig()  # the default, same cache keys


def test_easy_shapes_are_upright_large_centred_on_plain_or_gradient() -> None:
    ds = build_dataset(DataConfig(name="shapes", num_images=400, difficulty="easy"))
    assert ds.num_classes == len(EASY_SHAPES) == 5 and ds.class_names == list(EASY_SHAPES)
    assert set(EASY_SHAPES) < set(SHAPE_NAMES)
    lo, hi = EASY_RADIUS_RANGE
    textures = Counter()
    for i in range(len(ds)):
        s = ds.spec(i)
        assert s.label == i % 5 and s.shape == EASY_SHAPES[s.label]
        assert s.angle == (math.pi / 4 if s.shape == "square" else 0.0)  # square: sides level
        assert lo <= s.radius <= hi and s.radius_range == EASY_RADIUS_RANGE
        assert abs(s.cx - 0.5) <= EASY_CENTRE_JITTER and abs(s.cy - 0.5) <= EASY_CENTRE_JITTER
        textures[s.texture] += 1
    assert set(textures) == set(EASY_TEXTURES) and min(textures.values()) > 120
    assert {ds.spec(i).size_word for i in range(len(ds))} == {"small", "medium", "large"}
    again = ShapesDataset(num_images=400, difficulty="easy")
    assert all((ds[i][0] == again[i][0]).all() for i in (0, 7, 399))  # pure in (seed, index)
    other = ShapesDataset(num_images=400, difficulty="easy", seed=1)
    assert not (ds[0][0] == other[0][0]).all()


def _foreground_mask(ds: ShapesDataset, i: int) -> np.ndarray:
    spec, image = ds.spec(i), ((ds[i][0] + 1) / 2).permute(1, 2, 0).numpy()
    return np.linalg.norm(image - np.array(spec.fg_rgb), axis=-1) < 0.12


def test_easy_square_is_axis_aligned_and_triangle_points_up() -> None:
    """Measured on the pixels: an upright square fills its bounding box (a diamond fills half
    of it); an upright triangle has more of its mass in its lower half."""
    ds = ShapesDataset(num_images=60, image_size=64, difficulty="easy")
    for i in range(len(ds)):
        mask = _foreground_mask(ds, i)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        if ds.spec(i).shape == "square":
            assert mask.sum() / box > 0.9, i
        if ds.spec(i).shape == "triangle":
            middle = (ys.max() + ys.min()) / 2
            assert (ys > middle).sum() > 2 * (ys < middle).sum(), i


def test_easy_colours_say_nothing_of_the_class() -> None:
    """Only the shape tells the class: a lookup table from (foreground, background) colour
    names to the most frequent label, fitted on 2000 images, is at chance on 2000 others."""
    ds = ShapesDataset(num_images=4000, difficulty="easy")
    specs = [ds.spec(i) for i in range(len(ds))]
    pairs = [(s.fg, s.bg, s.label) for s in specs]
    votes: dict[tuple[str, str], Counter] = {}
    for fg, bg, label in pairs[:2000]:
        votes.setdefault((fg, bg), Counter())[label] += 1
    hits = [
        votes[(fg, bg)].most_common(1)[0][0] == label
        for fg, bg, label in pairs[2000:]
        if (fg, bg) in votes
    ]
    assert len(hits) > 1500 and np.mean(hits) < 0.3  # chance 0.2
    for name in EASY_SHAPES:  # every class wears most of the palette
        fgs = {fg for fg, _, label in pairs if EASY_SHAPES[label] == name}
        assert len(fgs) >= 10, (name, fgs)


def test_difficulty_config_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"data\.difficulty='medium'; valid: 'hard', 'easy'"):
        DataConfig(difficulty="medium")
    with pytest.raises(ValueError, match=r"only used by 'shapes', not 'digits'"):
        DataConfig(name="digits", difficulty="easy")
    with pytest.raises(ValueError, match=r"textures=\['plain'\] applies to difficulty 'hard'"):
        DataConfig(difficulty="easy", textures=("plain",))
    with pytest.raises(ValueError, match=r"difficulty 'extreme'; valid: hard, easy"):
        ShapesDataset(difficulty="extreme")


def test_class_names_without_loading_images(tmp_path) -> None:
    assert class_names(DataConfig(difficulty="easy")) == list(EASY_SHAPES)
    assert class_names(DataConfig()) == list(SHAPE_NAMES)
    assert class_names(DataConfig(name="digits")) == [str(d) for d in range(10)]
    for name in ("b_dog", "a_cat", ".hidden"):
        (tmp_path / name).mkdir()
    assert class_names(DataConfig(name="imagefolder", root=str(tmp_path))) == ["a_cat", "b_dog"]
    missing = str(tmp_path / "elsewhere")
    assert class_names(DataConfig(name="imagefolder", root=missing)) is None
    assert class_names(DataConfig(name="latents", root=missing)) is None
