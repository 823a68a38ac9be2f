"""Solvers on analytic fields, Gaussian data through each parameterisation, CFG interval."""

from __future__ import annotations

import math

import pytest
import torch

from denoiselab.objectives import DenoisingObjective, ObjectiveConfig, Prediction
from denoiselab.sampling import ClassifierFreeGuidance, euler, heun, nfe, sample, time_grid


def _field(z, t):  # dz/dt = −cos(t)·z  ⇒  z(1) = z(0)·exp(−sin 1)
    return -math.cos(t) * z


@pytest.mark.parametrize(("solver", "order"), [(euler, 1), (heun, 2)])
def test_solver_order_of_convergence(solver, order):
    z0 = torch.ones(1, dtype=torch.float64)
    exact = math.exp(-math.sin(1.0))
    errs = [abs(solver(_field, z0, time_grid(n)).item() - exact) for n in (20, 40, 80)]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.15 for r in rates), rates


def test_time_grid_and_nfe():
    g = time_grid(50)
    assert len(g) == 51 and g[0] == 0.0 and g[-1] == 1.0
    assert nfe(50, "heun") == 99 and nfe(50, "euler") == 50
    calls = []
    heun(lambda z, t: calls.append(t) or z * 0, torch.zeros(1), g)
    assert len(calls) == nfe(50, "heun") and max(calls) < 1.0  # never evaluated at t = 1
    with pytest.raises(ValueError, match="solver='rk45'"):
        sample(_field, torch.zeros(1), 4, "rk45")


def _gaussian_oracle(pred: Prediction, mean, cov, s):
    """Closed-form optimal network for x ~ N(m, Σ), ε ~ N(0, s²I) in each prediction space.

    E[x|z] = m + tΣ(t²Σ + (1−t)²s²I)⁻¹(z − t·m), and E[ε|z], E[v|z] follow linearly.
    """
    eye = torch.eye(len(mean), dtype=torch.float64)

    def net(z, t, y):
        tt = t[0].item()
        gain = tt * cov @ torch.linalg.inv(tt**2 * cov + (1 - tt) ** 2 * s**2 * eye)
        x_hat = mean + (z - tt * mean) @ gain.T
        if pred is Prediction.X:
            return x_hat
        eps_hat = (z - tt * x_hat) / (1 - tt)
        return eps_hat if pred is Prediction.EPS else x_hat - eps_hat

    return net


@pytest.mark.parametrize("pred", list(Prediction))
def test_sampling_gaussian_data_with_optimal_denoiser(pred):
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.7, 0.2], [0.3, 0.0, 0.4]], dtype=torch.float64)
    cov = a @ a.T
    s = 1.5
    # A small clamp: the reference's 0.05 clamp biases the last steps (see the test below).
    cfg = ObjectiveConfig(prediction=pred.value, noise_scale=s, t_eps=1e-3)
    obj = DenoisingObjective(cfg, 1)
    net = _gaussian_oracle(pred, mean, cov, s)
    y = torch.zeros(40_000, dtype=torch.long)
    fn = ClassifierFreeGuidance(net, obj.velocity, y, null_class=1, scale=1.0)
    noise = s * torch.randn(40_000, 3, dtype=torch.float64)
    x = sample(fn, noise, steps=100, solver="heun")
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.05, rtol=0.05)


def test_reference_clamp_leaves_a_trace_of_noise_at_the_end():
    """With t_eps = 0.05 (JiT default, also used when sampling) the velocity near t = 1 is
    damped: x-prediction's samples keep a few percent of z's deviation from x̂. This pins the
    reference behaviour, so a change of it is noticed."""
    mean = torch.tensor([2.0], dtype=torch.float64)
    cov = torch.tensor([[1e-6]], dtype=torch.float64)
    obj = DenoisingObjective(ObjectiveConfig(prediction="x", noise_scale=1.0), 1)
    net = _gaussian_oracle(Prediction.X, mean, cov, 1.0)
    fn = ClassifierFreeGuidance(net, obj.velocity, torch.zeros(20_000, dtype=torch.long), 1)
    noise = torch.randn(20_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = sample(fn, noise, steps=50, solver="heun")
    shortfall = (mean - x.mean(0)).item() / mean.item()
    assert 0.005 < shortfall < 0.05, shortfall


class _Affine(torch.nn.Module):
    """A tiny class-conditional 'network' whose output depends on y linearly."""

    def __init__(self):
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, z, t, y):
        self.batch_sizes.append(z.shape[0])
        return 0.5 * z + y.to(z.dtype)[:, None] + t[:, None]


def test_cfg_combines_and_skips_outside_interval():
    net = _Affine()
    obj = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), num_classes=3)
    y = torch.tensor([0, 1, 2, 1])
    cfg = ClassifierFreeGuidance(net, obj.velocity, y, null_class=3, scale=2.5)
    z = torch.randn(4, 2)
    v = cfg(z, 0.5)  # inside (0.1, 1): one batched call of 8
    assert net.batch_sizes == [8]
    t = torch.full((4,), 0.5)
    v_c = obj.velocity(net(z, t, y), z, t)
    v_u = obj.velocity(net(z, t, torch.full_like(y, 3)), z, t)
    torch.testing.assert_close(v, v_u + 2.5 * (v_c - v_u))
    net.batch_sizes.clear()
    v_out = cfg(z, 0.05)  # outside: conditional only
    assert net.batch_sizes == [4]
    t = torch.full((4,), 0.05)
    torch.testing.assert_close(v_out, obj.velocity(net(z, t, y), z, t))


def test_cfg_interval_saves_the_expected_evaluations():
    steps = 50
    grid = time_grid(steps)
    # Evaluation times of Heun, last step Euler; guided where 0.1 < t < 1 (reference rule).
    times = [grid[i] for i in range(steps)] + [grid[i + 1] for i in range(steps - 1)]
    expected = sum(2 if 0.1 < t < 1.0 else 1 for t in times)
    net = _Affine()
    obj = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), num_classes=3)
    y = torch.zeros(1, dtype=torch.long)
    with_interval = ClassifierFreeGuidance(net, obj.velocity, y, 3, scale=3.0)
    sample(with_interval, torch.zeros(1, 2), steps, "heun")
    always = ClassifierFreeGuidance(net, obj.velocity, y, 3, scale=3.0, interval=(0.0, 1.0))
    sample(always, torch.zeros(1, 2), steps, "heun")
    assert with_interval.calls == always.calls == nfe(steps, "heun")
    assert always.images_evaluated == 2 * nfe(steps, "heun")
    assert with_interval.images_evaluated == expected
    # t = 0.0, 0.02, …, 0.1 are outside: the first 6 Euler points and 5 Heun corrector points
    assert always.images_evaluated - with_interval.images_evaluated == 11


def test_cfg_rejects_bad_interval():
    with pytest.raises(ValueError, match=r"\(0.5, 0.2\)"):
        ClassifierFreeGuidance(_Affine(), lambda o, z, t: o, torch.zeros(1), 1, interval=(0.5, 0.2))
