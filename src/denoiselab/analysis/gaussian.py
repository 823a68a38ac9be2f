"""Local Gaussian analysis of the prediction target (JLT), in closed form.

Data ``x ~ N(0, Σ)``, noise ``ε ~ N(0, s²I)``, ``z = t·x + (1−t)·ε`` (``t = 1`` is data),
``v = x − ε``. All three targets ``y ∈ {x, ε, v}`` are jointly Gaussian with ``z``:

    Cov(z)    = t²Σ + (1−t)²s²I
    Cov(x, z) = tΣ            Cov(x) = Σ
    Cov(ε, z) = (1−t)s²I      Cov(ε) = s²I
    Cov(v, z) = tΣ − (1−t)s²I Cov(v) = Σ + s²I      ← the isotropic floor s²I

so ``E[y|z] = Cov(y, z) Cov(z)⁻¹ z`` is linear. In the eigenbasis of ``Σ`` (eigenvalues
``λ_i``) every matrix is diagonal; with ``c_i = t²λ_i + (1−t)²s²`` the per-direction gains
and irreducible (Bayes) errors are

    x: a = tλ/c,            err = λ(1−t)²s²/c
    ε: a = (1−t)s²/c,       err = t²λs²/c
    v: a = (tλ − (1−t)s²)/c, err = λs²/c = err_x/(1−t)²

As ``λ → 0`` the x-gain vanishes (x-prediction damps low-variance directions) while the
v-gain tends to ``−1/(1−t)`` (v-prediction must pass, and amplify, the noise there).

Capacity: the best rank-``K`` linear predictor of ``y`` (reduced-rank regression) keeps the
``K`` directions of largest *predictable* variance ``Var(E[y|z])``. For x that is the data's
top-K subspace; for ε and v every null direction of ``Σ`` carries predictable variance ``s²``.
At fixed ``t`` every loss space of JiT Table 1 is a scalar reweighting of the prediction
space's own loss, so this is also what any of the three losses would pick.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Target = Literal["x", "eps", "v"]
TARGETS: tuple[Target, ...] = ("x", "eps", "v")


def _check(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; valid: 'x', 'eps', 'v'")


# -- matrix form (any Σ) ---------------------------------------------------------------------
def joint_moments(
    target: Target, sigma: np.ndarray, t: float, s: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Cov(y, z), Cov(z), Cov(y))``, each ``[D, D]``, for ``Σ = sigma: [D, D]``."""
    _check(target)
    eye = np.eye(sigma.shape[0])
    cov_zz = t**2 * sigma + (1 - t) ** 2 * s**2 * eye
    if target == "x":
        return t * sigma, cov_zz, sigma
    if target == "eps":
        return (1 - t) * s**2 * eye, cov_zz, s**2 * eye
    return t * sigma - (1 - t) * s**2 * eye, cov_zz, sigma + s**2 * eye


def posterior_mean_matrix(
    target: Target, sigma: np.ndarray, t: float, s: float = 1.0
) -> np.ndarray:
    """``A: [D, D]`` with ``E[y|z] = A z``; e.g. ``A_x = tΣ(t²Σ + (1−t)²s²I)⁻¹``."""
    cov_yz, cov_zz, _ = joint_moments(target, sigma, t, s)
    return np.linalg.solve(cov_zz, cov_yz.T).T  # cov_zz is symmetric


def reduced_rank_regression(cov_yz: np.ndarray, cov_zz: np.ndarray, rank: int) -> np.ndarray:
    """``B = argmin_{rank B ≤ K} E‖y − Bz‖²`` given ``Cov(y, z)`` and ``Cov(z)`` (both ``[D, D]``).

    Whitening ``w = Cov(z)^{-1/2} z`` turns the loss into ``‖G − R‖_F² + const`` with
    ``G = B Cov(z)^{1/2}`` and ``R = Cov(y, z) Cov(z)^{-1/2}``; Eckart–Young gives
    ``G = R_K`` (top-K SVD), hence ``B = R_K Cov(z)^{-1/2}``. ``rank ≥ D`` is ordinary
    least squares. Ties among singular values are broken by the SVD routine.
    """
    evals, evecs = np.linalg.eigh(cov_zz)
    inv_sqrt = (evecs / np.sqrt(evals)) @ evecs.T
    u, sv, vt = np.linalg.svd(cov_yz @ inv_sqrt)
    k = min(rank, len(sv))
    return (u[:, :k] * sv[:k]) @ vt[:k] @ inv_sqrt


def to_x_matrix(target: Target, b: np.ndarray, t: float) -> np.ndarray:
    """Linear predictor ``ŷ = Bz`` of ``target`` → the implied ``x̂ = Cz`` (JiT Table 1 row 1).

    x: ``C = B``;  ε: ``x̂ = (z − (1−t)ε̂)/t`` → ``C = (I − (1−t)B)/t``;
    v: ``x̂ = z + (1−t)v̂`` → ``C = I + (1−t)B``. Unclamped: use ``0 < t < 1``.
    """
    _check(target)
    eye = np.eye(b.shape[0])
    if target == "x":
        return b
    if target == "eps":
        return (eye - (1 - t) * b) / t
    return eye + (1 - t) * b


def x_error_matrix(c: np.ndarray, sigma: np.ndarray, t: float, s: float = 1.0) -> np.ndarray:
    """``E[(x − Cz)(x − Cz)ᵀ] = Σ − tCΣ − tΣCᵀ + C Cov(z) Cᵀ``, ``[D, D]``."""
    cov_zz = t**2 * sigma + (1 - t) ** 2 * s**2 * np.eye(sigma.shape[0])
    return sigma - t * c @ sigma - t * sigma @ c.T + c @ cov_zz @ c.T


def rank_k_x_error_matrix(
    target: Target, sigma: np.ndarray, t: float, rank: int, s: float = 1.0
) -> np.ndarray:
    """x-space error covariance ``[D, D]`` of the best rank-K linear ``target`` predictor."""
    cov_yz, cov_zz, _ = joint_moments(target, sigma, t, s)
    return x_error_matrix(
        to_x_matrix(target, reduced_rank_regression(cov_yz, cov_zz, rank), t), sigma, t, s
    )


# -- eigenbasis form (per direction) ---------------------------------------------------------
def _c(lam: np.ndarray, t: float, s: float) -> np.ndarray:
    return t**2 * lam + (1 - t) ** 2 * s**2


def posterior_gain(target: Target, lam: np.ndarray, t: float, s: float = 1.0) -> np.ndarray:
    """Per-direction gain ``a_i`` of ``E[y_i|z] = a_i z_i`` in Σ's eigenbasis; ``lam: [D]``."""
    _check(target)
    c = _c(lam, t, s)
    if target == "x":
        return t * lam / c
    if target == "eps":
        return (1 - t) * s**2 / c
    return (t * lam - (1 - t) * s**2) / c


def target_variance(target: Target, lam: np.ndarray, s: float = 1.0) -> np.ndarray:
    """Diagonal of ``Cov(y)`` in Σ's eigenbasis: ``λ``, ``s²`` or ``λ + s²``."""
    _check(target)
    return {"x": lam, "eps": np.full_like(lam, s**2), "v": lam + s**2}[target]


def irreducible_error(target: Target, lam: np.ndarray, t: float, s: float = 1.0) -> np.ndarray:
    """``E[(y_i − E[y_i|z])²]`` per direction ``[D]`` (Bayes error in y's own space)."""
    _check(target)
    num = {"x": (1 - t) ** 2, "eps": t**2, "v": 1.0}[target]
    return num * lam * s**2 / _c(lam, t, s)


def predictable_variance(target: Target, lam: np.ndarray, t: float, s: float = 1.0) -> np.ndarray:
    """``Var(E[y_i|z]) = a_i² c_i``: what a predictor has to carry in direction ``i``."""
    return posterior_gain(target, lam, t, s) ** 2 * _c(lam, t, s)


def kept_directions(
    target: Target, lam: np.ndarray, t: float, rank: int, s: float = 1.0
) -> np.ndarray:
    """Boolean ``[D]``: the ``rank`` directions of largest predictable variance (stable ties)."""
    order = np.argsort(-predictable_variance(target, lam, t, s), kind="stable")
    kept = np.zeros(lam.shape, dtype=bool)
    kept[order[: min(rank, lam.size)]] = True
    return kept


def rank_k_x_error(
    target: Target, lam: np.ndarray, t: float, rank: int, s: float = 1.0
) -> np.ndarray:
    """x-space error ``[D]`` per direction of the best rank-K predictor of ``target``.

    A kept direction reaches the Bayes x-error ``λ(1−t)²s²/c``; a dropped one predicts
    ``ŷ_i = 0``, i.e. ``x̂_i = 0`` (x: error ``λ``), ``x̂_i = z_i/t`` (ε: ``((1−t)/t)²s²``)
    or ``x̂_i = z_i`` (v: ``(1−t)²(λ + s²)``).
    """
    _check(target)
    dropped = {
        "x": lam,
        "eps": np.full_like(lam, ((1 - t) / t) ** 2 * s**2),
        "v": (1 - t) ** 2 * (lam + s**2),
    }[target]
    bayes = irreducible_error("x", lam, t, s)
    return np.where(kept_directions(target, lam, t, rank, s), bayes, dropped)
