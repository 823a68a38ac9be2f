"""No pickle anywhere a user passes a path: every loader of a user-supplied file is fed a
malicious pickle (unpickling it would create a directory) and must refuse it without the
side effect; a scan of the sources keeps other ways in from appearing."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src" / "denoiselab"


class _Evil:
    """Unpickling this calls ``os.mkdir(marker)``: the side effect a real attack would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def evil(tmp_path):
    """``(pickle bytes, torch.save file bytes, marker path)``; checks the payload really runs."""
    marker = tmp_path / "PWNED"
    raw = pickle.dumps({"weight": _Evil(marker)})
    pickle.loads(raw)  # the payload works when unpickled ...
    assert marker.is_dir()
    marker.rmdir()  # ... so every test below must leave no marker behind
    saved = tmp_path / "evil.pth"
    torch.save({"weight": _Evil(marker)}, saved)
    assert not marker.exists()
    return raw, saved.read_bytes(), marker


def _refused(load, marker: Path) -> Exception:
    with pytest.raises(Exception) as info:  # loaders raise their own types
        load()
    assert not marker.exists(), "the malicious pickle was unpickled"
    return info.value


def test_inception_weights_path(tmp_path, evil):
    from denoiselab.metrics import load_inception
    from denoiselab.safeload import UnsafeFileError

    _, pth, marker = evil
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    path.write_bytes(pth)
    err = _refused(lambda: load_inception(path), marker)
    assert isinstance(err, UnsafeFileError) and "refused" in str(err) and str(path) in str(err)


def test_checkpoint_file_and_run_folder(tmp_path, evil, capsys):
    from denoiselab.cli import main
    from denoiselab.train.checkpoint import load_checkpoint

    raw, pth, marker = evil
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step_000000001.safetensors").write_bytes(raw)
    (run / "step_000000001.state.safetensors").write_bytes(pth)
    _refused(lambda: load_checkpoint(run.parent), marker)
    assert main(["sample", str(run.parent), "--out", str(tmp_path / "s")]) == 2
    assert main(["train", "--resume", str(run.parent)]) == 2
    assert not marker.exists() and "Traceback" not in capsys.readouterr().err


def test_reference_statistics_npz(tmp_path, evil):
    from denoiselab.metrics import reference

    _, _, marker = evil
    path = tmp_path / "ref.npz"
    np.savez(path, mean=np.zeros(2), cov=np.eye(2), count=np.int64(2),
             features=np.zeros((2, 2)), meta=np.array([_Evil(marker)], dtype=object))  # fmt: skip
    err = _refused(lambda: reference._load(path), marker)
    assert "allow_pickle" in str(err)


def test_probe_cache_file(tmp_path, evil):
    from denoiselab.metrics.probe import _build_net, read_net_file

    raw, _, marker = evil
    path = tmp_path / "probe.safetensors"
    path.write_bytes(raw)
    _refused(lambda: read_net_file(path, _build_net), marker)


def test_tiny_autoencoder_directory(tmp_path, evil):
    from denoiselab.latents import load_autoencoder

    raw, _, marker = evil
    d = tmp_path / "ae"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": "denoiselab-tiny-ae"}))
    (d / "model.safetensors").write_bytes(raw)
    _refused(lambda: load_autoencoder(d), marker)


def test_latent_cache_shard(tmp_path, evil):
    from denoiselab.data.latents import LatentDataset
    from denoiselab.latents import read_manifest

    raw, _, marker = evil
    cache = _tiny_latent_cache(tmp_path / "cache")
    manifest = read_manifest(cache)
    for shard in cache.glob("shard_*.safetensors"):
        shard.write_bytes(raw)
    _refused(lambda: [LatentDataset(cache, image_size=manifest.image_size)[i] for i in range(2)],
             marker)  # fmt: skip


def _tiny_latent_cache(out: Path) -> Path:
    from denoiselab.data import DataConfig
    from denoiselab.latents import TinyAE, TinyAEConfig, load_autoencoder, save_tiny_ae
    from denoiselab.latents.cache import cache_latents

    torch.manual_seed(0)
    ae_dir = save_tiny_ae(TinyAE(TinyAEConfig(widths=(8, 16))), out.parent / "ae_ok",
                          latent_mean=torch.zeros(4), latent_std=torch.ones(4), info={})  # fmt: skip
    data = DataConfig(name="shapes", image_size=16, num_images=4)
    cache_latents(data, load_autoencoder(ae_dir), out, batch_size=4)
    return out


def test_diffusers_autoencoder_directory_with_only_a_pickled_bin(tmp_path, evil):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed ([latents] extra)")
    from denoiselab.latents import load_autoencoder

    _, pth, marker = evil
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=16,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    (bin_file,) = (tmp_path / "vae").glob("*.bin")
    bin_file.write_bytes(pth)
    _refused(lambda: load_autoencoder(tmp_path / "vae"), marker)


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_transformers_extractor_directory_with_only_a_pickled_bin(
    tmp_path, evil, kind, monkeypatch
):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    from denoiselab.metrics import load_clip, load_dinov2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, pth, marker = evil
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    if kind == "clip":
        config = transformers.CLIPVisionConfig(intermediate_size=64, image_size=16, patch_size=8,
                                               projection_dim=8, **small)  # fmt: skip
        model, load = transformers.CLIPVisionModelWithProjection(config), load_clip
    else:
        config = transformers.Dinov2Config(mlp_ratio=2, image_size=14, patch_size=7, **small)
        model, load = transformers.Dinov2Model(config), load_dinov2
    model.save_pretrained(tmp_path / kind)
    for f in (tmp_path / kind).glob("*.safetensors"):
        f.unlink()  # what is left: config.json and a pickled pytorch_model.bin
    (tmp_path / kind / "pytorch_model.bin").write_bytes(pth)
    _refused(lambda: load(tmp_path / kind), marker)


# -- the sources: no other way for a pickle to get in --------------------------------------------

UNSAFE = {
    r"\bpickle\.loads?\(": "pickle.load",
    r"\bjoblib\.load\(": "joblib.load",
    r"\bdill\.": "dill",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True)",
    r"weights_only\s*=\s*False": "torch.load(weights_only=False)",
    r"\byaml\.load\(|\byaml\.unsafe_load\(|Loader\s*=": "yaml.load",
    r"torch\.jit\.load\(": "torch.jit.load",
}


def test_sources_have_no_unsafe_loaders():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for pattern, what in UNSAFE.items():
            found += [f"{path.name}: {what}" for _ in re.finditer(pattern, text)]
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                found.append(f"{path.name}: torch.load without weights_only=True")
        # transformers/diffusers loaders (denoiselab's own from_pretrained reads safetensors)
        for call in re.finditer(r"(?<!denoiselab)\.from_pretrained\(([^)]*)\)", text):
            if "use_safetensors=True" not in call.group(1):
                found.append(f"{path.name}: from_pretrained without use_safetensors=True")
        for call in re.finditer(r"np\.load\(([^)]*)\)", text):
            if "allow_pickle=False" not in call.group(1):
                found.append(f"{path.name}: np.load without allow_pickle=False")
    assert not found, found


def test_inception_loader_hands_torch_fidelity_the_safely_read_tensors(tmp_path, monkeypatch):
    """torch-fidelity calls ``torch.load(path)`` itself; ``load_inception`` reads the file once
    with ``weights_only=True`` and gives it those tensors (a stand-in module checks the wiring,
    since torch-fidelity needs torchvision)."""
    import sys
    import types

    from denoiselab.metrics import load_inception

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features, feature_extractor_weights_path):
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)
            self.load_state_dict(torch.load(feature_extractor_weights_path))  # as torch-fidelity

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    state = {"fc.weight": torch.arange(4.0).view(2, 2), "fc.bias": torch.tensor([5.0, 6.0])}
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(k) or real_load(*a, **k))
    extractor = load_inception(path)
    assert torch.equal(extractor.net.fc.weight, state["fc.weight"])
    assert reads == [{"map_location": "cpu", "weights_only": True}]  # one read, the safe one
