"""``denoiselab.from_pretrained(DIR or "owner/name")``: an exported model, ready to sample.

An export folder (``denoiselab export``) holds ``model.safetensors`` (one set of weights, the
chosen EMA) and ``config.json`` (the network, the objective's prediction space and noise
scale, the data the decoder needs, recommended sampler settings, class names, the recipe).
A hub id is resolved with ``huggingface_hub.snapshot_download``; when the Hub is marked
offline (``HF_HUB_OFFLINE``) or ``local_files_only=True`` only the local cache is read, and a
model missing from it is a clear error. Sampling goes through the same
:class:`~denoiselab.train.build.Restored` / :class:`~denoiselab.sampling.generate.Sampler`
path as ``denoiselab sample``, so equal weights, labels, seed and settings give equal images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from denoiselab.config import ConfigError, from_dict
from denoiselab.models import JiT, JiTConfig
from denoiselab.sampling.generate import balanced_labels
from denoiselab.train.build import Restored, build_objective, config_yaml_with_model
from denoiselab.train.checkpoint import Checkpoint
from denoiselab.train.config import TrainConfig

FORMAT = "denoiselab"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class Pretrained:
    """An exported model. ``sample`` returns decoded images ``float [n, C, H, W]`` in ``[-1, 1]``.

    ``config``: the export's ``config.json``; ``restored``: the network, objective and configs
    behind it (what ``denoiselab sample`` uses); ``class_names[label]`` where known.
    """

    config: dict[str, Any]
    restored: Restored
    path: Path
    class_names: list[str] | None = field(default=None)

    @property
    def net(self) -> torch.nn.Module:
        return self.restored.net

    @property
    def num_classes(self) -> int:
        return self.restored.model_cfg.num_classes

    def labels(self, labels: Any = None, num: int | None = None) -> Tensor:
        """Class ids ``[n]`` from ids, class names, or (``labels=None``) ``num`` balanced ones."""
        if labels is None:
            if num is None:
                raise ValueError("give labels (class ids or names) or num (balanced labels)")
            return balanced_labels(num, self.num_classes)
        if isinstance(labels, (int, str)):
            labels = [labels]
        if not isinstance(labels, Tensor):
            labels = torch.tensor([self._class_id(v) for v in labels], dtype=torch.long)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(
                f"label {int(bad[0])} is out of range; valid: 0 … {self.num_classes - 1}"
            )
        return labels.long()

    def _class_id(self, value: int | str) -> int:
        if isinstance(value, str):
            if not self.class_names or value not in self.class_names:
                raise ValueError(f"unknown class name {value!r}; valid: {self.class_names}")
            return self.class_names.index(value)
        return int(value)

    @torch.no_grad()
    def sample(
        self,
        labels: Any = None,
        *,
        num: int | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int = 0,
        solver: str | None = None,
        interval: tuple[float, float] | None = None,
    ) -> Tensor:
        """Images for ``labels`` (ids, names, or ``num`` balanced labels). Settings left at
        ``None`` take the export's recommended ones (``config["sampling"]``); the initial
        noise is a function of ``seed`` alone, as in ``denoiselab sample --seed``."""
        rec = self.config["sampling"]
        return self.restored.sample(
            self.labels(labels, num),
            seed,
            steps=rec["steps"] if steps is None else steps,
            solver=rec["solver"] if solver is None else solver,
            cfg_scale=rec["cfg"] if cfg is None else cfg,
            interval=tuple(rec["interval"] if interval is None else interval),
        )


def from_pretrained(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Pretrained:
    """Load an export folder, or hub repository ``owner/name`` (``huggingface_hub``)."""
    folder = _resolve(name_or_path, revision, cache_dir, local_files_only)
    config = read_config(folder)
    cfg = from_dict(TrainConfig, config["train_config"], "train_config")
    model_cfg = from_dict(JiTConfig, config["model"], "model")
    net = JiT(model_cfg)
    try:
        net.load_state_dict(load_file(folder / WEIGHTS_NAME))
    except RuntimeError as e:
        raise ConfigError(f"{folder / WEIGHTS_NAME}: weights do not fit config.json: {e}") from e
    net.to(device).eval()
    weights = config["weights"]
    ckpt = Checkpoint(  # the weights live in `net`; nothing else of a checkpoint is exported
        path=folder / WEIGHTS_NAME,
        step=weights["step"],
        config_yaml=config_yaml_with_model(cfg, model_cfg),
        model={},
        ema={},
        optimizer=None,
        loop_state={},
    )
    which = "model" if weights["ema"] is None else f"ema:{weights['ema']!r}"
    objective = build_objective(cfg, model_cfg)
    restored = Restored(cfg, model_cfg, net, objective, ckpt, which, device)
    return Pretrained(config, restored, folder, config.get("class_names"))


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of an export folder, checked for format and version."""
    path = folder / CONFIG_NAME
    if not path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a denoiselab export (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format {config.get('format')!r} version {config.get('format_version')!r}; "
            f"this denoiselab reads {FORMAT!r} up to version {FORMAT_VERSION}"
        )
    return config


def _resolve(
    name: str | Path, revision: str | None, cache_dir: str | Path | None, local_only: bool | None
) -> Path:
    """A local folder as it is; otherwise a hub id through ``snapshot_download``."""
    if Path(name).is_dir():
        return Path(name)
    if isinstance(name, Path) or str(name).count("/") != 1 or str(name).startswith((".", "/")):
        raise FileNotFoundError(f"{str(name)!r}: no such folder (nor a hub id owner/name)")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise ConfigError(
            f"{name!r} is not a local folder; loading hub ids needs huggingface_hub: "
            f'pip install -e ".[hub]" ({e})'
        ) from None
    if local_only is None:
        local_only = bool(constants.HF_HUB_OFFLINE) or hub_offline()
    try:
        path = snapshot_download(
            str(name), revision=revision, cache_dir=cache_dir, local_files_only=local_only
        )
    except LocalEntryNotFoundError as e:
        where = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"{name!r} is not in the local Hugging Face cache ({where}) and the Hub is offline "
            f"or local_files_only=True: {e}"
        ) from None
    return Path(path)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as the environment says now (the library reads it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
