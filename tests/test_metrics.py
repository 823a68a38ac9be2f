"""Metric maths against independent reference computations written here.

FD against ``scipy.linalg.sqrtm`` and closed forms, MMD/KID against brute-force kernel
sums, precision/recall against brute-force k-NN, IS against scipy's KL, and the one image
conversion against its specification (round, clamp, no double scaling).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
from scipy.spatial.distance import cdist

from denoiselab.metrics import (
    GaussianStats,
    StreamingGaussianStats,
    check_uint8_images,
    ensure_rgb,
    frechet_distance,
    from_uint8,
    gaussian_stats,
    inception_score,
    kid,
    mmd2,
    mmd_rbf,
    precision_recall,
    to_uint8,
)
from denoiselab.metrics.kernels import rbf_kernel

# ---------------------------------------------------------------- image conversion


def test_to_uint8_rounds_and_clamps():
    # (x + 1)·127.5 = 0.6 rounds to 1 (truncation would give 0); 254.4 rounds to 254.
    x = torch.tensor([-1.0, 0.6 / 127.5 - 1, 254.4 / 127.5 - 1, 1.0, -3.0, 1.7])
    assert to_uint8(x).tolist() == [0, 1, 254, 255, 0, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_to_uint8_round_trip_within_half_a_level():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert (from_uint8(to_uint8(x)) - x).abs().max() <= 0.5 / 127.5 + 1e-6


def test_double_scaling_is_refused():
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    u = to_uint8(x)
    with pytest.raises(TypeError, match="already converted"):
        to_uint8(u)  # uint8 fed again
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_uint8(u.float())  # [0, 255] floats fed as if in [-1, 1]
    with pytest.raises(TypeError, match="to_uint8"):
        check_uint8_images(x)  # metrics refuse floats
    with pytest.raises(TypeError, match="to_uint8"):
        check_uint8_images(u.float() * 255)  # the PRX bug: scaled twice, then wrapped
    assert check_uint8_images(u) is u


def test_grey_images_become_rgb_and_shapes_are_checked():
    grey = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    rgb = ensure_rgb(grey)
    assert rgb.shape == (1, 3, 4, 4) and (rgb == grey).all()
    with pytest.raises(ValueError, match="shape"):
        check_uint8_images(torch.zeros(3, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------- Fréchet distance


def _random_cov(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
    a = rng.normal(size=(n or 2 * d, d))
    return np.cov(a, rowvar=False)


def _fd_sqrtm(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula with scipy's matrix square root (the independent reference)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_matches_sqrtm_reference():
    rng = np.random.default_rng(0)
    d = 24
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d) * 2.0
    fd = frechet_distance(GaussianStats(mu1, s1, 48), GaussianStats(mu2, s2, 48))
    assert fd == pytest.approx(_fd_sqrtm(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_closed_form_commuting_covariances():
    # Σ₁ = Q diag(a) Qᵀ, Σ₂ = Q diag(b) Qᵀ commute: FD = ‖μ₁−μ₂‖² + Σ (√aᵢ − √bᵢ)².
    rng = np.random.default_rng(1)
    d = 10
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fd = frechet_distance(GaussianStats(mu1, s1, 0), GaussianStats(mu2, s2, 0))
    assert fd == pytest.approx(expected, rel=1e-10)


def test_fd_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(2)
    s = _random_cov(rng, 16)
    mu = rng.normal(size=16)
    assert abs(frechet_distance(GaussianStats(mu, s, 0), GaussianStats(mu, s, 0))) < 1e-9


def test_fd_nan_regression_tiny_negative_eigenvalue():
    """Σ₂ carries a −1e−18 variance (round-off in a real covariance): Σ₁Σ₂ has the real
    eigenvalue −1e−21, whose real square root is NaN."""
    s1, s2 = np.diag([2.0, 1e-3]), np.diag([0.5, -1e-18])
    eig = np.linalg.eigvals(s1 @ s2)  # real; some NumPy builds return complex dtype
    assert np.all(eig.imag == 0) and eig.real.min() < 0  # the setup really has the problem
    with np.errstate(invalid="ignore"):
        assert np.isnan(np.sqrt(eig.real).sum())  # the naive real computation
    mu1, mu2 = np.array([1.0, 0.0]), np.zeros(2)
    fd = frechet_distance(GaussianStats(mu1, s1, 2), GaussianStats(mu2, s2, 2))
    # √(2·0.5) = 1 is the only real root: FD = 1 + (2 + 1e−3 − 1e−18 + 0.5) − 2·1
    assert fd == pytest.approx(1.0 + 2.501 - 2.0, rel=1e-12)


def test_fd_rank_deficient_covariances_stay_finite():
    """Fewer samples than dimensions: many eigenvalues of Σ₁Σ₂ come out slightly negative."""
    rng = np.random.default_rng(3)
    d = 64
    s1, s2 = _random_cov(rng, d, n=20), _random_cov(rng, d, n=20)
    assert np.linalg.eigvals(s1 @ s2).real.min() < 0
    fd = frechet_distance(GaussianStats(np.zeros(d), s1, 20), GaussianStats(np.zeros(d), s2, 20))
    # Independent stable reference: tr (Σ₁^½ Σ₂ Σ₁^½)^½ with eigh and clipping.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    assert np.isfinite(fd)
    assert fd == pytest.approx(expected, rel=1e-6)


def test_fd_refuses_non_finite_statistics():
    s = np.eye(3)
    bad = GaussianStats(np.array([0.0, np.nan, 0.0]), s, 2)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(bad, GaussianStats(np.zeros(3), s, 2))


def test_streaming_stats_match_numpy_in_uneven_chunks():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(1003, 12)) * rng.uniform(0.01, 2, 12) + 1e4).astype(np.float32)
    running = StreamingGaussianStats(12, chunk=100)
    for part in np.array_split(x, 7):
        running.update(torch.from_numpy(part))
    stats = running.finalize()
    x64 = x.astype(np.float64)
    assert stats.count == 1003
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x64, rowvar=False), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gaussian_stats(x, chunk=64).cov, stats.cov, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- MMD and KID


def _mmd_brute(x: np.ndarray, y: np.ndarray, kernel) -> tuple[float, float]:
    """Both MMD² estimates from explicit kernel matrices."""
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    unbiased = (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )
    return biased, unbiased


def _gauss(sigma: float):
    return lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * sigma**2))


def test_mmd_matches_brute_force_with_blocks():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 6)), rng.normal(0.3, 1.2, size=(41, 6))
    result = mmd2(x, y, rbf_kernel(2.0), chunk=7)  # uneven blocks, symmetric fast path
    biased, unbiased = _mmd_brute(x, y, _gauss(2.0))
    assert result.biased == pytest.approx(biased, rel=1e-10)
    assert result.unbiased == pytest.approx(unbiased, rel=1e-10)


def test_cmmd_formula_sigma10_scale1000_on_unit_embeddings():
    # CMMD (google-research/cmmd distance.py): γ = 1/(2·10²), 1000·(mean Kxx + mean Kyy − 2 mean Kxy)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 16))
    y = rng.normal(0.5, 1.0, size=(60, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    result = mmd_rbf(torch.from_numpy(x), torch.from_numpy(y), chunk=16)
    biased, unbiased = _mmd_brute(x, y, _gauss(10.0))
    assert result.biased == pytest.approx(1000 * biased, rel=1e-9)
    assert result.unbiased == pytest.approx(1000 * unbiased, rel=1e-9)
    assert result.biased > 0


def test_kid_matches_brute_force_subsets():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(40, 5)), rng.normal(0.2, 1.0, size=(50, 5))
    result = kid(x, y, subsets=6, subset_size=20, seed=11)
    sampler = np.random.RandomState(11)
    values = []
    for _ in range(6):
        xs = x[sampler.choice(40, 20, replace=False)]
        ys = y[sampler.choice(50, 20, replace=False)]
        values.append(_mmd_brute(xs, ys, lambda a, b: (a @ b.T / 5 + 1) ** 3)[1])
    assert result.mean == pytest.approx(np.mean(values), rel=1e-10)
    assert result.std == pytest.approx(np.std(values), rel=1e-9)
    assert result.subset_size == 20


# ---------------------------------------------------------------- Inception Score


def test_inception_score_is_one_for_uniform_predictions():
    assert inception_score(torch.zeros(100, 7), splits=10).mean == pytest.approx(1.0, abs=1e-12)


def test_inception_score_is_num_classes_for_confident_balanced_predictions():
    logits = 60.0 * torch.nn.functional.one_hot(torch.arange(100) % 5, 5).double()
    score = inception_score(logits, splits=10, shuffle_seed=None)  # each split: 2 per class
    assert score.mean == pytest.approx(5.0, rel=1e-9)
    assert score.std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_survives_underflowing_probabilities():
    # softmax underflows to exact zeros, and class 4 is never predicted (p(y=4) = 0): the
    # terms 0·(log 0 − log 0) must count as 0, not NaN.
    logits = 2000.0 * torch.nn.functional.one_hot(torch.arange(40) % 4, 5).double()
    assert inception_score(logits, splits=2, shuffle_seed=None).mean == pytest.approx(4.0)


def test_inception_score_matches_scipy_kl():
    logits = torch.randn(90, 6, generator=torch.Generator().manual_seed(0)) * 3
    score = inception_score(logits, splits=3, shuffle_seed=5)
    p = scipy.special.softmax(
        logits.double().numpy()[np.random.RandomState(5).permutation(90)], axis=1
    )
    parts = [
        np.exp(np.mean([scipy.stats.entropy(row, part.mean(0)) for row in part]))
        for part in np.split(p, 3)
    ]
    assert score.mean == pytest.approx(np.mean(parts), rel=1e-10)
    assert score.std == pytest.approx(np.std(parts), rel=1e-8)


# ---------------------------------------------------------------- precision / recall


def _pr_brute(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(a):
        return np.sort(cdist(a, a), axis=1)[:, k]  # column 0 is the point itself

    precision = (cdist(fake, real) <= radii(real)[None, :]).any(axis=1).mean()
    recall = (cdist(real, fake) <= radii(fake)[None, :]).any(axis=1).mean()
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_knn(k):
    rng = np.random.default_rng(8)
    real = rng.normal(size=(57, 4))
    fake = rng.normal(0.6, 0.8, size=(45, 4))
    result = precision_recall(real, fake, k=k, chunk=8)
    precision, recall = _pr_brute(real, fake, k)
    assert (result.precision, result.recall) == pytest.approx((precision, recall), abs=1e-12)
    assert 0 < result.precision < 1 and 0 < result.recall < 1


def test_precision_radius_test_is_inclusive():
    # Real points 0,1,2,3 on a line: every 1-NN radius is exactly 1. A fake point at 4 sits
    # exactly on the sphere of the real point 3: inside with `≤` (the reference), not `<`.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[4.0], [10.0], [11.0], [12.0]])
    assert precision_recall(real, fake, k=1).precision == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("metrics", "num", "least"), [(["fd_probe", "pr_probe"], 3, 4), (["is"], 9, 10)]
)
def test_too_few_samples_for_a_metric_fail_before_any_work(metrics, num, least):
    """k-NN precision/recall (k = 3) needs more than 3 samples per set, the Inception score
    one per split (10): too few is a named error before generation, probe training or
    reference statistics (it came after all of them), and a config error in a training run's
    ``eval`` and in a suite's ``eval`` (it ended the run at its first evaluation)."""
    from denoiselab.ablate.suite import EvalSpec
    from denoiselab.config import ConfigError, from_dict
    from denoiselab.metrics import evaluate
    from denoiselab.train.config import TrainConfig

    def generate(n, labels, seed):
        raise AssertionError("generated before the sample count was checked")

    name = metrics[-1]
    with pytest.raises(ValueError, match=rf"{name} needs num >= {least} samples \(got {num}\)"):
        evaluate(generate, metrics=metrics, num=num, dataset_cfg=None, num_classes=2)
    evaluate_ok = {"metrics": metrics, "num": least}  # the least count is accepted
    assert from_dict(TrainConfig, {"eval": evaluate_ok}).eval.num == least
    with pytest.raises(ConfigError, match=rf"eval\.num={num}: {name} needs num >= {least}"):
        from_dict(TrainConfig, {"eval": {"metrics": metrics, "num": num}})
    with pytest.raises(ConfigError, match=rf"eval\.periodic_num={num}: {name} needs num >= "):
        EvalSpec(periodic_metrics=metrics, periodic_num=num)
    with pytest.raises(ConfigError, match=rf"eval\.num={num}: {name} needs num >= {least}"):
        EvalSpec(metrics=metrics, num=num)
    if name == "pr_probe":  # the default suite metrics hold pr_probe
        with pytest.raises(ConfigError, match=r"eval\.num=3: pr_probe needs num >= 4"):
            EvalSpec(num=3)
