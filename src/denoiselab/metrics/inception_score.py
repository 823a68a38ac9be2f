"""Inception Score (Salimans et al. 2016) from classifier logits, as torch-fidelity computes it.

For each of ``splits`` equal parts of the (shuffled) samples, with ``p(y|x) = softmax(logits)``
and ``p(y)`` the mean of ``p(y|x)`` over the part:

    IS_part = exp( mean_x KL(p(y|x) ‖ p(y)) ),     IS = mean over parts (± std)

IS = 1 when every prediction is the same distribution (e.g. uniform); IS = C when each
prediction is one-hot and the C classes are equally frequent within each part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["InceptionScore", "inception_score"]


@dataclass(frozen=True)
class InceptionScore:
    """Mean and standard deviation over the splits."""

    mean: float
    std: float
    splits: int


def inception_score(
    logits: Tensor, splits: int = 10, shuffle_seed: int | None = 2020
) -> InceptionScore:
    """IS of ``logits [N, C]`` (float64 maths).

    ``shuffle_seed`` permutes the rows with ``np.random.RandomState(seed).permutation`` before
    splitting, as torch-fidelity does (its default seed is 2020); ``None`` keeps the order.
    Part ``i`` is rows ``[i·N // splits, (i+1)·N // splits)``.
    """
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"expected logits [N >= splits={splits}, C], got {tuple(logits.shape)}")
    logits = logits.detach().to("cpu", torch.float64)
    n = logits.shape[0]
    if shuffle_seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        p = part.exp()
        log_marginal = p.mean(dim=0).log()
        # Terms with p = 0 are 0 (p log p → 0); written out they would be 0·(−∞ + ∞) = NaN.
        kl = torch.where(p > 0, p * (part - log_marginal), 0.0).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), splits)
