"""Crash-safe files of a suite folder: atomic replacement, append-only JSON lines, locks.

A kill at any instant leaves either the old or the new content of a file (temporary file
beside it, ``fsync``, then ``os.replace``), never a mixture. JSON-lines files are appended
one flushed line at a time; readers skip a last line cut by a kill, and
:func:`rewrite_jsonl` drops such a line before anything is appended after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from denoiselab.io import atomic_write


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON object as a line, flushed and fsynced (on a new line after a last
    line cut by a kill: glued to it, the row would be unreadable too)."""
    with open(path, "a+b") as f:
        cut = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (``[]`` if absent); cut lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def rewrite_jsonl(path: str | Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Atomically keep only the readable rows for which ``keep(row)`` is true."""
    path = Path(path)
    rows = [r for r in read_jsonl(path) if keep(r)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold ``path`` as a lock file (``O_EXCL``); a lock left by a dead process is taken over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and (host != me["host"] or _alive(pid)):
                raise LockedError(
                    f"{path.parent} is being run by pid {pid} on {host}; wait for it or, if "
                    f"that process is gone, delete {path}"
                ) from None
            path.unlink(missing_ok=True)  # stale: its owner died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:  # pragma: no cover - another process won the race twice
        raise LockedError(f"could not take the lock {path}")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
