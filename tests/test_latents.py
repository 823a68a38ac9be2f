"""Latent spaces through their real code paths: fold, autoencoders, cache, dataset, decoding.

The diffusers tests build tiny random VAEs of the real classes, save them with
``save_pretrained`` and load them through ``load_autoencoder`` (local files, safetensors).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from denoiselab.cli import main as cli_main
from denoiselab.config import CONFIG_DIR, ConfigError, from_dict, to_dict
from denoiselab.data import DataConfig, LatentDataset, build_dataset
from denoiselab.data.loader import StepLoader
from denoiselab.latents import (
    LatentCacheError,
    LatentNorm,
    TinyAE,
    TinyAEConfig,
    cache_latents_main,
    decoder_for,
    fold,
    load_autoencoder,
    pixel_data_config,
    read_manifest,
    save_tiny_ae,
    train_ae_main,
    unfold,
)
from denoiselab.latents import cache as cache_mod
from denoiselab.latents.cache import cache_latents
from denoiselab.models.flops import count_params
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.train.build import load_train_config, resolve_model_config
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import Trainer, train

CONFIGS = CONFIG_DIR  # the shipped configs, inside the package
SHAPES16 = DataConfig(name="shapes", image_size=16, num_images=24, seed=3)


@pytest.fixture(scope="module")
def tiny_ae_dir(tmp_path_factory) -> Path:
    """A random (untrained) tiny autoencoder, 16×16×3 ↔ 4×4×4, with non-trivial statistics."""
    torch.manual_seed(0)
    net = TinyAE(TinyAEConfig(widths=(8, 16)))
    out = tmp_path_factory.mktemp("ae")
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.5, 2.0, 1.0, 0.25])
    return save_tiny_ae(net, out, latent_mean=mean, latent_std=std, info={})


@pytest.fixture(scope="module")
def cache_dir(tiny_ae_dir, tmp_path_factory) -> Path:
    """24 shapes encoded in 3 shards of ≤ 10, with flips."""
    out = tmp_path_factory.mktemp("cache")
    cache_latents(SHAPES16, load_autoencoder(tiny_ae_dir), out, batch_size=7, shard_size=10)
    return out


def latents_cfg(root: Path, **fields) -> DataConfig:
    return DataConfig(name="latents", root=str(root), image_size=16, seed=3, **fields)


# -- fold / normalisation ------------------------------------------------------------------------


def test_fold_is_flux2_patchify_and_unfold_inverts_it_exactly():
    z = torch.randn(2, 32, 6, 4)
    f = fold(z)
    assert f.shape == (2, 128, 3, 2)
    for c, i, j, y, x in [(0, 0, 1, 0, 0), (5, 1, 0, 2, 1), (31, 1, 1, 1, 1)]:
        assert f[1, c * 4 + i * 2 + j, y, x] == z[1, c, 2 * y + i, 2 * x + j]
    assert torch.equal(unfold(f), z)
    assert torch.equal(fold(unfold(f)), f)
    with pytest.raises(ValueError, match="5×4 is not divisible by the patch size 2"):
        fold(torch.zeros(1, 2, 5, 4))


def test_latent_norm_round_trip_and_errors():
    norm = LatentNorm.from_values([0.5, -1.0, 2.0], [2.0, 0.5, 1.0], 3)
    z = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(norm.normalize(z)[:, 1], (z[:, 1] + 1.0) / 0.5)
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z)
    assert LatentNorm.from_values(0.1, 4.0, 2) == LatentNorm((0.1, 0.1), (4.0, 4.0))
    with pytest.raises(ValueError, match="shape"):
        norm.normalize(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="scales must be finite and > 0"):
        LatentNorm((0.0,), (0.0,))


# -- tiny autoencoder, cache, dataset --------------------------------------------------------------


def test_tiny_autoencoder_round_trips_through_its_files(tiny_ae_dir):
    ae = load_autoencoder(tiny_ae_dir)
    assert (ae.kind, ae.latent_channels, ae.downsample) == ("tiny", 4, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 4, 4, 4) and ae.decode(z).shape == (2, 3, 16, 16)
    torch.manual_seed(0)
    fresh = TinyAE(TinyAEConfig(widths=(8, 16)))  # the same random init as the fixture
    assert torch.equal(z, fresh.encode(x))
    assert ae.normalization().scale == (0.5, 2.0, 1.0, 0.25)
    with pytest.raises(ValueError, match="divisible by 4; got"):
        ae.encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(ValueError, match="is 'tiny', not kind='flux2'"):
        load_autoencoder(tiny_ae_dir, "flux2")


def test_cache_records_encoder_shards_and_statistics(cache_dir, tiny_ae_dir):
    m = read_manifest(cache_dir)
    assert (m.num_images, m.latent_shape, m.flips, m.image_size) == (24, (4, 4, 4), True, 16)
    assert [s.count for s in m.shards] == [10, 10, 4]
    assert m.encoder.kind == "tiny" and m.encoder.path == str(tiny_ae_dir.resolve())
    ds = LatentDataset(cache_dir, image_size=16, latent_norm="dataset")
    assert (ds.channels, ds.image_size, ds.num_classes, len(ds)) == (4, 4, 8, 24)
    everything = torch.stack([ds.raw(i, f) for i in range(24) for f in (False, True)])
    z = m.norm("dataset").normalize(everything)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (z.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    # decoding undoes the chosen normalisation, then runs the recorded autoencoder
    ae, decode = (
        load_autoencoder(tiny_ae_dir),
        decoder_for(latents_cfg(cache_dir, latent_norm="dataset")),
    )
    expected = ae.decode(everything[:4]).clamp(-1, 1)
    assert torch.allclose(decode(z[:4]), expected, atol=1e-5)
    source = pixel_data_config(latents_cfg(cache_dir))
    assert source == replace(SHAPES16, hflip=None) and pixel_data_config(SHAPES16) is SHAPES16
    one = everything[:1]
    assert decoder_for(SHAPES16)(one) is one  # pixel data decode with the identity


def test_training_from_cache_equals_encoding_on_the_fly(cache_dir, tiny_ae_dir):
    """Same step, same flips: cached latents == normalize(encode(pixels)); same loss."""
    ae = load_autoencoder(tiny_ae_dir)
    pixels = build_dataset(replace(SHAPES16, hflip=True))
    latents = build_dataset(latents_cfg(cache_dir, hflip=True))
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), num_classes=8)
    net = lambda z, t, y: z * 0.5  # noqa: E731 - any fixed function of z_t
    seen_flip = False
    for step in (0, 3):  # step 3 crosses into epoch 1 (batch 7 of 24 images)
        ((_, xs, ys),) = StepLoader(
            pixels, seed=5, global_batch=7, start_step=step, end_step=step + 1
        )
        ((_, zs, ls),) = StepLoader(
            latents, seed=5, global_batch=7, start_step=step, end_step=step + 1
        )
        on_the_fly = ae.normalization().normalize(ae.encode(xs))
        assert torch.equal(ys, ls)
        assert torch.allclose(zs, on_the_fly, atol=1e-5), (zs - on_the_fly).abs().max()
        loss = [
            objective(net, z, ys, torch.Generator().manual_seed(1))["denoise"]
            for z in (zs, on_the_fly)
        ]
        assert torch.allclose(loss[0], loss[1], atol=1e-5)
        unflipped = torch.stack([latents.norm.normalize(latents.raw(int(i))) for i in range(24)])
        seen_flip |= not all(any(torch.equal(z, u) for u in unflipped) for z in zs)
    assert seen_flip, "no batch used a flipped encoding"


def test_cache_resumes_finished_shards_and_refuses_a_changed_encoder(
    tiny_ae_dir, tmp_path, monkeypatch
):
    ae = load_autoencoder(tiny_ae_dir)
    cache_latents(SHAPES16, ae, tmp_path, shard_size=16)
    calls = []
    real = cache_mod._encode_range
    monkeypatch.setattr(
        cache_mod, "_encode_range", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    cache_latents(SHAPES16, ae, tmp_path, shard_size=16)
    assert calls == []  # both shards reused
    other = tmp_path / "other_ae"
    torch.manual_seed(1)
    save_tiny_ae(
        TinyAE(TinyAEConfig(widths=(8, 16))),
        other,
        latent_mean=torch.zeros(4),
        latent_std=torch.ones(4),
        info={},
    )
    cache_latents(SHAPES16, load_autoencoder(other), tmp_path, shard_size=16)
    assert len(calls) == 2  # a different fingerprint re-encodes every shard
    with pytest.raises(LatentCacheError, match="fingerprint"):
        decoder_for(latents_cfg(tmp_path, autoencoder=str(tiny_ae_dir)))
    with pytest.raises(LatentCacheError, match=r"set data\.autoencoder to where it lives now"):
        decoder_for(latents_cfg(tmp_path, autoencoder=str(tmp_path / "moved")))


def test_cache_latents_refuses_bad_sizes_and_an_out_that_holds_other_data(tmp_path, capsys):
    """``--shard-size 0`` was a ZeroDivisionError traceback, a negative one wrote no shard and
    then failed on NaN statistics; ``--out`` on a prepared folder deleted its manifest.json (the
    cache's is written at the end) and left it unusable."""
    import numpy as np

    from denoiselab.data import prepare as prep

    ae = load_autoencoder("identity")
    for kwargs, fragment in (({"shard_size": 0}, "shard_size=0"), ({"batch_size": -1}, "-1")):
        with pytest.raises(ConfigError, match=fragment):
            cache_latents(SHAPES16, ae, tmp_path / "c", **kwargs)
    argv = ["cache-latents", "quickstart", "data.num_images=8", "--autoencoder", "identity"]
    assert cli_main([*argv, "--out", str(tmp_path / "c"), "--shard-size", "0"]) == 2
    assert "shard_size=0 must be >= 1" in capsys.readouterr().err
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "0.png")
    prep.prepare(images.parent, tmp_path / "prep", image_size=16)
    before = (tmp_path / "prep" / "manifest.json").read_text()
    data = DataConfig(name="prepared", root=str(tmp_path / "prep"), image_size=16)
    for out in (tmp_path / "prep", tmp_path / "prep" / "."):  # the data itself
        with pytest.raises(ConfigError, match=r"is in data\.root"):
            cache_latents(data, ae, out)
    folder = DataConfig(name="imagefolder", root=str(images.parent), image_size=16)
    with pytest.raises(ConfigError, match=r"is in data\.root"):  # a class folder-to-be
        cache_latents(folder, ae, images.parent / "latents")
    assert not (images.parent / "latents").exists()
    with pytest.raises(ConfigError, match="not a latent cache's"):
        cache_latents(SHAPES16, ae, tmp_path / "prep")
    assert (tmp_path / "prep" / "manifest.json").read_text() == before
    assert not list((tmp_path / "prep").glob("shard_*"))
    cache_latents(SHAPES16, ae, tmp_path / "c", shard_size=16)  # a cache may be re-run
    cache_latents(SHAPES16, ae, tmp_path / "c", shard_size=16)


def test_the_cache_records_where_its_source_is_from_any_directory(tmp_path, monkeypatch):
    """A latent run's metrics compare with the cache's source pixels (pixel_data_config); a
    relative data.root was recorded as given, so from another directory it was not found."""
    import numpy as np

    from denoiselab.latents import pixel_data_config

    images = tmp_path / "work" / "images" / "a"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "0.png")
    monkeypatch.chdir(tmp_path / "work")
    data = DataConfig(name="imagefolder", root="images", image_size=16)
    cache_latents(data, load_autoencoder("identity"), tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    pixels = pixel_data_config(latents_cfg(tmp_path / "cache"))
    assert pixels.root == str(images.parent) and len(build_dataset(pixels)) == 1


def test_mismatches_fail_when_the_run_is_built(cache_dir, tmp_path):
    cfg = from_dict(
        TrainConfig,
        {
            "data": to_dict(latents_cfg(cache_dir)),
            "model": {
                "name": "JiT-Micro",
                "image_size": 4,
                "patch_size": 1,
                "in_channels": 16,
                "bottleneck": None,
            },
            "global_batch": 4,
            "duration_nimg": 4,
        },
    )
    with pytest.raises(ConfigError, match=r"model.in_channels=16 but the data gives in_channels=4"):
        Trainer(cfg, tmp_path / "r", quiet=True)
    with pytest.raises(LatentCacheError, match=r"data.image_size=32.*set data.image_size=16"):
        build_dataset(replace(latents_cfg(cache_dir), image_size=32))
    with pytest.raises(LatentCacheError, match=r"has no manifest\.json"):
        build_dataset(latents_cfg(tmp_path))
    with pytest.raises(ValueError, match="'latents' needs the latent cache directory"):
        DataConfig(name="latents")
    with pytest.raises(ValueError, match="only used by 'latents'"):
        DataConfig(latent_norm="dataset")


# -- diffusers VAEs (real classes, tiny random weights) --------------------------------------------

_TINY_VAE = dict(
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)


def test_diffusers_vaes_load_encode_decode_and_normalise(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed ([latents] extra)")
    if not hasattr(diffusers, "AutoencoderKLFlux2"):
        pytest.skip(f"diffusers {diffusers.__version__} lacks AutoencoderKLFlux2 (needs ≥ 0.36)")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    # FLUX.1-style AutoencoderKL: 16 channels, 8× down, (z − shift)·scaling
    kl = diffusers.AutoencoderKL(
        latent_channels=16, scaling_factor=0.5, shift_factor=0.1, **_TINY_VAE
    )
    kl.save_pretrained(tmp_path / "flux1", safe_serialization=True)
    ae = load_autoencoder(tmp_path / "flux1")
    assert (ae.kind, ae.latent_channels, ae.downsample) == ("diffusers-kl", 16, 8)
    z = ae.encode(x)
    with torch.no_grad():
        assert torch.allclose(z, kl.encode(x).latent_dist.mode(), atol=1e-6)
    assert z.shape == (2, 16, 4, 4) and ae.decode(z).shape == (2, 3, 32, 32)
    n = ae.normalization()
    assert n.shift == (0.1,) * 16 and n.scale == (2.0,) * 16
    # FLUX.2: 32 channels at 8×, folded to 128 at 16×, BatchNorm running statistics
    f2 = diffusers.AutoencoderKLFlux2(latent_channels=32, **_TINY_VAE)
    f2.bn.running_mean.copy_(torch.randn(128))
    f2.bn.running_var.copy_(torch.rand(128) + 0.5)
    f2.save_pretrained(tmp_path / "flux2" / "vae", safe_serialization=True)
    ae2 = load_autoencoder(tmp_path / "flux2")  # a model repo root: finds vae/
    assert (ae2.kind, ae2.latent_channels, ae2.downsample) == ("flux2", 128, 16)
    with torch.no_grad():
        raw = f2.encode(x).latent_dist.mode()  # [2, 32, 4, 4]
    z2 = ae2.encode(x)
    assert z2.shape == (2, 128, 2, 2) and torch.allclose(z2, fold(raw), atol=1e-6)
    # the pipeline's normalisation: (fold(z) − bn.mean) / sqrt(bn.var + eps)
    expected = (fold(raw) - f2.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        f2.bn.running_var.view(1, -1, 1, 1) + f2.config.batch_norm_eps
    )
    assert torch.allclose(ae2.normalization().normalize(z2), expected, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(ae2.decode(z2), f2.decode(raw).sample, atol=1e-5)
    # a cache from the FLUX.2 VAE decodes back to 32×32 pixels
    data = DataConfig(name="shapes", image_size=32, num_images=3)
    cache_latents(data, ae2, tmp_path / "cache", batch_size=2)
    decode = decoder_for(DataConfig(name="latents", root=str(tmp_path / "cache")))
    ds = build_dataset(DataConfig(name="latents", root=str(tmp_path / "cache")))
    assert ds.channels == 128 and decode(ds[0][0][None]).shape == (1, 3, 32, 32)


# -- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch,tokens", [(1, 256), (2, 64)])
def test_jlt_twins_differ_only_in_the_prediction_target(patch, tokens):
    x = to_dict(load_train_config(CONFIGS / f"jlt_b{patch}_imagenet256.yaml"))
    v = to_dict(load_train_config(CONFIGS / f"jlt_b{patch}_imagenet256_vpred.yaml"))
    assert (x["objective"]["prediction"], v["objective"]["prediction"]) == ("x", "v")
    v["objective"]["prediction"] = "x"
    assert x == v
    cfg = load_train_config(CONFIGS / f"jlt_b{patch}_imagenet256.yaml")
    model = resolve_model_config(cfg, image_size=16, channels=128, num_classes=1000)
    assert model.patch_size == patch and model.grid_size**2 == tokens
    assert 125e6 < count_params(model) < 135e6  # ≈130M (JLT-B)
    with pytest.raises(
        ConfigError, match=r"model\.in_channels=128 but the data gives in_channels=32"
    ):
        resolve_model_config(cfg, image_size=16, channels=32, num_classes=1000)


def test_latent_targets_suite_varies_only_the_prediction():
    from denoiselab.ablate import load_suite

    suite = load_suite("latent_targets")
    configs = {name: to_dict(suite.config(name)) for name in suite.names}
    preds = {name: c["objective"].pop("prediction") for name, c in configs.items()}
    assert preds == {"x": "x", "v": "v", "eps": "eps"}
    assert all(c == configs["x"] for c in configs.values())  # nothing else differs
    assert configs["x"]["data"]["name"] == "latents"


# -- end to end: train-ae → cache-latents → train → sample ------------------------------------------


@pytest.mark.integration
def test_train_ae_cache_train_sample_end_to_end(tmp_path, capsys):
    data = ["data.image_size=16", "data.num_images=32", "arch.widths=[8, 16]"]
    ae = tmp_path / "ae"
    assert train_ae_main([*data, "--out", str(ae), "--steps", "3", "--batch", "4"]) == 0
    cfg = json.loads((ae / "config.json").read_text())
    assert len(cfg["latent_std"]) == 4 and (ae / "recon.png").is_file()
    src = tmp_path / "src.yaml"
    src.write_text(yaml.safe_dump({"data": {"name": "shapes", "image_size": 16, "num_images": 32}}))
    cache = tmp_path / "cache"
    assert cache_latents_main([str(src), "--autoencoder", str(ae), "--out", str(cache)]) == 0
    assert cache_latents_main([str(src), "--out", str(tmp_path / "x")]) == 2
    assert "no autoencoder" in capsys.readouterr().err
    run_cfg = from_dict(
        TrainConfig,
        {
            "data": {"name": "latents", "root": str(cache), "image_size": 16},
            "model": {
                "name": "JiT-Micro",
                "image_size": 4,
                "in_channels": 4,
                "patch_size": 1,
                "bottleneck": None,
            },
            "ema": {"decays": [0.9], "warmup": True},
            "sample": {"steps": 2, "num_grid": 8},
            "global_batch": 8,
            "duration_nimg": 24,
            "log_every_nimg": 8,
            "deterministic": True,
        },
    )
    run = train(run_cfg, tmp_path / "run", quiet=True)
    grid = next((run / "samples").glob("*.png"))
    assert Image.open(grid).size == (8 * 18 + 2, 18 + 2)  # 8 decoded 16×16 images in one row
    out = tmp_path / "samples"
    assert cli_main(["sample", str(run), "--num", "2", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out / "000000.png").size == (16, 16)  # decoded, not the 4×4 latent
