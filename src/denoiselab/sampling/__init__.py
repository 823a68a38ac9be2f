"""Pure ODE samplers over a velocity function, and classifier-free guidance with an interval."""

from denoiselab.sampling.guidance import ClassifierFreeGuidance
from denoiselab.sampling.solvers import (
    SOLVERS,
    euler,
    euler_maruyama,
    heun,
    nfe,
    sample,
    time_grid,
)

__all__ = [
    "SOLVERS",
    "ClassifierFreeGuidance",
    "euler",
    "euler_maruyama",
    "heun",
    "nfe",
    "sample",
    "time_grid",
]
