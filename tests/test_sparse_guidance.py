"""Sparse guidance (a routing network guided by its routed self, both conditional): the velocity
against the formula computed from explicit network calls with the same seeded routes, the
interval, the sampler and CLI paths, and the named errors."""

from __future__ import annotations

import pytest
import torch

from denoiselab.cli import main
from denoiselab.models.routing import RouteSampler
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.sampling.guidance import SparseGuidance
from denoiselab.train.build import restore
from denoiselab.train.loop import train

from .test_routing import _net, routed


def test_velocity_is_the_weak_branch_pushed_toward_the_full_one() -> None:
    net = _net("tread")
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10)
    routes = RouteSampler.for_model(net.config)
    y = torch.arange(3)
    gen = torch.Generator().manual_seed(7)
    fn = SparseGuidance(net, objective.velocity, y, lambda b: routes(b, gen, "cpu"), 3.0)
    z = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        v = fn(z, 0.5)
        t = torch.full((3,), 0.5)
        keep = routes(3, torch.Generator().manual_seed(7), "cpu")  # the same draw
        v_full = objective.velocity(net(z, t, y), z, t)
        v_weak = objective.velocity(net(z, t, y, route=keep), z, t)
    torch.testing.assert_close(v, v_weak + 3.0 * (v_full - v_weak), rtol=1e-5, atol=1e-5)
    assert (v - v_full).abs().max() > 1e-3 and fn.images_evaluated == 6
    with torch.no_grad():
        outside = fn(z, 0.05)  # below the interval's lower end: the full network alone
    torch.testing.assert_close(outside, objective.velocity(net(z, t * 0.1, y), z, t * 0.1))
    assert fn.images_evaluated == 9


@pytest.mark.slow
def test_sampling_and_cli_with_sparse_guidance(tmp_path, capsys) -> None:
    run = train(routed("tread"), tmp_path / "r", quiet=True)
    r = restore(run)
    labels = torch.arange(4)
    a = r.sample(labels, 3, steps=3, cfg_scale=2.0, guidance="sparse", sparse_ratio=0.5)
    b = r.sample(labels, 3, steps=3, cfg_scale=2.0, guidance="sparse", sparse_ratio=0.5)
    c = r.sample(labels, 3, steps=3, cfg_scale=2.0, guidance="sparse", sparse_ratio=0.25)
    plain = r.sample(labels, 3, steps=3, cfg_scale=1.0, guidance="sparse")
    assert torch.equal(a, b) and not torch.equal(a, c)  # routes seeded by the sampling seed
    assert torch.equal(plain, r.sample(labels, 3, steps=3))  # ω = 1: the full network alone
    assert main(["sample", str(run), "--num", "2", "--steps", "2", "--cfg", "2",
                 "--guidance", "sparse", "--sparse-ratio", "0.5", "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    assert (tmp_path / "s" / "grid.png").is_file()
    with pytest.raises(
        ValueError, match=r"sparse_ratio=1.0 \(--sparse-ratio\) must lie in \(0, 1\)"
    ):
        r.sample(labels, 3, steps=2, cfg_scale=2.0, guidance="sparse", sparse_ratio=1.0)
    dense = restore(train(routed("none"), tmp_path / "d", quiet=True))
    with pytest.raises(ValueError, match=r"has model\.routing\.kind: none"):
        dense.sample(labels, 3, steps=2, cfg_scale=2.0, guidance="sparse")
    with pytest.raises(ValueError, match="guidance='pag'; valid: cfg, sparse"):
        dense.sample(labels, 3, steps=2, guidance="pag")


@pytest.mark.parametrize("ratio", [0.0, 0.01, 1.0, -0.5])
def test_a_sparse_ratio_that_routes_no_token_or_all_is_a_named_error(ratio) -> None:
    # JiT-Micro's 4×4 grid: ratio 0.01 skips round(0.16) = 0 tokens, so the weak pass would
    # be the full network and guidance would silently do nothing (v = v_f)
    from denoiselab.sampling.generate import Sampler

    net = _net("tread")
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10)
    cfg = net.config
    sampler = Sampler(
        net, objective.velocity, (cfg.in_channels, cfg.image_size, cfg.image_size),
        num_classes=10, noise_scale=1.0, decode=lambda x: x,
        routes=RouteSampler.for_model(cfg),
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"sparse_ratio={ratio!r}"):
        sampler(torch.arange(2), 0, steps=2, cfg_scale=2.0, guidance="sparse", sparse_ratio=ratio)
