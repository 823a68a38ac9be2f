"""Experiment trackers: the run folder's rows, grids and config, mirrored to TensorBoard / W&B.

``log.backends`` lists where a run reports (``metrics.jsonl`` is always written: it is the
``jsonl`` backend and the record the others mirror):

- every row appended to ``metrics.jsonl`` (training losses, learning rate, throughput, the
  periodic ``eval/*`` metrics) → one scalar per numeric key, at the row's ``step``;
- every sample grid written to ``samples/`` → an image ``samples`` at its step;
- the resolved ``config.yaml`` → TensorBoard text ``config`` / the W&B run config.

Only the main rank opens trackers (:class:`~denoiselab.train.run.RunFolder` owns them). A
backend's package is imported when the run starts, not when a config is read: sampling or
evaluating a run needs neither TensorBoard nor W&B. :func:`require_backends` names the
missing extra before training starts. Add a backend by adding a :class:`Backend` to
:data:`BACKENDS`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from denoiselab.config import ConfigError

WandbMode = Literal["online", "offline", "disabled"]


class Tracker(Protocol):
    """One backend's view of a run (opened by :func:`open_trackers` on the main rank)."""

    def log_row(self, row: dict[str, Any]) -> None: ...

    def log_image(self, tag: str, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LogConfig:
    """Where a run reports, besides ``metrics.jsonl`` (always written).

    backends: any of ``jsonl``, ``tensorboard`` (event files in ``<run>/tensorboard``),
        ``wandb`` (Weights & Biases; run files in ``<run>/wandb``).
    project / name: the W&B project and run name (default name: the run folder's name).
    wandb_mode: ``offline`` (no network: ``wandb sync`` uploads later), ``online``,
        ``disabled``; ``None`` leaves it to W&B (``WANDB_MODE``, else online).
    """

    backends: tuple[str, ...] = ("jsonl",)
    project: str = "denoiselab"
    name: str | None = None
    wandb_mode: WandbMode | None = None

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"log.backends has {unknown}; valid: {', '.join(BACKENDS)}")
        if self.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(
                f"log.wandb_mode={self.wandb_mode!r}; valid: online, offline, disabled, null"
            )


# ------------------------------------------------------------------------------- backends


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row (``step`` is the x-axis, not a scalar)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class TensorBoardTracker:
    """``torch.utils.tensorboard.SummaryWriter`` in ``<run>/tensorboard``. On resume from step
    ``s``, ``purge_step = s + 1`` hides the events logged after the checkpoint (they are logged
    again), as ``metrics.jsonl`` drops its rows past ``s``."""

    def __init__(self, cfg: LogConfig, root: Path, config_yaml: str, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            str(root / "tensorboard"), purge_step=step + 1 if step else None
        )
        # Markdown: a 4-space indent keeps the YAML a code block
        self.writer.add_text(
            "config", "\n".join("    " + ln for ln in config_yaml.splitlines()), step
        )

    def log_row(self, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def log_image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, array, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<run>/wandb``; its id is kept in ``<run>/tracking.json`` so that a
    resumed run continues the same W&B run (rows W&B already has are not logged twice:
    it ignores steps below its last one, and a resumed run repeats them bit for bit)."""

    def __init__(self, cfg: LogConfig, root: Path, config_yaml: str, step: int) -> None:
        import wandb

        record = root / "tracking.json"
        state = json.loads(record.read_text()) if record.is_file() else {}
        run_id = state.get("wandb_id") or uuid.uuid4().hex[:8]  # W&B ids: [a-z0-9]
        record.write_text(json.dumps({**state, "wandb_id": run_id}) + "\n")
        self.run = wandb.init(
            project=cfg.project,
            name=cfg.name or root.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(root),
            config=yaml.safe_load(config_yaml),
            mode=cfg.wandb_mode,
        )
        self._image = wandb.Image

    def log_row(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self._image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


@dataclass(frozen=True)
class Backend:
    """A tracker: the module it needs, the pyproject extra that installs it, its factory."""

    module: str | None
    extra: str | None
    open: Callable[[LogConfig, Path, str, int], Tracker] | None


BACKENDS: dict[str, Backend] = {
    "jsonl": Backend(None, None, None),  # metrics.jsonl itself (RunFolder.log)
    "tensorboard": Backend("tensorboard", "tensorboard", TensorBoardTracker),
    "wandb": Backend("wandb", "wandb", WandbTracker),
}


def require_backends(cfg: LogConfig) -> None:
    """Raise :class:`ConfigError` naming the extra to install for any backend whose package
    is missing (checked before training starts)."""
    for name in cfg.backends:
        backend = BACKENDS[name]
        if backend.module and importlib.util.find_spec(backend.module) is None:
            raise ConfigError(
                f"log.backends has {name!r} but the {backend.module!r} package is not "
                f'installed: pip install -e ".[{backend.extra}]"'
            )


def open_trackers(cfg: LogConfig, root: Path, config_yaml: str, step: int) -> list[Tracker]:
    """One tracker per backend (``jsonl`` is the run folder's own file), starting at ``step``."""
    require_backends(cfg)
    return [
        BACKENDS[name].open(cfg, root, config_yaml, step)  # type: ignore[misc]
        for name in dict.fromkeys(cfg.backends)
        if BACKENDS[name].open is not None
    ]
