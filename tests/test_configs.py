"""Shipped configs live inside the package and are found by name, also from a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from denoiselab.ablate.suite import resolve_base
from denoiselab.cli import main
from denoiselab.config import CONFIG_DIR, ConfigError, find_config, shipped_configs
from denoiselab.latents.train_ae import train_ae_main

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_found_by_name_and_unknown_names_list_them(tmp_path):
    names = shipped_configs()
    assert {"quickstart", "quickstart_hard", "latent_quickstart", "jit_b16_imagenet256"} <= set(
        names
    )
    assert find_config("quickstart") == CONFIG_DIR / "quickstart.yaml"
    assert find_config("quickstart.yaml") == CONFIG_DIR / "quickstart.yaml"
    own = tmp_path / "quickstart.yaml"  # a file of that name wins over the shipped one
    own.write_text("seed: 3\n")
    assert find_config(own) == own
    with pytest.raises(
        ConfigError, match=r"config 'quikstart' not found: neither a file nor a shipped"
    ):
        find_config("quikstart")
    with pytest.raises(ConfigError, match=r"shipped: .*latent_quickstart, quickstart, quick"):
        find_config("configs/quickstart.yaml")  # a missing path is not guessed at
    assert not (ROOT / "configs").exists()  # one copy of the configs: no second tree to drift


def test_train_by_name_dry_run_and_unknown_name(capsys):
    assert main(["train", "quickstart", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["difficulty"] == "easy" and cfg["model"]["name"] == "JiT-S/8"
    assert main(["train", "quickstart_hard", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["difficulty"] == "hard"
    assert main(["train", "no_such_config", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("denoiselab train: error: config 'no_such_config' not found: neither")
    assert "quickstart" in err and len(err.splitlines()) == 1


def test_other_commands_take_config_names(capsys):
    assert train_ae_main(["quickstart", "--out", "unused", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["difficulty"] == "easy"
    base = resolve_base("quickstart_hard", ROOT, "suite")
    assert base["data"]["difficulty"] == "hard" and base["duration_nimg"] == 172800
    with pytest.raises(ConfigError, match=r"suite: base config 'nope' not found: neither a file"):
        resolve_base("nope", ROOT, "suite")


@pytest.mark.slow
def test_a_non_editable_install_finds_the_configs(tmp_path):
    """Build the wheel from a copy of the project, install it into a folder of its own and
    run ``denoiselab train quickstart --dry-run`` from there, away from the source tree."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(project)], check=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("denoiselab-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    assert {f"denoiselab/configs/{n}.yaml" for n in shipped_configs()} <= packed
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-m", "denoiselab", "train", "quickstart", "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["data"]["difficulty"] == "easy"
    where = subprocess.run(
        [sys.executable, "-c", "import denoiselab.config as c; print(c.find_config('quickstart'))"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(target)), where


def test_speedrun_is_quickstart_hard_plus_the_changes_its_header_names():
    """The speedrun's header names the evidence for each change; every other key must stay
    quickstart_hard's, or the claim compares more than it says."""
    from denoiselab.config import to_dict
    from denoiselab.train.build import load_train_config

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    base = flat(to_dict(load_train_config("quickstart_hard")))
    fast = flat(to_dict(load_train_config("speedrun")))
    changed = {k: fast[k] for k in base.keys() | fast.keys() if base.get(k) != fast.get(k)}
    assert changed == {
        "objective.contrastive": 0.05,
        "compile": True,
        "duration_nimg": 103680,
        "sample_every_nimg": 103680,
        "ckpt_every_nimg": 51840,
    }
    assert fast["duration_nimg"] == 0.6 * base["duration_nimg"]
    header = (CONFIG_DIR / "speedrun.yaml").read_text().split("\ndata:")[0]
    assert all(f"CHANGED {k}" in header for k in ("objective.contrastive", "compile"))
