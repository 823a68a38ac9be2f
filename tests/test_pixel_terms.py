"""The perceptual terms (``terms.lpips``, ``terms.pdino``) share one time window, decode and
weighting (``algorithms.pixel_terms.PixelDistanceTerm``): each case below runs for both, so
a regression in the shared part fails for both. The expected values are built here from the
terms' frozen networks called directly on the samples the window should select."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from denoiselab.algorithms import TERMS, TermContext
from denoiselab.algorithms.lpips import LPIPS, LPIPSConfig, LPIPSTerm
from denoiselab.algorithms.pdino import PDINOConfig, PDINOTerm, pdino_distance
from denoiselab.config import ConfigError
from denoiselab.objectives import ObjectiveConfig, StepContext, Triple

from .test_repa import PoolTeacher

WEIGHT, T_MIN = 0.3, 0.5


class _Teacher(PoolTeacher):
    def __init__(self, seen: list[int]) -> None:
        super().__init__(resolution=16, patch=4, dim=6)
        self.seen = seen

    def tokens(self, pixel_values):
        self.seen.append(pixel_values.shape[0])
        return super().tokens(pixel_values)


def _term(kind: str, t_min: float = T_MIN):
    """``(term, batch sizes the frozen network saw, reference distance (a, b) -> [b])``."""
    torch.manual_seed(0)
    seen: list[int] = []
    if kind == "pdino":
        teacher = _Teacher(seen)
        term = PDINOTerm(PDINOConfig(weight=WEIGHT, t_min=t_min), teacher, _Decoder())
        return term, seen, lambda a, b: pdino_distance(teacher, a, b)
    net = LPIPS().eval().requires_grad_(False)
    for lin in net.lins:  # LPIPS heads are ≥ 0 (random init is not)
        lin.weight.abs_()
    net.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    term = LPIPSTerm(LPIPSConfig(weight=WEIGHT, t_min=t_min), net, _Decoder())
    return term, seen, lambda a, b: net(a, b)


class _Decoder:
    """A stand-in for a latent run's decoder: ``tanh`` (differentiable), recording each input
    and whether it ran with gradients enabled."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, bool]] = []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls.append((v.detach().clone(), torch.is_grad_enabled()))
        return torch.tanh(v)


def _ctx(t: torch.Tensor) -> tuple[StepContext, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(t), 3, 16, 16, generator=g)
    xhat = (x + 0.5 * torch.randn(x.shape, generator=g)).requires_grad_(True)
    eps = torch.randn(x.shape, generator=g)
    pred, target = Triple(xhat, eps, xhat - eps), Triple(x, eps, x - eps)
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
    ctx = StepContext(x, torch.arange(len(t)), t, eps, z, xhat, pred, target, {})
    return ctx, x, xhat


@pytest.mark.parametrize("kind", ["pdino", "lpips"])
def test_window_selects_decodes_and_weights_the_same_samples(kind):
    term, seen, distance = _term(kind)
    t = torch.tensor([0.2, 0.6, 0.49, 0.9, 0.5])  # t_min itself is inside (t ≥ t_min)
    ctx, x, xhat = _ctx(t)
    out = term(ctx)
    inside = torch.tensor([1, 3, 4])
    # decoded: x̂ of the samples inside (with graph), then x of the same ones (no graph)
    (d_pred, grad_pred), (d_target, grad_target) = term.decode.calls
    assert torch.equal(d_pred, xhat.detach()[inside]) and grad_pred
    assert torch.equal(d_target, x[inside]) and not grad_target
    assert seen and all(n == len(inside) for n in seen)  # the network saw those only
    with torch.no_grad():
        ref = WEIGHT * distance(torch.tanh(xhat[inside]), torch.tanh(x[inside]))
    expected = torch.zeros(5).index_put((inside,), ref.float())
    assert out.dtype == torch.float32 and out.shape == (5,)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    assert (out[inside] > 0).all() and out[0] == 0 and out[2] == 0
    out.sum().backward()  # gradient reaches x̂ of the samples inside, and only those
    per_sample = xhat.grad.abs().flatten(1).sum(1)
    assert (per_sample[inside] > 0).all() and per_sample[0] == 0 and per_sample[2] == 0


@pytest.mark.parametrize("kind", ["pdino", "lpips"])
def test_no_sample_in_the_window_is_zero_without_decode_or_network(kind):
    term, seen, _ = _term(kind)
    ctx, _, _ = _ctx(torch.tensor([0.1, 0.49, 0.3]))
    out = term(ctx)
    assert torch.equal(out, torch.zeros(3)) and out.dtype == torch.float32
    assert term.decode.calls == [] and seen == []


@pytest.mark.parametrize("kind", ["pdino", "lpips"])
def test_no_window_applies_everywhere(kind):
    term, seen, distance = _term(kind, t_min=0.0)
    ctx, x, xhat = _ctx(torch.tensor([0.0, 0.3, 1.0]))
    out = term(ctx)
    with torch.no_grad():
        ref = WEIGHT * distance(torch.tanh(xhat), torch.tanh(x))
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-7)
    assert all(n == 3 for n in seen)


@pytest.mark.parametrize("config", [PDINOConfig, LPIPSConfig])
def test_both_configs_check_weight_and_window_alike(config):
    key = f"terms.{'pdino' if config is PDINOConfig else 'lpips'}"
    with pytest.raises(ConfigError, match=rf"{key}\.weight=0\.0 must be > 0"):
        config(weight=0.0)
    for t_min in (-0.1, 1.0):
        with pytest.raises(ConfigError, match=rf"{key}\.t_min={t_min} must lie in \[0, 1\)"):
            config(t_min=t_min)


@pytest.mark.parametrize("name", ["pdino", "lpips"])
def test_both_builders_refuse_images_that_are_neither_rgb_nor_grey(name):
    spec = TERMS[name]
    data = SimpleNamespace(name="shapes")
    ctx = TermContext(
        None, ObjectiveConfig(), data, SimpleNamespace(channels=4), torch.device("cpu")
    )
    with pytest.raises(ConfigError, match=rf"terms\.{name} compares RGB or grey images; the data has 4 channels"):  # fmt: skip
        spec.build(spec.config(), ctx)
