"""Text runs on latent caches: the cache stores each image's caption(s); a text run trained on
the cache reads the pixel dataset's captions (flip variants included), resumes exactly, and an
imagefolder's caption files (metadata.jsonl, .txt, missing ones) survive caching."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denoiselab.config import apply_overrides, from_dict
from denoiselab.data import DataConfig, build_dataset
from denoiselab.latents import LatentCacheError, TinyAE, TinyAEConfig, load_autoencoder
from denoiselab.latents import save_tiny_ae as save_ae
from denoiselab.latents.cache import cache_latents
from denoiselab.latents.manifest import read_manifest, write_manifest
from denoiselab.text import build_vocab, tokenizer_for
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import Trainer, train
from denoiselab.train.run import read_metrics

SHAPES = DataConfig(name="shapes", image_size=16, num_images=24, seed=3, hflip=True)


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ae")
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.5, 2.0, 1.0, 0.25])
    return save_ae(
        TinyAE(TinyAEConfig(widths=(8, 16))), out, latent_mean=mean, latent_std=std, info={}
    )


@pytest.fixture(scope="module")
def shapes_cache(ae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    cache_latents(SHAPES, load_autoencoder(ae_dir), out, batch_size=7, shard_size=10)
    return out


def latent_text_cfg(root: Path, *overrides: str) -> TrainConfig:
    raw = {
        "data": {"name": "latents", "root": str(root), "image_size": 16, "seed": 3},
        "model": {"name": "JiT-Micro-T2I", "image_size": 4, "patch_size": 1, "in_channels": 4,
                  "bottleneck": None, "text": {"mode": "joint", "encoder": "words"}},
        "objective": {"label_drop": 0.1, "noise_scale": 1.0},
        "optim": {"lr": 1e-3, "warmup_epochs": 0.25, "grad_clip": 1.0},
        "ema": {"decays": [0.9], "warmup": True},
        "sample": {"steps": 2, "num_grid": 2},
        "global_batch": 8, "duration_nimg": 48, "log_every_nimg": 8,
        "sample_every_nimg": 1_000_000, "ckpt_every_nimg": 24, "deterministic": True,
    }  # fmt: skip
    return from_dict(TrainConfig, apply_overrides(raw, list(overrides)))


def test_cache_stores_the_pixel_captions_of_each_flip_variant(shapes_cache):
    pixels = build_dataset(SHAPES)
    latents = build_dataset(DataConfig(name="latents", root=str(shapes_cache), image_size=16,
                                       seed=3, hflip=True))  # fmt: skip
    m = read_manifest(shapes_cache)
    assert m.captions == {"source": "dataset", "missing": 0, "follow_flips": True}
    assert latents.captions_follow_flips
    differ = 0
    for i in range(len(pixels)):
        assert latents.caption(i) == pixels.caption(i)
        for epoch in range(4):
            assert latents.caption(i, epoch) == pixels.caption(i, epoch), (i, epoch)
        differ += latents.caption_variant(i, True) != latents.caption_variant(i, False)
    assert differ > 0, "no image whose mirrored caption differs (left/right)"


def test_text_run_on_a_latent_cache_trains_resumes_exactly_and_reads_its_captions(
    shapes_cache, tmp_path
):
    cfg = latent_text_cfg(shapes_cache)
    trainer = Trainer(cfg, tmp_path / "probe", quiet=True)
    pixels = build_dataset(SHAPES)
    vocab, longest = build_vocab(pixels.caption_variant(i, m) for i in range(24) for m in (0, 1))
    assert trainer.model_cfg.text.vocab == vocab and trainer.model_cfg.text.max_len == longest
    tokenize = tokenizer_for(trainer.model_cfg.text)
    for i in range(24):  # the condition of item i in epoch e is its pixel caption's ids
        for epoch in (0, 1):
            _, ids = trainer.dataset.get_item(i, epoch)
            assert torch.equal(ids, tokenize([pixels.caption(i, epoch)])[0])
    full = train(cfg, tmp_path / "full", quiet=True)
    half = train(replace(cfg, duration_nimg=24), tmp_path / "half", quiet=True)
    resumed = train(cfg, tmp_path / "half", resume=half, quiet=True)
    losses = [[r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (full, resumed)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert all(np.isfinite(losses[0]))
    from denoiselab.train import checkpoint as ckpt_io

    a, b = ckpt_io.load_checkpoint(full), ckpt_io.load_checkpoint(resumed)
    assert "cond_embedder.words.weight" in a.model
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_a_cache_without_captions_is_a_named_error_for_text_runs(shapes_cache, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in shapes_cache.iterdir():
        (old / f.name).symlink_to(f)
    (old / "manifest.json").unlink()
    write_manifest(old, replace(read_manifest(shapes_cache), captions=None))
    with pytest.raises(LatentCacheError, match="stores no captions"):
        Trainer(latent_text_cfg(old), tmp_path / "r", quiet=True)


def test_imagefolder_captions_and_missing_ones_survive_caching(ae_dir, tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{k}.png")
    meta = [{"file_name": f"{k}.png", "text": f"photo number {k}"} for k in range(4)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(e) + "\n" for e in meta))
    (root / "4.txt").write_text("a sidecar caption é\n")  # 5.png has none
    data = DataConfig(name="imagefolder", root=str(root), image_size=16, hflip=False)
    pixels = build_dataset(data)
    m = cache_latents(data, load_autoencoder(ae_dir), tmp_path / "c", shard_size=4)
    assert m.captions == {"source": "files", "missing": 1, "follow_flips": False}
    with caplog.at_level(logging.WARNING):
        latents = build_dataset(
            DataConfig(name="latents", root=str(tmp_path / "c"), image_size=16, hflip=False)
        )
    assert "1 of 6 cached images have no caption" in caplog.text
    assert latents.missing_captions == 1
    got = [latents.caption(i) for i in range(6)]
    assert got == [pixels.caption(i) for i in range(6)]
    assert got[4] == "a sidecar caption é" and got[5] == "" and got[0] == "photo number 0"
    # an edited caption file re-encodes its shard when the cache is written again
    (root / "4.txt").write_text("an edited caption\n")
    cache_latents(data, load_autoencoder(ae_dir), tmp_path / "c", shard_size=4)
    again = DataConfig(name="latents", root=str(tmp_path / "c"), image_size=16, hflip=False)
    assert build_dataset(again).caption(4) == "an edited caption"


def test_t2i_prx_256_latent_config_validates_and_info_counts_its_parameters(tmp_path, capsys):
    """The shipped 256-px latent recipe: dry-run validates it; on a captioned imagefolder cached
    into 16×16×128 latents (a FLUX.2 VAE's folded shape, made by a tiny AE) with a tiny T5
    encoder, ``info`` counts PRX-1.2B with patch 1, 128 input channels and D_text = 16."""
    from denoiselab.cli import main
    from denoiselab.models.flops import count_params
    from denoiselab.models.registry import model_config
    from denoiselab.text import TextConfig

    from .test_text_encoders import _save

    assert main(["train", "t2i_prx_256_latent", "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "name: PRX-1.2B/2" in shown and "name: latents" in shown and "encoder: auto" in shown
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        pixels = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{k}.png")
        (root / f"{k}.txt").write_text("a small red circle")
    torch.manual_seed(0)
    ae = save_ae(TinyAE(TinyAEConfig(latent_channels=128, patch=16, widths=(8,))), tmp_path / "ae",
                 latent_mean=torch.zeros(128), latent_std=torch.ones(128), info={})  # fmt: skip
    data = DataConfig(name="imagefolder", root=str(root), image_size=256, hflip=False)
    m = cache_latents(data, load_autoencoder(ae), tmp_path / "c", flips=False)
    assert m.latent_shape == (128, 16, 16)
    t5 = _save("t5", tmp_path / "t5")
    argv = ["info", "t2i_prx_256_latent", f"data.root={tmp_path / 'c'}", f"model.text.path={t5}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "input: 128×16×16, patch 1" in out and "tokens: 256" in out
    assert "encoder auto (D_text 16, 128 tokens)" in out
    text = TextConfig(mode="joint", encoder="auto", path=str(t5), dim=16, max_len=128)
    ref = model_config("PRX-1.2B/2", image_size=16, in_channels=128, patch_size=1, text=text)
    n = count_params(ref)
    assert 1.15e9 < n < 1.25e9 and f"params: {n / 1e6:.1f}M" in out


def test_text_metrics_of_a_latent_shapes_run_score_its_shapes_source(shapes_cache, tmp_path):
    """A text run on a latent cache of ``shapes`` draws shapes scenes: clipscore scores it on
    the held-out shapes prompts and compositional judges it, as on pixels (the data config
    was read as written, ``latents``: clipscore took training captions and compositional
    refused the run)."""
    from denoiselab.cli import main
    from denoiselab.evaluation_clip import eval_prompts
    from denoiselab.metrics import shapes_prompts

    run = train(latent_text_cfg(shapes_cache, "duration_nimg=16"), tmp_path / "run", quiet=True)
    texts, source = eval_prompts(latent_text_cfg(shapes_cache).data, 4, 0)
    assert source.startswith("shapes_prompts")
    assert texts == [p.prompt for p in shapes_prompts(SHAPES, 4, 0)]
    out = tmp_path / "e"
    argv = ["eval", str(run), "--metrics", "compositional", "--num", "2", "--batch", "2",
            "--steps", "1", "--probe-steps", "5", "--cache-dir", str(tmp_path / "c"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["compositional"]["num"] == 2 and "compositional/shape" in result["metrics"]
