"""Scores at equal training time: the images a variant reaches in the baseline's training
time (n_v = N·r_v/r_b) and its periodic metrics interpolated there, from suite files."""

from __future__ import annotations

import json

import pytest

from denoiselab.ablate.equal_time import equal_time_rows, interpolate, markdown


def test_interpolate_is_piecewise_linear_and_none_outside():
    pts = [(10.0, 1.0), (20.0, 3.0), (40.0, 2.0)]
    assert interpolate(pts, 15) == pytest.approx(2.0)
    assert interpolate(pts, 30) == pytest.approx(2.5)
    assert interpolate(pts, 40) == 2.0 and interpolate(pts, 10) == 1.0
    assert interpolate(pts, 5) is None and interpolate(pts, 41) is None


def test_equal_time_rows_from_suite_files(tmp_path):
    for name, fds in (("base", [4.0, 2.0]), ("slow", [3.0, 1.0])):
        vdir = tmp_path / "variants" / name
        vdir.mkdir(parents=True)
        rows = [{"step": s, "nimg": n, "kimg": n / 1000, "fd_probe": f, "seconds": 9.0}
                for s, n, f in zip((1, 2), (100, 200), fds)]  # fmt: skip
        (vdir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [
        {"variant": "base", "nimg": 200, "img_per_s": 10.0},
        {"variant": "slow", "nimg": 200, "img_per_s": 7.5},  # 0.75× the speed: 150 images
    ]
    base, slow = equal_time_rows(tmp_path, rows, "base")
    assert base == {"variant": "base", "nimg": 200, "img_per_s": 10.0, "fd_probe": 2.0}
    assert slow["nimg"] == 150 and slow["fd_probe"] == pytest.approx(2.0)  # halfway 3 → 1
    assert "| slow | 150 | 7.5 | 2 |" in markdown([base, slow], 20.0)
    assert equal_time_rows(tmp_path, [{"variant": "base", "nimg": 200}], "base") is None
