"""Experiment tracking (`log.backends`): TensorBoard event files and W&B offline run files are
read back and compared with what the run folder holds (metrics.jsonl, sample grids, config)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from denoiselab.cli import main
from denoiselab.config import ConfigError
from denoiselab.train.loop import train
from denoiselab.train.run import RunFolder, read_metrics
from denoiselab.train.tracking import LogConfig, require_backends
from tests.test_train import tiny

GRIDS = {"sample_every_nimg": 32}  # grids at steps 4 and 8 of the 8-step tiny run


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_tb = pytest.mark.skipif(not _has("tensorboard"), reason="needs the [tensorboard] extra")
needs_wandb = pytest.mark.skipif(not _has("wandb"), reason="needs the [wandb] extra")


def _loss_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@needs_tb
def test_tensorboard_events_hold_every_row_grid_and_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(
        tiny(**GRIDS, **{"log.backends": "[jsonl, tensorboard]"}), tmp_path / "r", quiet=True
    )
    acc = EventAccumulator(
        str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    )
    acc.Reload()
    rows = _loss_rows(run)
    assert len(rows) == 8
    for key in ("loss", "loss/denoise", "lr", "grad_norm", "kimg"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == sorted(rows)
        assert [e.value for e in events] == pytest.approx(
            [rows[s][key] for s in sorted(rows)], rel=1e-6
        )
    images = acc.Images("samples")
    assert [e.step for e in images] == [4, 8]
    import io

    decoded = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    grid = np.asarray(Image.open(run / "samples" / "step_000000008.png").convert("RGB"))
    assert np.array_equal(decoded, grid)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "global_batch: 8" in text and "resolved_model:" in text


@needs_tb
def test_tensorboard_after_resume_has_each_step_once(tmp_path):
    """A run killed after its step-4 checkpoint logged steps 5…8; resuming from step 4 logs
    them again: TensorBoard must show the new values once, as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(**{"log.backends": "[tensorboard]", "ckpt_every_nimg": 32})
    run = train(cfg, tmp_path / "r", quiet=True)
    step4 = run / "checkpoints" / "step_000000004.safetensors"
    train(
        tiny(**{"log.backends": "[tensorboard]", "optim.lr": 5e-4}), run, resume=step4, quiet=True
    )
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rows = _loss_rows(run)
    events = acc.Scalars("loss")
    assert [e.step for e in events] == list(range(1, 9))
    assert [e.value for e in events] == pytest.approx(
        [rows[s]["loss"] for s in range(1, 9)], rel=1e-6
    )


def _wandb_records(path: Path):
    """Records of a W&B ``.wandb`` file (leveldb log format: 7-byte file header, then 32 KiB
    blocks of chunks ``crc32 (4) | length (2, LE) | type (1) | data``; types 1 full,
    2 first, 3 middle, 4 last), parsed as ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block tail too short for a header: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _finished_records(path: Path, timeout: float = 60.0):
    """The records once W&B's writer (a separate service process, which may still be
    flushing when ``finish()`` returns) has written the run's ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path) if path.is_file() else []
        if (
            any(r.WhichOneof("record_type") == "exit" for r in records)
            or time.monotonic() > deadline
        ):
            return records
        time.sleep(0.2)


@needs_wandb
def test_wandb_offline_run_holds_every_row_grid_and_the_config(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny(**GRIDS, **{"log.backends": "[wandb]", "log.wandb_mode": "offline"})
    run = train(cfg, tmp_path / "r", quiet=True)
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    run_id = json.loads((run / "tracking.json").read_text())["wandb_id"]
    assert run_dir.name.endswith(run_id)
    records = _finished_records(run_dir / f"run-{run_id}.wandb")
    history: dict[int, dict] = {}
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            history.setdefault(items.pop("_step"), {}).update(items)
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    rows = _loss_rows(run)
    assert sorted(history) == sorted(rows)
    for step, row in rows.items():
        for key in ("loss", "loss/denoise", "lr", "img_per_s"):
            assert history[step][key] == pytest.approx(row[key], rel=1e-12), (step, key)
    images = {
        s: h["samples/path"] for s, h in history.items() if h.get("samples/_type") == "image-file"
    }
    assert sorted(images) == [4, 8]
    logged = np.asarray(Image.open(run_dir / "files" / images[8]).convert("RGB"))
    grid = np.asarray(Image.open(run / "samples" / "step_000000008.png").convert("RGB"))
    assert np.array_equal(logged, grid)
    assert config["global_batch"] == 8 and config["resolved_model"]["depth"] == 2


def test_only_the_main_rank_opens_trackers(tmp_path):
    folder = RunFolder(tmp_path / "r", is_main=False)
    folder.start_tracking(LogConfig(backends=("tensorboard", "wandb")), "seed: 0\n", 0)
    folder.log({"step": 1, "loss": 1.0})
    assert folder.trackers == [] and not (tmp_path / "r").exists()


def test_unknown_backend_and_missing_package_are_config_errors(monkeypatch, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"log\.backends has \['mlflow'\]; valid: jsonl, tensorboard, wandb"
    ):
        tiny(**{"log.backends": "[mlflow]"})
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[wandb\]"'):
        require_backends(LogConfig(backends=("wandb",)))
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({**json.loads(json.dumps(_tiny_dict())), "log": {"backends": ["wandb"]}})
    )
    assert main(["train", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'wandb' package is not installed" in err and not (tmp_path / "r").exists()


def _tiny_dict():
    from tests.test_train import TINY

    return TINY
