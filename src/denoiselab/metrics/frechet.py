"""Gaussian feature statistics (streamed in float64) and the Fréchet distance.

    FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^{1/2}

``tr (Σ₁Σ₂)^{1/2}`` is computed by the eigenvalue method: Σ₁Σ₂ is similar to the PSD matrix
Σ₁^{1/2} Σ₂ Σ₁^{1/2}, so its eigenvalues λᵢ are real and ≥ 0 in exact arithmetic and
``tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ``. In floating point some λᵢ come out as tiny negatives (rank-
deficient covariances, fewer samples than dimensions); they are cast to complex before the
square root, so √λ is imaginary and contributes 0 to the real part instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = ["GaussianStats", "StreamingGaussianStats", "frechet_distance", "gaussian_stats"]

FeatureArray = Tensor | np.ndarray


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``count`` feature rows."""

    mean: np.ndarray
    cov: np.ndarray
    count: int


class StreamingGaussianStats:
    """Running mean and covariance of feature rows, accumulated in float64 chunk by chunk.

    Chunks are merged with Chan et al.'s pairwise update, which stays accurate when the
    mean is large against the spread (unlike ``Σ xxᵀ/n − μμᵀ``):

        δ = μ_b − μ_a,  n = n_a + n_b,  μ = μ_a + δ·n_b/n,
        M = M_a + M_b + δδᵀ · n_a n_b / n,     Σ = M / (n − 1)

    Memory is ``O(D² + chunk·D)`` whatever the number of rows (50K × 2048 fits easily).
    """

    def __init__(self, dim: int, chunk: int = 4096) -> None:
        self.dim = dim
        self.chunk = chunk
        self.count = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._scatter = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: FeatureArray) -> None:
        """Add rows ``features [B, D]`` (any float dtype, CPU or GPU tensor or array)."""
        if features.shape[-1] != self.dim or features.ndim != 2:
            raise ValueError(
                f"expected features of shape [B, {self.dim}], got {tuple(features.shape)}"
            )
        for start in range(0, features.shape[0], self.chunk):
            self._merge(_as_float64(features[start : start + self.chunk]))

    def _merge(self, block: np.ndarray) -> None:
        n_b = block.shape[0]
        mean_b = block.mean(axis=0)
        centred = block - mean_b
        n = self.count + n_b
        delta = mean_b - self._mean
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n_b / n)
        self._mean += delta * (n_b / n)
        self.count = n

    def finalize(self) -> GaussianStats:
        """Return the statistics so far (covariance with the ``n − 1`` denominator, as ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.count}")
        return GaussianStats(self._mean.copy(), self._scatter / (self.count - 1), self.count)


def gaussian_stats(features: FeatureArray, chunk: int = 4096) -> GaussianStats:
    """Mean and covariance of ``features [N, D]`` in float64, streamed in row chunks."""
    stats = StreamingGaussianStats(features.shape[1], chunk)
    stats.update(features)
    return stats.finalize()


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between two Gaussians (eigenvalue method, float64).

    ``FD = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 Σᵢ Re √λᵢ(Σ_a Σ_b)``. Finite inputs always give
    a finite result; tiny negative values (≈ −1e−10) are possible for identical inputs and
    are returned as they are, not clamped.
    """
    mu_a, mu_b = np.asarray(a.mean, np.float64), np.asarray(b.mean, np.float64)
    cov_a, cov_b = np.asarray(a.cov, np.float64), np.asarray(b.cov, np.float64)
    for name, array in (("mean", mu_a), ("cov", cov_a), ("mean", mu_b), ("cov", cov_b)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"Fréchet distance: non-finite values in the {name} statistics")
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape} vs {mu_b.shape}")
    eigenvalues = scipy.linalg.eigvals(cov_a @ cov_b, check_finite=False)
    # Complex before the root: a real −1e−17 would give NaN, a complex one gives ±1e−8.5 i.
    trace_sqrt = np.sqrt(eigenvalues.astype(np.complex128)).real.sum()
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    if not np.isfinite(fd):
        raise FloatingPointError("Fréchet distance is not finite despite finite statistics")
    return fd


def _as_float64(features: FeatureArray) -> np.ndarray:
    if isinstance(features, Tensor):
        return features.detach().to("cpu", torch.float64).numpy()
    return np.asarray(features, dtype=np.float64)
