"""Checkpoints as safetensors pairs, written atomically and verified on load; no pickles.

A checkpoint of step ``s`` is two files in ``<run>/checkpoints/``:

- ``step_<s>.safetensors`` — weights: ``model.*`` and one ``ema.<decay>.*`` per EMA decay;
  metadata holds the resolved config (YAML), the step and images seen.
- ``step_<s>.state.safetensors`` — optimizer tensors (``optim.<param>.<key>``), the
  objective's trained state (``objective.*``: parameters of loss terms such as a REPA
  projector; not needed to sample), the loop's partial log window (``window.*``) and, in
  metadata, the optimizer's param groups and the loop state (JSON).

Each file carries CRC-32 checksums of its tensors and metadata (``train.tensorfile``), so a
flipped bit is a named error, not silently wrong weights. Each is written to a temporary name,
flushed, fsynced and renamed. The state file is renamed first and the weights file last, so a
checkpoint is visible (its weights file exists) only once both are complete: a kill at any
moment leaves the previous checkpoint loadable. A failed write (a full disk) removes what it
wrote and raises :class:`CheckpointWriteError`; the previous checkpoints stay. Every save
also removes what earlier kills left behind (temporary files, a state file without weights).

Under ``strategy: fsdp`` a checkpoint is instead a folder ``step_<s>.dcp/`` of sharded
safetensors written by ``torch.distributed.checkpoint`` (``train.sharded``): the same tensor
names and metadata, loadable at any world size. The functions here list, prune, set aside and
load both kinds; for the same step, loading for sampling prefers the pair and resuming the
folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from denoiselab.train import tensorfile
from denoiselab.train.tensorfile import CheckpointError, CheckpointWriteError

_STEP_RE = re.compile(r"^step_(\d+)\.(safetensors|dcp)$")
# what a kill can leave: our temporary files, the safetensors writer's own (``.tmpXXXXXX``),
# a state file whose weights file never came
_LEFTOVER_RE = re.compile(
    r"^(\.step_\d+\.(state\.)?safetensors\..*\.tmp|\.tmp\w{6}|step_\d+\.state\.safetensors)$"
)
_WEIGHTS_KEYS = ("config", "step", "decays")
_STATE_KEYS = ("optimizer", "loop_state", "step")

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriteError", "load_checkpoint"]


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns (all tensors on CPU). ``state_tensors``: the state
    file's other named tensors (e.g. ``window.*``), by full name."""

    path: Path
    step: int
    config_yaml: str
    model: dict[str, Tensor]
    ema: dict[float, dict[str, Tensor]]
    optimizer: dict[str, Any] | None
    loop_state: dict[str, Any]
    objective: dict[str, Tensor] | None = None
    state_tensors: dict[str, Tensor] | None = None
    # a sharded checkpoint (``step_<s>.dcp``) whose tensors are not loaded yet: the trainer
    # loads them straight into its own shards (``train.sharded.load``); ``from_folder``: it
    # was picked from a run folder, so an older one may replace it if its data are corrupt
    sharded: bool = False
    from_folder: bool = False


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


@dataclass
class Contents:
    """What a checkpoint of ``step`` holds, as the two files' named tensors and metadata."""

    step: int
    tensors: dict[str, Tensor]  # weights file: model.*, ema.<decay>.*
    meta: dict[str, str]
    state_tensors: dict[str, Tensor]  # state file: optim.<pid>.<key>, objective.*, window.*
    state_meta: dict[str, str]


def contents(
    step: int,
    *,
    config_yaml: str,
    model: dict[str, Tensor],
    ema: dict[float, dict[str, Tensor]],
    optimizer: dict[str, Any],
    loop_state: dict[str, Any],
    objective: dict[str, Tensor] | None = None,
    state_tensors: dict[str, Tensor] | None = None,
) -> Contents:
    """Name every tensor of a checkpoint (``state_tensors``: more named tensors for the
    state file; names must not start with ``optim.`` or ``objective.``)."""
    optim_tensors, optim_meta = optimizer_to_tensors(optimizer)
    optim_tensors.update({f"objective.{k}": v for k, v in (objective or {}).items()})
    optim_tensors.update(state_tensors or {})
    tensors = {f"model.{k}": v for k, v in model.items()}
    for decay, params in ema.items():
        tensors.update({f"ema.{decay!r}.{k}": v for k, v in params.items()})
    meta = {"config": config_yaml, "step": str(step), "decays": json.dumps(list(ema))}
    smeta = {"optimizer": optim_meta, "loop_state": json.dumps(loop_state), "step": str(step)}
    return Contents(step, tensors, meta, optim_tensors, smeta)


def save_checkpoint(directory: Path, step: int, *, keep: int = 2, **parts: Any) -> Path:
    """Write checkpoint ``step`` (``parts``: the keywords of :func:`contents`) atomically,
    then delete all but the newest ``keep`` (and leftovers of interrupted saves)."""
    return write_pair(directory, contents(step, **parts), keep=keep)


def write_pair(directory: Path, c: Contents, *, keep: int = 2) -> Path:
    """Write the two files of ``c`` atomically (state first, weights last), then prune to
    ``keep`` checkpoints. A failed write raises :class:`CheckpointWriteError`."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"step_{c.step:09d}.safetensors"
    state = _state_path(weights)
    optim_tensors, smeta, tensors, meta = c.state_tensors, c.state_meta, c.tensors, c.meta
    try:
        tensorfile.write(state, optim_tensors, smeta)
        tensorfile.write(weights, tensors, meta)
        _fsync_dir(directory)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as its own
        if not weights.exists():  # no half checkpoint: a state file alone is removed
            state.unlink(missing_ok=True)
        found = list_checkpoints(directory)
        kept = f"the newest checkpoint kept is {found[-1].name}" if found else "none is kept"
        err = CheckpointWriteError(f"could not write checkpoint {weights} ({e}); {kept}")
        code = re.search(r"os error (\d+)", str(e))
        err.errno = getattr(e, "errno", None) or (int(code.group(1)) if code else None)
        raise err from e
    prune(directory, keep)
    return weights


def prune(directory: Path, keep: int) -> None:
    """Delete all but the checkpoints of the newest ``keep`` steps (a step may have a pair
    and a sharded folder), and what interrupted saves left."""
    from denoiselab.train import sharded

    found = list_checkpoints(directory)
    kept_steps = sorted({step_of(p) for p in found})[-keep:]
    for old in found:
        if step_of(old) in kept_steps:
            continue
        if sharded.is_sharded(old):
            sharded.remove(old)
            continue
        old.unlink(missing_ok=True)  # weights first: the pair leaves the listing at once
        _state_path(old).unlink(missing_ok=True)
    complete = {p.name for p in list_checkpoints(directory)}
    for p in directory.iterdir():
        if _LEFTOVER_RE.match(p.name) and p.name.replace(".state", "") not in complete:
            p.unlink(missing_ok=True)
    sharded.remove_leftovers(directory)


def _state_path(weights: Path) -> Path:
    return weights.with_name(weights.name.replace(".safetensors", ".state.safetensors"))


def step_of(path: Path) -> int:
    """The step of a checkpoint: weights file ``step_<N>.safetensors`` or folder
    ``step_<N>.dcp``."""
    m = _STEP_RE.match(path.name)
    if m is None:
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint (expected step_<N>.safetensors or step_<N>.dcp)"
        )
    return int(m.group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first: weights files (their pair is
    complete once the weights file exists) and sharded folders with their manifest; for the
    same step the folder comes first."""
    from denoiselab.train.sharded import is_complete

    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (m.group(2) == "safetensors" or is_complete(p)):
            found.append((int(m.group(1)), m.group(2) == "safetensors", p))
    return [p for *_, p in sorted(found)]


def _candidates(path: str | Path, *, prefer_sharded: bool = False) -> list[Path]:
    """Checkpoints that ``path`` names, newest first: a weights file or sharded folder
    itself, or a run folder's. For one step, the pair comes first, or the sharded folder
    with ``prefer_sharded``."""
    from denoiselab.train.sharded import is_sharded

    p = Path(path)
    if p.is_file() or (p.is_dir() and _STEP_RE.match(p.name)):
        step_of(p)
        return [p]
    if p.is_dir():
        for directory in (p / "checkpoints", p):
            found = list_checkpoints(directory)
            if found:
                key = (lambda c: (step_of(c), is_sharded(c))) if prefer_sharded else None
                return sorted(found, key=key)[::-1] if key else found[::-1]
        raise CheckpointError(
            f"no checkpoint in {str(p)!r} (looked for checkpoints/step_*.safetensors and "
            "step_*.dcp)"
        )
    raise CheckpointError(f"{str(p)!r} does not exist: expected a run folder or a checkpoint file")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder, a ``checkpoints/`` folder or a weights file → the weights file to load."""
    return _candidates(path)[0]


def load_checkpoint(path: str | Path, *, with_state: bool = True) -> Checkpoint:
    """Load weights (and optimizer + loop state) of the checkpoint at ``path`` (a folder: its
    newest). Raises :class:`CheckpointError` naming the file if it is missing or corrupt."""
    weights = resolve_checkpoint(path)
    from denoiselab.train import sharded

    if sharded.is_sharded(weights):
        return sharded.load_full(weights, with_state=with_state)
    tensors, meta = tensorfile.read(weights, _WEIGHTS_KEYS)
    ck = from_tensors(weights, tensors, meta)
    if with_state:
        _load_state(ck)
    return ck


def from_tensors(
    weights: Path,
    tensors: dict[str, Tensor],
    meta: dict[str, str],
    state_tensors: dict[str, Tensor] | None = None,
    state_meta: dict[str, str] | None = None,
) -> Checkpoint:
    """A :class:`Checkpoint` from the two files' named tensors and metadata (the state part
    only if given); ``weights`` names it in errors."""
    try:
        step, config = int(meta["step"]), meta["config"]
        decays = [float(d) for d in json.loads(meta.get("decays", "[]"))]
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{str(weights)!r} has unreadable metadata ({e!r})") from e
    model: dict[str, Tensor] = {}
    ema: dict[float, dict[str, Tensor]] = {d: {} for d in decays}
    for name, value in tensors.items():
        kind, rest = name.split(".", 1)
        if kind == "model":
            model[rest] = value
        else:
            decay, key = _split_ema(rest, ema, weights)
            ema[decay][key] = value
    ck = Checkpoint(weights, step, config, model, ema, None, {})
    if state_tensors is not None and state_meta is not None:
        _parse_state(ck, state_tensors, state_meta, weights)
    return ck


def _load_state(ck: Checkpoint) -> None:
    state = _state_path(ck.path)
    if not state.is_file():
        raise CheckpointError(f"{str(ck.path)!r} has no optimizer/loop state file {state.name!r}")
    tensors, smeta = tensorfile.read(state, _STATE_KEYS)
    _parse_state(ck, tensors, smeta, state)


def _parse_state(
    ck: Checkpoint, tensors: dict[str, Tensor], smeta: dict[str, str], state: Path
) -> None:
    tensors = dict(tensors)
    ck.objective = {
        k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("objective.")
    }
    optim = {k: tensors.pop(k) for k in list(tensors) if k.startswith("optim.")}
    ck.state_tensors = tensors
    try:
        ck.optimizer = optimizer_from_tensors(optim, smeta["optimizer"])
        ck.loop_state = json.loads(smeta["loop_state"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{str(state)!r} has unreadable metadata ({e!r})") from e


def _load_for_resume(path: Path) -> Checkpoint:
    from denoiselab.train import sharded

    return sharded.open_lazy(path) if sharded.is_sharded(path) else load_checkpoint(path)


def load_for_resume(
    path: str | Path,
    *,
    warn: Callable[[str], None] = lambda message: None,
    before: int | None = None,
) -> Checkpoint:
    """The checkpoint to resume from, with its state. For a folder: the newest that loads
    (``before``: older than that step); each newer one that does not is reported through
    ``warn`` (one line each). A file given explicitly must load. A sharded checkpoint comes
    back unloaded (``sharded=True``: manifest read, files present); the trainer loads and
    verifies its tensors."""
    candidates = _candidates(path, prefer_sharded=True)
    if len(candidates) == 1 and Path(path) == candidates[0]:
        return _load_for_resume(candidates[0])
    if before is not None:
        candidates = [c for c in candidates if step_of(c) < before]
        if not candidates:
            raise CheckpointError(f"no loadable checkpoint in {str(path)!r} before step {before}")
    failures: list[str] = []
    for weights in candidates:
        try:
            ck = _load_for_resume(weights)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for failure in failures:
            warn(f"{failure}; resuming from the previous checkpoint {weights.name} instead")
        ck.from_folder = True
        return ck
    raise CheckpointError(f"no loadable checkpoint in {str(path)!r}: " + "; ".join(failures))


def set_aside_after(directory: Path, step: int) -> list[Path]:
    """Rename the checkpoints of ``directory`` newer than ``step`` to ``*.stale`` (a run
    resumed at ``step`` continues another history; unreadable ones end up here too).
    Returns the new names."""
    moved = []
    for weights in list_checkpoints(directory):
        if step_of(weights) > step and weights.is_dir():  # a sharded folder: one rename
            moved.append(weights.rename(weights.with_name(weights.name + ".stale")))
        elif step_of(weights) > step:
            for p in (weights, _state_path(weights)):  # weights first: the pair disappears
                if p.exists():
                    moved.append(p.rename(p.with_name(p.name + ".stale")))
    return moved


def _split_ema(rest: str, ema: dict[float, dict[str, Tensor]], path: Path) -> tuple[float, str]:
    """``"0.9999.blocks.0.w"`` → ``(0.9999, "blocks.0.w")`` using the recorded decays."""
    for decay in ema:
        prefix = f"{decay!r}."
        if rest.startswith(prefix):
            return decay, rest[len(prefix) :]
    raise CheckpointError(f"{str(path)!r}: unrecognised EMA tensor {rest!r}")


def state_dict_cpu(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
