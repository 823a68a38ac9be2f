"""What every ``denoiselab`` subcommand shares: bad input → one line on stderr, exit status 2.

- :class:`ArgumentParser` prints an argument error as one line (argparse's default prints the
  whole usage block first) and exits with status 2.
- :func:`guarded` runs a subcommand and turns the errors a user's input causes (a bad config
  value, a missing or unreadable file, a refused checkpoint, …) into
  ``denoiselab <command>: error: <message>`` and status 2. Anything else is a bug and keeps its
  traceback. ``DENOISELAB_TRACEBACK=1`` shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line: ``PROG: error: MSG (see PROG -h)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is bad", not "the code is broken"."""
    from safetensors import SafetensorError

    from denoiselab.ablate.files import LockedError
    from denoiselab.train.checkpoint import CheckpointError
    from denoiselab.train.distributed import DistributedError
    from denoiselab.train.window import NonFiniteLossError

    return (
        ValueError,  # ConfigError, LatentCacheError, JSON decode errors, our validation
        FileNotFoundError,  # also MissingExtractorError
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        FileExistsError,
        ModuleNotFoundError,  # an optional extra (diffusers, torch-fidelity, …) not installed
        CheckpointError,
        LockedError,
        SafetensorError,  # a checkpoint, cache or weights file that is not safetensors
        NonFiniteLossError,  # a diverged run (also a non-finite gradient): stopped, named
        DistributedError,  # a lost rank
    )


def _disk_full(error: BaseException) -> bool:
    """A full disk or quota while writing checkpoints, metrics, samples or plots."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (multi-line messages joined with ``; ``)."""
    text = str(error) or type(error).__name__
    if isinstance(error, ModuleNotFoundError):
        text += " (an optional dependency: see the README's install extras)"
    if type(error).__name__ == "SafetensorError":
        text = f"not a readable safetensors file: {text}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines)


def guarded(prog: str, run: Callable[[], int]) -> int:
    """``run()``, with user errors reported as one line on stderr and exit status 2."""
    try:
        return run()
    except Exception as e:
        user = isinstance(e, user_error_types()) or _disk_full(e)
        if os.environ.get("DENOISELAB_TRACEBACK") or not user:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def check_sampler_flags(args: argparse.Namespace) -> None:
    """Sampler flags of ``sample``/``eval`` that were given (``None``: the run's own setting,
    validated with its config): ``ValueError`` naming the flag, the value and what is valid."""
    for flag, value in (("--num", getattr(args, "num", None)), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if args.cfg_interval is not None:
        lo, hi = args.cfg_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"--cfg-interval {lo} {hi} must satisfy 0 <= LO <= HI <= 1")
    if args.eta is not None and not args.eta >= 0:
        raise ValueError(f"--eta {args.eta} must be >= 0 (0: the ODE)")


def add_guidance_arguments(p: argparse.ArgumentParser) -> None:
    """``--guidance cfg|sparse`` and ``--sparse-ratio`` (``denoiselab sample`` and ``eval``)."""
    p.add_argument("--guidance", choices=("cfg", "sparse"), default="cfg",
                   help="cfg: classifier-free with scale --cfg; sparse: a token-routing network "
                   "guided by its routed self (both conditional), scale --cfg")  # fmt: skip
    p.add_argument("--sparse-ratio", type=float, default=0.5,
                   help="fraction of patch tokens routed in sparse guidance's weak pass")  # fmt: skip


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler flags of ``sample`` and ``eval``; each defaults to the run's own setting
    (``None`` here; :meth:`~denoiselab.train.build.Restored.settings` fills it in)."""
    own = "(default: the run's own, its config's sample.%s)"
    p.add_argument("--steps", type=int, help="sampling steps " + own % "steps")
    p.add_argument("--solver", choices=["heun", "euler", "euler_maruyama"], help=own % "solver")
    p.add_argument(
        "--eta", type=float, help="euler_maruyama: SDE noise g² = 2·eta·(1−t)·s² " + own % "eta"
    )
    p.add_argument("--cfg", type=float, help="guidance scale ω " + own % "cfg")
    p.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="guidance interval " + own % "interval",
    )
    add_guidance_arguments(p)
