"""`denoiselab eval --ref-stats FILE.npz`: published reference statistics (ADM / JiT format)
and `--num-ref`. FID itself is checked against an independent computation in the test:
numpy mean/covariance and the `scipy.linalg.sqrtm` form of the Fréchet distance."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from denoiselab.cli import main
from denoiselab.metrics import ReferenceStatsError, load_reference_npz, to_uint8
from denoiselab.train.build import restore
from tests import official_jit as oj

DIM = 16
evaluate_module = importlib.import_module("denoiselab.metrics.evaluate")  # not the function


class FakeInception:
    """Stands in for TF-Inception (whose weights cannot be downloaded here): a fixed random
    projection of 8×8 average-pooled pixels, any input size, ``DIM`` features."""

    name = "fake-inception"
    weights_id = "fixed-projection"

    def __init__(self) -> None:
        self.preprocessing = {"features": f"projection ({DIM})"}
        self.w = torch.randn(3 * 64, DIM, generator=torch.Generator().manual_seed(7)).double()

    def __call__(self, images):
        pooled = F.adaptive_avg_pool2d(images.double() / 255, 8).flatten(1)
        return (pooled @ self.w).float()


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate_module, "load_inception", lambda *a, **k: FakeInception())
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"unused")
    return str(weights)


@pytest.fixture
def converted_run(tmp_path):
    """A run whose data (ImageNet at /nonexistent/imagenet) does not exist on this machine."""
    _, _, path, _ = oj.make_official_checkpoint(tmp_path)
    run = tmp_path / "run"
    assert (
        main(["convert", "jit-official", str(path), "--out", str(run), "--train-images", "64"]) == 0
    )
    return run


def _fd_sqrtm(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _independent_features(run, num, batch, steps, seed):
    """The evaluation's samples, regenerated here: labels i mod C, batch seeds from
    SeedSequence([seed, batch index]) (the documented protocol), EMA 'auto', the run's own
    sampler settings but ``steps``."""
    r = restore(run, ema="auto")
    labels = torch.arange(num) % r.model_cfg.num_classes
    feats, fake = [], FakeInception()
    for i, start in enumerate(range(0, num, batch)):
        s = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        x = r.sample(labels[start : start + batch], s, **r.settings(steps))
        feats.append(fake(to_uint8(x)))
    return torch.cat(feats).double().numpy()


def test_fid_against_published_statistics_needs_no_dataset(tmp_path, fake_inception, converted_run):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(DIM, DIM))
    mu_ref, sigma_ref = rng.normal(size=DIM), a @ a.T / DIM + 0.1 * np.eye(DIM)
    ref = tmp_path / "VIRTUAL_ref.npz"  # ADM layout: extra arrays beside mu/sigma
    np.savez(
        ref,
        mu=mu_ref,
        sigma=sigma_ref,
        mu_s=np.zeros(3),
        sigma_s=np.eye(3),
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
    )
    out = tmp_path / "eval"
    argv = [
        "eval",
        str(converted_run),
        "--metrics",
        "fid",
        "--ref-stats",
        str(ref),
        "--inception",
        fake_inception,
        "--num",
        "12",
        "--batch",
        "4",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    f = _independent_features(converted_run, 12, 4, 2, seed=0)
    expected = _fd_sqrtm(f.mean(0), np.cov(f, rowvar=False), mu_ref, sigma_ref)
    assert result["metrics"]["fid"] == pytest.approx(expected, rel=1e-6)
    info = result["reference"]["inception"]
    assert info["source"] == "file" and info["path"] == str(ref.resolve()) and info["count"] is None
    assert len(info["stats_sha256"]) == 64


def test_num_ref_sets_the_reference_image_count(tmp_path, fake_inception):
    _, _, path, _ = oj.make_official_checkpoint(tmp_path)
    run = tmp_path / "run"
    assert (
        main(
            [
                "convert",
                "jit-official",
                str(path),
                "--out",
                str(run),
                "--train-images",
                "64",
                "data.name=shapes",
                "data.root=null",
                "data.num_images=64",
            ]
        )
        == 0
    )
    out = tmp_path / "eval"
    argv = [
        "eval",
        str(run),
        "--metrics",
        "fid",
        "--inception",
        fake_inception,
        "--num",
        "8",
        "--num-ref",
        "24",
        "--batch",
        "8",
        "--steps",
        "1",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert json.loads((out / "eval.json").read_text())["reference"]["inception"]["count"] == 24


def _npz(tmp_path, **arrays):
    path = tmp_path / "ref.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"mu": np.zeros(4)}, "lacks ['sigma']"),
        ({"mean": np.zeros(4), "cov": np.eye(4)}, "lacks ['mu', 'sigma']"),
        ({"mu": np.zeros(4), "sigma": np.eye(3)}, "'mu' has shape [4] and 'sigma' [3, 3]"),
        ({"mu": np.zeros((1, 4)), "sigma": np.eye(4)}, "'mu' has shape [1, 4]"),
        (
            {"mu": np.array([{"x": 1}], dtype=object), "sigma": np.eye(1)},
            "'mu' is a pickled object array",
        ),
        ({"mu": np.array(["a", "b"]), "sigma": np.eye(2)}, "'mu' has dtype <U1"),
        ({"mu": np.array([np.nan, 0.0]), "sigma": np.eye(2)}, "'mu' holds non-finite values"),
    ],
)
def test_bad_reference_files_are_named(tmp_path, arrays, message):
    with pytest.raises(ReferenceStatsError) as e:
        load_reference_npz(_npz(tmp_path, **arrays))
    assert message in str(e.value) and "ref.npz" in str(e.value)


def test_pickled_array_is_never_unpickled(tmp_path):
    class Trap:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = _npz(tmp_path, mu=np.array([Trap()], dtype=object), sigma=np.eye(1))
    with pytest.raises(ReferenceStatsError, match="refusing to unpickle"):
        load_reference_npz(path)
    assert not (tmp_path / "pwned").exists()


def test_not_an_npz_and_missing_file(tmp_path):
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(ReferenceStatsError, match=r"not a readable \.npz"):
        load_reference_npz(tmp_path / "x.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ReferenceStatsError, match="holds one array"):
        load_reference_npz(tmp_path / "one.npy")
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_reference_npz(tmp_path / "nope.npz")


def test_cli_errors_before_any_sample(tmp_path, capsys, fake_inception, converted_run):
    ref = _npz(tmp_path, mu=np.zeros(DIM + 1), sigma=np.eye(DIM + 1))
    base = [
        "eval",
        str(converted_run),
        "--inception",
        fake_inception,
        "--num",
        "4",
        "--steps",
        "1",
        "--ref-stats",
        str(ref),
        "--out",
        str(tmp_path / "e"),
    ]
    assert main([*base, "--metrics", "fid"]) == 2
    assert (
        f"are {DIM + 1}-dimensional but the inception features are {DIM}-dimensional"
        in capsys.readouterr().err
    )
    assert main([*base, "--metrics", "fid,kid"]) == 2
    assert "kid needs real-image feature rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--metrics", "fd_probe"])
    assert e.value.code == 2 and "add fid to --metrics" in capsys.readouterr().err
    assert not (tmp_path / "e" / "eval.json").exists()
