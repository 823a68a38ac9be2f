"""Extractor wiring: tiny random networks of the real classes, saved to disk and loaded back
through the real loading code (``local_files_only``, no network), compared with an
independent PIL/transformers preprocessing; clear errors when files are missing."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from denoiselab.metrics import MissingExtractorError, load_clip, load_dinov2, load_inception
from denoiselab.metrics.images import resize_uint8

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers not installed (optional [eval] extra)"
)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _pil_preprocess(
    images: torch.Tensor, size: int, mean: np.ndarray, std: np.ndarray
) -> torch.Tensor:
    """Independent reference: PIL bicubic resize of each uint8 image, /255, mean/std."""
    out = []
    for im in images.permute(0, 2, 3, 1).numpy():
        resized = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC), np.float64)
        out.append((resized / 255.0 - mean) / std)
    return torch.tensor(np.stack(out)).permute(0, 3, 1, 2).float()


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the Hugging Face hub fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("size", [48, 20])
def test_resize_matches_pil_bicubic_within_one_level(size):
    images = _images(2, 32)
    ours = resize_uint8(images, size) * 255.0
    ref = _pil_preprocess(images, size, np.zeros(3), np.full(3, 1 / 255.0))
    assert (ours - ref).abs().max() <= 1.0 + 1e-4


def test_missing_files_name_what_is_needed(tmp_path):
    with pytest.raises(MissingExtractorError, match=r"weights-inception-2015-12-05-6726825d\.pth"):
        load_inception(tmp_path / "nope.pth")
    with pytest.raises(MissingExtractorError, match="clip-vit-large-patch14-336"):
        load_clip(None)
    with pytest.raises(MissingExtractorError, match="dinov2-with-registers-large"):
        load_dinov2(tmp_path)  # a directory without config.json


@needs_transformers
def test_clip_wiring_tiny_model(tmp_path, offline):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=48,
        patch_size=8,
        projection_dim=16,
    )
    model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(tmp_path / "clip")
    extractor = load_clip(tmp_path / "clip")
    images = _images()
    features = extractor(images)
    with torch.no_grad():
        ref = model(pixel_values=_pil_preprocess(images, 48, CLIP_MEAN, CLIP_STD)).image_embeds
    assert features.shape == (3, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features, ref, atol=2e-3, rtol=2e-3)
    assert extractor.preprocessing["size"] == 48
    assert extractor.preprocessing["mean"] == pytest.approx(CLIP_MEAN.tolist())
    assert len(extractor.weights_id) == 16


@needs_transformers
@pytest.mark.parametrize("registers", [True, False])
def test_dinov2_wiring_tiny_model(tmp_path, offline, registers):
    import transformers

    prefix = "Dinov2WithRegisters" if registers else "Dinov2"
    extra = {"num_register_tokens": 4} if registers else {}
    config = getattr(transformers, f"{prefix}Config")(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=28,
        patch_size=7,
        **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}Model")(config).eval()
    model.save_pretrained(tmp_path / "dino")
    extractor = load_dinov2(tmp_path / "dino", size=28)
    assert type(extractor.model).__name__ == f"{prefix}Model"
    images = _images()
    imagenet = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
    with torch.no_grad():
        out = model(pixel_values=_pil_preprocess(images, 28, *imagenet))
    ref = out.pooler_output
    torch.testing.assert_close(ref, out.last_hidden_state[:, 0])  # pooler = normed CLS token
    torch.testing.assert_close(extractor(images), ref, atol=2e-3, rtol=2e-3)


@needs_transformers
def test_dinov2_refuses_another_model_type(tmp_path, offline):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=16,
        patch_size=8,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="clip_vision_model"):
        load_dinov2(tmp_path / "clip")


# ---------------------------------------------------------------- TF-Inception (torch-fidelity)

WEIGHTS = os.environ.get("DENOISELAB_INCEPTION_WEIGHTS")  # the real file, where available


def _fidelity_or_skip():
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as module
    except ImportError as err:  # torch-fidelity imports torchvision at package import
        pytest.skip(f"torch-fidelity not importable ({err}); optional [eval] extra")
    return module


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """$DENOISELAB_INCEPTION_WEIGHTS if set, else a random state dict of the real class."""
    module = _fidelity_or_skip()
    if WEIGHTS:
        return WEIGHTS
    with pytest.MonkeyPatch.context() as patch:  # build the class without weights to get its keys
        patch.setattr(module, "load_state_dict_from_url", lambda *a, **k: None)
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = module.FeatureExtractorInceptionV3("x", ["2048"])
    for layer in net.modules():  # He init keeps the signal alive through ~90 layers
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=3.0)  # confident logits: IS well above 1
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def test_inception_wiring(inception_weights):
    module = _fidelity_or_skip()
    net = module.FeatureExtractorInceptionV3(
        "x", ["2048", "logits_unbiased"], feature_extractor_weights_path=inception_weights
    )
    extractor = load_inception(inception_weights)
    images = _images(2, 32)
    features, logits = extractor.features_and_logits(images)
    ref_features, ref_logits = net(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(features, ref_features)
    torch.testing.assert_close(logits, ref_logits)
    assert extractor.preprocessing["resize"].startswith("tf1_bilinear")


@pytest.mark.slow
def test_fid_kid_is_pr_match_torch_fidelity(inception_weights):
    """Same images, same weights: our metrics against torch-fidelity's calculate_metrics."""
    import torch_fidelity

    from denoiselab.metrics import (
        frechet_distance,
        gaussian_stats,
        inception_score,
        kid,
        precision_recall,
    )

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]

    fake = _images(24, 32, seed=1)
    real = torch.cat([fake[:12], _images(12, 32, seed=2) // 2])  # half shared: 0 < P, R < 1
    extractor = load_inception(inception_weights)
    f_fake, logits = extractor.features_and_logits(fake)
    f_real = extractor(real)
    ref = torch_fidelity.calculate_metrics(
        input1=Images(fake),
        input2=Images(real),
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        kid_subset_size=12,
        isc_splits=4,
        feature_extractor="inception-v3-compat",  # its PR default is VGG16
        cuda=False,
        verbose=False,
        save_cpu_ram=True,
        feature_extractor_weights_path=inception_weights,
    )
    pr = precision_recall(f_real, f_fake, k=3)
    ours = {
        "frechet_inception_distance": frechet_distance(
            gaussian_stats(f_fake), gaussian_stats(f_real)
        ),
        "kernel_inception_distance_mean": kid(f_fake, f_real, subset_size=12).mean,
        "inception_score_mean": inception_score(logits, splits=4).mean,
        "precision": pr.precision,
        "recall": pr.recall,
    }
    assert ours["frechet_inception_distance"] > 1.0 and ours["inception_score_mean"] > 1.002
    assert 0 < ours["precision"] < 1 or 0 < ours["recall"] < 1  # not a degenerate comparison
    for key, value in ours.items():
        assert value == pytest.approx(ref[key], rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("side", [32, 512])  # up- and downsampling to 299
def test_inception_antialias_resize_matches_pil_and_tf1_passes_through(side):
    """What the TF-Inception network receives under each resize option (no weights needed):
    ``antialias`` = PIL's antialiased bilinear (an independent implementation) within one
    grey level; ``tf1_bilinear`` = the images untouched (torch-fidelity's network resizes)."""
    from PIL import Image

    from denoiselab.metrics.extractors import InceptionExtractor

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(len(x), 2048), torch.zeros(len(x), 1008)

    images = _images(2, side)
    for resize in ("antialias", "tf1_bilinear"):
        InceptionExtractor(Recorder(), "w", torch.device("cpu"), resize)(images)
    fed_aa, fed_tf1 = seen
    assert torch.equal(fed_tf1, images)
    assert fed_aa.dtype == torch.uint8 and fed_aa.shape == (2, 3, 299, 299)
    for i in range(2):
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((299, 299), Image.BILINEAR)
        ref = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).int()
        assert (fed_aa[i].int() - ref).abs().max() <= 1
    a = InceptionExtractor(Recorder(), "w", torch.device("cpu"), "antialias").preprocessing
    b = InceptionExtractor(Recorder(), "w", torch.device("cpu")).preprocessing
    assert a["resize"].startswith("antialias") and b["resize"].startswith("tf1_bilinear")
    with pytest.raises(ValueError, match="inception resize 'bicubic'; valid: tf1_bilinear"):
        InceptionExtractor(Recorder(), "w", torch.device("cpu"), "bicubic")
