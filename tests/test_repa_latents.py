"""REPA on latents: ``cache-latents --teacher`` stores the teacher's features of the original
pixels (both flips), the latent dataset returns them as a batch extra, the loop hands them to
the term; the targets equal the teacher run on the very pixels of the same step and flip."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from denoiselab.algorithms import TermContext, build_terms, parse_terms
from denoiselab.config import ConfigError, from_dict
from denoiselab.data import DataConfig, build_dataset
from denoiselab.data.loader import StepLoader
from denoiselab.encoders import TeacherConfig, build_teacher
from denoiselab.latents import TinyAE, TinyAEConfig, load_autoencoder, read_manifest, save_tiny_ae
from denoiselab.latents.cache import cache_latents, cache_latents_main
from denoiselab.models import model_config
from denoiselab.objectives import ObjectiveConfig, StepContext
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

SHAPES16 = DataConfig(name="shapes", image_size=16, num_images=24, seed=3)
TINY_SSL = {"patch": 4, "steps": 3, "num_train": 16, "num_val": 4, "batch": 8, "width": 16, "depth": 1,
            "heads": 2, "head_dim": 8}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("repa_latents")
    torch.manual_seed(0)
    ae_dir = save_tiny_ae(TinyAE(TinyAEConfig(widths=(8, 16))), root / "ae",
                          latent_mean=torch.zeros(4), latent_std=torch.ones(4), info={})  # fmt: skip
    tcfg = TeacherConfig(offline=TINY_SSL, cache_dir=str(root / "teachers"))
    teacher = build_teacher(tcfg, SHAPES16)
    cache = root / "cache"
    cache_latents(SHAPES16, load_autoencoder(ae_dir), cache, batch_size=7, shard_size=10,
                  teacher=teacher)  # fmt: skip
    plain = root / "plain"
    cache_latents(SHAPES16, load_autoencoder(ae_dir), plain, batch_size=7, shard_size=10)
    return {"root": root, "ae": ae_dir, "tcfg": tcfg, "teacher": teacher, "cache": cache,
            "plain": plain}  # fmt: skip


def _latent_data(root, **fields):
    return DataConfig(name="latents", root=str(root), image_size=16, seed=3, **fields)


def test_cached_features_are_the_teachers_of_the_same_pixels_and_flip(setup):
    teacher = setup["teacher"]
    assert read_manifest(setup["cache"]).teacher == teacher.identity()
    pixels = build_dataset(replace(SHAPES16, hflip=True))
    latents = build_dataset(_latent_data(setup["cache"], hflip=True))
    assert latents[0][:2] and len(latents[0]) == 2  # pairs unless extras are requested
    latents.request_extras(("teacher",))
    flipped = 0
    for step in (0, 3):  # step 3 crosses into epoch 1
        ((_, xs, _),) = StepLoader(pixels, seed=5, global_batch=7, start_step=step,
                                   end_step=step + 1)  # fmt: skip
        loader = StepLoader(latents, seed=5, global_batch=7, start_step=step, end_step=step + 1)
        ((_, _, _, extras),) = loader.iter_with_extras()
        assert extras["teacher"].shape == (7, 16, 16)
        torch.testing.assert_close(extras["teacher"], teacher(xs), atol=1e-5, rtol=1e-5)
        unflipped = torch.stack([latents.raw(int(i), what="teacher") for i in range(24)])
        flipped += sum(not any(torch.equal(f, u) for u in unflipped) for f in extras["teacher"])
    assert flipped, "no batch used a mirrored image's features"


def _ctx(data):
    mc = model_config("JiT-Micro", image_size=4, in_channels=4, patch_size=1, bottleneck=None)
    return mc, TermContext(mc, ObjectiveConfig(), data, build_dataset(data), torch.device("cpu"))


def test_repa_on_latents_uses_the_cached_features_and_checks_the_teacher(setup):
    tcfg = {"offline": TINY_SSL, "cache_dir": setup["tcfg"].cache_dir}
    _, ctx = _ctx(_latent_data(setup["cache"]))
    (term,) = build_terms(parse_terms({"repa": {"block": 1, "teacher": tcfg}}), ctx)
    assert term.teacher is None and ctx.dataset.extras == ("teacher",)
    assert term.teacher_grid == (4, 4) and term.grid == (4, 4)
    other = {**tcfg, "offline": {**TINY_SSL, "steps": 4}}
    with pytest.raises(ConfigError, match="does not match the teacher whose features the cache"):
        build_terms(
            parse_terms({"repa": {"teacher": other}}), _ctx(_latent_data(setup["cache"]))[1]
        )
    with pytest.raises(ConfigError, match="has none: re-cache with `denoiselab cache-latents"):
        build_terms(parse_terms({"repa": {"teacher": tcfg}}), _ctx(_latent_data(setup["plain"]))[1])
    # the term's targets on latents (cached features) == on pixels (teacher forward)
    feats = torch.stack([ctx.dataset.raw(i, what="teacher") for i in range(4)])
    x = torch.stack([build_dataset(SHAPES16)[i][0] for i in range(4)])
    pix = build_terms(parse_terms({"repa": {"block": 1, "teacher": tcfg}}),
                      TermContext(model_config("JiT-Micro", image_size=16), ObjectiveConfig(),
                                  SHAPES16, build_dataset(SHAPES16), torch.device("cpu")))[0]  # fmt: skip
    blank = dict.fromkeys(("y", "t", "eps", "z_t", "net_out", "pred", "target"))
    a = term.targets(StepContext(x=None, hidden={}, extras={"teacher": feats}, **blank))
    b = pix.targets(StepContext(x=x, hidden={}, **blank))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_jlt_with_repa_trains_from_the_cache_without_a_teacher_forward(setup, tmp_path):
    cfg = from_dict(TrainConfig, {
        "data": {"name": "latents", "root": str(setup["cache"]), "image_size": 16},
        "model": {"name": "JiT-Micro", "image_size": 4, "in_channels": 4, "patch_size": 1,
                  "bottleneck": None},
        "ema": {"decays": [0.9]}, "sample": {"steps": 2, "num_grid": 4},
        "global_batch": 8, "grad_accum": 2, "duration_nimg": 24, "log_every_nimg": 8,
        "deterministic": True,
        "terms": {"repa": {"block": 1, "teacher": {"offline": TINY_SSL,
                                                    "cache_dir": setup["tcfg"].cache_dir}}},
    })  # fmt: skip
    import denoiselab.encoders.base as base

    calls = []
    orig = base.ImageEncoder.forward
    base.ImageEncoder.forward = lambda self, x: calls.append(1) or orig(self, x)
    try:
        run = train(cfg, tmp_path / "run", quiet=True)
    finally:
        base.ImageEncoder.forward = orig
    assert not calls
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(r["loss/repa"] != 0 for r in rows)


def test_cache_latents_cli_teacher_flags(setup, tmp_path, capsys):
    import yaml

    src = tmp_path / "src.yaml"
    src.write_text(yaml.safe_dump({"data": {"name": "shapes", "image_size": 16, "num_images": 8}}))
    args = [str(src), "--autoencoder", str(setup["ae"]), "--out", str(tmp_path / "c")]
    assert cache_latents_main([*args, "--teacher", "dinov2"]) == 2
    assert "teacher.path is not set" in capsys.readouterr().err


def test_pretrained_teacher_ids_hash_the_weights_and_old_caches_still_open(setup, tmp_path):
    """A Hugging Face teacher's weights_id changes with its weights, not only with its config
    and file sizes: features cached from another checkpoint of the same architecture are
    refused (they were accepted when the id was config + names + sizes); a cache made before,
    which recorded that older id for these very weights, still opens."""
    pytest.importorskip("transformers")
    from dataclasses import replace as dc_replace

    from transformers import Dinov2Config, Dinov2Model

    from denoiselab.encoders.hf import legacy_dir_id, weights_fingerprint
    from denoiselab.latents.manifest import write_manifest

    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          mlp_ratio=2, image_size=16, patch_size=4)  # fmt: skip
    dirs = {}
    for seed in (0, 1):  # the same architecture, other weights (a fine-tune, a retrain)
        torch.manual_seed(seed)
        Dinov2Model(config).eval().save_pretrained(tmp_path / f"dino{seed}")
        dirs[seed] = tmp_path / f"dino{seed}"
    assert legacy_dir_id(dirs[0]) == legacy_dir_id(dirs[1])  # blind to the weights
    assert weights_fingerprint(dirs[0]) != weights_fingerprint(dirs[1])
    teacher = build_teacher(TeacherConfig(kind="dinov2", path=str(dirs[0])), SHAPES16)
    cache = tmp_path / "cache"
    cache_latents(SHAPES16, load_autoencoder(setup["ae"]), cache, batch_size=12, shard_size=24,
                  teacher=teacher)  # fmt: skip

    def build(path):
        teacher_cfg = {"kind": "dinov2", "path": str(path)}
        return build_terms(parse_terms({"repa": {"block": 1, "teacher": teacher_cfg}}),
                           _ctx(_latent_data(cache))[1])  # fmt: skip

    assert build(dirs[0])[0].teacher is None  # the cached features serve
    with pytest.raises(ConfigError, match="does not match the teacher whose features the cache"):
        build(dirs[1])
    manifest = read_manifest(cache)  # as written before ids hashed the weights
    old = dc_replace(manifest, teacher={**manifest.teacher, "weights_id": legacy_dir_id(dirs[0])})
    write_manifest(cache, old)
    assert build(dirs[0])[0].teacher is None
    write_manifest(
        cache, dc_replace(manifest, teacher={**manifest.teacher, "weights_id": "0" * 16})
    )
    with pytest.raises(ConfigError, match="does not match the teacher whose features the cache"):
        build(dirs[0])
