"""Min-SNR-γ weighting (Hang et al. 2023) in every loss space, for our interpolant
``z = t·x + (1−t)·ε``, ``ε ~ N(0, s²I)``: ``SNR = t²/((1−t)²s²)``."""

from __future__ import annotations

import pytest
import torch

from denoiselab.objectives import DenoisingObjective, ObjectiveConfig, interpolate
from denoiselab.objectives.parameterization import LossSpace, Prediction, min_snr_weight

T_EPS = 0.05
GAMMA = 5.0


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _snr(t, s):
    return t**2 / ((1 - t) ** 2 * s**2)


# The closed forms, written out: x-space weight min(SNR, γ) divided by the factor by which
# each loss space scales the x-error (ε: t²/(1−t)² = s²·SNR, v: 1/(1−t)²).
CLOSED_FORM = {
    "x": lambda t, s: torch.clamp(_snr(t, s), max=GAMMA),
    "eps": lambda t, s: torch.clamp(_snr(t, s), max=GAMMA) / (s**2 * _snr(t, s)),
    "v": lambda t, s: torch.clamp(_snr(t, s), max=GAMMA) * (1 - t) ** 2,
}


@pytest.mark.parametrize("s", [1.0, 0.125, 2.0])
@pytest.mark.parametrize("pred", list(Prediction))
@pytest.mark.parametrize("loss", ["x", "eps", "v"])
def test_min_snr_weight_matches_the_closed_form_in_each_loss_space(loss, pred, s):
    t = torch.linspace(T_EPS + 1e-3, 1 - T_EPS - 1e-3, 301)  # away from the clamps
    w = min_snr_weight(t, GAMMA, s, prediction=pred, loss_space=LossSpace(loss), t_eps=T_EPS)
    torch.testing.assert_close(w, CLOSED_FORM[loss](t, s), rtol=1e-12, atol=1e-15)
    snr = _snr(t, s)
    assert (snr < GAMMA).any() and (snr > GAMMA).any()  # both branches of the min are checked


def _weighted_loss(pred, loss, s, out, x, eps, t):
    cfg = ObjectiveConfig(
        prediction=pred, loss_space=loss, noise_scale=s, weighting="min_snr",
        min_snr_gamma=GAMMA, t_eps=T_EPS, label_drop=0,
    )  # fmt: skip
    obj = DenoisingObjective(cfg, num_classes=10)
    return obj.terms(lambda z, tt, y: out, x, torch.zeros(len(x)), t, eps)["denoise"]


@pytest.mark.parametrize("s", [1.0, 0.5])
@pytest.mark.parametrize("pred", ["x", "eps", "v"])
@pytest.mark.parametrize("loss", ["x", "eps", "v"])
def test_effective_weight_on_the_x_error_is_the_papers_min_snr(loss, pred, s):
    """Converted to x-space, every (prediction, loss) pair weights ‖x̂ − x‖² by min(SNR, γ)."""
    g = torch.Generator().manual_seed(0)
    b, d = 400, 6
    x = torch.randn(b, d, generator=g)
    eps = s * torch.randn(b, d, generator=g)
    # x- and v-prediction: every t, clamp region included; ε-prediction: x̂ = (z − (1−t)ε̂)/t
    # needs t > t_eps to be the unclamped estimate written below.
    lo = T_EPS + 1e-3 if pred == "eps" else 1e-3
    t = lo + (1 - 1e-3 - lo) * torch.rand(b, generator=g)
    z = interpolate(x, eps, t)
    out = torch.randn(b, d, generator=g)  # an arbitrary network output
    tb = t[:, None]
    x_hat = {"x": out, "eps": (z - (1 - tb) * out) / tb, "v": z + (1 - tb) * out}[pred]
    paper = torch.clamp(_snr(t, s), max=GAMMA) * ((x_hat - x) ** 2).mean(1)
    got = _weighted_loss(pred, loss, s, out, x, eps, t)
    torch.testing.assert_close(got, paper, rtol=1e-9, atol=1e-12)
    assert (t > 1 - T_EPS).any() or pred == "eps"  # the clamp region is in the batch


def test_eps_loss_with_unit_noise_is_the_papers_eps_form():
    """s = 1: the ε-loss weight is literally Hang et al.'s ``min(SNR, γ)/SNR``; and the VP
    v-form ``min(SNR, γ)/(SNR + 1)`` is *not* right for our ``v = x − ε``."""
    t = torch.linspace(0.1, 0.9, 81)
    snr = _snr(t, 1.0)
    w_eps = min_snr_weight(t, GAMMA, 1.0, prediction=Prediction.X, loss_space=LossSpace.EPS)
    torch.testing.assert_close(w_eps, torch.clamp(snr, max=GAMMA) / snr)
    w_v = min_snr_weight(t, GAMMA, 1.0, prediction=Prediction.X, loss_space=LossSpace.V)
    vp_form = torch.clamp(snr, max=GAMMA) / (snr + 1)
    assert not torch.allclose(w_v, vp_form, rtol=1e-3)
    # our v-error is the x-error / (1 − t): the effective x weight of w_v is min(SNR, γ)
    torch.testing.assert_close(w_v / (1 - t) ** 2, torch.clamp(snr, max=GAMMA))


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="min_snr_gamma=0"):
        ObjectiveConfig(min_snr_gamma=0.0)
