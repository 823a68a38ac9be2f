"""``shapes`` captions and attributes say what the pixels show; held-out (colour, shape) pairs
never appear; imagefolder captions from ``metadata.jsonl`` and sidecar ``.txt`` files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from denoiselab.data import DataConfig, ShapesDataset, build_dataset
from denoiselab.data.shapes_caption import (
    PHRASINGS,
    POSITION_BAND,
    POSITION_NAMES,
    SIZE_NAMES,
    compose,
    position_phrase,
)
from denoiselab.data.shapes_draw import PALETTE


def _nearest(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: np.linalg.norm(np.array(PALETTE[name]) - rgb))


@pytest.mark.parametrize("difficulty", ["hard", "easy"])
def test_captions_name_every_attribute_in_seeded_phrasings(difficulty: str) -> None:
    ds = ShapesDataset(num_images=300, seed=4, difficulty=difficulty)
    phrasings = Counter()
    for i in range(len(ds)):
        caption, attrs, names = ds.caption(i), ds.attributes(i), ds.attribute_names
        words = {k: names[k][v] for k, v in attrs.items()}
        assert f"{words['colour']} {words['shape']}" in caption or (
            f"{words['shape']} in {words['colour']}" in caption
        ), caption
        assert words["size"] in caption and words["background"] in caption, caption
        if difficulty == "hard":
            assert position_phrase(words["position"]) in caption, caption
        else:
            assert "position" not in attrs and not any(p in caption for p in ("left", "top"))
        # The caption is one of the grammar's phrasings of exactly these words.
        matches = [k for k in range(len(PHRASINGS)) if compose(words, k) == caption]
        assert len(matches) == 1, caption
        phrasings[matches[0]] += 1
        assert " a a" not in caption and not any(f" a {v}" in caption for v in "aeiou")
    assert set(phrasings) == set(range(len(PHRASINGS))) and min(phrasings.values()) > 30
    again = ShapesDataset(num_images=300, seed=4, difficulty=difficulty)
    assert [again.caption(i) for i in range(50)] == [ds.caption(i) for i in range(50)]
    other = ShapesDataset(num_images=300, seed=5, difficulty=difficulty)
    assert [other.caption(i) for i in range(50)] != [ds.caption(i) for i in range(50)]


def _foreground(ds: ShapesDataset, i: int) -> np.ndarray:
    spec, image = ds.spec(i), ((ds[i][0] + 1) / 2).permute(1, 2, 0).numpy()
    return np.linalg.norm(image - np.array(spec.fg_rgb), axis=-1) < 0.12


def test_attributes_are_what_the_pixels_show() -> None:
    """Measured on the rendered image, independently of the drawing code: the colour at the
    mask's centroid is the named colour, the centroid's 3×3 cell the named position (away from
    cell borders), plain backgrounds the named background colour, and the mask area grows
    with the named size for each shape."""
    size = 64
    ds = ShapesDataset(num_images=8 * 40, image_size=size, seed=6, textures=("plain",))
    areas: dict[tuple[int, int], list[float]] = {}
    checked_position = 0
    for i in range(len(ds)):
        attrs, names, spec = ds.attributes(i), ds.attribute_names, ds.spec(i)
        image = ((ds[i][0] + 1) / 2).permute(1, 2, 0).numpy()
        mask = _foreground(ds, i)
        ys, xs = np.nonzero(mask)
        corner = image[1, 1] if not mask[1, 1] else image[-2, -2]
        assert _nearest(corner) == names["background"][attrs["background"]]
        areas.setdefault((attrs["shape"], attrs["size"]), []).append(mask.mean())
        if spec.shape in ("ring", "crescent", "heart"):
            continue  # their mass centre is not the drawn centre
        cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
        if min(abs(abs(c - 0.5) - POSITION_BAND) for c in (cx, cy)) > 0.02:
            col = 0 if cx < 0.5 - POSITION_BAND else 2 if cx > 0.5 + POSITION_BAND else 1
            row = 0 if cy < 0.5 - POSITION_BAND else 2 if cy > 0.5 + POSITION_BAND else 1
            assert POSITION_NAMES[3 * row + col] == names["position"][attrs["position"]], i
            checked_position += 1
        if spec.shape != "cross":  # a thin cross may have no interior pixel at its centre
            px = image[int(spec.cy * size), int(spec.cx * size)]
            assert _nearest(px) == names["colour"][attrs["colour"]], i
    assert checked_position > 100
    for shape in range(8):
        mean = [np.mean(areas[(shape, s)]) for s in range(3) if (shape, s) in areas]
        assert len(mean) == 3 and mean[0] < mean[1] < mean[2], (shape, mean)
    assert ds.attribute_names["size"] == SIZE_NAMES


def test_holdout_pairs_never_appear_and_leave_other_images_alone() -> None:
    pairs = ("red triangle", "blue circle", "green square")
    plain = ShapesDataset(num_images=2000, difficulty="easy")
    held = build_dataset(DataConfig(num_images=2000, difficulty="easy", holdout_pairs=pairs))
    held_out = {tuple(p.split()[::-1]) for p in pairs}
    seen_before, changed = 0, 0
    for i in range(len(plain)):
        a, b = plain.spec(i), held.spec(i)
        assert (b.shape, b.fg) not in held_out
        if (a.shape, a.fg) in held_out:
            seen_before += 1
            assert (b.shape, b.cx, b.cy, b.radius, b.texture) == (
                a.shape, a.cx, a.cy, a.radius, a.texture,
            )  # fmt: skip
            changed += 1
        else:
            assert a == b
    assert seen_before > 20 and changed == seen_before  # the pairs were there without holdout
    for i in (0, 1, 2, 3):  # images are rendered from the spec: unaffected ones bit-identical
        if plain.spec(i) == held.spec(i):
            assert torch.equal(plain[i][0], held[i][0])
    assert held[0][1] == plain[0][1] and held.num_classes == plain.num_classes


def test_holdout_config_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"holdout_pairs: holdout pair 'red heart'.*circle"):
        DataConfig(difficulty="easy", holdout_pairs=("red heart",))  # heart is not an easy shape
    with pytest.raises(ValueError, match=r"holdout pair 'crimson star'; valid"):
        DataConfig(holdout_pairs=("crimson star",))
    with pytest.raises(ValueError, match=r"only used by 'shapes', not 'digits'"):
        DataConfig(name="digits", holdout_pairs=("red star",))
    assert DataConfig(holdout_pairs=("red heart",)).holdout_pairs == ("red heart",)
