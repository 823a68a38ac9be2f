"""``prepare-data`` and ``data.name: prepared``: the folder's images, decoded once.

A small JPEG folder (photos of several sizes and modes, a corrupt file, an empty file) is
prepared; the prepared dataset must give exactly what the imagefolder gives — the same
length, bit-equal uint8 crops, the same labels, the same flips per epoch, the same
replacement of unreadable files — and a training run on it must equal a run on the folder.
Interrupted preparation resumes without redoing finished shards; a changed source is
refused; bad settings are named errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denoiselab.cli import main
from denoiselab.config import ConfigError
from denoiselab.data import DataConfig, build_dataset
from denoiselab.data import prepare as prep
from denoiselab.data.imagefolder import ImageFolderDataset, ImageFolderError, decode_crop
from denoiselab.data.prepared import PreparedDataError, PreparedDataset
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.loop import train

from .test_train import tiny

S = 16


def make_folder(root: Path, seed: int = 0) -> Path:
    """3 classes of JPEGs (and one PNG with alpha) of assorted sizes, one truncated JPEG,
    one empty file; returns ``root``."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (17, 23), (64, 64), (33, 50), (16, 16)]
    for c, name in enumerate(("cat", "dog", "golden_fish")):
        folder = root / name
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate(sizes[: 3 + c]):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    grey = rng.integers(0, 256, (20, 28), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(root / "dog" / "grey.jpg")
    rgba = rng.integers(0, 256, (18, 18, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(root / "cat" / "alpha.png")
    good = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "1.jpg").write_bytes(good[: len(good) // 3])  # truncated: unreadable
    (root / "golden_fish" / "0.jpg").write_bytes(b"")  # empty: unreadable
    return root


def _u8(x: torch.Tensor) -> np.ndarray:
    return np.round((x.permute(1, 2, 0).numpy() + 1) / 2 * 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def test_prepared_shards_hold_exactly_what_the_folder_yields(folder, tmp_path):
    m = prep.prepare(folder, tmp_path / "prep", image_size=S, shard_size=4, workers=2)
    ds_folder = ImageFolderDataset(folder, image_size=S, seed=3, hflip=True)
    ds = PreparedDataset(tmp_path / "prep", image_size=S, seed=3, hflip=True)
    assert len(ds) == len(ds_folder) == m["num_files"] == 14
    assert ds.class_names == ds_folder.class_names and ds.num_classes == 3
    assert m["num_images"] == 12 and len(m["bad_files"]) == 2
    assert {b.split(":")[0] for b in m["bad_files"]} == {
        str(folder / "dog" / "1.jpg"), str(folder / "golden_fish" / "0.jpg")}  # fmt: skip
    for epoch in (0, 1, 2):
        for i in range(len(ds)):
            a, la = ds.get_item(i, epoch)
            b, lb = ds_folder.get_item(i, epoch)
            assert la == lb and torch.equal(a, b), (i, epoch)
    assert ds_folder.bad_paths == {b.split(":")[0] for b in m["bad_files"]}
    # and the stored bytes are the decoder's crops (not merely equal after conversion)
    readable = [p for p, _ in ds_folder.samples if p not in ds_folder.bad_paths]
    for position, path in enumerate(readable):
        assert np.array_equal(ds.stored(position), decode_crop(path, S, 3)), path
    # a file replaced by the next readable one, wrapping round at the end
    bad_i = [i for i, (p, _) in enumerate(ds_folder.samples) if p in ds_folder.bad_paths]
    assert bad_i  # un-flipped (a flip is drawn per index): i shows the file after it
    for i in bad_i:
        assert torch.equal(ds._load(i)[0], ds_folder._load((i + 1) % len(ds))[0])
    # flips really happen (else the epoch loop above would prove little)
    assert any(not torch.equal(ds.get_item(i, 0)[0], ds.get_item(i, 1)[0]) for i in range(14))
    assert ds.caption(13) == "golden fish"
    assert prep.verify(tmp_path / "prep") == []


def test_training_on_prepared_data_equals_training_on_the_folder(folder, tmp_path):
    prep.prepare(folder, tmp_path / "prep", image_size=S, shard_size=5)
    common = {"data.image_size": S, "data.num_images": 50_000, "duration_nimg": 32,
              "ckpt_every_nimg": 0, "device": "cpu"}  # fmt: skip
    a = train(tiny(**common, **{"data.name": "imagefolder", "data.root": str(folder)}),
              tmp_path / "folder", quiet=True)  # fmt: skip
    b = train(tiny(**common, **{"data.name": "prepared", "data.root": str(tmp_path / "prep"),
                                "data.num_workers": 2}), tmp_path / "prepared", quiet=True)  # fmt: skip
    ca, cb = ckpt_io.load_checkpoint(a), ckpt_io.load_checkpoint(b)
    assert ca.model.keys() == cb.model.keys()
    assert all(torch.equal(ca.model[k], cb.model[k]) for k in ca.model)


def test_a_captioned_folder_keeps_its_captions_and_trains_a_text_run(folder, tmp_path):
    """Captions from a sidecar .txt and metadata.jsonl survive preparation: each index has the
    imagefolder's caption (an unreadable file's replacement's), and a text run on the prepared
    folder trains on them. Before, the prepared folder captioned with class names, and a text
    run failed at the first batch (``caption()`` took no epoch)."""
    (folder / "cat" / "0.txt").write_text("a striped cat\n")
    lines = [{"file_name": "grey.jpg", "text": "a grey dog"},
             {"file_name": "1.jpg", "text": "the truncated one"}]  # fmt: skip
    (folder / "dog" / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    m = prep.prepare(folder, tmp_path / "prep", image_size=S, shard_size=4)
    ds_folder = ImageFolderDataset(folder, image_size=S)
    ds = PreparedDataset(tmp_path / "prep", image_size=S)
    for i in range(len(ds_folder)):
        ds_folder[i]  # the folder's caption follows the files it found unreadable: load first
    want = [ds_folder.caption(i) for i in range(len(ds))]
    assert [ds.caption(i, epoch=1) for i in range(len(ds))] == want
    assert {"a striped cat", "a grey dog"} <= set(want) and "the truncated one" not in want
    assert ds.caption_source == "files" and m["missing_captions"] == ds.missing_captions == 10
    assert prep.verify(tmp_path / "prep") == []
    (tmp_path / "prep" / "captions.json").write_text("[]")  # a damaged captions file is named
    assert prep.verify(tmp_path / "prep") == ["captions.json"]
    prep.prepare(folder, tmp_path / "prep2", image_size=S, shard_size=4)
    text = {"model.name": "JiT-Micro-T2I", "model.text": {"mode": "joint", "encoder": "words"}}
    cfg = tiny(**{"data.name": "prepared", "data.root": str(tmp_path / "prep2"),
                  "data.image_size": S, "data.hflip": False, "duration_nimg": 16,
                  "ckpt_every_nimg": 0, "device": "cpu", **text})  # fmt: skip
    run = train(cfg, tmp_path / "run", quiet=True)
    vocab = ckpt_io.load_checkpoint(run).config_yaml
    assert "striped" in vocab and "grey" in vocab


def test_interrupted_preparation_resumes_and_a_changed_source_is_refused(
    folder, tmp_path, monkeypatch
):
    whole = prep.prepare(folder, tmp_path / "whole", image_size=S, shard_size=3)
    real, done = prep._decode_shard, []

    def dies_after_two(*args):
        if len(done) == 2:
            raise KeyboardInterrupt  # the job is killed here
        done.append(args[1])
        return real(*args)

    monkeypatch.setattr(prep, "_decode_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(folder, tmp_path / "part", image_size=S, shard_size=3)
    assert not (tmp_path / "part" / "manifest.json").exists()
    with pytest.raises(PreparedDataError, match=r"has no manifest.json.*prepare-data"):
        PreparedDataset(tmp_path / "part", image_size=S)
    again: list[int] = []
    monkeypatch.setattr(prep, "_decode_shard", lambda *a: again.append(a[1]) or real(*a))
    part = prep.prepare(folder, tmp_path / "part", image_size=S, shard_size=3)
    assert sorted(again) == [2, 3, 4] and done == [0, 1]  # 5 shards of 3 files: only the missing
    assert part["content_hash"] == whole["content_hash"]
    # a source that changed since the interrupted run is refused, not mixed
    Image.new("RGB", (20, 20)).save(folder / "cat" / "new.jpg")
    with pytest.raises(PreparedDataError, match=r"files_sha256.*another --out"):
        prep.prepare(folder, tmp_path / "part", image_size=S, shard_size=3)


def test_prepare_data_command_and_bad_input(folder, tmp_path, capsys):
    out = tmp_path / "prep"
    args = ["prepare-data", str(folder), "--out", str(out), "--image-size", str(S)]
    assert main(args) == 0
    assert "12 images (2 unreadable skipped)" in capsys.readouterr().out
    assert main([*args[:4], "--verify", "--image-size", str(S)]) == 0
    data = bytearray((out / "images-00000.npy").read_bytes())
    data[-1] ^= 1
    (out / "images-00000.npy").write_bytes(bytes(data))
    assert main(["prepare-data", str(folder), "--out", str(out), "--image-size", str(S),
                 "--verify"]) == 1  # fmt: skip
    assert "1 file(s) differ" in capsys.readouterr().out
    with pytest.raises(PreparedDataError, match=r"data.image_size=32.*16×16×3.*image_size=16"):
        build_dataset(DataConfig(name="prepared", root=str(out), image_size=32))
    # a folder without images: one line, exit 2, in prepare-data and in train
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    assert main(["prepare-data", str(empty), "--out", str(tmp_path / "p2"), "--image-size",
                 "16"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contain no files" in err
    assert issubclass(ImageFolderError, ConfigError)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {
                "data": {"name": "imagefolder", "root": str(empty), "image_size": 16},
                "model": {"name": "JiT-Micro"},
            }
        )
    )
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "contain no files" in capsys.readouterr().err
    unreadable = tmp_path / "bad" / "cls"
    unreadable.mkdir(parents=True)
    (unreadable / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageFolderError, match="none of its 1 image files could be decoded"):
        prep.prepare(unreadable.parent, tmp_path / "p3", image_size=S)


def test_prepare_data_refuses_an_out_inside_the_source_or_holding_a_latent_cache(
    folder, tmp_path, capsys
):
    """``--out SRC`` wrote shards and ``progress/`` into the image folder (which then had a
    class folder without images: training on it failed); an ``--out`` holding a latent
    cache's manifest.json was taken for a finished prepared folder (KeyError traceback)."""
    listing = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    for out in (folder, folder / "prepared"):
        args = ["prepare-data", str(folder), "--out", str(out), "--image-size", str(S)]
        assert main(args) == 2
        assert "is inside the image folder" in capsys.readouterr().err
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == listing  # untouched
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"format": "denoiselab-latents"}))
    args = ["prepare-data", str(folder), "--out", str(cache), "--image-size", str(S)]
    assert main(args) == 2
    assert "of format 'denoiselab-latents', not a prepared folder's" in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json"]


def test_num_workers_auto(monkeypatch):
    from denoiselab.data import config as data_config

    monkeypatch.setattr(data_config, "cores_per_rank", lambda: 13)
    assert DataConfig(name="imagefolder", root="x").resolved_num_workers == 8
    assert DataConfig(name="prepared", root="x").resolved_num_workers == 8
    assert DataConfig().resolved_num_workers == 0  # shapes: rendered in the training process
    assert DataConfig(num_workers=3).resolved_num_workers == 3
    monkeypatch.setattr(data_config, "cores_per_rank", lambda: 2)
    assert DataConfig(name="imagefolder", root="x").resolved_num_workers == 2
    monkeypatch.undo()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    usable = data_config.cores_per_rank()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert usable == max(1, data_config.cores_per_rank() // 4)
    with pytest.raises(ValueError, match="num_workers='many'; valid: 'auto'"):
        DataConfig(num_workers="many")
