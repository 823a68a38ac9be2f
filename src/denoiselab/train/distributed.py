"""Process-group helpers for ``torchrun`` (DDP: NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from denoiselab.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class DistributedError(RuntimeError):
    """This rank lost the others (one died or hung); the message says what to do."""


def parse_device(device: str) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a
    ``torch.device``; a name torch does not know, or CUDA on a machine without it, is a
    :class:`ConfigError` naming the valid choices."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device={device!r} is not a device; valid: auto, cpu, cuda, cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return dev


def resolve_device(device: str = "auto") -> torch.device:
    """:func:`parse_device` for one process (no process group): ``"cuda"`` → ``cuda:0``."""
    dev = parse_device(device)
    return torch.device("cuda", 0) if dev.type == "cuda" and dev.index is None else dev


def init_distributed(
    device: str = "auto", timeout_s: float | None = None
) -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes (if any) and pick this rank's device.

    ``timeout_s``: how long a collective waits for the other ranks before it fails (torch's
    default, 30 min for gloo, if None). It bounds the wait for a rank that hangs or whose
    host vanished; a rank that dies is noticed at once (its sockets close) and torchrun then
    stops the others."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device)
    if dev.type == "cuda":
        if dev.index is None and local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible: start at most that many processes per node (torchrun "
                "--nproc_per_node), or train on device=cpu"
            )
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(rank, world, local), dev


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def shutdown() -> None:
    """Destroy this process's process group, if it has one. Only after the last collective;
    not after a failed one (the command exits with its own error then). This alone does not
    make the process's exit safe: see :func:`end_process`."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int = 0) -> NoReturn:
    """End a process that took part in collectives with exit status ``code``, skipping the
    interpreter's teardown.

    Why: gloo runs collectives on its own worker threads, and a worker drops its reference
    to a finished collective's tensors a moment *after* the caller's wait returned. Dropping
    a tensor that Python created takes the GIL. If the main thread has meanwhile reached
    interpreter teardown, that GIL request ends the worker thread from inside a C++
    destructor and the process aborts ("terminate called without an active exception",
    exit -6) after all its work was done. :func:`shutdown` does not prevent it: DDP keeps
    the process group, and so its worker threads, alive past ``destroy_process_group``.
    (torch 2.13; core dump: ``ProcessGroupGloo::runLoop`` → ``~AsyncWork`` → ``take_gil``.)
    So the group is destroyed (on success only), logging and the standard streams are
    flushed, and the process exits with ``os._exit``; the only thing skipped is ``atexit``
    handlers and object finalisers, which denoiselab does not use for anything that must
    reach disk (checkpoints and results are written atomically and closed before their
    function returns)."""
    if code == 0:  # every collective done; after a failure the group may be broken, and
        shutdown()  # destroying it could wait on a dead peer (os._exit closes its sockets)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or a broken pipe: nothing to save
            stream.flush()
    os._exit(code)


_COMM_FAILURES = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout")


def is_comm_failure(e: BaseException) -> bool:
    """Whether ``e`` (raised inside a collective) means the process group broke: another
    rank died or hung. Gloo reports it as a plain ``RuntimeError`` naming its transport."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _COMM_FAILURES)
