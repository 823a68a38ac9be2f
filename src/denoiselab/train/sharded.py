"""Sharded checkpoints (``strategy: fsdp``): ``torch.distributed.checkpoint`` folders.

A checkpoint of step ``s`` is a folder ``<run>/checkpoints/step_<s>.dcp/``:

- ``shard-<r>-model-00001-of-00001.safetensors``, one per rank: that rank's slices of every
  sharded tensor and its share of the replicated ones, written by DCP's
  ``HuggingFaceStorageWriter`` (safetensors with the slices' offsets in their metadata). The
  tensor names are the pair's (``model.*``, ``ema.<decay>.*``, ``optim.<pid>.<key>``,
  ``objective.*``, ``window.*``; ``train.checkpoint.contents``).
- ``manifest.json``, written last: the step, the two files' metadata of the pair (config,
  decays, optimizer groups, loop state), every tensor's dtype and shape, and each shard
  file's size and CRC-32, with a CRC-32 of the manifest itself.

No pickle is read: DCP's own ``.metadata`` file (a pickle) is not written; the reader
(``HuggingFaceStorageReader``) rebuilds the layout from the safetensors headers, so a folder
loads at any world size (DCP reads the overlapping slices: re-sharding) and in one process
without a process group (:func:`load_full`, ``denoiselab consolidate``).

Atomic: every rank writes into ``.step_<s>.dcp.tmp/``; after all have finished, each checks a
share of the files, rank 0 writes the manifest, fsyncs and renames the folder into place.
A kill at any moment leaves the previous checkpoint; removal renames a folder away
(``.….del``) before deleting it, so a half-deleted folder is never listed.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from denoiselab.io import atomic_write_text
from denoiselab.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    Contents,
    from_tensors,
    list_checkpoints,
    step_of,
    write_pair,
)
from denoiselab.train.distributed import DistInfo

MANIFEST = "manifest.json"
FORMAT = "denoiselab-dcp-1"
SHARD_SUFFIX = ".safetensors"
_CHUNK = 1 << 24


def dcp_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:09d}.dcp"


def is_sharded(path: Path) -> bool:
    return path.name.endswith(".dcp")


def is_complete(path: Path) -> bool:
    """A sharded folder that was renamed into place (its manifest exists)."""
    return path.is_dir() and (path / MANIFEST).is_file()


def file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest_crc(manifest: dict[str, Any]) -> int:
    rest = {k: v for k, v in manifest.items() if k != "crc32"}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(SHARD_SUFFIX))


# -- writing ---------------------------------------------------------------------------------
def save(directory: Path, c: Contents, dist: DistInfo, *, keep: int) -> Path:
    """Write ``c`` (tensors may be DTensors: each rank writes its slices) as
    ``step_<s>.dcp`` atomically, then prune to ``keep`` steps. A collective: every rank calls
    it; a failure raises :class:`CheckpointWriteError` on every rank and removes what was
    written (the previous checkpoints stay)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageWriter

    final = dcp_path(directory, c.step)
    tmp = directory / f".{final.name}.tmp"
    tensors = {**c.tensors, **c.state_tensors}
    error: BaseException | None = None
    if dist.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a kill
        tmp.mkdir()
    _barrier(dist)
    try:
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
        files = _checksums(tmp, dist)
        if dist.is_main:
            _commit(tmp, final, c, tensors, files, dist.world_size)
    except (OSError, RuntimeError, ValueError, CheckpointException) as e:
        error = e  # DCP reports any rank's failure on every rank (a CheckpointException)
    failed = _any(dist, error is not None)
    if failed:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        found = list_checkpoints(directory)
        kept = f"the newest checkpoint kept is {found[-1].name}" if found else "none is kept"
        cause = _cause(error)
        err = CheckpointWriteError(f"could not write checkpoint {final}{cause}; {kept}")
        err.errno = getattr(_root(error), "errno", None)
        raise err from error
    if dist.is_main:
        from denoiselab.train.checkpoint import prune

        prune(directory, keep)
    return final


def _root(error: BaseException | None) -> BaseException | None:
    """The first rank's own exception inside DCP's CheckpointException (``failures``)."""
    failures = getattr(error, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


def _cause(error: BaseException | None) -> str:
    root = _root(error)
    if root is None:
        return " (on another rank)"
    text = next((ln for ln in str(root).splitlines() if ln.strip()), type(root).__name__)
    return f" ({text.strip()[:300]})"


def _checksums(folder: Path, dist: DistInfo) -> dict[str, dict[str, int]]:
    """Size and CRC-32 of every shard file; each rank reads a share (all files on rank 0)."""
    import torch.distributed as tdist

    names = _shard_files(folder)
    mine = {
        n: {"bytes": (folder / n).stat().st_size, "crc32": file_crc(folder / n)}
        for i, n in enumerate(names)
        if i % dist.world_size == dist.rank
    }
    if not dist.enabled:
        return mine
    parts: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _commit(
    tmp: Path,
    final: Path,
    c: Contents,
    tensors: Mapping[str, Tensor],
    files: dict[str, dict[str, int]],
    world_size: int,
) -> None:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "step": c.step,
        "world_size": world_size,
        "meta": c.meta,
        "state_meta": c.state_meta,
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()
        },
        "files": files,
    }
    manifest["crc32"] = _manifest_crc(manifest)
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # the same step written before (a set-aside history): replace it
        remove(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def remove(path: Path) -> None:
    """Delete a sharded folder: renamed out of the listing first, then deleted."""
    gone = path.with_name(f".{path.name}.del")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def remove_leftovers(directory: Path) -> None:
    """Temporary and half-deleted folders that kills left behind."""
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith(".step_") and p.name.endswith((".tmp", ".del")):
            shutil.rmtree(p, ignore_errors=True)


def _barrier(dist: DistInfo) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def _any(dist: DistInfo, flag: bool) -> bool:
    if not dist.enabled:
        return flag
    device = "cuda" if "nccl" in str(torch.distributed.get_backend()) else "cpu"
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# -- reading ---------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """The verified manifest of a sharded folder; every shard file present at its size.
    Raises :class:`CheckpointError` naming the folder."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        ok = manifest.get("format") == FORMAT and manifest["crc32"] == _manifest_crc(manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{str(path)!r}: unreadable manifest ({e})") from e
    if not ok:
        raise CheckpointError(f"{str(path)!r} is corrupt: its manifest fails the checksum")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{str(path)!r} is corrupt: shard file {name} missing or cut")
    return manifest


def open_lazy(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` with its manifest read and files present, tensors not yet
    loaded (``sharded=True``): a trainer loads them into its own shards (:func:`load`)."""
    manifest = read_manifest(path)
    ck = from_tensors(path, {}, manifest["meta"])
    ck.sharded, ck.ema = True, {}
    ck.loop_state = json.loads(manifest["state_meta"]["loop_state"])
    return ck


def verify(path: Path, manifest: dict[str, Any], dist: DistInfo) -> None:
    """Check every shard file's CRC-32; under torchrun each rank checks a share and all
    raise the same :class:`CheckpointError` if any fails (a collective)."""
    names = sorted(manifest["files"])
    bad = [
        n
        for i, n in enumerate(names)
        if i % dist.world_size == dist.rank and file_crc(path / n) != manifest["files"][n]["crc32"]
    ]
    if dist.enabled:
        parts: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, bad)
        bad = sorted(n for part in parts for n in part)
    if bad:
        raise CheckpointError(f"{str(path)!r} is corrupt: shard file {bad[0]} fails the checksum")


_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}  # fmt: skip


def _load(
    path: Path,
    manifest: dict[str, Any],
    keep: Callable[[str], bool],
    like: Callable[[str], Tensor | None],
) -> dict[str, Tensor]:
    """Read the tensors ``keep`` selects, each into ``zeros_like(like(name))`` when that has
    the tensor's shape (a DTensor: only this rank's slice is read) or else a full CPU
    tensor. No collective: each process plans its own reads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    template: dict[str, Tensor] = {}
    for name, info in manifest["tensors"].items():
        if not keep(name):
            continue
        dtype, shape = _DTYPES[info["dtype"]], torch.Size(info["shape"])
        ref = like(name)
        if ref is not None and ref.shape == shape:
            template[name] = torch.zeros_like(ref, dtype=dtype)
        else:
            template[name] = torch.zeros(shape, dtype=dtype)
    with warnings.catch_warnings():  # "no process group: loading in a single process"
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load(template, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
        except (Exception, dcp.CheckpointException) as e:  # e.g. a slice the files lack
            raise CheckpointError(f"{str(path)!r} could not be read ({e})") from e
    return template


def _split(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(weights-file tensors, state-file tensors)`` of a checkpoint's named tensors."""
    weights = {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}
    state = {k: v for k, v in tensors.items() if k not in weights}
    return weights, state


def load_full(path: Path, *, with_state: bool = True) -> Checkpoint:
    """The whole checkpoint as full CPU tensors (one process, no process group): for
    sampling, evaluation, export and :func:`consolidate`. Every file is verified."""
    manifest = read_manifest(path)
    verify(path, manifest, DistInfo())
    wanted = (lambda n: True) if with_state else (lambda n: n.startswith(("model.", "ema.")))
    weights, state = _split(_load(path, manifest, wanted, lambda n: None))
    if not with_state:
        return from_tensors(path, weights, manifest["meta"])
    return from_tensors(path, weights, manifest["meta"], state, manifest["state_meta"])


def load(path: Path, like: Mapping[str, Tensor], dist: DistInfo) -> Checkpoint:
    """The checkpoint at ``path`` for a running trainer: files verified (a collective),
    each tensor read into the placement of its live counterpart in ``like`` (names as in the
    checkpoint; ``optim.<pid>`` names parameter ``pid`` for its optimizer state), so under
    FSDP each rank reads only its slices, at any world size."""
    manifest = read_manifest(path)
    verify(path, manifest, dist)

    def ref(name: str) -> Tensor | None:
        if name.startswith("optim."):
            return like.get(name.rsplit(".", 1)[0])
        return like.get(name)

    weights, state = _split(_load(path, manifest, lambda n: True, ref))
    return from_tensors(path, weights, manifest["meta"], state, manifest["state_meta"])


def consolidate(path: Path, *, keep: int | None = None) -> Path:
    """Write the sharded checkpoint ``path`` as the usual safetensors pair beside it (same
    names, metadata and checksums as a DDP run writes) and return the weights file.
    Nothing is deleted unless ``keep`` is given (then as every save prunes)."""
    manifest = read_manifest(path)
    verify(path, manifest, DistInfo())
    weights, state = _split(_load(path, manifest, lambda n: True, lambda n: None))
    c = Contents(step_of(path), weights, manifest["meta"], state, manifest["state_meta"])
    return write_pair(path.parent, c, keep=keep if keep is not None else 1 << 30)


def consolidate_main(argv: list[str] | None = None) -> int:
    """``denoiselab consolidate RUN [--step N]``: a sharded checkpoint as the safetensors
    pair that ``sample``, ``eval`` and ``export`` read."""
    from denoiselab.cliutil import ArgumentParser
    from denoiselab.train.checkpoint import _candidates

    p = ArgumentParser(
        prog="denoiselab consolidate",
        description="Write a sharded (FSDP) checkpoint as the usual safetensors pair beside it "
        "(one process, any world size; nothing is deleted).",
    )
    p.add_argument("run", help="run folder (its newest sharded checkpoint) or a step_N.dcp folder")
    p.add_argument("--step", type=int, help="this step's sharded checkpoint")
    args = p.parse_args(argv)
    found = [c for c in _candidates(args.run, prefer_sharded=True) if is_sharded(c)]
    if args.step is not None:
        found = [c for c in found if step_of(c) == args.step]
    if not found:
        which = f"of step {args.step} " if args.step is not None else ""
        raise CheckpointError(f"no sharded checkpoint {which}in {args.run!r} (step_<N>.dcp)")
    path = consolidate(found[0])
    print(f"wrote {path} (and {path.name.replace('.safetensors', '.state.safetensors')})")
    return 0
