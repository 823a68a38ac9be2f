"""``solver: euler_maruyama``: the reverse SDE with the ODE's marginals, checked on Gaussian
data with the closed-form optimal denoiser, where the exact end distribution is known."""

from __future__ import annotations

import math

import pytest
import torch

from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.sampling import ClassifierFreeGuidance, sample
from denoiselab.sampling.generate import Sampler, sde_seed

MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.7, 0.2], [0.3, 0.0, 0.4]], dtype=torch.float64)
COV = _A @ _A.T
S = 1.5


def _oracle_velocity(n: int):
    """The exact velocity field of x ~ N(MEAN, COV), ε ~ N(0, S²I), through x-prediction:
    E[x|z] = m + tΣ(t²Σ + (1−t)²s²I)⁻¹(z − t·m)."""
    eye = torch.eye(3, dtype=torch.float64)

    def net(z, t, y):
        tt = t[0].item()
        gain = tt * COV @ torch.linalg.inv(tt**2 * COV + (1 - tt) ** 2 * S**2 * eye)
        return MEAN + (z - tt * MEAN) @ gain.T

    obj = DenoisingObjective(ObjectiveConfig(prediction="x", noise_scale=S, t_eps=1e-4), 1)
    return ClassifierFreeGuidance(net, obj.velocity, torch.zeros(n, dtype=torch.long), 1)


@pytest.mark.parametrize("eta", [1.0, 3.0])
def test_sde_samples_the_data_distribution_with_the_exact_field(eta):
    n = 40_000
    g = torch.Generator().manual_seed(0)
    noise = S * torch.randn(n, 3, dtype=torch.float64, generator=g)
    x = sample(_oracle_velocity(n), noise, steps=400, solver="euler_maruyama", eta=eta,
               noise_scale=S, generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.allclose(x.mean(0), MEAN, atol=0.03), x.mean(0)
    assert torch.allclose(torch.cov(x.T), COV, atol=0.05, rtol=0.05), torch.cov(x.T)
    # the noise really is injected: the SDE's samples are not the ODE's
    ode = sample(_oracle_velocity(n), noise, steps=400, solver="euler")
    assert (x - ode).abs().mean() > 0.1


def test_eta_zero_is_the_euler_ode_and_bad_eta_is_refused():
    noise = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = sample(_oracle_velocity(16), noise, steps=20, solver="euler_maruyama", eta=0.0)
    b = sample(_oracle_velocity(16), noise, steps=20, solver="euler")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eta=-1"):
        sample(_oracle_velocity(16), noise, steps=2, solver="euler_maruyama", eta=-1.0)


def test_sampler_sde_is_a_function_of_the_seed():
    net = lambda z, t, y: 0.5 * z  # noqa: E731 - any fixed network
    obj = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), num_classes=2)
    sampler = Sampler(net, obj.velocity, (1, 4, 4), num_classes=2, noise_scale=1.0,
                      decode=lambda x: x)  # fmt: skip
    labels = torch.tensor([0, 1])
    kw = {"steps": 5, "solver": "euler_maruyama", "eta": 1.0}
    assert torch.equal(sampler(labels, 3, **kw), sampler(labels, 3, **kw))
    assert not torch.equal(sampler(labels, 3, **kw), sampler(labels, 4, **kw))
    assert not torch.equal(sampler(labels, 3, **kw), sampler(labels, 3, steps=5, solver="euler"))
    assert sde_seed(3) != 3 and math.isfinite(sde_seed(2**62))


def test_sde_from_the_cli_and_config(tmp_path, capsys):
    import yaml

    from denoiselab.cli import main
    from tests.test_train import TINY

    cfg = dict(TINY, duration_nimg=8, sample={"steps": 2, "num_grid": 2,
                                              "solver": "euler_maruyama", "eta": 2.0})  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 0  # grids use the SDE
    out = tmp_path / "s"
    args = ["sample", str(tmp_path / "r"), "--num", "2", "--steps", "3", "--out", str(out)]
    assert main([*args, "--solver", "euler_maruyama", "--eta", "0.5"]) == 0
    assert len(list(out.glob("0*.png"))) == 2
    assert main([*args, "--solver", "euler_maruyama", "--eta", "-1"]) == 2
    assert "--eta -1.0 must be >= 0" in capsys.readouterr().err
    assert main(["train", str(path), "--dry-run", "sample.eta=-1"]) == 2
