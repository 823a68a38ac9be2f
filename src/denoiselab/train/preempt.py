"""Stopping on request: SIGTERM or SIGUSR1 → finish the step, checkpoint, exit 75.

Schedulers announce the end of a job with a signal: Kubernetes sends SIGTERM and waits the
pod's grace period, Slurm sends what ``--signal`` asks (e.g. ``USR1@120``) and SIGTERM on
preemption or ``scontrol requeue``; torchrun forwards SIGTERM (and, with
``--signals-to-handle``, SIGUSR1) to its workers. The handler only records the signal; the
loop stops after the current step, writes a checkpoint and raises :class:`Preempted`, which
``denoiselab train`` turns into exit code :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try
again"). Repeated signals change nothing (a worker may get SIGTERM both from Slurm and from
torchrun); the scheduler's SIGKILL after its grace period ends a run that cannot stop.

Under torchrun a signal may reach only some ranks. Ranks agree through an all-reduce (max) of
the stop flag every ``stop_check_steps`` steps, so all stop after the same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from denoiselab.train.distributed import DistInfo

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retrying may succeed
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s)


class Preempted(Exception):  # not an error: the run stopped as asked
    """The run stopped on a signal after writing a checkpoint of ``step``."""

    def __init__(self, step: int, signum: int, run_dir: Any) -> None:
        self.step, self.signum, self.run_dir = step, signum, run_dir
        name = signal.Signals(signum).name if signum > 0 else "a stop request of another rank"
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved in {run_dir}/checkpoints; "
            f"continue with: denoiselab train --resume {run_dir}"
        )


class StopRequest:
    """Context manager: while active, SIGTERM/SIGUSR1 set :attr:`signum` instead of killing.

    Handlers are installed only from the main thread (Python's rule) and the previous ones are
    restored on exit; elsewhere :meth:`request` is the only way to ask for a stop.
    """

    def __init__(self, dist: DistInfo, device: torch.device, check_steps: int) -> None:
        self.dist, self.device, self.check_steps = dist, device, max(1, check_steps)
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Repeats change nothing: under Slurm a worker gets SIGTERM from Slurm and again
        # from torchrun, and must still write its checkpoint (SIGKILL ends it regardless).
        self.request(signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop after the current step (what the signal handler does)."""
        self.signum = self.signum or signum

    def agreed(self, done: int) -> bool:
        """Whether all ranks stop after step ``done``. Under DDP this is a collective every
        ``check_steps`` steps (the same steps on all ranks); elsewhere a flag read."""
        if not self.dist.enabled:
            return self.signum != 0
        if done % self.check_steps:
            return False
        flag = torch.tensor([1 if self.signum else 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not self.signum:
            self.signum = -1  # another rank got the signal
        return bool(flag.item())
