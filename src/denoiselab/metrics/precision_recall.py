"""Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds with k = 3.

Each sample set approximates its manifold by balls around its points: the radius ``r_i`` of
point ``i`` is the distance to its k-th nearest *other* point of the same set. Then

    precision = mean over generated g  of  [∃ real r:       ‖g − r‖ ≤ r_r ]
    recall    = mean over real r       of  [∃ generated g:  ‖r − g‖ ≤ r_g ]

The radius test is ``≤`` (inclusive), as in the reference implementation
(kynkaat/improved-precision-and-recall-metric: ``distance_batch <= self.D``) and in
torch-fidelity. Squared distances are compared (same ordering), in float64, over
``chunk × chunk`` blocks, keeping only the ``k + 1`` smallest distances per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .kernels import as_float64_rows

__all__ = ["PrecisionRecall", "knn_radii_sq", "precision_recall"]


@dataclass(frozen=True)
class PrecisionRecall:
    """Fractions in ``[0, 1]``; ``k`` is the neighbourhood size used for the radii."""

    precision: float
    recall: float
    k: int


def precision_recall(
    real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 3, chunk: int = 2048
) -> PrecisionRecall:
    """Precision and recall of generated features ``fake [m, D]`` against ``real [n, D]``."""
    real = as_float64_rows(real)
    fake = as_float64_rows(fake).to(real.device)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _in_manifold(fake, real, knn_radii_sq(real, k, chunk), chunk)
    recall = _in_manifold(real, fake, knn_radii_sq(fake, k, chunk), chunk)
    return PrecisionRecall(precision=precision, recall=recall, k=k)


def knn_radii_sq(features: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """Squared distance of each row of ``features [N, D]`` to its k-th nearest other row ``[N]``.

    The point itself is the nearest (distance 0), so this is the (k+1)-th smallest distance
    of each row, found by a running top-(k+1) over column blocks.
    """
    features = as_float64_rows(features)
    radii = []
    for i in range(0, features.shape[0], chunk):
        rows = features[i : i + chunk]
        best = torch.empty(rows.shape[0], 0, dtype=torch.float64, device=rows.device)
        for j in range(0, features.shape[0], chunk):
            candidates = torch.cat([best, _sq_dist(rows, features[j : j + chunk])], dim=1)
            best = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def _in_manifold(queries: Tensor, points: Tensor, radii_sq: Tensor, chunk: int) -> float:
    """Fraction of ``queries`` inside at least one ball ``‖q − pᵢ‖² ≤ radii_sq[i]``."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for i in range(0, queries.shape[0], chunk):
        for j in range(0, points.shape[0], chunk):
            d = _sq_dist(queries[i : i + chunk], points[j : j + chunk])
            inside[i : i + chunk] |= (d <= radii_sq[j : j + chunk][None, :]).any(dim=1)
    return inside.double().mean().item()


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """``‖aᵢ − bⱼ‖² [n, m]``, clamped at 0 as in the reference."""
    sq = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min(0.0)
