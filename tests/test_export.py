"""`denoiselab export` → `denoiselab.from_pretrained`: the exported model samples exactly what
`denoiselab sample` draws from the source run; hub ids resolve from the local cache only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import denoiselab
from denoiselab.cli import main
from denoiselab.config import ConfigError
from denoiselab.data.shapes import SHAPE_NAMES
from denoiselab.metrics import to_uint8
from denoiselab.sampling.generate import balanced_labels
from denoiselab.train.build import restore
from denoiselab.train.loop import train
from tests.test_train import tiny

ROOT = Path(__file__).resolve().parents[1]
EVAL = {
    "metrics": {"fd_probe": 1.2345, "acc_probe": 0.625},
    "num": 64,
    "cfg": 1.5,
    "ema": 0.99,
    "sampling_steps": 3,
    "solver": "heun",
    "reference": {"probe": {"count": 64, "path": "/cache/ref.npz"}},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # no EMA warm-up: the two decays then hold different averages after 8 steps
    cfg = tiny(sample_every_nimg=32, **{"ema.warmup": False})
    out = train(cfg, tmp_path_factory.mktemp("run") / "r", quiet=True)
    (out / "eval.json").write_text(json.dumps(EVAL))
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-jit"
    assert main(["export", str(run), "--out", str(out), "--ema", "0.99"]) == 0
    return out


def _pngs(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("0*.png"))
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    )


def test_exported_model_samples_what_denoiselab_sample_draws(run, exported, tmp_path):
    model = denoiselab.from_pretrained(exported)
    labels = balanced_labels(4, 8)
    x = model.sample(labels=labels, steps=3, cfg=1.5, seed=7)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    ref = restore(run, ema=0.99).sample(labels, 7, steps=3, cfg_scale=1.5, interval=(0.1, 1.0))
    assert torch.equal(x, ref)
    out = tmp_path / "s"
    argv = [
        "sample",
        str(run),
        "--num",
        "4",
        "--batch",
        "4",
        "--steps",
        "3",
        "--cfg",
        "1.5",
        "--seed",
        "7",
        "--ema",
        "0.99",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert torch.equal(to_uint8(x), _pngs(out))
    # the other EMA gives other images: the export holds the decay that was asked for
    assert not torch.equal(x, restore(run, ema=0.9).sample(labels, 7, steps=3, cfg_scale=1.5))
    # defaults are the run's sampler settings (3 Heun steps, CFG 1.5, interval (0.1, 1))
    assert torch.equal(model.sample(labels=labels, seed=7), x)
    by_name = model.sample(labels=[SHAPE_NAMES[i] for i in labels.tolist()], seed=7)
    assert torch.equal(by_name, x)


def test_export_folder_contents(run, exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "denoiselab" and config["weights"]["ema"] == 0.99
    assert config["weights"]["step"] == 8 and config["class_names"] == list(SHAPE_NAMES)
    # noise_scale "auto" at 16 px: 16/256, the number the run recorded
    assert (config["prediction"], config["loss_space"], config["noise_scale"]) == ("x", "v", 0.0625)
    assert config["sampling"] == {"steps": 3, "solver": "heun", "cfg": 1.5, "interval": [0.1, 1.0]}
    assert config["model"]["depth"] == 2 and config["train_config"]["global_batch"] == 8
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: denoiselab\n")
    assert (
        "| acc_probe | 0.625 |" in card
        and "| fd_probe | 1.234 |" in card
        and "64 class-balanced" in card
    )
    assert "![samples](samples.png)" in card and "| batch, steps, images seen | 8, 8, 64 |" in card
    assert (exported / "samples.png").read_bytes() == (
        run / "samples" / "step_000000008.png"
    ).read_bytes()


def _hub_cache(exported: Path, hub: Path, repo: str, commit: str = "a" * 40) -> None:
    """The huggingface_hub cache layout: refs/main names a snapshot folder holding the files."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(exported, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_hub_id_loads_from_the_local_cache_only(exported, tmp_path):
    home = tmp_path / "hf"
    _hub_cache(exported, home / "hub", "me/tiny-jit")
    script = (
        "import denoiselab, torch, sys\n"
        "m = denoiselab.from_pretrained('me/tiny-jit')\n"
        "torch.save(m.sample(labels=[0, 5], steps=2, seed=3), sys.argv[1])\n"
        "try:\n    denoiselab.from_pretrained('me/absent')\n"
        "except FileNotFoundError as e:\n    print('MISSING', e)\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT),
    }
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "MISSING 'me/absent' is not in the local Hugging Face cache" in done.stdout
    x = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(
        x, denoiselab.from_pretrained(exported).sample(labels=[0, 5], steps=2, seed=3)
    )
    # in-process, with an explicit cache folder
    m = denoiselab.from_pretrained("me/tiny-jit", cache_dir=home / "hub", local_files_only=True)
    assert torch.equal(m.sample(labels=[0, 5], steps=2, seed=3), x)


def test_push_to_hub_sends_nothing_offline_or_without_token(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be sent in this test")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["export", str(run), "--out", str(tmp_path / "a"), "--push-to-hub", "me/tiny-jit"]
    assert main(argv) == 0
    assert "not pushed: the Hugging Face Hub is offline" in capsys.readouterr().err
    assert (tmp_path / "a" / "model.safetensors").is_file()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # the library reads the variable once, at import: an earlier test may have imported it
    # offline (the encoder tests do)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main([*argv[:3], str(tmp_path / "b"), *argv[4:]]) == 0
    assert "not pushed: no Hugging Face token" in capsys.readouterr().err


def test_export_and_load_errors_are_named(run, exported, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(exported)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--ema", "0.5"]) == 2
    assert "ema=0.5 not in checkpoint; available: [0.9, 0.99]" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="is not a denoiselab export"):
        denoiselab.from_pretrained(run)
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ConfigError, match="reads 'denoiselab' up to version 1"):
        denoiselab.from_pretrained(broken)
    config["model"]["depth"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"weights do not fit config\.json"):
        denoiselab.from_pretrained(broken)
    with pytest.raises(ValueError, match="label 8 is out of range; valid: 0 … 7"):
        denoiselab.from_pretrained(exported).sample(labels=[8], steps=1)
