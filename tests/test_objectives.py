"""The parameterisation maths of JiT Table 1 / footnote 4 / Table 10, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from denoiselab.objectives import (
    DenoisingObjective,
    LossTerm,
    ObjectiveConfig,
    Prediction,
    TimeSamplerConfig,
    convert,
    interpolate,
    preconditioner_coefficients,
    sample_t,
    shift_time,
)

T_EPS = 0.05


@pytest.fixture(autouse=True)
def _float64():
    """These are maths checks: run them in float64 (restored afterwards for other modules)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _batch(b=64, d=12, seed=0, t_lo=T_EPS, t_hi=1 - T_EPS):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    eps = torch.randn(b, d, generator=g)
    t = t_lo + (t_hi - t_lo) * torch.rand(b, generator=g)
    return x, eps, t


@pytest.mark.parametrize("pred", list(Prediction))
def test_conversions_recover_truth_in_every_space(pred):
    x, eps, t = _batch()
    z = interpolate(x, eps, t)
    truth = {"x": x, "eps": eps, "v": x - eps}
    got = convert(truth[pred.value], pred, z, t, T_EPS)
    for name in ("x", "eps", "v"):
        torch.testing.assert_close(getattr(got, name), truth[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pred", list(Prediction))
def test_conversions_round_trip_through_every_space(pred):
    """out → (x, ε, v) → re-enter through each space → the same triple."""
    x, eps, t = _batch(seed=1)
    z = interpolate(x, eps, t)
    out = torch.randn_like(x)  # an arbitrary (wrong) prediction still round-trips
    first = convert(out, pred, z, t, T_EPS)
    for other in Prediction:
        again = convert(first.get(other), other, z, t, T_EPS)
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(first.v, first.x - first.eps)  # Eq. (2) holds for predictions
    torch.testing.assert_close(interpolate(first.x, first.eps, t), z)  # Eq. (1) too


def _loss(pred, loss, out, x, eps, t):
    obj = DenoisingObjective(
        ObjectiveConfig(prediction=pred, loss_space=loss, label_drop=0, noise_scale=1.0), 10
    )
    return obj.terms(lambda z, tt, y: out, x, torch.zeros(len(x)), t, eps)["denoise"]


# Footnote 4 generalised: loss in space L of prediction P equals w(t)·‖P̂ − P‖² (per dim).
WEIGHTS = {
    ("x", "x"): lambda t: torch.ones_like(t),
    ("x", "eps"): lambda t: t**2 / (1 - t) ** 2,
    ("x", "v"): lambda t: 1 / (1 - t) ** 2,
    ("eps", "eps"): lambda t: torch.ones_like(t),
    ("eps", "x"): lambda t: (1 - t) ** 2 / t**2,
    ("eps", "v"): lambda t: 1 / t**2,
    ("v", "v"): lambda t: torch.ones_like(t),
    ("v", "x"): lambda t: (1 - t) ** 2,
    ("v", "eps"): lambda t: t**2,
}


@pytest.mark.parametrize(("pred", "loss"), list(WEIGHTS))
def test_every_loss_is_a_reweighted_prediction_space_loss(pred, loss):
    x, eps, t = _batch(seed=2)
    truth = {"x": x, "eps": eps, "v": x - eps}[pred]
    out = truth + 0.3 * torch.randn_like(x)
    base = (out - truth).pow(2).mean(1)
    torch.testing.assert_close(_loss(pred, loss, out, x, eps, t), WEIGHTS[pred, loss](t) * base)


def test_clamp_keeps_x_pred_v_loss_an_exact_reweighting():
    """Past the clamp (1 − t < 0.05) the weight is 1/t_eps², as in the reference code."""
    x, eps, t = _batch(seed=3, t_lo=0.96, t_hi=1.0)
    out = x + 0.1 * torch.randn_like(x)
    got = _loss("x", "v", out, x, eps, t)
    torch.testing.assert_close(got, (out - x).pow(2).mean(1) / T_EPS**2)


def test_preconditioner_limits_and_identities():
    t = torch.tensor([1e-7, 1e-4, 0.3, 0.5, 0.9, 1 - 1e-9])
    c_skip, c_out = preconditioner_coefficients("linear", t)
    torch.testing.assert_close(c_skip, t)
    torch.testing.assert_close(c_out, 1 - t)
    sd = 0.5
    c_skip, c_out = preconditioner_coefficients("edm", t, sigma_data=sd, t_eps=1e-12)
    # t → 0: c_skip → 0, c_out → σ_data (x-prediction up to a constant output scale)
    assert c_skip[0] < 1e-6 and abs(c_out[0] - sd) < 1e-6
    # Independent form (EDM Table 1 in σ = (1−t)/t on the rescaled input z/t)
    sigma = (1 - t) / t
    edm_skip = sd**2 / (sigma**2 + sd**2)
    torch.testing.assert_close(c_skip * t, edm_skip)
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    # t → 1: σ → 0, the network is skipped (c_skip·z → z, c_out → 0)
    assert abs(c_skip[-1] - 1) < 1e-6 and c_out[-1] < 1e-6
    none_skip, none_out = preconditioner_coefficients("none", t)
    assert torch.all(none_skip == 0) and torch.all(none_out == 1)


def test_preconditioned_objective_uses_wrapped_x():
    x, eps, t = _batch(seed=4)
    cfg = ObjectiveConfig(preconditioner="linear", label_drop=0, noise_scale=1.0)
    obj = DenoisingObjective(cfg, 10)
    z = interpolate(x, eps, t)
    out = torch.randn_like(x)
    x_hat = t[:, None] * z + (1 - t[:, None]) * out
    got = obj.terms(lambda *_: out, x, torch.zeros(len(x)), t, eps)["denoise"]
    torch.testing.assert_close(got, (x_hat - x).pow(2).mean(1) / (1 - t) ** 2)


def test_preconditioner_requires_x_prediction():
    with pytest.raises(ValueError, match="prediction='v'"):
        ObjectiveConfig(prediction="v", preconditioner="edm")


def test_logit_normal_moments():
    cfg = TimeSamplerConfig(mu=-0.8, sigma=0.8)
    t = sample_t(cfg, 400_000, generator=torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.01
    assert abs(logit.std().item() - 0.8) < 0.01
    assert t.min() > 0 and t.max() < 1


def test_time_sampler_is_pure_given_generator():
    cfg = TimeSamplerConfig()
    a = sample_t(cfg, 16, generator=torch.Generator().manual_seed(7))
    b = sample_t(cfg, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_uniform_and_shift():
    t = sample_t(TimeSamplerConfig(kind="uniform"), 200_000, generator=torch.Generator())
    assert abs(t.double().mean().item() - 0.5) < 0.005
    assert abs(t.double().var().item() - 1 / 12) < 0.002
    # shift k: noise level σ = 1−t maps to kσ/(1+(k−1)σ); t = 1/2 ↦ 1/(1+k)
    tt = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_time(tt, 3.0), torch.tensor([0.0, 0.25, 1.0]))
    s = 1 - torch.linspace(0.01, 0.99, 9)
    torch.testing.assert_close(1 - shift_time(1 - s, 2.0), 2 * s / (1 + s))


def test_label_drop_rate_and_null_class():
    obj = DenoisingObjective(ObjectiveConfig(label_drop=0.1, noise_scale=1.0), num_classes=7)
    x = torch.zeros(100_000, 1)
    _, _, y = obj.draw(x, torch.zeros(100_000, dtype=torch.long), torch.Generator())
    assert set(y.unique().tolist()) == {0, 7}
    assert abs((y == 7).double().mean().item() - 0.1) < 0.005


def test_noise_scale_scales_eps():
    obj = DenoisingObjective(ObjectiveConfig(noise_scale=2.0), num_classes=1)
    _, eps, _ = obj.draw(torch.zeros(50_000, 4), torch.zeros(50_000, dtype=torch.long), None)
    assert abs(eps.std().item() - 2.0) < 0.02


def test_extra_terms_get_hidden_states_and_are_per_sample():
    class Probe(LossTerm):
        name = "probe"
        hidden_blocks = (1, 3)

        def __call__(self, ctx):
            assert set(ctx.hidden) == {1, 3}
            return ctx.hidden[3].mean(dim=(1, 2))

    def net(z, t, y, hidden_out=None):
        for k in hidden_out:
            hidden_out[k] = torch.full((z.shape[0], 2, 5), float(k))
        return z

    obj = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10, extra_terms=[Probe()])
    x = torch.randn(6, 3, 4, 4)
    terms = obj(net, x, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(0))
    assert set(terms) == {"denoise", "probe"}
    assert terms["denoise"].shape == (6,) and torch.all(terms["probe"] == 3.0)


@pytest.mark.parametrize("loss", ["v", "x", "eps"])
def test_contrastive_flow_matching_pushes_away_from_the_next_samples_target(loss):
    # ΔFM (seeds/002): ‖p̂ − p‖² − λ‖p̂ − p̃‖², p̃ the target of another sample; for x-pred
    # with v-loss p = x − ε (linear path), written out here from x, ε, t alone.
    lam = 0.3
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 2, 2, generator=g)

    def net(z, t, y):  # any fixed function of the inputs will do
        return torch.tanh(z * w.mean() + t.view(-1, 1, 1, 1)) + 0.1 * y.view(-1, 1, 1, 1)

    cfg = ObjectiveConfig(loss_space=loss, contrastive=lam, label_drop=0.0, noise_scale=1.0)
    obj = DenoisingObjective(cfg, 10)
    x = torch.randn(4, 3, 2, 2, generator=g)
    eps = torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    y = torch.tensor([0, 1, 2, 3])
    terms = obj.terms(net, x, y, t, eps)
    assert set(terms) == {"denoise", "contrastive"}

    tb = t.view(-1, 1, 1, 1)
    z = tb * x + (1 - tb) * eps
    x_hat = net(z, t, y)
    own = {"x": x, "eps": eps, "v": x - eps}[loss]
    hat = {"x": x_hat, "eps": (z - tb * x_hat) / (1 - tb), "v": (x_hat - z) / (1 - tb)}[loss]
    other = own.roll(1, dims=0)  # sample i is pushed away from sample i − 1's target
    per = lambda d: d.pow(2).flatten(1).mean(1)  # noqa: E731
    torch.testing.assert_close(terms["denoise"], per(hat - own))
    torch.testing.assert_close(terms["contrastive"], -lam * per(hat - other))
    assert not torch.equal(other, own)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"prediction": "y"}, "Prediction='y'.*'x', 'eps', 'v'"),
        ({"loss_space": "score"}, "LossSpace='score'"),
        ({"t_eps": 0.0}, "t_eps=0.0"),
        ({"preconditioner": "karras"}, "preconditioner='karras'"),
        ({"noise_scale": math.nan}, "noise_scale=nan"),
        ({"contrastive": 1.0}, r"contrastive=1.0 must lie in \[0, 1\)"),
    ],
)
def test_bad_config_names_value(kw, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**kw)


def test_contrastive_term_carries_the_denoising_weight_so_the_loss_stays_bounded():
    # With weighting min_snr the denoising term is w(t)·‖v̂ − v‖²; the push-away term must be
    # weighted alike, w(t)·(‖v̂ − v‖² − λ‖v̂ − ṽ‖²), or it dominates wherever w(t) < λ and the
    # loss has no minimum (v̂ → ∞ drives it to −∞). For x-pred, v-loss, away from the clamps,
    # w = min(SNR, γ)·(1 − t)², SNR = t²/(1 − t)² (s = 1).
    lam, gamma = 0.5, 5.0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 2, generator=g)
    eps = torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    y = torch.zeros(4, dtype=torch.long)
    cfg = ObjectiveConfig(
        contrastive=lam, label_drop=0.0, noise_scale=1.0, weighting="min_snr", min_snr_gamma=gamma
    )
    obj = DenoisingObjective(cfg, 10)
    snr = t**2 / (1 - t) ** 2
    w = snr.clamp_max(gamma) * (1 - t) ** 2
    tb = t.view(-1, 1, 1, 1)
    z = tb * x + (1 - tb) * eps
    per = lambda d: d.pow(2).flatten(1).mean(1)  # noqa: E731

    def net(z, t, y):
        return torch.tanh(z + 0.5)

    terms = obj.terms(net, x, y, t, eps)
    v_hat = (net(z, t, y) - z) / (1 - tb)
    other = (x - eps).roll(1, dims=0)
    torch.testing.assert_close(terms["denoise"], w * per(v_hat - (x - eps)))
    torch.testing.assert_close(terms["contrastive"], -lam * w * per(v_hat - other))
    # bounded below: a far-off output costs more than a near one, for every sample
    totals = []
    for c in (1.0, 100.0):
        out = obj.terms(lambda z, t, y, c=c: c * torch.ones_like(z), x, y, t, eps)
        totals.append(out["denoise"] + out["contrastive"])
    assert torch.all(totals[1] > totals[0])


def test_contrastive_term_on_a_batch_of_one_is_a_named_error():
    # roll(1) of one sample is itself: the push-away term became −λ‖p̂ − p‖², a silent
    # rescaling of the denoising loss by (1 − λ) instead of a contrastive term
    cfg = ObjectiveConfig(contrastive=0.3, label_drop=0.0, noise_scale=1.0)
    obj = DenoisingObjective(cfg, 10)
    x, eps = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"objective.contrastive.*1 sample"):
        obj.terms(lambda z, t, y: z, x, torch.zeros(1, dtype=torch.long), torch.tensor([0.5]), eps)
