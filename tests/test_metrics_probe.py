"""The offline probe metrics end to end: probe training and calibration, content-hashed
caches (probe weights, reference statistics) and ``evaluate`` with callable generators."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from denoiselab.data import DataConfig, build_dataset
from denoiselab.metrics import (
    METRICS,
    ProbeConfig,
    evaluate,
    frechet_distance,
    gaussian_stats,
    load_probe,
    reference_stats,
    to_uint8,
)
from denoiselab.metrics.cache import atomic_write, content_hash
from denoiselab.metrics.images import dataset_uint8
from denoiselab.metrics.probe import probe_path
from denoiselab.metrics.probe_train import gaussian_blur

DATA = DataConfig(name="shapes", image_size=32, seed=0)
SMALL = ProbeConfig(width=8, steps=150, batch=32, num_train=1024, num_val=256)  # seconds on CPU


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(DATA)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("denoiselab-cache")


@pytest.fixture(scope="module")
def probe(dataset, cache):
    return load_probe(DATA, dataset=dataset, config=SMALL, cache_dir=cache)


def _real(dataset, start: int, n: int = 256) -> torch.Tensor:
    return dataset_uint8(dataset, range(start, start + n))[0]


def test_probe_learns_the_classes(probe):
    assert probe.num_classes == 8 and probe.image_size == 32
    assert probe.meta["val_accuracy"] > 0.2  # chance is 1/8; the default recipe reaches ~0.97


def test_probe_fd_is_calibrated(probe, dataset):
    """Real-vs-real FD is small against real-vs-noise; FD grows with blur and with noise."""
    real_a, real_b = _real(dataset, 10_000), _real(dataset, 20_000)
    ref = gaussian_stats(probe(real_a))

    def fd(images: torch.Tensor) -> float:
        return frechet_distance(gaussian_stats(probe(images)), ref)

    x = real_b.float() / 127.5 - 1
    g = torch.Generator().manual_seed(0)
    noise_only = to_uint8(torch.randn(x.shape, generator=g).clamp(-1, 1))
    assert fd(real_b) < 0.05 * fd(noise_only)
    blurred = [
        fd(to_uint8(gaussian_blur(x, torch.full((len(x),), s), radius=6))) for s in (1.5, 3.0)
    ]
    noisy = [fd(to_uint8(x + s * torch.randn(x.shape, generator=g))) for s in (0.2, 0.4, 0.8)]
    assert fd(real_b) < blurred[0] < blurred[1]
    assert fd(real_b) < noisy[0] < noisy[1] < noisy[2]


def test_probe_is_cached_by_content_hash(probe, dataset, cache, monkeypatch):
    path = probe_path(DATA, SMALL, cache)
    assert path.is_file() and path.suffix == ".safetensors" and path.parent.name == "probes"
    monkeypatch.setattr("denoiselab.metrics.probe.fit_probe", lambda *a: pytest.fail("retrained"))
    again = load_probe(DATA, config=SMALL, cache_dir=cache)  # no dataset needed: from cache
    images = _real(dataset, 0, 16)
    torch.testing.assert_close(again(images), probe(images))
    assert probe_path(DATA, ProbeConfig(width=8, steps=151), cache) != path
    monkeypatch.setenv("DENOISELAB_CACHE", str(cache / "elsewhere"))
    assert probe_path(DATA, SMALL).parent == cache / "elsewhere" / "probes"


def test_reference_stats_are_cached(probe, dataset, cache):
    first = reference_stats(probe, DATA, num=64, dataset=dataset, cache_dir=cache, max_features=40)
    assert first.path.parent.name == "reference" and first.path.suffix == ".npz"
    assert first.stats.count == 64 and first.features.shape == (40, probe.net.feature_dim)

    class Untouchable:
        def __getitem__(self, i):
            raise AssertionError("reference statistics recomputed")

    again = reference_stats(
        probe, DATA, num=64, dataset=Untouchable(), cache_dir=cache, max_features=40
    )
    assert (again.stats.mean == first.stats.mean).all()
    torch.testing.assert_close(again.features, first.features)
    other = reference_stats(probe, DATA, num=32, dataset=dataset, cache_dir=cache, max_features=40)
    assert other.path != first.path


def test_content_hash_and_atomic_write(tmp_path):
    assert content_hash({"a": 1, "b": DATA}) == content_hash({"b": DATA, "a": 1})
    assert content_hash(DATA) != content_hash(DataConfig(name="shapes", image_size=32, seed=1))
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        atomic_write(
            target, lambda tmp: (tmp.write_bytes(b"half"), (_ for _ in ()).throw(RuntimeError()))
        )
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no partial file left


def _label_generator(dataset, corrupt: float = 0.0, shift: int = 0):
    """A 'model' returning real shapes of class ``label + shift`` (shapes: label = i mod 8),
    plus Gaussian noise of std ``corrupt``."""

    def generate(n: int, labels: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        idx = 30_000 + 8 * torch.randint(0, 2000, (n,), generator=g) + (labels + shift) % 8
        x = torch.stack([dataset[int(i)][0] for i in idx])
        return to_uint8(x + corrupt * torch.randn(x.shape, generator=g))

    return generate


def test_evaluate_probe_metrics(probe, dataset, cache):
    kwargs = dict(
        num=96,
        dataset_cfg=DATA,
        num_classes=8,
        batch=40,
        seed=3,
        num_ref=128,
        dataset=dataset,
        probe_config=SMALL,
        cache_dir=cache,
    )
    names = ["fd_probe", "mmd_probe", "acc_probe", "pr_probe"]
    good = evaluate(_label_generator(dataset), metrics=names, **kwargs)
    noisy = evaluate(_label_generator(dataset, corrupt=0.6), metrics=names, **kwargs)
    wrong = evaluate(_label_generator(dataset, shift=1), metrics=["acc_probe"], **kwargs)
    m = good["metrics"]
    assert set(m) == {
        "fd_probe",
        "mmd_probe",
        "mmd_probe_unbiased",
        "acc_probe",
        "precision_probe",
        "recall_probe",
    }
    assert m["fd_probe"] < noisy["metrics"]["fd_probe"]
    assert m["mmd_probe"] < noisy["metrics"]["mmd_probe"]
    # Samples of the asked class are recognised; samples of the next class are not.
    assert m["acc_probe"] > 0.2 > wrong["metrics"]["acc_probe"]
    assert 0 <= m["precision_probe"] <= 1 and 0 <= m["recall_probe"] <= 1
    assert good["batch_seeds"] == noisy["batch_seeds"] and len(good["batch_seeds"]) == 3  # 40+40+16
    assert good["num"] == 96 and good["reference"]["probe"]["count"] == 128
    assert good["extractors"]["probe"]["preprocessing"]["size"] == 32
    assert good["generation_images_per_s"] > 0 and good["wall_time_s"] > 0


def test_evaluate_rejects_bad_input(dataset, cache):
    kwargs = dict(num=8, dataset_cfg=DATA, num_classes=8, dataset=dataset, cache_dir=cache)
    with pytest.raises(ValueError, match="fd_probe, mmd_probe, acc_probe"):
        evaluate(_label_generator(dataset), metrics=["fid_typo"], **kwargs)
    with pytest.raises(ValueError, match="classes"):
        evaluate(
            _label_generator(dataset),
            metrics=["acc_probe"],
            probe_config=SMALL,
            **{**kwargs, "num_classes": 10},
        )
    with pytest.raises(TypeError, match="to_uint8"):  # a generator that forgot the conversion
        evaluate(
            lambda n, y, s: torch.zeros(n, 3, 32, 32),
            metrics=["acc_probe"],
            probe_config=SMALL,
            **kwargs,
        )
    assert list(METRICS) == [
        "fd_probe",
        "mmd_probe",
        "acc_probe",
        "pr_probe",
        "fid",
        "cmmd",
        "dino_mmd",
        "kid",
        "is",
        "pr",
    ]


@pytest.mark.slow
def test_default_probe_recipe_is_accurate(dataset, tmp_path):
    """The default recipe (~1–3 min on 2 CPU cores) recognises the shapes classes."""
    probe = load_probe(DATA, dataset=dataset, cache_dir=tmp_path)
    assert probe.meta["val_accuracy"] > 0.9


@pytest.mark.slow
def test_probe_is_right_on_held_out_easy_images():
    """The quickstart's judge: on the ``easy`` data the probe's own training code, at a smaller
    budget to stay fast (400 of the default 1000 steps, 1024 of its 4096 training images), is
    right on ≥ 97 % of its 512 held-out images and of 512 images of another data seed (the
    default recipe: 100 %, reported as ``probe_real_accuracy`` in eval.json)."""
    from denoiselab.metrics.probe import fit_probe

    easy = DataConfig(name="shapes", image_size=32, num_images=20_000, difficulty="easy")
    net, meta = fit_probe(build_dataset(easy), ProbeConfig(steps=400, num_train=1024, num_val=512))
    assert meta["val_accuracy"] >= 0.97, meta["val_accuracy"]
    fresh = build_dataset(DataConfig(name="shapes", image_size=32, difficulty="easy", seed=1))
    images, labels = dataset_uint8(fresh, range(512))
    with torch.no_grad():
        _, logits = net(images.float() / 127.5 - 1)
    assert (logits.argmax(1) == labels).float().mean() >= 0.97


class _MeanColour:
    """A stand-in extractor: the mean colour of each image ``[B, 3]``."""

    name, weights_id, preprocessing = "mean-colour", "none", {"features": "mean RGB"}

    def __call__(self, images):
        return images.double().mean(dim=(2, 3)).float()


def test_a_relative_data_root_does_not_share_cached_statistics(tmp_path, monkeypatch):
    """``data.root: data`` names another folder from each working directory: the reference
    statistics (and the probe) of one folder must not be served for the other (the cache
    key held the root as written, so the second folder got the first one's statistics)."""
    from PIL import Image

    for name, rgb in (("a", (250, 10, 10)), ("b", (10, 10, 250))):
        (tmp_path / name / "data" / "c0").mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (8, 8), rgb).save(tmp_path / name / "data" / "c0" / f"{k}.png")
    cfg = DataConfig(name="imagefolder", root="data", image_size=8, hflip=False)
    cache = tmp_path / "cache"
    means, probes = {}, {}
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)
        ref = reference_stats(_MeanColour(), cfg, num=4, cache_dir=cache, max_features=4)
        means[name], probes[name] = ref.stats.mean, probe_path(cfg, SMALL, cache)
    assert means["a"][0] > 200 and means["b"][2] > 200  # each folder's own colour
    assert probes["a"] != probes["b"]
    monkeypatch.chdir(tmp_path / "a")  # an absolute root names the same folder: same key
    absolute = dataclasses.replace(cfg, root=str(tmp_path / "a" / "data"))
    assert probe_path(absolute, SMALL, cache) == probes["a"]
