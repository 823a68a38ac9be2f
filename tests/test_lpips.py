"""``terms.lpips``: the loader reads torchvision's VGG16 and lpips' linear-head layouts from local
files (random weights saved in those layouts here), the value equals the LPIPS formula written
out independently below, the time window, gradients into the network (through the frozen
autoencoder for latent runs), named errors, and the real training loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from denoiselab.algorithms.lpips import LPIPSConfig, LPIPSTerm, load_lpips
from denoiselab.config import ConfigError, from_dict, to_dict
from denoiselab.data import DataConfig
from denoiselab.latents import (
    TinyAE,
    TinyAEConfig,
    differentiable_decoder,
    load_autoencoder,
    save_tiny_ae,
)
from denoiselab.latents.cache import cache_latents
from denoiselab.models import build_model
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import Trainer, train
from denoiselab.train.run import read_metrics

from .test_train import tiny

CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision vgg16.features convs
WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _random_weights(root: Path, fmt: str, seed: int = 0) -> tuple[Path, Path]:
    """VGG16 in torchvision's state-dict layout (with a classifier to ignore) and LPIPS heads in
    the lpips package's layout, random, saved as ``fmt`` (pth or safetensors)."""
    g = torch.Generator().manual_seed(seed)
    vgg, c_in = {}, 3
    for i, c in zip(CONVS, WIDTHS):
        vgg[f"features.{i}.weight"] = (
            torch.randn(c, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        )
        vgg[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.05
        c_in = c
    vgg["classifier.0.weight"] = torch.randn(8, 8, generator=g)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
           for k, c in enumerate((64, 128, 256, 512, 512))}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    paths = root / f"vgg16.{fmt}", root / f"lin.{fmt}"
    for state, path in zip((vgg, lin), paths):
        save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    return paths


def _formula(vgg: dict, lin: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out: scaling layer, VGG16 convs/ReLU/max-pools to relu5_3, taps at
    relu1_2 … relu5_3, unit-normalised features, squared difference, 1×1 weights, spatial
    mean, sum over the five layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    pools_after, taps_after = {1, 3, 6, 9}, {1, 3, 6, 9, 12}  # positions in CONVS
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    xa, xb = ((x.double() - shift) / scale for x in (a, b))
    tap = 0
    for j, i in enumerate(CONVS):
        w, bias = vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double()
        xa, xb = (F.relu(F.conv2d(x, w, bias, padding=1)) for x in (xa, xb))
        if j in taps_after:
            na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            weights = lin[f"lin{tap}.model.1.weight"].double()
            out += (weights * (na - nb).pow(2)).sum(1).mean((1, 2))
            tap += 1
        if j in pools_after:
            xa, xb = (F.max_pool2d(x, 2) for x in (xa, xb))
    return out


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_lpips_equals_the_written_out_formula(tmp_path: Path, fmt: str) -> None:
    vgg_path, lin_path = _random_weights(tmp_path, fmt)
    net = load_lpips(str(vgg_path), str(lin_path))
    g = torch.Generator().manual_seed(1)
    a, b = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    read = (lambda p: torch.load(p, weights_only=True)) if fmt == "pth" else (lambda p: load_file(str(p)))  # fmt: skip
    vgg, lin = read(vgg_path), read(lin_path)
    value = net(a, b)
    torch.testing.assert_close(value.double(), _formula(vgg, lin, a, b), rtol=1e-4, atol=1e-7)
    assert (value > 0).all() and torch.equal(net(a, a), torch.zeros(3))
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_missing_or_wrong_weights_are_named_config_errors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DENOISELAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"no VGG16 weights at .*cache/lpips/vgg16\.safetensors.*vgg16-397923af\.pth"):  # fmt: skip
        Trainer(tiny(**{"terms.lpips.weight": 1.0}), tmp_path / "r", quiet=True)
    vgg_path, lin_path = _random_weights(tmp_path / "w", "pth")
    with pytest.raises(ConfigError, match=r"no LPIPS linear weights at /nowhere/lin\.pth.*terms\.lpips\.lin"):  # fmt: skip
        load_lpips(str(vgg_path), "/nowhere/lin.pth")
    with pytest.raises(ConfigError, match="do not have the expected layout"):
        load_lpips(str(lin_path), str(lin_path))  # heads given as the VGG file
    with pytest.raises(ConfigError, match=r"terms.lpips.t_min=1.0 must lie in \[0, 1\)"):
        LPIPSConfig(t_min=1.0)
    with pytest.raises(ConfigError, match=r"terms.lpips.weight=0.0 must be > 0"):
        from_dict(
            TrainConfig, {"model": {"name": "JiT-Micro"}, "terms": {"lpips": {"weight": 0.0}}}
        )


def test_time_window_value_and_gradient(tmp_path: Path) -> None:
    vgg_path, lin_path = _random_weights(tmp_path, "safetensors")
    net_lpips = load_lpips(str(vgg_path), str(lin_path))
    term = LPIPSTerm(LPIPSConfig(weight=0.5, t_min=0.5), net_lpips, lambda x: x)
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10, [term])
    model = build_model("JiT-Micro")
    with torch.no_grad():  # leave the zero init so that x̂ depends on the weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.arange(4)
    t = torch.tensor([0.2, 0.6, 0.49, 0.9])
    eps = torch.randn_like(x)
    out = objective.terms(model, x, y, t, eps)
    with torch.no_grad():
        z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
        xhat = model(z, t, y)  # x-prediction: the raw output is x̂
        expected = 0.5 * net_lpips(xhat, x) * (t >= 0.5)
    torch.testing.assert_close(out["lpips"], expected, rtol=1e-5, atol=1e-7)
    assert out["lpips"][0] == 0 and out["lpips"][2] == 0 and (out["lpips"][[1, 3]] > 0).all()
    out["lpips"].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ae_dir = save_tiny_ae(TinyAE(TinyAEConfig(widths=(8, 16))), tmp_path_factory.mktemp("ae"),
                          latent_mean=torch.zeros(4), latent_std=torch.full((4,), 0.5), info={})  # fmt: skip
    out = tmp_path_factory.mktemp("cache")
    data = DataConfig(name="shapes", image_size=16, num_images=16, seed=3)
    cache_latents(data, load_autoencoder(ae_dir), out, batch_size=8, shard_size=16)
    return out


def _latent_cfg(cache: Path, vgg: Path, lin: Path, **extra) -> TrainConfig:
    data = DataConfig(name="latents", root=str(cache), image_size=16, seed=3)
    model = {"name": "JiT-Micro", "patch_size": 1, "bottleneck": None}
    return from_dict(TrainConfig, {**to_dict(tiny()), "data": to_dict(data), "model": model,
                                   "terms": {"lpips": {"vgg": str(vgg), "lin": str(lin)}}, **extra})  # fmt: skip


def test_latent_runs_decode_through_the_autoencoder_with_gradients(latent_cache, tmp_path) -> None:
    vgg_path, lin_path = _random_weights(tmp_path, "pth")
    cfg = _latent_cfg(latent_cache, vgg_path, lin_path)
    trainer = Trainer(cfg, tmp_path / "r", quiet=True)
    (term,) = trainer.objective.extra_terms
    decode = differentiable_decoder(cfg.data)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    pixels = term.decode(z)  # the term's decoder: the run's autoencoder, with gradients
    assert pixels.shape == (2, 3, 16, 16)
    torch.testing.assert_close(pixels.detach().clamp(-1, 1), trainer.decode(z.detach()))
    pixels.pow(2).sum().backward()
    assert z.grad.abs().sum() > 0
    zt, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    ref = term.net(decode(zt), decode(target))
    torch.testing.assert_close(term.net(term.decode(zt), term.decode(target)), ref)


@pytest.mark.slow
def test_lpips_trains_through_the_loop_on_pixels_and_latents(latent_cache, tmp_path) -> None:
    vgg_path, lin_path = _random_weights(tmp_path, "safetensors")
    paths = {"terms.lpips.vgg": str(vgg_path), "terms.lpips.lin": str(lin_path)}
    for run, cfg in (
        ("pixels", tiny(duration_nimg=32, **paths, **{"terms.lpips.t_min": 0.3})),
        ("latents", _latent_cfg(latent_cache, vgg_path, lin_path, duration_nimg=32)),
    ):
        out = train(cfg, tmp_path / run, quiet=True)
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss/lpips" in r]
        assert rows and all(r["loss/lpips"] > 0 for r in rows), run
