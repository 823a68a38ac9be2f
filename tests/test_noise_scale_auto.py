"""``objective.noise_scale: auto`` (the default): JiT's ``image_size/256`` for pixels, 1.0 for
latents, resolved from the data and recorded in the run, so sampling uses the same number."""

from __future__ import annotations

import pytest
import torch
import yaml

from denoiselab.ablate.suite import builtin_suites, load_suite
from denoiselab.cli import main
from denoiselab.config import CONFIG_DIR as CONFIGS  # the shipped configs
from denoiselab.config import ConfigError, from_dict, load_yaml
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.sampling.generate import balanced_labels, generate
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import restore
from denoiselab.train.config import TrainConfig, auto_noise_scale
from denoiselab.train.loop import Trainer, train


def _cfg(**top) -> TrainConfig:
    base = {
        "data": {"name": "shapes", "image_size": 32, "num_images": 16},
        "model": {"name": "JiT-Micro"},
        "ema": {"decays": [0.9]},
        "sample": {"steps": 2, "num_grid": 2},
        "global_batch": 8, "duration_nimg": 8, "log_every_nimg": 8,
        "sample_every_nimg": 10**6, "ckpt_every_nimg": 8,
    }  # fmt: skip
    for key, value in top.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(TrainConfig, base)


@pytest.mark.parametrize(("size", "expected"), [(32, 0.125), (64, 0.25), (256, 1.0), (512, 2.0)])
def test_auto_is_image_size_over_256_for_pixels(size, expected):
    cfg = _cfg(data={"image_size": size}, model={"name": "JiT-Micro", "patch_size": 4})
    assert cfg.objective.noise_scale == "auto"  # the default
    assert cfg.resolved().objective.noise_scale == expected
    assert auto_noise_scale(cfg.data) == expected


def test_auto_is_one_for_latents_and_refused_for_unnormalised_latents():
    from denoiselab.data import DataConfig

    assert auto_noise_scale(DataConfig(name="latents", root="c", image_size=256)) == 1.0
    with pytest.raises(ConfigError, match=r"latent_norm='none'.*set objective.noise_scale"):
        from_dict(TrainConfig, {"data": {"name": "latents", "root": "c", "latent_norm": "none"}})
    pinned = {"data": {"name": "latents", "root": "c", "latent_norm": "none"},
              "objective": {"noise_scale": 0.7}}  # fmt: skip
    assert from_dict(TrainConfig, pinned).resolved().objective.noise_scale == 0.7


def test_a_number_is_kept_and_auto_cannot_build_an_objective():
    cfg = _cfg(objective={"noise_scale": 1.0})
    assert cfg.resolved() is cfg
    with pytest.raises(ValueError, match="noise_scale='auto' must be resolved"):
        DenoisingObjective(ObjectiveConfig(), num_classes=8)
    with pytest.raises(ConfigError, match=r"noise_scale=0\.0 must be > 0 or 'auto'"):
        _cfg(objective={"noise_scale": 0})


def test_run_records_the_resolved_scale_and_its_sampler_uses_it(tmp_path):
    run = train(_cfg(), tmp_path / "r", quiet=True)  # 32 px, noise_scale auto
    recorded = yaml.safe_load((run / "config.yaml").read_text())["objective"]["noise_scale"]
    assert recorded == 0.125
    ck = ckpt_io.load_checkpoint(run)
    assert yaml.safe_load(ck.config_yaml)["objective"]["noise_scale"] == 0.125
    r = restore(run)
    assert r.sampler.noise_scale == 0.125 and r.objective.cfg.noise_scale == 0.125
    # the restored sampler's images start from N(0, 0.125²) noise, not N(0, 1)
    labels = balanced_labels(2, 8)
    x = r.sample(labels, 5, steps=2, cfg_scale=1.0)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    kw = {"null_class": 8, "steps": 2, "cfg_scale": 1.0}
    with torch.no_grad():
        small = generate(r.net, r.objective.velocity, labels, noise * 0.125, **kw)
        unit = generate(r.net, r.objective.velocity, labels, noise, **kw)
    assert torch.equal(x, small) and not torch.allclose(x, unit)


def test_trainer_draws_noise_at_the_resolved_scale(tmp_path):
    trainer = Trainer(_cfg(data={"image_size": 64}, model={"name": "JiT-Micro"}), tmp_path)
    assert trainer.objective.cfg.noise_scale == 0.25
    x = torch.zeros(4096, 3, 1, 1)
    _, eps, _ = trainer.objective.draw(x, torch.zeros(4096, dtype=torch.long), None)
    assert eps.std().item() == pytest.approx(0.25, rel=0.05)


def test_old_checkpoint_with_a_number_keeps_sampling_with_it(tmp_path):
    run = train(_cfg(objective={"noise_scale": 1.0}), tmp_path / "r", quiet=True)
    assert restore(run).sampler.noise_scale == 1.0
    # `--resume` rebuilds the run's own config: the recorded number, not today's "auto" default
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["objective"]["noise_scale"] == 1.0
    assert ckpt_io.load_checkpoint(run).step == 2


def test_shipped_configs_and_suites_pin_the_noise_scale():
    """Changing the default must not change any shipped recipe: each names its number."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        value = load_yaml(path).get("objective", {}).get("noise_scale")
        assert isinstance(value, float), (path.name, value)
    for name in builtin_suites():
        suite = load_suite(name)
        for variant in suite.names:
            value = suite.config(variant).objective.noise_scale
            assert isinstance(value, float), (name, variant, value)
