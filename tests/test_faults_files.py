"""Faults in checkpoint files (issue #14 §1): flipped bits, truncated, empty and missing
files are named errors and ``--resume RUN`` falls back to the previous checkpoint; a full
disk during a save keeps the previous checkpoint and stops the run with one line; a run
never mixes with another's checkpoints."""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from denoiselab.cli import main
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train import tensorfile

from .test_faults import assert_same_run, fault_run, only_checkpoint_pairs, run_forked

__all__ = ["fault_run"]  # a fixture used here


@pytest.fixture(scope="module")
def partial_run(fault_run, tmp_path_factory):
    """FAULT_RUN stopped after 4 of its 6 steps, checkpoints after steps 2 and 4."""
    cfg, _, _ = fault_run
    run = tmp_path_factory.mktemp("partial") / "run"
    assert main(["train", str(cfg), "--out", str(run), "duration_nimg=32",
                 "ckpt_every_nimg=16", "keep_checkpoints=3"]) == 0  # fmt: skip
    return run


def _flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _corrupt(path: Path, how: str, rng: random.Random) -> None:
    size, header = path.stat().st_size, _header_size(path)
    if how == "flip-data":
        _flip_bit(path, rng.randrange(header, size), rng.randrange(8))
    elif how == "flip-header":
        _flip_bit(path, rng.randrange(0, header), rng.randrange(8))
    elif how == "truncate":
        os.truncate(path, rng.randrange(0, size))
    elif how == "empty":
        os.truncate(path, 0)
    elif how == "missing":
        path.unlink()


CORRUPTIONS = [
    (which, how)
    for which in ("weights", "state")
    for how in ("flip-data", "flip-data", "flip-header", "flip-header", "truncate", "empty")
] + [("state", "missing")]


def test_corrupt_or_truncated_checkpoint_is_named_and_resume_falls_back(partial_run, tmp_path):
    rng = random.Random(7)
    for i, (which, how) in enumerate(CORRUPTIONS):
        run = tmp_path / f"c{i}"
        shutil.copytree(partial_run, run)
        weights = run / "checkpoints" / "step_000000004.safetensors"
        bad = weights if which == "weights" else ckpt_io._state_path(weights)
        _corrupt(bad, how, rng)
        ctx = f"{which} {how}"
        name = weights.name if how == "missing" else bad.name
        with pytest.raises(ckpt_io.CheckpointError, match=name) as err:
            ckpt_io.load_checkpoint(run)
        assert "Traceback" not in str(err.value) and "\n" not in str(err.value), ctx
        warnings: list[str] = []
        ck = ckpt_io.load_for_resume(run, warn=warnings.append)
        assert ck.step == 2, ctx
        assert len(warnings) == 1 and name in warnings[0], (ctx, warnings)
        assert "resuming from the previous checkpoint step_000000002" in warnings[0]


def test_flipped_data_bit_loads_silently_without_the_checksum(partial_run, tmp_path):
    """Why checksums: safetensors alone reads a flipped data bit without complaint."""
    run = tmp_path / "r"
    shutil.copytree(partial_run, run)
    weights = run / "checkpoints" / "step_000000004.safetensors"
    # clones: loaded tensors are views of the file (safetensors maps it) until written to
    before = {k: v.clone() for k, v in ckpt_io.load_checkpoint(run).model.items()}
    _flip_bit(weights, weights.stat().st_size - 3, 6)
    with safe_open(weights, framework="pt") as f:  # header fine, data silently different
        after = {k.split(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}  # noqa: SIM118
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ckpt_io.CheckpointError, match="fails the checksum"):
        ckpt_io.load_checkpoint(run)


def test_checkpoint_without_checksums_still_loads(partial_run, tmp_path):
    """Checkpoints written before the checksums existed load (unverified)."""
    from safetensors.torch import save_file

    run = tmp_path / "r"
    shutil.copytree(partial_run, run)
    for path in (run / "checkpoints").glob("step_000000004*"):
        tensors, meta = tensorfile.read(path, ())
        meta.pop(tensorfile.CHECKSUM_KEY)
        save_file(tensors, path, meta)
    assert ckpt_io.load_checkpoint(run).step == 4


@pytest.mark.integration
def test_resume_from_a_folder_with_a_corrupt_newest_checkpoint(fault_run, partial_run,
                                                              tmp_path, capsys):  # fmt: skip
    """The CLI says so in one line, continues from the previous checkpoint (bit-exactly) and
    sets the unreadable one aside; with nothing loadable it is a one-line error."""
    _, ref, _ = fault_run
    run = tmp_path / "r"
    shutil.copytree(partial_run, run)
    weights = run / "checkpoints" / "step_000000004.safetensors"
    _flip_bit(weights, weights.stat().st_size - 100, 3)
    assert main(["train", "--resume", str(run), "duration_nimg=48", "ckpt_every_nimg=8",
                 "keep_checkpoints=2"]) == 0  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "is corrupt" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), err
    assert "step_000000004.safetensors" in warned[0]
    assert "resuming from the previous checkpoint step_000000002.safetensors" in warned[0]
    assert (run / "checkpoints" / "step_000000004.safetensors.stale").is_file()
    assert_same_run(run, ref, "fallback")

    broken = tmp_path / "broken"
    shutil.copytree(partial_run, broken)
    for path in (broken / "checkpoints").glob("step_*.state.safetensors"):
        os.truncate(path, 10)
    assert main(["train", "--resume", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no loadable checkpoint" in err[0], err


@pytest.mark.parametrize("fail_call", [1, 2])  # the state file's write, the weights file's
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(partial_run, tmp_path,
                                                               monkeypatch, capsys, fail_call):  # fmt: skip
    run = tmp_path / "r"
    shutil.copytree(partial_run, run)
    real_save, calls = tensorfile.save_file, [0]

    def full_disk(tensors, path, metadata=None):
        calls[0] += 1
        if calls[0] == fail_call:  # half the file reaches the disk, then it is full
            real_save(tensors, path, metadata)
            os.truncate(path, os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, path, metadata)

    monkeypatch.setattr(tensorfile, "save_file", full_disk)
    code = main(["train", "--resume", str(run), "duration_nimg=48", "ckpt_every_nimg=40"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 2 and err[0].startswith("resumed from"), err  # and one error line
    assert "could not write checkpoint" in err[1] and "No space left on device" in err[1]
    assert "the newest checkpoint kept is step_000000004.safetensors" in err[1]
    assert ckpt_io.load_checkpoint(run).step == 4  # the previous checkpoint, intact
    assert only_checkpoint_pairs(run / "checkpoints"), os.listdir(run / "checkpoints")


@pytest.mark.integration
def test_real_write_failure_mid_file_is_a_one_line_error(partial_run, tmp_path):
    """A write that really fails mid-file (the file-size limit of the process, so the
    safetensors writer itself hits the error) is the same named, one-line error."""
    run = tmp_path / "r"
    shutil.copytree(partial_run, run)
    limit = (run / "checkpoints" / "step_000000004.safetensors").stat().st_size // 2
    log = tmp_path / "stderr.txt"

    def child() -> int:
        sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 - the child exits right after
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        return main(["train", "--resume", str(run), "duration_nimg=48", "ckpt_every_nimg=40"])

    assert run_forked(child) == 2, log.read_text()
    err = log.read_text().strip().splitlines()
    assert "could not write checkpoint" in err[-1] and "File too large" in err[-1], err
    assert ckpt_io.load_checkpoint(run).step == 4
    assert only_checkpoint_pairs(run / "checkpoints"), os.listdir(run / "checkpoints")


def test_a_new_run_never_mixes_with_another_runs_checkpoints(fault_run, partial_run, tmp_path,
                                                            capsys):  # fmt: skip
    """Training a config into a folder that holds a run is a one-line error that touches
    nothing (before, it wiped the old metrics and mixed the two runs' checkpoints)."""
    cfg, _, _ = fault_run
    run = tmp_path / "r"
    shutil.copytree(partial_run, run)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", str(cfg), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0], err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_explicit_corrupt_checkpoint_file_is_an_error_not_a_fallback(partial_run, tmp_path,
                                                                       capsys):  # fmt: skip
    run = tmp_path / "r"
    shutil.copytree(partial_run, run)
    weights = run / "checkpoints" / "step_000000004.safetensors"
    os.truncate(weights, 100)
    assert main(["train", "--resume", str(weights)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_000000004.safetensors" in err[0] and "truncated" in err[0]
