"""Tests of denoiselab.analysis: the Gaussian closed forms against Monte Carlo and brute force,
and the toy experiment of JiT Fig. 2 through the real objective and sampler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from denoiselab.analysis import (
    TARGETS,
    ToyConfig,
    analyze_main,
    irreducible_error,
    joint_moments,
    parse_spectrum,
    patch_covariance,
    posterior_gain,
    posterior_mean_matrix,
    random_projection,
    rank_k_x_error,
    rank_k_x_error_matrix,
    reduced_rank_regression,
    run_toy,
    to_x_matrix,
    toy_main,
)
from denoiselab.analysis.distances import off_manifold_energy, sliced_wasserstein2


def random_cov(dim: int, seed: int) -> np.ndarray:
    """A dense SPD covariance with spread-out eigenvalues."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return (q * np.geomspace(3.0, 0.05, dim)) @ q.T


def draw(sigma: np.ndarray, t: float, s: float, n: int, seed: int) -> dict[str, np.ndarray]:
    """Monte Carlo draws ``{x, eps, v, z}``, each ``[n, D]``."""
    rng = np.random.default_rng(seed)
    x = rng.multivariate_normal(np.zeros(len(sigma)), sigma, size=n)
    eps = s * rng.normal(size=x.shape)
    return {"x": x, "eps": eps, "v": x - eps, "z": t * x + (1 - t) * eps}


# -- toy pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [2, 8, 512])
def test_projection_is_column_orthogonal_and_fixed(dim: int) -> None:
    p = random_projection(dim)
    assert p.shape == (dim, 2)
    torch.testing.assert_close(p.T @ p, torch.eye(2), atol=1e-5, rtol=0)
    assert torch.equal(p, random_projection(dim))
    assert not torch.equal(p, random_projection(dim, seed=1))


def test_sliced_wasserstein_of_a_shift() -> None:
    """Shifting a 2-D cloud by c moves every projection by θ·c: SW₂ = |c|/√2."""
    a = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([0.3, -0.4])
    assert sliced_wasserstein2(a, a) == 0.0
    assert sliced_wasserstein2(a, a + c) == pytest.approx(0.5 / math.sqrt(2), rel=1e-6)


def test_off_manifold_energy() -> None:
    p = random_projection(16)
    on = torch.randn(10, 2) @ p.T
    off = torch.randn(10, 16)
    off = off - (off @ p) @ p.T
    assert off_manifold_energy(on, p).abs().max() < 1e-5
    torch.testing.assert_close(
        off_manifold_energy(on + off, p), off.pow(2).sum(1), atol=1e-4, rtol=1e-4
    )


def test_toy_cells_are_deterministic_and_share_everything_but_the_prediction(monkeypatch) -> None:
    """Re-running gives the same cells; within a run the three cells see the same initial
    weights, data, times, noise and sampling noise, and differ only in the prediction."""
    from denoiselab.analysis import toy
    from denoiselab.objectives import DenoisingObjective

    cfg = ToyConfig(dims=(4,), train_steps=3, batch=16, num_samples=32, sample_steps=3)
    first, second = run_toy(cfg, log=False), run_toy(cfg, log=False)
    assert [r.prediction for r in first] == ["x", "eps", "v"]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.samples_2d, b.samples_2d)
        assert a.sw2 == b.sw2 and np.isfinite(a.sw2)

    seen: dict[str, list[torch.Tensor]] = {}
    terms, sample = DenoisingObjective.terms, toy.sample

    def spy_terms(self, net, x, y, t, eps, **kw):
        if self.cfg.prediction not in seen:  # the first step: weights still at initialisation
            seen[self.cfg.prediction] = [x, t, eps, *(p.detach().clone() for p in net.parameters())]
        return terms(self, net, x, y, t, eps, **kw)

    noises: list[torch.Tensor] = []
    monkeypatch.setattr(DenoisingObjective, "terms", spy_terms)
    monkeypatch.setattr(
        toy, "sample", lambda fn, noise, **kw: noises.append(noise) or sample(fn, noise, **kw)
    )
    third = run_toy(cfg, log=False)
    assert sorted(seen) == ["eps", "v", "x"] and len(noises) == 3
    for pred in ("eps", "v"):
        assert all(torch.equal(a, b) for a, b in zip(seen["x"], seen[pred], strict=True)), pred
    assert all(torch.equal(noises[0], n) for n in noises[1:])
    assert not np.array_equal(third[0].samples_2d, third[1].samples_2d)  # the predictions differ


# -- Gaussian closed forms vs Monte Carlo ----------------------------------------------------
@pytest.mark.parametrize(("t", "s"), [(0.3, 1.0), (0.7, 0.5)])
def test_posterior_mean_equals_least_squares_fit(t: float, s: float) -> None:
    sigma = random_cov(4, seed=1)
    mc = draw(sigma, t, s, n=200_000, seed=2)
    for target in TARGETS:
        fit = np.linalg.lstsq(mc["z"], mc[target], rcond=None)[0].T  # y ≈ fit @ z
        np.testing.assert_allclose(posterior_mean_matrix(target, sigma, t, s), fit, atol=0.02)


@pytest.mark.parametrize(("t", "s"), [(0.2, 1.0), (0.6, 1.0), (0.5, 2.0)])
def test_irreducible_error_per_direction_matches_monte_carlo(t: float, s: float) -> None:
    sigma = random_cov(4, seed=3)
    lam, u = np.linalg.eigh(sigma)
    mc = draw(sigma, t, s, n=200_000, seed=4)
    for target in TARGETS:
        resid = mc[target] - mc["z"] @ posterior_mean_matrix(target, sigma, t, s).T
        mc_err = (resid @ u).var(axis=0)
        np.testing.assert_allclose(irreducible_error(target, lam, t, s), mc_err, rtol=0.03)


def test_gains_and_target_covariance_in_the_eigenbasis() -> None:
    """The matrix posterior mean is diagonal in Σ's eigenbasis with the scalar gains;
    Cov(v) = Σ + s²I (the isotropic floor); x damps λ→0 directions, v amplifies them."""
    sigma, t, s = random_cov(5, seed=5), 0.4, 1.5
    lam, u = np.linalg.eigh(sigma)
    for target in TARGETS:
        rotated = u.T @ posterior_mean_matrix(target, sigma, t, s) @ u
        np.testing.assert_allclose(rotated, np.diag(posterior_gain(target, lam, t, s)), atol=1e-12)
    np.testing.assert_allclose(joint_moments("v", sigma, t, s)[2], sigma + s**2 * np.eye(5))
    tiny = np.array([1e-9])
    assert posterior_gain("x", tiny, t, s)[0] == pytest.approx(0.0, abs=1e-8)
    assert posterior_gain("v", tiny, t, s)[0] == pytest.approx(-1 / (1 - t), rel=1e-6)


# -- reduced-rank regression -----------------------------------------------------------------
def test_reduced_rank_at_full_rank_is_least_squares() -> None:
    sigma, t = random_cov(5, seed=6), 0.35
    for target in TARGETS:
        cov_yz, cov_zz, _ = joint_moments(target, sigma, t)
        b = reduced_rank_regression(cov_yz, cov_zz, rank=5)
        np.testing.assert_allclose(b, posterior_mean_matrix(target, sigma, t), atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2])
def test_reduced_rank_matches_numerical_optimisation(rank: int) -> None:
    """Generic (non-Gaussian-model) moments: the SVD solution is no worse than, and equal to,
    the best of several gradient-based optimisations over factors B = U Vᵀ."""
    rng = np.random.default_rng(rank)
    dim = 4
    m = rng.normal(size=(2 * dim, 2 * dim))
    joint = m @ m.T + 0.1 * np.eye(2 * dim)  # Cov of (y, z)
    cov_yy, cov_yz, cov_zz = joint[:dim, :dim], joint[:dim, dim:], joint[dim:, dim:]

    def loss(b: np.ndarray) -> float:  # E‖y − Bz‖²
        return float(np.trace(cov_yy) - 2 * np.trace(b @ cov_yz.T) + np.trace(b @ cov_zz @ b.T))

    b_svd = reduced_rank_regression(cov_yz, cov_zz, rank)
    assert np.linalg.matrix_rank(b_svd, tol=1e-9) == rank
    best = min(
        minimize(
            lambda w: loss(w[: dim * rank].reshape(dim, rank) @ w[dim * rank :].reshape(rank, dim)),
            rng.normal(size=2 * dim * rank),
            method="BFGS",
            options={"gtol": 1e-10},
        ).fun
        for _ in range(5)
    )
    assert loss(b_svd) <= best + 1e-7
    assert loss(b_svd) == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_per_direction_rank_k_error_equals_matrix_path(t: float) -> None:
    lam = np.array([4.0, 2.0, 1.0, 0.5, 0.2, 0.05])
    sigma = random_cov(6, seed=7)
    _, u = np.linalg.eigh(sigma)
    sigma = (u * lam) @ u.T
    for target in TARGETS:
        for rank in (1, 3, 6):
            diag = np.diag(u.T @ rank_k_x_error_matrix(target, sigma, t, rank) @ u)
            np.testing.assert_allclose(rank_k_x_error(target, lam, t, rank), diag, atol=1e-10)


def test_rank_k_x_error_matches_monte_carlo() -> None:
    sigma, t, rank = random_cov(4, seed=8), 0.45, 2
    mc = draw(sigma, t, 1.0, n=200_000, seed=9)
    for target in TARGETS:
        cov_yz, cov_zz, _ = joint_moments(target, sigma, t)
        c = to_x_matrix(target, reduced_rank_regression(cov_yz, cov_zz, rank), t)
        mc_err = ((mc["x"] - mc["z"] @ c.T) ** 2).sum(1).mean()
        assert np.trace(rank_k_x_error_matrix(target, sigma, t, rank)) == pytest.approx(
            mc_err, rel=0.02
        )


def test_rank_k_relations_between_x_eps_v() -> None:
    """At K = D the three predictors are one x̂; with data rank d ≤ K < D, x-prediction keeps
    the Bayes error while ε and v pay for each of the D − K dropped noise directions:
    ((1−t)/t)²s² (ε) and (1−t)²s² (v)."""
    dim, d, rank, t, s = 12, 3, 5, 0.5, 1.0
    lam = np.zeros(dim)
    lam[:d] = [40.0, 20.0, 10.0]  # λ > s²(2−t)/t, so v keeps the data directions
    sigma = random_cov(dim, seed=10)
    _, u = np.linalg.eigh(sigma)
    sigma = (u * lam) @ u.T
    full = [to_x_matrix(tg, posterior_mean_matrix(tg, sigma, t, s), t) for tg in TARGETS]
    np.testing.assert_allclose(full[1], full[0], atol=1e-10)
    np.testing.assert_allclose(full[2], full[0], atol=1e-10)
    bayes = irreducible_error("x", lam, t, s).sum()
    err = {tg: np.trace(rank_k_x_error_matrix(tg, sigma, t, rank, s)) for tg in TARGETS}
    assert err["x"] == pytest.approx(bayes, rel=1e-9)
    assert err["eps"] == pytest.approx((dim - rank) * ((1 - t) / t) ** 2 * s**2, rel=1e-9)
    assert err["v"] == pytest.approx(bayes + (dim - rank) * (1 - t) ** 2 * s**2, rel=1e-9)


# -- spectra and the CLI ---------------------------------------------------------------------
def test_parse_spectrum() -> None:
    lam = parse_spectrum("powerlaw:D=6,rank=3,alpha=1,top=2,floor=0.01")
    np.testing.assert_allclose(lam, [2.0, 1.0, 2 / 3, 0.01, 0.01, 0.01])
    np.testing.assert_allclose(parse_spectrum("list:0,3,1"), [3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="kind"):
        parse_spectrum("cauchy:D=3")


def test_patch_covariance_matches_manual_patches() -> None:
    images = torch.randn(3, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    patches = [
        images[n, :, i : i + 2, j : j + 2].reshape(-1)
        for n in range(3)
        for i in (0, 2)
        for j in (0, 2, 4)
    ]
    expected = np.cov(torch.stack(patches).double().numpy(), rowvar=False)
    np.testing.assert_allclose(patch_covariance(images, 2), expected, atol=1e-12)


def test_analyze_gaussian_cli(tmp_path, capsys) -> None:
    spec = "powerlaw:D=16,rank=2,alpha=1,top=4"
    assert (
        analyze_main(["gaussian", "--spectrum", spec, "--rank", "4", "--out", str(tmp_path)]) == 0
    )
    assert "Local Gaussian analysis" in capsys.readouterr().out
    table = json.loads((tmp_path / "gaussian.json").read_text())
    assert (tmp_path / "gaussian.png").stat().st_size > 10_000
    assert (tmp_path / "gaussian.md").exists()
    for row in table["rows"]:  # data rank 2 ≤ K = 4: x-prediction is not starved, ε/v are
        assert row["rank_k_x_error_x"] == pytest.approx(row["bayes_x_error"])
        assert row["rank_k_x_error_eps"] > row["bayes_x_error"] + 12 * (1 - row["t"]) ** 2 * 0.99
        assert row["captured_x"] == pytest.approx(1.0)


def test_analyze_gaussian_from_dataset_patches(tmp_path) -> None:
    args = ["gaussian", "--data", "shapes", "--image-size", "16", "--patch", "4"]
    args += ["--num-images", "16", "--rank", "8", "--out", str(tmp_path)]
    assert analyze_main(args) == 0
    table = json.loads((tmp_path / "gaussian.json").read_text())
    assert table["dim"] == 48 and table["rank_k"] == 8
    # the spectrum is that of the first 16 shapes images' 4×4 patches, computed here by hand
    from denoiselab.data import ShapesDataset

    ds = ShapesDataset(num_images=16, image_size=16)
    x = np.stack([ds[i][0].numpy() for i in range(16)]).astype(np.float64)  # [N, 3, 16, 16]
    patches = x.reshape(16, 3, 4, 4, 4, 4).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 48)
    expected = np.sort(np.linalg.eigvalsh(np.cov(patches, rowvar=False)))[::-1]
    np.testing.assert_allclose(table["eigenvalues"], expected, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_toy_quick_separates_x_from_eps_and_v(tmp_path, capsys) -> None:
    """JiT Fig. 2 at D = 512: only x-prediction recovers the spiral."""
    assert toy_main(["--quick", "--dims", "512", "--out", str(tmp_path)]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("SW2 ratio to x-prediction at D=512")
    assert (tmp_path / "toy.png").stat().st_size > 10_000 and (tmp_path / "toy.md").exists()
    cells = {c["prediction"]: c for c in json.loads((tmp_path / "toy.json").read_text())["cells"]}
    assert cells["x"]["sw2"] * 1.5 < cells["v"]["sw2"]
    assert cells["x"]["sw2"] * 10 < cells["eps"]["sw2"]
    assert cells["x"]["off_manifold"] * 100 < cells["v"]["off_manifold"]
