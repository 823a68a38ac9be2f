"""``shapes`` captions and attributes say what the pixels show; held-out (colour, shape) pairs
never appear; imagefolder captions from ``metadata.jsonl`` and sidecar ``.txt`` files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from denoiselab.data import DataConfig, ImageFolderDataset, ShapesDataset, build_dataset
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
    seen_before = 0
    for i in range(len(plain)):
        a, b = plain.spec(i), held.spec(i)
        assert (b.shape, b.fg) not in held_out
        if (a.shape, a.fg) in held_out:
            seen_before += 1
            assert (b.shape, b.cx, b.cy, b.radius, b.texture) == (
                a.shape, a.cx, a.cy, a.radius, a.texture,
            )  # fmt: skip
            assert b.fg != a.fg  # re-coloured, everything else kept
        else:
            assert a == b
    assert seen_before > 20  # the pairs were there without holdout
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
    from denoiselab.config import from_dict

    loaded = from_dict(DataConfig, {"difficulty": "easy", "holdout_pairs": ["red star"]})
    assert loaded.holdout_pairs == ("red star",)  # a YAML list
    with pytest.raises(ValueError, match=r"holdout pair 'red heart'"):
        from_dict(DataConfig, {"difficulty": "easy", "holdout_pairs": ["red heart"]})


# --------------------------------------------------------------------------------------------
# imagefolder captions


def _png(path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)


def _jsonl(path, *rows) -> None:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_imagefolder_metadata_jsonl_flat_layout(tmp_path, caplog) -> None:
    """The Hugging Face layout: images directly in the folder, ``metadata.jsonl`` beside them
    (``text`` or ``caption``); an image without an entry is counted and captioned ''."""
    from denoiselab.data.config import class_names

    root = tmp_path / "pets"
    for k, name in enumerate(("a.png", "b.png", "c.png", "d.png")):
        _png(root / name, 40 * k)
    _jsonl(
        root / "metadata.jsonl",
        {"file_name": "a.png", "text": "a grey cat"},
        "",
        {"file_name": "b.png", "caption": "a dog", "extra": 3},
        {"file_name": "c.png", "text": None},
        {"file_name": "gone.png", "text": "no such image"},
    )
    with caplog.at_level("WARNING", logger="denoiselab.data.imagefolder"):
        ds = build_dataset(DataConfig(name="imagefolder", root=str(root), image_size=8))
    assert ds.class_names == ["pets"] == class_names(DataConfig(name="imagefolder", root=str(root)))
    assert [ds.caption(i) for i in range(4)] == ["a grey cat", "a dog", "", ""]
    assert ds.missing_captions == 2 and ds.caption_source == "files"
    assert ds.captions.unmatched == [str(root / "gone.png")]
    assert sum("2 of 4 images have no caption" in r.getMessage() for r in caplog.records) == 1
    assert any("1 metadata.jsonl entries name no image" in r.getMessage() for r in caplog.records)
    assert ds[1][1] == 0 and torch.equal(ds[1][0], ds[1][0])


def test_imagefolder_sidecar_txt_and_metadata_in_class_folders(tmp_path) -> None:
    """Class folders with sidecar .txt files, and a metadata.jsonl in one folder whose entry
    wins over a sidecar; a tree without caption files keeps class-name captions."""
    _png(tmp_path / "cat" / "1.png", 10)
    _png(tmp_path / "cat" / "2.png", 20)
    _png(tmp_path / "dog" / "sub" / "3.png", 30)
    (tmp_path / "cat" / "1.txt").write_text("  a cat asleep\n", encoding="utf-8")
    (tmp_path / "cat" / "2.txt").write_text("ignored: metadata wins", encoding="utf-8")
    (tmp_path / "dog" / "sub" / "3.txt").write_text("un chien, déjà vu", encoding="utf-8")
    _jsonl(tmp_path / "cat" / "metadata.jsonl", {"file_name": "2.png", "text": "a cat, from jsonl"})
    ds = ImageFolderDataset(tmp_path, image_size=8, hflip=False)
    assert ds.class_names == ["cat", "dog"] and [ds.samples[i][1] for i in range(3)] == [0, 0, 1]
    assert [ds.caption(i) for i in range(3)] == [
        "a cat asleep",
        "a cat, from jsonl",
        "un chien, déjà vu",
    ]
    assert ds.missing_captions == 0
    for path in (tmp_path / "cat").glob("*.txt"):
        path.unlink()
    (tmp_path / "dog" / "sub" / "3.txt").unlink()
    (tmp_path / "cat" / "metadata.jsonl").unlink()
    (tmp_path / "golden_retriever").mkdir()
    _png(tmp_path / "golden_retriever" / "4.png", 50)
    plain = ImageFolderDataset(tmp_path, image_size=8)
    assert plain.caption_source == "class names" and plain.missing_captions == 0
    assert [plain.caption(i) for i in range(4)] == ["cat", "cat", "dog", "golden retriever"]


def test_imagefolder_caption_follows_a_replaced_unreadable_image(tmp_path) -> None:
    _png(tmp_path / "x" / "a.png", 10)
    (tmp_path / "x" / "b.png").write_bytes(b"not a png")
    _png(tmp_path / "x" / "c.png", 30)
    for name in "abc":
        (tmp_path / "x" / f"{name}.txt").write_text(f"caption {name}")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    image, _ = ds[1]  # b is unreadable: the sample is c
    assert torch.equal(image, ds[2][0]) and ds.caption(1) == "caption c"
    assert ds.caption(0) == "caption a"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"file_name": "a.png", "text": "ok"', r"metadata\.jsonl:2: invalid JSON"),
        ('["a.png", "text"]', r"metadata\.jsonl:2: .* has no string 'file_name'"),
        ('{"text": "no file"}', r"metadata\.jsonl:2: .* has no string 'file_name'"),
        ('{"file_name": "a.png", "text": 7}', r"metadata\.jsonl:2: text=7 is not a string"),
    ],
)
def test_imagefolder_bad_metadata_line_is_named(tmp_path, line: str, match: str) -> None:
    from denoiselab.data.captions import CaptionError

    _png(tmp_path / "a.png", 10)
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "fine"}\n' + line + "\n"
    )
    with pytest.raises(CaptionError, match=match) as err:
        ImageFolderDataset(tmp_path, image_size=8)
    assert str(tmp_path / "metadata.jsonl") in str(err.value)


def test_caption_of_a_mirrored_image_swaps_left_and_right() -> None:
    from denoiselab.data.base import flip_decision

    ds = ShapesDataset(num_images=200, seed=3, hflip=True)
    flipped = unflipped = 0
    for i in range(len(ds)):
        words, mirrored = ds.words(i), ds.words(i, epoch=2)
        if flip_decision(3, i, 2):
            swap = {"left": "right", "right": "left"}
            expected = " ".join(swap.get(w, w) for w in words["position"].split())
            assert mirrored["position"] == expected
            sided = "left" in expected or "right" in expected
            assert (ds.caption(i, 2) != ds.caption(i)) == sided
            flipped += sided
        else:
            assert mirrored == words and ds.caption(i, 2) == ds.caption(i)
            unflipped += 1
    assert flipped > 30 and unflipped > 60
    # Measured on the pixels: the centroid of a mirrored image's shape is on the named side.
    for i in range(40):
        image, _ = ds.get_item(i, epoch=2)
        spec, name = ds.spec(i), ds.words(i, epoch=2)["position"]
        if spec.shape in ("ring", "crescent", "heart") or name.split()[-1] not in ("left", "right"):
            continue
        mask = (
            np.linalg.norm(((image + 1) / 2).permute(1, 2, 0).numpy() - spec.fg_rgb, axis=-1) < 0.12
        )
        cx = (np.nonzero(mask)[1].mean() + 0.5) / 32
        assert (cx < 0.5) == name.endswith("left"), (i, name, cx)


def test_every_dataset_takes_an_epoch_for_its_caption(tmp_path) -> None:
    """One contract for the text loader: ``caption(i, epoch)`` on every dataset."""
    from denoiselab.data import DigitsDataset

    _png(tmp_path / "a_b" / "x.png", 5)
    folder = ImageFolderDataset(tmp_path, image_size=8)
    digits = DigitsDataset(image_size=8)
    assert folder.caption(0, epoch=3) == folder.caption(0) == "a b"
    assert digits.caption(4, epoch=1) == digits.caption(4)
    shapes = ShapesDataset(num_images=8, difficulty="easy", hflip=True)
    assert all(shapes.caption(i, epoch=5) == shapes.caption(i) for i in range(8))  # no position
