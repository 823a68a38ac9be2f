"""Label-keyed sampling of text runs: which caption each label is sampled with
(``text.data.prompts_for``), the per-class caption table (``class_prompts``) read without
decoding images (``label(i)`` on every dataset), and the sampler using exactly the prompts
it records."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from denoiselab.data import DigitsDataset, ShapesDataset, build_dataset
from denoiselab.data.imagefolder import ImageFolderDataset
from denoiselab.data.prepared import PreparedDataset
from denoiselab.metrics.batches import batch_seed
from denoiselab.sampling.generate import balanced_labels
from denoiselab.text.data import CaptionTokens, class_prompts, prompts_for

from .test_latents import SHAPES16, cache_dir, latents_cfg, tiny_ae_dir  # noqa: F401 - fixtures
from .test_prepared import S, make_folder


def test_prompts_for_turns_through_each_class_from_the_seed():
    table = [["a0", "a1", "a2", "a3"], ["b0"], ["c0", "c1", "c2"]]
    labels = torch.tensor([0, 2, 0, 1, 0, 2, 1])
    # j-th occurrence of y takes table[y][(j + seed) % len]; seed 5: a from 5 % 4 = 1, c from 2
    assert prompts_for(labels, table, 5) == ["a1", "c2", "a2", "b0", "a3", "c0", "b0"]
    assert prompts_for(labels, table, 0) == ["a0", "c0", "a1", "b0", "a2", "c1", "b0"]
    # a batch repeating a class len times uses each of its captions exactly once
    assert sorted(prompts_for(torch.zeros(4, dtype=torch.long), table, 123)) == table[0]


def test_batches_smaller_than_the_classes_still_use_every_caption():
    """1000 classes, 8 captions each, batches of 64 (each class at most once per batch, as in
    a label-balanced ImageNet evaluation): over 8 000 samples every class is drawn 8 times
    and must not always get its first caption (it did when the choice ignored the seed)."""
    k, per = 1000, 8
    table = [[f"{y}:{j}" for j in range(per)] for y in range(k)]
    labels, used = balanced_labels(8000, k), [set() for _ in range(k)]
    for index, start in enumerate(range(0, 8000, 64)):
        batch = labels[start : start + 64]
        for y, p in zip(batch.tolist(), prompts_for(batch, table, batch_seed(0, index))):
            used[y].add(int(p.split(":")[1]))
    distinct = np.array([len(u) for u in used])
    # 8 draws of 8 seeded offsets: 8·(1 − (7/8)^8) ≈ 5.3 distinct captions expected per class
    assert distinct.min() >= 2 and 4.8 < distinct.mean() < 5.8, np.bincount(distinct)


def _old_table(ds, per_class: int = 8, seed: int = 0) -> list[list[str]]:
    """class_prompts' rule written out with the pixels loaded (``ds[i][1]``) for the label."""
    out: list[list[str]] = [[] for _ in range(ds.num_classes)]
    for i in np.random.default_rng((0x7E47, seed)).permutation(len(ds)).tolist():
        y = int(ds[i][1])
        if len(out[y]) < per_class:
            out[y].append(ds.caption(i))
    return [c or [ds.class_names[y]] for y, c in enumerate(out)]


def test_every_dataset_gives_labels_without_its_pixels(tmp_path, cache_dir, monkeypatch):  # noqa: F811
    from denoiselab.data import prepare as prep

    folder = make_folder(tmp_path / "images")
    prep.prepare(folder, tmp_path / "prep", image_size=S, shard_size=4, workers=1)
    datasets = {
        "imagefolder": ImageFolderDataset(folder, image_size=S),
        "prepared": PreparedDataset(tmp_path / "prep", image_size=S),
        "latents": build_dataset(latents_cfg(cache_dir)),
        "shapes": ShapesDataset(num_images=24, image_size=8, seed=3),
        "digits": DigitsDataset(image_size=8),
    }
    for name, ds in datasets.items():
        n = min(len(ds), 40)
        assert [ds.label(i) for i in range(n)] == [int(ds[i][1]) for i in range(n)], name
        with pytest.raises(IndexError):
            ds.label(len(ds))
    # the image folder's unreadable files (now known) are replaced by the next readable one,
    # for the label as for the pixels and the caption
    ds = datasets["imagefolder"]
    assert ds.bad_paths and all(ds.label(i) == ds[i][1] for i in range(len(ds)))
    # a wrapped text dataset gives the class, not the caption's token ids
    tokens = CaptionTokens(datasets["shapes"], lambda texts: torch.zeros(len(texts), 4).long())
    assert [tokens.label(i) for i in range(8)] == [datasets["shapes"].label(i) for i in range(8)]

    # class_prompts: the same table as with the pixels loaded, without decoding any file
    for path in ds.bad_paths:  # (with them gone, loading a file never moves to the next one)
        os.remove(path)
    want = _old_table(ImageFolderDataset(folder, image_size=S))
    fresh = ImageFolderDataset(folder, image_size=S)  # its constructor reads one image
    import denoiselab.data.imagefolder as imagefolder

    def no_decoding(*args, **kwargs):
        raise AssertionError("class_prompts decoded an image")

    monkeypatch.setattr(imagefolder, "decode_crop", no_decoding)
    assert class_prompts(fresh) == want and fresh.skipped == 0
    shapes = ShapesDataset(num_images=200, image_size=8, seed=1, difficulty="easy")
    assert class_prompts(shapes) == _old_table(shapes)
