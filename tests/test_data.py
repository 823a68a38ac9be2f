"""Tests of denoiselab.data: datasets, preprocessing and deterministic resumable batching."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denoiselab.data import (
    SHAPE_NAMES,
    DataConfig,
    DigitsDataset,
    ImageFolderDataset,
    ShapesDataset,
    StepLoader,
    build_dataset,
    center_crop_arr,
    global_batch_indices,
    step_batch,
)
from denoiselab.data.shapes_draw import PALETTE

# --------------------------------------------------------------------------------------------
# shapes


def test_shapes_pure_in_seed_and_index() -> None:
    a, b = ShapesDataset(100, 32, seed=3), ShapesDataset(100, 32, seed=3)
    for i in (0, 7, 99):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    # Order of access must not matter (no shared RNG state).
    first = a[42][0].clone()
    _ = [a[i] for i in range(10)]
    assert torch.equal(a[42][0], first)
    other = ShapesDataset(100, 32, seed=4)
    assert not any(torch.equal(a[i][0], other[i][0]) for i in range(8))
    assert not torch.equal(a[0][0], a[8][0])  # same class, different images


@pytest.mark.parametrize("size", [32, 96])
def test_shapes_shape_range_and_classes(size: int) -> None:
    ds = ShapesDataset(num_images=64, image_size=size, seed=0)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = [ds[i][1] for i in range(len(ds))]
    assert images.shape == (64, 3, size, size) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.2  # not blank
    assert set(labels) == set(range(ds.num_classes)) and ds.num_classes == len(SHAPE_NAMES) >= 6
    assert ds.class_names == list(SHAPE_NAMES) and ds.channels == 3 and ds.image_size == size


def test_shapes_same_scene_at_every_resolution() -> None:
    small = ShapesDataset(16, 32, seed=1)[5][0]
    large = ShapesDataset(16, 128, seed=1)[5][0]
    pooled = torch.nn.functional.avg_pool2d(large[None], 4)[0]
    assert (pooled - small).abs().mean() < 0.05


def test_shapes_captions_name_shape_and_colours() -> None:
    ds = ShapesDataset(num_images=40, seed=2)
    for i in range(len(ds)):
        spec, caption = ds.spec(i), ds.caption(i)
        assert SHAPE_NAMES[ds[i][1]] in caption and spec.fg in caption and spec.bg in caption
        assert spec.size_word in caption and spec.position_word in caption
        assert spec.fg != spec.bg and "background" in caption
    assert ds.caption(0) == ShapesDataset(num_images=40, seed=2).caption(0)


def test_shapes_fill_colour_is_the_captioned_one() -> None:
    """The pixel at the shape's interior has the foreground colour named in the caption."""
    ds = ShapesDataset(num_images=16, image_size=64, seed=5)
    for i in range(len(ds)):
        spec, image = ds.spec(i), (ds[i][0] + 1) / 2
        if spec.shape in ("ring", "crescent"):
            continue  # their centre is background
        px = image[:, int(spec.cy * 64), int(spec.cx * 64)].numpy()
        nearest = min(PALETTE, key=lambda name: np.linalg.norm(np.array(PALETTE[name]) - px))
        assert nearest == spec.fg, (i, spec.shape, nearest, spec.fg)


def _shape_features(mask: np.ndarray) -> np.ndarray:
    """Translation-, rotation- and scale-invariant descriptors of a coverage mask ``[H, W]``.

    Radial histogram of the mask mass around its centroid (in units of √area) and the
    magnitudes of the angular Fourier modes 1…6 of the mass (triangle: 3, square: 4, star: 5…).
    """
    ys, xs = np.nonzero(mask > 0.5)
    w = mask[ys, xs]
    cy, cx = np.average(ys, weights=w), np.average(xs, weights=w)
    r = np.hypot(ys - cy, xs - cx) / np.sqrt(w.sum())
    radial = np.histogram(r, bins=8, range=(0, 1.2), weights=w)[0] / w.sum()
    theta = np.arctan2(ys - cy, xs - cx)
    outer = w * r**2
    modes = [np.abs((outer * np.exp(1j * k * theta)).sum()) / outer.sum() for k in range(1, 7)]
    return np.concatenate([radial, modes])


def test_shapes_are_distinguishable_by_their_pixels() -> None:
    """A nearest-centroid classifier on rotation-invariant features of the rendered foreground
    mask (pixels close to the captioned colour) recognises the class far above chance (1/8),
    and each class shows its expected geometry."""
    ds = ShapesDataset(num_images=8 * 60, image_size=32, seed=11)
    feats, labels = [], []
    for i in range(len(ds)):
        spec = ds.spec(i)
        image = ((ds[i][0] + 1) / 2).permute(1, 2, 0).numpy()
        dist_fg = np.linalg.norm(image - np.array(spec.fg_rgb), axis=-1)
        feats.append(_shape_features(np.clip(1.0 - dist_fg / 0.25, 0, 1)))
        labels.append(ds[i][1])
    x, y = np.array(feats), np.array(labels)
    mean = {name: x[y == c].mean(0) for c, name in enumerate(ds.class_names)}
    # Each class draws its own geometry: dominant angular symmetry, hole at the centroid.
    for name, order in (("triangle", 3), ("square", 4), ("cross", 4), ("star", 5)):
        modes = mean[name][8:]  # angular modes 1…6
        assert np.argmax(modes[1:]) + 2 == order, (name, modes)
    assert mean["circle"][8:].max() < 0.05 and mean["ring"][8:].max() < 0.05
    assert mean["ring"][0] < 0.02 < mean["circle"][0]  # the ring has no mass at its centre
    assert np.argmax(mean["crescent"][8:]) == 1  # a bent bar: the second angular mode dominates
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    train, test = np.arange(len(y)) < 320, np.arange(len(y)) >= 320
    centroids = np.stack([x[train & (y == c)].mean(0) for c in range(ds.num_classes)])
    pred = np.argmin(((x[test, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y[test]).mean()
    assert accuracy > 0.8, accuracy


def test_shapes_grey_channel() -> None:
    """A grey image is the luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) of the colour
    rendering of its scene, the scene's geometry is the colour dataset's, and the shape
    stands out from the background in grey too."""
    from denoiselab.data.shapes import render

    grey, colour = (ShapesDataset(num_images=16, image_size=32, channels=c) for c in (1, 3))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    for i in range(16):
        x = grey[i][0]
        assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1
        spec = grey.spec(i)
        rgb = torch.from_numpy(render(spec, 32, channels=3)) * 2 - 1
        torch.testing.assert_close(x[0], (rgb * luma).sum(0), atol=1e-5, rtol=0)
        c = colour.spec(i)
        assert (spec.shape, spec.cx, spec.cy, spec.radius, spec.angle) == (
            c.shape, c.cx, c.cy, c.radius, c.angle)  # fmt: skip
        fg, bg = (float(np.dot(v, luma.flatten().numpy())) for v in (spec.fg_rgb, spec.bg_rgb))
        assert abs(fg - bg) > 0.2, (i, fg, bg)


# --------------------------------------------------------------------------------------------
# digits


def test_digits_shape_range_labels() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = DigitsDataset(image_size=32, channels=3)
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.class_names[7] == "7"
    for i in (0, 100, 1796):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and y == int(ref.target[i])
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
        small = torch.nn.functional.avg_pool2d(x[:1][None], 4)[0, 0].numpy()
        corr = np.corrcoef(small.ravel(), ref.images[i].ravel())[0, 1]
        assert corr > 0.9, corr
    grey = DigitsDataset(image_size=16, channels=1)
    assert grey[0][0].shape == (1, 16, 16)
    assert (
        DigitsDataset(image_size=8, channels=1)[0][0]
        .add(1)
        .mul(8)
        .allclose(torch.from_numpy(ref.images[0]).float()[None], atol=1e-5)
    )


# --------------------------------------------------------------------------------------------
# imagefolder


def _write_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, colour in (("cat", 40), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        for k, (w, h) in enumerate([(40, 24), (24, 30), (33, 33)]):
            arr = np.full((h, w, 3), colour, np.uint8) + rng.integers(
                0, 20, (h, w, 3), dtype=np.uint8
            )
            Image.fromarray(arr).save(root / cls / f"{k}.{'png' if k % 2 else 'JPEG'}")
    good = root / "cat" / "0.JPEG"
    (root / "cat" / "zz_truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "dog" / "fake.png").write_text("this is not an image")
    (root / "dog" / "notes.txt").write_text("not listed: wrong extension")


def test_imagefolder_classes_skips_and_determinism(tmp_path: Path, caplog) -> None:
    _write_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path, image_size=16, seed=0, hflip=False)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 8  # 3 + truncated, 3 + fake; notes.txt not listed
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 2
    assert "zz_truncated.jpg" in caplog.text and "fake.png" in caplog.text
    for (x, y), (path, label) in zip(items, ds.samples):
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
        if "truncated" not in path and "fake" not in path:
            assert y == label
            assert (x.mean() > 0) == (label == 1)  # dark cats, bright dogs
    bad = [i for i, (p, _) in enumerate(ds.samples) if "truncated" in p or "fake" in p]
    for i in bad:  # replaced by the next readable sample, the same every time
        replacement = ds[(i + 1) % len(ds)]
        assert torch.equal(ds[i][0], replacement[0]) and ds[i][1] == replacement[1]
    assert ds.skipped == 2  # known-bad files are not counted twice


def test_imagefolder_hflip_depends_on_seed_index_epoch(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    flip = ImageFolderDataset(tmp_path, image_size=16, seed=0, hflip=True)
    plain = ImageFolderDataset(tmp_path, image_size=16, seed=0, hflip=False)
    flipped = []
    for epoch in range(8):
        x = flip.get_item(0, epoch)[0]
        assert torch.equal(x, flip.get_item(0, epoch)[0])
        if torch.equal(x, plain[0][0].flip(-1)):
            flipped.append(epoch)
        else:
            assert torch.equal(x, plain[0][0])
    assert 0 < len(flipped) < 8


def test_center_crop_matches_adm_steps_for_non_square_image() -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (150, 300, 3), dtype=np.uint8))  # w=300, h=150
    # Independent computation for image_size=32: 150 ≥ 64 → halve to 150×75; 75 ≥ 64 → halve
    # to 75×37; 37 < 64 stop. Scale 32/37: (75, 37) → (round(64.86), 32) = (65, 32). Crop at
    # x = (65 − 32) // 2 = 16.
    ref = image.resize((150, 75), Image.Resampling.BOX).resize((75, 37), Image.Resampling.BOX)
    ref = ref.resize((65, 32), Image.Resampling.BICUBIC).crop((16, 0, 48, 32))
    out = center_crop_arr(image, 32)
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    tall = center_crop_arr(Image.fromarray(np.zeros((50, 20, 3), np.uint8)), 16)
    assert tall.size == (16, 16)


def test_imagefolder_missing_and_empty_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist.*class"):
        ImageFolderDataset(missing)
    with pytest.raises(ValueError, match="no class sub-folders and no images"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(DataConfig(name="imagefolder", root=str(missing)))


# --------------------------------------------------------------------------------------------
# config


def test_data_config_builds_and_validates() -> None:
    ds = build_dataset(DataConfig(name="shapes", image_size=48, num_images=10, seed=1))
    assert isinstance(ds, ShapesDataset) and len(ds) == 10 and ds[0][0].shape == (3, 48, 48)
    assert not ds.hflip
    assert isinstance(build_dataset(DataConfig(name="digits", channels=1)), DigitsDataset)
    for bad, match in [
        ({"name": "cifar"}, "cifar.*'shapes'"),
        ({"image_size": 4}, "image_size=4"),
        ({"image_size": 32.0}, "image_size=32.0"),
        ({"channels": 2}, "channels=2.*1, 3"),
        ({"name": "imagefolder"}, "root=None"),
        ({"root": "/data"}, "only used by 'imagefolder'"),
        ({"num_images": 0}, "num_images=0"),
        ({"seed": -1}, "seed=-1"),
        ({"hflip": "yes"}, "hflip='yes'"),
        ({"num_workers": -2}, "num_workers=-2"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataConfig(**bad)


# --------------------------------------------------------------------------------------------
# batching


def test_global_batch_indices_walks_permutations_and_straddles_epochs() -> None:
    n, g = 10, 4
    steps = [global_batch_indices(7, s, g, n) for s in range(10)]  # 40 positions = 4 epochs
    stream = np.concatenate(steps)
    epochs = [stream[e * n : (e + 1) * n] for e in range(4)]
    for perm in epochs:
        assert sorted(perm.tolist()) == list(range(n))
    assert not all(np.array_equal(epochs[0], p) for p in epochs[1:])
    # step 2 = positions 8..11: the last two of epoch 0, then the first two of epoch 1
    assert np.array_equal(steps[2], np.concatenate([epochs[0][8:], epochs[1][:2]]))
    assert step_batch(7, 2, g, n)[1].tolist() == [0, 0, 1, 1]
    # pure: the same answer in any call order, and seeds matter
    assert np.array_equal(global_batch_indices(7, 2, g, n), steps[2])
    assert not np.array_equal(global_batch_indices(8, 0, n, n), global_batch_indices(7, 0, n, n))
    big = global_batch_indices(0, 1, 25, 10)  # batch larger than the dataset
    assert sorted(big[5:15].tolist()) == list(range(10))


def _collect(loader: StepLoader) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_step_loader_resume_and_shards() -> None:
    ds = ShapesDataset(num_images=20, image_size=16, seed=0, hflip=True)
    full = _collect(StepLoader(ds, seed=5, global_batch=6, start_step=0, end_step=8))
    assert [s for s, _, _ in full] == list(range(8))
    assert full[0][1].shape == (6, 3, 16, 16) and full[0][2].dtype == torch.int64
    resumed = _collect(StepLoader(ds, seed=5, global_batch=6, start_step=5, end_step=8))
    for (s1, x1, y1), (s2, x2, y2) in zip(full[5:], resumed):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    shards = [
        _collect(StepLoader(ds, seed=5, global_batch=6, shard_index=k, num_shards=3, end_step=8))
        for k in range(3)
    ]
    for step in range(8):
        assert torch.equal(torch.cat([sh[step][1] for sh in shards]), full[step][1])
        assert torch.equal(torch.cat([sh[step][2] for sh in shards]), full[step][2])
    # the loader delivers exactly the indices of global_batch_indices, with flips by epoch
    idx, epochs = step_batch(5, 3, 6, 20)
    expected = torch.stack([ds.get_item(i, e)[0] for i, e in zip(idx.tolist(), epochs.tolist())])
    assert torch.equal(full[3][1], expected)
    with pytest.raises(ValueError, match="global_batch=6 is not divisible by num_shards=4"):
        StepLoader(ds, seed=0, global_batch=6, num_shards=4)


def test_step_loader_workers_match_in_process() -> None:
    ds = ShapesDataset(num_images=30, image_size=16, seed=0)
    ref = _collect(StepLoader(ds, seed=1, global_batch=4, start_step=3, end_step=7))
    with_workers = _collect(
        StepLoader(ds, seed=1, global_batch=4, start_step=3, end_step=7, num_workers=2)
    )
    for (s1, x1, y1), (s2, x2, y2) in zip(ref, with_workers, strict=True):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_shapes_texture_subset_changes_only_the_backgrounds():
    from dataclasses import replace as dc_replace

    from denoiselab.data import DataConfig, build_dataset

    full = build_dataset(DataConfig(name="shapes", num_images=200, image_size=16))
    plain = build_dataset(
        DataConfig(name="shapes", num_images=200, image_size=16, textures=("plain",))
    )
    two = build_dataset(
        DataConfig(name="shapes", num_images=200, image_size=16, textures=("plain", "dots"))
    )
    for i in range(200):
        a, b, c = full.spec(i), plain.spec(i), two.spec(i)
        assert b.texture == "plain" and c.texture in ("plain", "dots")
        assert dc_replace(b, texture=a.texture) == a  # every other draw is the same
        assert dc_replace(c, texture=a.texture) == a
    assert {two.spec(i).texture for i in range(200)} == {"plain", "dots"}
    assert full.spec(3).texture in ("plain", "stripes", "checker", "dots", "gradient")
    with pytest.raises(ValueError, match=r"shapes textures \['wood'\]; valid: plain, stripes"):
        ShapesDataset(num_images=4, textures=("wood",))


def test_in_memory_cache_renders_each_sample_once_and_changes_nothing(monkeypatch):
    plain = build_dataset(DataConfig(name="shapes", image_size=16, num_images=6, hflip=True))
    cached = build_dataset(
        DataConfig(name="shapes", image_size=16, num_images=6, hflip=True, cache=True)
    )
    assert cached.cache and not plain.cache
    calls: list[int] = []
    render = cached._load
    monkeypatch.setattr(cached, "_load", lambda i: calls.append(i) or render(i))
    for epoch in range(3):  # flips differ per epoch and are applied after the cache
        for i in range(6):
            a, b = plain.get_item(i, epoch), cached.get_item(i, epoch)
            assert a[1] == b[1] and torch.equal(a[0], b[0])
    assert sorted(calls) == list(range(6))
    with pytest.raises(ValueError, match=r"data\.cache=1"):
        DataConfig(cache=1)
    with pytest.raises(ValueError, match="'latents' already reads"):
        DataConfig(name="latents", root="somewhere", cache=True)
