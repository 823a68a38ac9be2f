"""``to_uint8`` refuses inputs that would silently give wrong pixels: [0, 1] floats, NaN/inf."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from denoiselab.images import make_grid, save_images
from denoiselab.metrics import to_uint8
from denoiselab.metrics.images import dataset_uint8


def _unit_batch(n=4, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))  # [0, 1]


def test_unit_range_batch_is_refused_and_its_rescaled_form_accepted():
    x01 = _unit_batch()
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*over 4 images — expected \[-1, 1\]"):
        to_uint8(x01)
    u = to_uint8(2 * x01 - 1)  # what the message tells the user to pass
    expected = np.round((2 * x01.numpy().astype(np.float64)) * 127.5)  # (x + 1)·127.5
    assert np.abs(u.numpy().astype(np.float64) - expected).max() <= 1  # round-half-to-even
    assert u.min() < 10 and u.max() > 245  # the full range, not 128–255


def test_bright_images_pass_where_legitimate():
    bright = _unit_batch(n=1)  # one image: can be legitimately bright, not judged
    assert to_uint8(bright).min() >= 128
    assert to_uint8(_unit_batch(), check_range=False).min() >= 128  # caller says it is fine
    batch = torch.cat([_unit_batch(), -_unit_batch(seed=1)[:1]])  # one dark pixel anywhere
    to_uint8(batch)
    grid = make_grid(_unit_batch(n=9))  # PNG grids show what the sampler made, even if bright
    assert grid.dtype == np.uint8 and grid.shape == (2 + 3 * 10, 2 + 3 * 10, 3)


def test_nan_and_inf_are_errors_that_count_them(tmp_path):
    x = torch.zeros(4, 3, 8, 8)
    x[1, 0, :3, 0] = float("nan")
    x[3, 2, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"3 NaN and 1 inf values in 2 of 4 images \(of 768"):
        to_uint8(x)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN"):  # image writers refuse too: no black PNGs
        save_images(x, tmp_path / "png")
    assert not list(tmp_path.glob("png/*.png"))


def test_callers_still_convert_real_data(tmp_path):
    from denoiselab.data import ShapesDataset

    ds = ShapesDataset(num_images=8, image_size=16)
    u, labels = dataset_uint8(ds, range(8))
    assert u.dtype == torch.uint8 and u.shape == (8, 3, 16, 16) and len(labels) == 8
    x = torch.stack([ds[i][0] for i in range(8)])
    (path,) = save_images(x[:1], tmp_path)
    assert np.array_equal(np.asarray(Image.open(path)), u[0].permute(1, 2, 0).numpy())
