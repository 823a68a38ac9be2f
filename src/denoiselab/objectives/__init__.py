"""Interpolant, time samplers, the nine prediction × loss combinations and the objective."""

from denoiselab.objectives.objective import (
    DenoisingObjective,
    LossTerm,
    ObjectiveConfig,
    StepContext,
)
from denoiselab.objectives.parameterization import (
    LossSpace,
    Prediction,
    Triple,
    convert,
    preconditioner_coefficients,
)
from denoiselab.objectives.path import (
    TimeSamplerConfig,
    expand_t,
    interpolate,
    sample_t,
    shift_time,
)

__all__ = [
    "DenoisingObjective",
    "LossSpace",
    "LossTerm",
    "ObjectiveConfig",
    "Prediction",
    "StepContext",
    "TimeSamplerConfig",
    "Triple",
    "convert",
    "expand_t",
    "interpolate",
    "preconditioner_coefficients",
    "sample_t",
    "shift_time",
]
