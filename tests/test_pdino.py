"""``terms.pdino``: the distance against its formula written out in float64 through a tiny
random DINOv2 of the real class (saved and loaded by the real code), the time window, where
gradients go (the network, never the teacher), named errors, the teacher kept out of
checkpoints, and pixel and latent runs through the real loop."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from denoiselab.algorithms import parse_terms
from denoiselab.algorithms.pdino import PDINOConfig, PDINOTerm, pdino_distance
from denoiselab.config import ConfigError, from_dict, to_dict
from denoiselab.data import DataConfig
from denoiselab.encoders import TeacherConfig, build_teacher
from denoiselab.models import build_model
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import Trainer, train
from denoiselab.train.run import read_metrics

from .test_lpips import latent_cache  # noqa: F401 - the module's latent cache fixture
from .test_repa import TINY_SSL, PoolTeacher
from .test_train import tiny

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers missing"
)
DATA = DataConfig(name="shapes", image_size=16, num_images=64)


def _tiny_dinov2(root: Path) -> Path:
    """A random 1-layer DINOv2 with registers (patch 8, 16 wide), saved like a hub download."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
        mlp_ratio=2, num_register_tokens=2,
    )  # fmt: skip
    torch.manual_seed(0)
    Dinov2WithRegistersModel(config).eval().save_pretrained(root / "dino")
    return root / "dino"


@needs_transformers
def test_distance_equals_the_written_out_formula(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import Dinov2WithRegistersModel

    path = _tiny_dinov2(tmp_path)
    teacher = build_teacher(TeacherConfig(kind="dinov2", path=str(path), resolution=32), DATA)
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 3, 16, 16, generator=g) * 2.4 - 1.2  # some pixels outside [-1, 1]
    target = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    got = pdino_distance(teacher, pred, target)
    # independent: clamp, [0, 1], bicubic antialiased to 32, ImageNet mean/std, 1 + 2 prefix
    model = Dinov2WithRegistersModel.from_pretrained(path).double().eval()
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float64).view(1, 3, 1, 1)

    def feats(img):
        u = (img.clamp(-1, 1).double() + 1) / 2
        u = F.interpolate(u, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
        with torch.no_grad():
            return model(pixel_values=(u - mean) / std).last_hidden_state[:, 3:]

    a, b = feats(pred), feats(target)
    assert a.shape == (3, 16, 16)
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        for p in range(16):
            expected[i] += 1 - (a[i, p] @ b[i, p]) / (a[i, p].norm() * b[i, p].norm())
    expected /= 16
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    assert pdino_distance(teacher, target, target).abs().max() < 1e-5  # 0 at the target


def _model():
    model = build_model("JiT-Micro")
    with torch.no_grad():  # off the zero init, so that x̂ depends on the weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _step(term, t):
    objective = DenoisingObjective(ObjectiveConfig(noise_scale=1.0), 10, [term])
    model = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(len(t), 3, 16, 16, generator=g) * 2 - 1
    y = torch.arange(len(t))
    eps = torch.randn(x.shape, generator=g)
    return objective.terms(model, x, y, t, eps), model, (x, y, t, eps)


def test_time_window_value_and_gradients_reach_the_network_not_the_teacher():
    torch.manual_seed(0)
    teacher = PoolTeacher(resolution=16, patch=4, dim=6)
    term = PDINOTerm(PDINOConfig(weight=0.5, t_min=0.5), teacher, lambda v: v)
    out, model, (x, y, t, eps) = _step(term, torch.tensor([0.2, 0.6, 0.49, 0.9]))
    with torch.no_grad():
        z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
        xhat = model(z, t, y)  # x-prediction: the raw output is x̂
        expected = 0.5 * pdino_distance(teacher, xhat, x) * (t >= 0.5)
    torch.testing.assert_close(out["pdino"], expected, rtol=1e-5, atol=1e-7)
    assert out["pdino"][0] == 0 and out["pdino"][2] == 0 and (out["pdino"][[1, 3]] > 0).all()
    out["pdino"].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    # no sample inside the window: zeros and no teacher forward at all
    calls = teacher.calls
    out, _, _ = _step(term, torch.tensor([0.1, 0.3]))
    assert teacher.calls == calls and torch.equal(out["pdino"], torch.zeros(2))


def test_named_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"terms\.pdino\.weight=0\.0 must be > 0"):
        parse_terms({"pdino": {"weight": 0.0}})
    with pytest.raises(ConfigError, match=r"terms\.pdino\.t_min=1\.0 must lie in \[0, 1\)"):
        parse_terms({"pdino": {"t_min": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'wieght' in terms\.pdino"):
        parse_terms({"pdino": {"wieght": 1}})
    cfg = tiny(**{"terms.pdino.teacher.kind": "dinov2"})
    with pytest.raises(ConfigError, match=r"terms\.pdino\.teacher\.path is not set"):
        Trainer(cfg, tmp_path / "r", quiet=True)


def _offline(cache: Path) -> dict:
    return {"weight": 0.05, "teacher": {"offline": TINY_SSL, "cache_dir": str(cache)}}


def _latent_cfg(cache: Path, teacher_cache: Path, **extra) -> TrainConfig:
    data = DataConfig(name="latents", root=str(cache), image_size=16, seed=3)
    model = {"name": "JiT-Micro", "patch_size": 1, "bottleneck": None}
    return from_dict(TrainConfig, {**to_dict(tiny()), "data": to_dict(data), "model": model,
                                   "terms": {"pdino": _offline(teacher_cache)}, **extra})  # fmt: skip


@pytest.mark.slow
def test_pdino_trains_through_the_loop_on_pixels_and_latents(latent_cache, tmp_path) -> None:  # noqa: F811
    """The offline teacher (trained once into a temporary cache; on the cache's source
    pixels for latents) through the real loop: the term is logged, gradients flow through
    the autoencoder's decoder, and nothing of the teacher is checkpointed."""
    pixels = tiny(duration_nimg=32)
    pixels = from_dict(TrainConfig, {**to_dict(pixels), "terms": {"pdino": {**_offline(
        tmp_path / "teachers"), "t_min": 0.3}}})  # fmt: skip
    latents = _latent_cfg(latent_cache, tmp_path / "teachers", duration_nimg=32)
    trainer = Trainer(latents, tmp_path / "probe", quiet=True)
    (term,) = trainer.objective.extra_terms
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    pixels_of_z = term.decode(z)  # the run's autoencoder, with gradients
    assert pixels_of_z.shape == (2, 3, 16, 16) and term.teacher.resolution == 16
    pdino_distance(term.teacher, pixels_of_z, torch.zeros(2, 3, 16, 16)).sum().backward()
    assert z.grad.abs().sum() > 0
    for run, cfg in (("pixels", pixels), ("latents", latents)):
        out = train(cfg, tmp_path / run, quiet=True)
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss/pdino" in r]
        assert len(rows) == 4 and all(r["loss/pdino"] > 0 for r in rows), run
        ck = ckpt_io.load_checkpoint(out)
        assert dict(ck.objective) == {}, run  # P-DINO has no state: the teacher is not saved
        names = [*ck.model, *(k for e in ck.ema.values() for k in e)]
        assert not any("teacher" in k or "net.blocks" in k for k in names), run
