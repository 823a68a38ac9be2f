"""Analyses of the prediction target: the JiT toy experiment and the JLT local Gaussian model.

- :mod:`~denoiselab.analysis.toy`: JiT §3.3 / Fig. 2, a 2-D spiral buried in ``D`` dims,
  x/ε/v-prediction with the v-loss through the real objective and sampler.
- :mod:`~denoiselab.analysis.gaussian`: closed-form posterior means, irreducible errors and
  best rank-K linear predictors for ``x ~ N(0, Σ)``.
- :mod:`~denoiselab.analysis.cli`: ``toy_main`` and ``analyze_main`` (``denoiselab toy`` and
  ``denoiselab analyze gaussian``).

Time convention: ``t = 1`` is data, ``t = 0`` is noise, ``z = t·x + (1−t)·ε``.
"""

from denoiselab.analysis.cli import analyze_main, toy_main
from denoiselab.analysis.gaussian import (
    TARGETS,
    irreducible_error,
    joint_moments,
    posterior_gain,
    posterior_mean_matrix,
    rank_k_x_error,
    rank_k_x_error_matrix,
    reduced_rank_regression,
    to_x_matrix,
)
from denoiselab.analysis.gaussian_report import gaussian_analysis
from denoiselab.analysis.spectra import dataset_spectrum, parse_spectrum, patch_covariance
from denoiselab.analysis.toy import ToyConfig, ToyResult, random_projection, run_toy

__all__ = [
    "TARGETS",
    "ToyConfig",
    "ToyResult",
    "analyze_main",
    "dataset_spectrum",
    "gaussian_analysis",
    "irreducible_error",
    "joint_moments",
    "parse_spectrum",
    "patch_covariance",
    "posterior_gain",
    "posterior_mean_matrix",
    "random_projection",
    "rank_k_x_error",
    "rank_k_x_error_matrix",
    "reduced_rank_regression",
    "run_toy",
    "to_x_matrix",
    "toy_main",
]
