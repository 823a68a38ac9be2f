"""Teacher encoders through the real loading code: tiny random transformers models of the
real classes saved to disk and loaded back offline, their patch features compared with an
independent computation (preprocessing written out here, tokens sliced by hand); the offline
teacher trained with a reduced recipe; named errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from denoiselab.config import ConfigError
from denoiselab.data import DataConfig
from denoiselab.encoders import TeacherConfig, build_teacher, teacher_weights_id

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers missing")
DATA = DataConfig(name="shapes", image_size=16, num_images=96)
TINY_SSL = {"patch": 4, "steps": 4, "num_train": 64, "num_val": 16, "batch": 8, "width": 16, "depth": 1,
            "heads": 2, "head_dim": 8}  # fmt: skip


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _images(n=3, size=16, channels=3):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def _reference(x, side, mean, std):
    """[-1, 1] → [0, 1] → antialiased bicubic to ``side`` → (u − mean) / std."""
    u = (x.expand(-1, 3, -1, -1) + 1) / 2
    if u.shape[-1] != side:
        u = F.interpolate(u, size=(side, side), mode="bicubic", antialias=True)
    return (u - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


FAMILIES = {  # kind → (config class, model class, config kwargs, tokens before the patches)
    "dinov2": ("Dinov2Config", "Dinov2Model", {"mlp_ratio": 2}, 1),
    "dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                   {"mlp_ratio": 2, "num_register_tokens": 3}, 4),
    "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel",
               {"intermediate_size": 32, "num_register_tokens": 2}, 3),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", {"intermediate_size": 32}, 1),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", {"intermediate_size": 32}, 0),
}  # fmt: skip


@needs_transformers
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("resolution", [None, 24])
def test_transformers_teachers_give_patch_tokens_of_their_own_preprocessing(
    tmp_path, offline, family, resolution
):
    import transformers

    config_cls, model_cls, extra, prefix = FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    config = getattr(transformers, config_cls)(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
        **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(tmp_path / "m")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)  # read from the processor config, not defaults
    (tmp_path / "m" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )
    kind = family.removesuffix("_reg")
    cfg = TeacherConfig(kind=kind, path=str(tmp_path / "m"), resolution=resolution)
    teacher = build_teacher(cfg, DATA, grid=4)  # grid 4 × patch 8 = 32 px when unset
    side = resolution or 32
    assert teacher.resolution == side and teacher.grid == (side // 8, side // 8)
    assert teacher.dim == 16 and not any(p.requires_grad for p in teacher.parameters())
    x = _images()
    features = teacher(x)
    extra_kw = (
        {"interpolate_pos_encoding": True} if kind in ("clip", "siglip") and side != 32 else {}
    )
    with torch.no_grad():
        hidden = model(pixel_values=_reference(x, side, mean, std), **extra_kw).last_hidden_state
    assert hidden.shape[1] == prefix + (side // 8) ** 2
    torch.testing.assert_close(features, hidden[:, prefix:], atol=1e-5, rtol=1e-4)
    assert teacher_weights_id(cfg, DATA) == teacher.weights_id
    assert teacher(_images(channels=1)).shape == features.shape  # grey images: 3 channels


@needs_transformers
def test_a_directory_of_another_family_is_a_named_error(tmp_path, offline):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                              num_attention_heads=1, image_size=16, patch_size=8)  # fmt: skip
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    cfg = TeacherConfig(kind="dinov2", path=str(tmp_path / "clip"))
    with pytest.raises(ConfigError, match=r"k\.teacher: .* holds a 'clip_vision_model' model, not"):
        build_teacher(cfg, DATA, key="k.teacher")


def test_missing_paths_name_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"terms\.repa\.teacher\.path is not set.*dinov2"):
        build_teacher(TeacherConfig(kind="dinov2"), DATA, key="terms.repa.teacher")
    with pytest.raises(ConfigError, match=r"x\.path='.*nope' does not exist"):
        build_teacher(TeacherConfig(kind="siglip", path=str(tmp_path / "nope")), DATA, key="x")
    with pytest.raises(ConfigError, match=r"teacher\.kind='dino'"):
        TeacherConfig(kind="dino")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown key 'step'"):
        TeacherConfig(offline={"step": 3})


def test_offline_teacher_trains_once_is_cached_and_is_not_the_probe(tmp_path):
    from denoiselab.encoders.offline import OfflineEncoder, teacher_path
    from denoiselab.metrics.probe_train import ProbeNet

    cfg = TeacherConfig(offline=TINY_SSL, cache_dir=str(tmp_path))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    teacher = build_teacher(cfg, DATA)
    assert torch.equal(torch.random.get_rng_state(), state)  # training forks the global RNG
    path = teacher_path(DATA, cfg.ssl_config(), tmp_path)
    assert path.is_file() and isinstance(teacher, OfflineEncoder)
    assert not isinstance(teacher.net, ProbeNet)  # a ViT trained label-free, not the judge
    assert teacher.grid == (4, 4) and teacher.dim == 16 and teacher.resolution == 16
    x = _images()
    again = build_teacher(cfg, DATA)  # from the cache: the very same weights
    torch.testing.assert_close(teacher(x), again(x), rtol=0, atol=0)
    assert path.stat().st_mtime == teacher_path(DATA, cfg.ssl_config(), tmp_path).stat().st_mtime
    assert teacher_weights_id(cfg, DATA) == teacher.weights_id
    # flips, workers and the in-memory cache do not change the images: same teacher
    from dataclasses import replace

    assert teacher_weights_id(cfg, replace(DATA, hflip=True, cache=True)) == teacher.weights_id
    assert teacher_weights_id(cfg, replace(DATA, seed=1)) != teacher.weights_id
    with pytest.raises(ConfigError, match="offline teacher runs at the data's side 16"):
        build_teacher(TeacherConfig(offline=TINY_SSL, cache_dir=str(tmp_path), resolution=32), DATA)


def test_ssl_views_keep_the_content_and_the_loss_prefers_matching_views():
    from denoiselab.encoders.ssl import nt_xent, two_views

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    views = two_views(x, g)
    assert views.shape == (12, 3, 16, 16) and views.min() >= 0 and views.max() <= 1
    z = torch.randn(6, 8, generator=g)
    matched = nt_xent(torch.cat([z, z]), 0.2)
    shuffled = nt_xent(torch.cat([z, z.roll(1, 0)]), 0.2)
    assert matched < shuffled
    # NT-Xent written out for one row: −log(exp(s_ip) / Σ_{j≠i} exp(s_ij))
    zz = F.normalize(torch.cat([z, z.roll(1, 0)]), dim=1)
    s = zz @ zz.T / 0.2
    row0 = -(s[0, 6] - torch.logsumexp(torch.cat([s[0, 1:]]), 0))
    rows = [-(s[i, (i + 6) % 12] - torch.logsumexp(s[i][torch.arange(12) != i], 0))
            for i in range(12)]  # fmt: skip
    torch.testing.assert_close(rows[0], row0)
    torch.testing.assert_close(shuffled, torch.stack(rows).mean())
