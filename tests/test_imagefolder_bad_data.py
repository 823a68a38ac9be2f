"""Bad data in an imagefolder: awkward modes decoded correctly, broken files skipped and
counted (never a crash mid-epoch), batches still a pure function of (seed, step)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denoiselab.cli import main
from denoiselab.data import DataConfig, ImageFolderDataset, ImageFolderError, build_dataset
from denoiselab.data.loader import StepLoader

S = 16  # file side = image_size: the ADM crop is then the identity


def _u8(x: torch.Tensor) -> np.ndarray:
    """Model tensor [C, H, W] in [-1, 1] back to uint8 [H, W, C] (exact for x/255·2−1)."""
    return np.round((x.permute(1, 2, 0).numpy() + 1) / 2 * 255).astype(np.uint8)


def _two_halves(left, right, mode: str) -> Image.Image:
    """An S×S image of ``mode``: left half pixel value ``left``, right half ``right``."""
    image = Image.new(mode, (S, S), left)
    image.paste(Image.new(mode, (S // 2, S), right), (S // 2, 0))
    return image


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (S, S), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    image.paste(1, (S // 2, 0, S, S))
    image.info["transparency"] = 0  # index 0 is transparent
    return image


def _good_files(root: Path) -> dict[str, np.ndarray]:
    """Write one file per awkward mode; return name → the RGB uint8 [S, S, 3] it must give."""
    cls = root / "a"
    cls.mkdir(parents=True)
    expect = {}

    def both(left, right):
        out = np.empty((S, S, 3), np.uint8)
        out[:, : S // 2], out[:, S // 2 :] = left, right
        return out

    # 16-bit grey: 0 … 65535 → 0 … 255 by v/257 (PIL's convert would clip 32768 to 255)
    sixteen = np.zeros((S, S), np.uint16)
    sixteen[:, S // 2 :] = 32768
    sixteen[0, 0], sixteen[0, 1] = 65535, 1000
    Image.fromarray(sixteen).save(cls / "gray16.png")
    e = both(0, 128)
    e[0, 0], e[0, 1] = 255, 4  # round(65535/257) = 255, round(1000/257) = 4
    expect["gray16.png"] = e
    # CMYK (TIFF keeps it lossless): pure cyan-free red = (0, 255, 255, 0) → (255, 0, 0)
    _two_halves((0, 255, 255, 0), (0, 0, 0, 255), "CMYK").save(cls / "cmyk.tif")
    expect["cmyk.tif"] = both((255, 0, 0), (0, 0, 0))
    # palette with a transparent index: transparent → white background, opaque red stays
    _palette_with_transparency().save(cls / "palette.png", transparency=0)
    expect["palette.png"] = both(255, (255, 0, 0))
    # grey + alpha: alpha 0 → white; alpha 128 → round(100·128/255 + 255·127/255)
    _two_halves((0, 0), (100, 128), "LA").save(cls / "la.png")
    expect["la.png"] = both(255, round(100 * 128 / 255 + 255 * 127 / 255))
    # RGBA: opaque green, fully transparent blue → white
    _two_halves((0, 200, 0, 255), (0, 0, 255, 0), "RGBA").save(cls / "rgba.png")
    expect["rgba.png"] = both((0, 200, 0), 255)
    _two_halves(30, 220, "L").save(cls / "plain.png")
    expect["plain.png"] = both(30, 220)
    return expect


def _bad_files(root: Path) -> list[str]:
    cls = root / "b"
    cls.mkdir(parents=True, exist_ok=True)
    good = cls / "ok.png"
    _two_halves((10, 20, 30), (200, 100, 50), "RGB").save(good)
    data = good.read_bytes()
    (cls / "truncated.png").write_bytes(data[: len(data) // 2])
    (cls / "zero.jpg").write_bytes(b"")
    (cls / "garbage.jpeg").write_bytes(np.random.default_rng(0).bytes(300))
    (cls / "text.png").write_text("not an image")
    Image.fromarray(np.full((S, S), 0.5, np.float32)).save(cls / "float.tif")  # mode F
    return ["float.tif", "garbage.jpeg", "text.png", "truncated.png", "zero.jpg"]


def test_awkward_modes_decode_to_the_right_rgb(tmp_path):
    expect = _good_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, image_size=S, hflip=False)
    assert ds.skipped == 0
    for i, (path, _) in enumerate(ds.samples):
        got = _u8(ds[i][0])
        want = expect[Path(path).name]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, Path(path).name
    grey = ImageFolderDataset(tmp_path, image_size=S, channels=1, hflip=False)
    i16 = next(i for i, (p, _) in enumerate(grey.samples) if p.endswith("gray16.png"))
    assert _u8(grey[i16][0])[0, :3, 0].tolist() == [255, 4, 0]  # scaled, not clipped


def test_bad_files_are_skipped_counted_logged_once_and_replaced(tmp_path, caplog):
    _good_files(tmp_path)
    bad = _bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, image_size=S, hflip=False)
    names = [Path(p).name for p, _ in ds.samples]
    with caplog.at_level(logging.WARNING, logger="denoiselab.data.imagefolder"):
        first = [ds[i] for i in range(len(ds))]
        again = [ds[i] for i in range(len(ds))]  # known-bad files: no second warning
    assert ds.skipped == len(bad) and sorted(Path(p).name for p in ds.bad_paths) == bad
    for name in bad:
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    for i, name in enumerate(names):
        assert torch.equal(first[i][0], again[i][0])
        if name in bad:  # replaced by the next readable index, deterministically
            j = i + 1
            while names[j % len(names)] in bad:
                j += 1
            assert torch.equal(first[i][0], first[j % len(names)][0])


def test_batches_stay_a_pure_function_of_seed_and_step(tmp_path):
    _good_files(tmp_path)
    _bad_files(tmp_path)

    def batches(workers, start=0):
        ds = ImageFolderDataset(tmp_path, image_size=S, seed=3, hflip=True)
        loader = StepLoader(ds, seed=7, global_batch=4, start_step=start, end_step=6,
                            num_workers=workers)  # fmt: skip
        return [(s, x.clone(), y.clone()) for s, x, y in loader]

    plain = batches(0)
    for other in (batches(0), batches(2)):  # a fresh dataset, and worker processes
        assert all(
            torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(plain, other)
        )
    resumed = batches(0, start=3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain[3:], resumed))
    assert len(plain) == 6


def test_folder_of_only_bad_images_is_a_named_error(tmp_path, capsys):
    _bad_files(tmp_path)
    (tmp_path / "b" / "ok.png").unlink()
    with pytest.raises(ImageFolderError, match=r"none of its 5 image files could be decoded"):
        ImageFolderDataset(tmp_path, image_size=S)
    with pytest.raises(ImageFolderError, match=str(tmp_path)):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=S))
    code = main(["train", "--dry-run", "--out", str(tmp_path / "r"), "--steps", "1",
                 str(_write_config(tmp_path))])  # fmt: skip
    assert code == 0  # a dry run does not open the data ...
    code = main(
        ["train", "--out", str(tmp_path / "r"), "--steps", "1", str(_write_config(tmp_path))]
    )
    err = capsys.readouterr().err
    assert code == 2 and "none of its 5 image files" in err  # ... the run names it at once


def _write_config(root: Path) -> Path:
    import yaml

    cfg = {"data": {"name": "imagefolder", "root": str(root), "image_size": S},
           "model": {"name": "JiT-Micro"}, "ema": {"decays": [0.9]}, "global_batch": 4,
           "sample": {"steps": 1, "num_grid": 2}}  # fmt: skip
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_on_a_folder_with_bad_files_runs_through(tmp_path):
    from denoiselab.train.loop import Trainer

    data = tmp_path / "data"
    _good_files(data)
    _bad_files(data)
    from denoiselab.config import from_dict
    from denoiselab.train.config import TrainConfig

    # loading in this process (no workers): ``skipped`` counts what this process decoded
    cfg = from_dict(TrainConfig, {
        "data": {"name": "imagefolder", "root": str(data), "image_size": S, "num_workers": 0},
        "model": {"name": "JiT-Micro"}, "ema": {"decays": [0.9]}, "global_batch": 4,
        "duration_nimg": 4 * 6, "log_every_nimg": 4, "ckpt_every_nimg": 24,
        "sample_every_nimg": 10**6, "sample": {"steps": 1, "num_grid": 2},
    })  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    trainer.run()  # 6 steps = 2 epochs of 12 files, 5 of them bad
    assert trainer.dataset.skipped == 5
