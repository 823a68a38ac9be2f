"""Checkpoints as safetensors pairs, written atomically; no pickles anywhere.

A checkpoint of step ``s`` is two files in ``<run>/checkpoints/``:

- ``step_<s>.safetensors`` — weights: ``model.*`` and one ``ema.<decay>.*`` per EMA decay;
  metadata holds the resolved config (YAML), the step and images seen.
- ``step_<s>.state.safetensors`` — optimizer tensors (``optim.<param>.<key>``), the
  objective's trained state (``objective.*``: parameters of loss terms such as a REPA
  projector; not needed to sample) and, in metadata, the optimizer's param groups and the
  loop state (JSON).

Each file is written to a temporary name, flushed, fsynced and renamed. The state file is
renamed first and the weights file last, so a checkpoint is visible (its weights file exists)
only once both are complete: a kill at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from denoiselab.io import atomic_write

_STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(RuntimeError):
    """No loadable checkpoint where one was expected; the message names the path."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns (all tensors on CPU)."""

    path: Path
    step: int
    config_yaml: str
    model: dict[str, Tensor]
    ema: dict[float, dict[str, Tensor]]
    optimizer: dict[str, Any] | None
    loop_state: dict[str, Any]
    objective: dict[str, Tensor] | None = None


def _atomic_save(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON string of the rest."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, json.dumps(meta)


def optimizer_from_tensors(tensors: dict[str, Tensor], meta_json: str) -> dict[str, Any]:
    meta = json.loads(meta_json)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    step: int,
    *,
    config_yaml: str,
    model: dict[str, Tensor],
    ema: dict[float, dict[str, Tensor]],
    optimizer: dict[str, Any],
    loop_state: dict[str, Any],
    objective: dict[str, Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"step_{step:09d}.safetensors"
    state = directory / f"step_{step:09d}.state.safetensors"
    optim_tensors, optim_meta = optimizer_to_tensors(optimizer)
    optim_tensors.update({f"objective.{k}": v for k, v in (objective or {}).items()})
    _atomic_save(
        optim_tensors,
        {"optimizer": optim_meta, "loop_state": json.dumps(loop_state), "step": str(step)},
        state,
    )
    tensors = {f"model.{k}": v for k, v in model.items()}
    for decay, params in ema.items():
        tensors.update({f"ema.{decay!r}.{k}": v for k, v in params.items()})
    meta = {"config": config_yaml, "step": str(step), "decays": json.dumps(list(ema))}
    _atomic_save(tensors, meta, weights)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        _state_path(old).unlink(missing_ok=True)
    return weights


def _state_path(weights: Path) -> Path:
    return weights.with_name(weights.name.replace(".safetensors", ".state.safetensors"))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (weights file present) in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, a ``checkpoints/`` folder or a weights file → the weights file to load."""
    p = Path(path)
    if p.is_file():
        if not _STEP_RE.match(p.name):
            raise CheckpointError(f"{str(p)!r} is not a checkpoint (expected step_<N>.safetensors)")
        return p
    if p.is_dir():
        for directory in (p / "checkpoints", p):
            found = list_checkpoints(directory)
            if found:
                return found[-1]
        raise CheckpointError(
            f"no checkpoint in {str(p)!r} (looked for checkpoints/step_*.safetensors)"
        )
    raise CheckpointError(f"{str(p)!r} does not exist: expected a run folder or a checkpoint file")


def load_checkpoint(path: str | Path, *, with_state: bool = True) -> Checkpoint:
    """Load weights (and optimizer + loop state) of the checkpoint at ``path``."""
    weights = resolve_checkpoint(path)
    model: dict[str, Tensor] = {}
    ema: dict[float, dict[str, Tensor]] = {}
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata() or {}
        for decay in json.loads(meta.get("decays", "[]")):
            ema[float(decay)] = {}
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            kind, rest = name.split(".", 1)
            if kind == "model":
                model[rest] = f.get_tensor(name)
            else:
                decay, key = _split_ema(rest, ema)
                ema[decay][key] = f.get_tensor(name)
    optimizer, loop_state, objective = None, {}, None
    if with_state:
        state = _state_path(weights)
        if not state.is_file():
            raise CheckpointError(
                f"{str(weights)!r} has no optimizer/loop state file {state.name!r}"
            )
        with safe_open(state, framework="pt") as f:
            smeta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        objective = {
            k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("objective.")
        }
        optimizer = optimizer_from_tensors(tensors, smeta["optimizer"])
        loop_state = json.loads(smeta["loop_state"])
    return Checkpoint(
        weights, int(meta["step"]), meta["config"], model, ema, optimizer, loop_state, objective
    )


def _split_ema(rest: str, ema: dict[float, dict[str, Tensor]]) -> tuple[float, str]:
    """``"0.9999.blocks.0.w"`` → ``(0.9999, "blocks.0.w")`` using the recorded decays."""
    for decay in ema:
        prefix = f"{decay!r}."
        if rest.startswith(prefix):
            return decay, rest[len(prefix) :]
    raise CheckpointError(f"unrecognised EMA tensor {rest!r}")


def state_dict_cpu(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
