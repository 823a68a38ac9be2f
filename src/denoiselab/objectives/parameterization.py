"""The nine prediction × loss combinations of JiT Table 1, and the preconditioners of Table 10.

Given the network's direct output in one space (``Prediction``) and ``z_t``, the other two
quantities follow in closed form from ``z_t = t·x + (1−t)·ε`` and ``v = x − ε``:

    x-pred:  ε̂ = (z − t·x̂)/(1−t)       v̂ = (x̂ − z)/(1−t)
    ε-pred:  x̂ = (z − (1−t)·ε̂)/t       v̂ = (z − ε̂)/t
    v-pred:  x̂ = z + (1−t)·v̂           ε̂ = z − t·v̂

Every division clamps its denominator at ``t_eps`` (JiT §4.3, default 0.05).
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from torch import Tensor

from denoiselab.objectives.path import expand_t


class Prediction(str, Enum):
    """What the network directly outputs (JiT Table 1, columns)."""

    X = "x"
    EPS = "eps"
    V = "v"


class LossSpace(str, Enum):
    """Where the unweighted L2 loss is measured (JiT Table 1, rows)."""

    X = "x"
    EPS = "eps"
    V = "v"


class Triple(NamedTuple):
    """The three mutually determined quantities ``(x, ε, v)``, each ``[B, ...]``."""

    x: Tensor
    eps: Tensor
    v: Tensor

    def get(self, space: LossSpace | Prediction | str) -> Tensor:
        return getattr(self, str(getattr(space, "value", space)))


def parse_space(value: str | Enum, enum: type[Enum]) -> Enum:
    """``"x" -> enum.X`` with an error that lists the valid names."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum)  # type: ignore[attr-defined]
        raise ValueError(f"{enum.__name__}={value!r} is not valid; choose one of {valid}") from None


def convert(out: Tensor, prediction: Prediction, z_t: Tensor, t: Tensor, t_eps: float) -> Triple:
    """Complete ``out`` (a value in ``prediction`` space) to ``(x, ε, v)`` (JiT Table 1).

    ``out, z_t: [B, ...]``, ``t: [B]``. Denominators ``1 − t`` and ``t`` are clamped at
    ``t_eps``, so the map is finite for every ``t ∈ [0, 1]``.
    """
    tb = expand_t(t, z_t)
    if prediction is Prediction.X:
        one_minus_t = (1 - tb).clamp_min(t_eps)
        return Triple(out, (z_t - tb * out) / one_minus_t, (out - z_t) / one_minus_t)
    if prediction is Prediction.EPS:
        t_safe = tb.clamp_min(t_eps)
        return Triple((z_t - (1 - tb) * out) / t_safe, out, (z_t - out) / t_safe)
    if prediction is Prediction.V:
        return Triple(z_t + (1 - tb) * out, z_t - tb * out, out)
    raise ValueError(f"unknown prediction {prediction!r}")


def preconditioner_coefficients(
    kind: str, t: Tensor, *, sigma_data: float = 0.5, t_eps: float = 0.05
) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` with ``x̂ = c_skip·z_t + c_out·net`` (JiT App. B.2, Table 10).

    - ``"none"``:   ``c_skip = 0``, ``c_out = 1`` (plain x-prediction).
    - ``"edm"``:    ``σ_t = (1−t)/t``, ``c_skip = (1/t)·σ_d²/(σ_d² + σ_t²)``,
      ``c_out = σ_d·σ_t/√(σ_d² + σ_t²)``. As ``t → 0``: ``c_skip → 0`` and
      ``c_out → σ_d``, i.e. x-prediction up to the constant output scale σ_d.
    - ``"linear"``: ``c_skip = t``, ``c_out = 1 − t`` (x-prediction only at ``t = 0``).
    """
    if kind == "none":
        return t.new_zeros(t.shape), t.new_ones(t.shape)
    if kind == "linear":
        return t, 1 - t
    if kind == "edm":
        t_safe = t.clamp_min(t_eps)
        sigma_t = (1 - t) / t_safe
        denom = sigma_data**2 + sigma_t**2
        return (sigma_data**2 / denom) / t_safe, sigma_data * sigma_t / denom.sqrt()
    raise ValueError(f"preconditioner={kind!r}; valid: 'none', 'edm', 'linear'")


def snr(t: Tensor, noise_scale: float = 1.0) -> Tensor:
    """Signal-to-noise ratio of ``z_t = t·x + (1−t)·ε``, ``ε ~ N(0, s²I)``, for data of unit
    variance per dimension: ``SNR(t) = t² / ((1−t)²·s²)`` (``1 − t`` floored at 1e-12)."""
    return t**2 / ((1 - t).clamp_min(1e-12) ** 2 * noise_scale**2)


def error_gain(space: LossSpace | Prediction, prediction: Prediction, t: Tensor, t_eps: float):
    """``a(t) [B]`` with ``ŝ − s = a(t)·(P̂ − P)``: how an error in the prediction space ``P``
    shows in the quantity ``s`` of ``space``, through :func:`convert` (clamps included).

    From Table 1 with the clamped denominators ``m = max(1−t, t_eps)``, ``n = max(t, t_eps)``:

        P = x:  a_x = 1,          a_ε = −t/m,   a_v = 1/m
        P = ε:  a_x = −(1−t)/n,   a_ε = 1,      a_v = −1/n
        P = v:  a_x = 1 − t,      a_ε = −t,     a_v = 1
    """
    space = Prediction(str(getattr(space, "value", space)))
    one = t.new_ones(t.shape)
    if prediction is Prediction.X:
        m = (1 - t).clamp_min(t_eps)
        gains = {Prediction.X: one, Prediction.EPS: -t / m, Prediction.V: 1 / m}
    elif prediction is Prediction.EPS:
        n = t.clamp_min(t_eps)
        gains = {Prediction.X: -(1 - t) / n, Prediction.EPS: one, Prediction.V: -1 / n}
    else:
        gains = {Prediction.X: 1 - t, Prediction.EPS: -t, Prediction.V: one}
    return gains[space]


def min_snr_weight(
    t: Tensor,
    gamma: float,
    noise_scale: float = 1.0,
    *,
    prediction: Prediction = Prediction.X,
    loss_space: LossSpace = LossSpace.X,
    t_eps: float = 0.05,
) -> Tensor:
    """Min-SNR-γ weight ``[B]`` (Hang et al. 2023) for a loss measured in ``loss_space``.

    Hang et al. weight the *x-space* error by ``w_x(t) = min(SNR, γ)``; their ε- and v-loss
    forms are that same weight divided by the factor by which the loss space scales the
    x-error. Here ``SNR = t²/((1−t)²s²)`` (:func:`snr`) and, by :func:`error_gain`,

        ‖L̂ − L‖² = (a_L/a_x)² · ‖x̂ − x‖²,   so   w_L(t) = min(SNR, γ) · (a_x/a_L)².

    Away from the clamps (``t_eps < t < 1 − t_eps``) the factor does not depend on the
    prediction: ``(a_ε/a_x)² = t²/(1−t)² = s²·SNR`` and ``(a_v/a_x)² = 1/(1−t)²``, so

        x-loss:  w = min(SNR, γ)
        ε-loss:  w = min(SNR, γ) / (s²·SNR)     (the paper's min(SNR, γ)/SNR for s = 1)
        v-loss:  w = min(SNR, γ) · (1−t)²

    The paper's v-form ``min(SNR, γ)/(SNR + 1)`` belongs to the variance-preserving
    ``v = α·ε − σ·x``, whose error is ``(SNR + 1)`` times the x-error; our ``v = x − ε``
    scales it by ``1/(1−t)² = (1 + s·√SNR)²`` instead, so dividing by ``SNR + 1`` would not give
    the paper's x-space weight. Inside the clamps the same identity holds with the clamped
    gains, so the effective weight on the x-error (``pred.x − target.x``, both converted with
    the same clamps) is ``min(SNR, γ)`` at every ``t``. Where a gain vanishes (``a_L = 0``:
    the loss is identically zero) the clamped division only keeps the weight finite.
    """
    s = snr(t, noise_scale)
    a_x = error_gain(Prediction.X, prediction, t, t_eps)
    a_l = error_gain(loss_space, prediction, t, t_eps)
    ratio = a_x.abs() / a_l.abs().clamp_min(1e-12)
    return s.clamp_max(gamma) * ratio**2
