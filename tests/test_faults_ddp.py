"""Faults with 2 gloo ranks on CPU. Under the real torchrun and CLI: a stop signal reaching
one rank stops both after the same step; a rank killed with SIGKILL makes the other exit
with a named error at once (and torchrun ends the job); after each, ``--auto-resume``
continues, and the run interrupted twice ends where one process with the same global batch
(``grad_accum=2``) ends. With two forked ranks: a rank that hangs (SIGSTOP, its sockets
open) makes the other fail after ``dist_timeout_s`` instead of waiting forever."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from denoiselab.config import from_dict
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config
from denoiselab.train.config import TrainConfig
from denoiselab.train.distributed import DistributedError
from denoiselab.train.loop import Trainer, train
from denoiselab.train.run import read_metrics

from .test_terms import _free_port
from .test_train import TINY

STEPS = 20
DDP_RUN = dict(
    TINY,
    device="cpu",
    duration_nimg=8 * STEPS,
    log_every_nimg=16,
    ckpt_every_nimg=32,  # every 4 steps
    sample_every_nimg=0,
    keep_checkpoints=2,
    stop_check_steps=3,  # ranks agree on a stop every 3 steps
    ema={"decays": [0.9], "warmup": True},
)


def _worker_pids(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's worker processes (read from /proc)."""
    found: dict[int, int] = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(pid)
    return found


class Torchrun:
    """``torchrun --nproc_per_node=2 -m denoiselab train CONFIG --out RUN --auto-resume``."""

    def __init__(self, cfg: Path, run: Path, log: Path) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "denoiselab", "train", str(cfg), "--out", str(run),
               "--auto-resume"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.run, self.log = run, log
        self.out = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.out, stderr=subprocess.STDOUT)

    def wait_for_step(self, step: int, limit_s: float = 240) -> None:
        """Until a log row of ``step`` or later is in metrics.jsonl."""
        deadline = time.monotonic() + limit_s
        path = self.run / "metrics.jsonl"
        while time.monotonic() < deadline:
            if path.is_file() and any(r.get("step", 0) >= step for r in read_metrics(path)):
                return
            assert self.proc.poll() is None, self.text()
            time.sleep(0.02)
        raise AssertionError(f"no step {step} within {limit_s}s:\n{self.text()}")

    def wait_for_text(self, needle: str, limit_s: float) -> float:
        """Seconds until ``needle`` appears in the output."""
        tic = time.monotonic()
        while time.monotonic() - tic < limit_s:
            if needle in self.log.read_text():
                return time.monotonic() - tic
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not printed within {limit_s}s:\n{self.text()}")

    def signal_rank(self, rank: int, sig: int) -> int:
        pid = _worker_pids(self.proc.pid)[rank]
        os.kill(pid, sig)
        return pid

    def wait(self, limit_s: float = 240) -> int:
        try:
            return self.proc.wait(timeout=limit_s)
        finally:
            self.out.close()

    def text(self) -> str:
        return self.log.read_text()[-4000:]


@pytest.mark.slow
@pytest.mark.integration
def test_signal_and_rank_death_under_torchrun_then_resume(tmp_path):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(DDP_RUN))
    run = tmp_path / "run"

    # 1. SIGUSR1 to rank 1 only: both ranks stop after the same step, checkpoint, exit 75
    job = Torchrun(cfg, run, tmp_path / "1.log")
    job.wait_for_step(4)
    job.signal_rank(1, signal.SIGUSR1)
    assert job.wait() != 0  # torchrun reports any non-zero worker exit as its own failure
    out = job.text()
    stops = re.findall(r"stopped by (SIGUSR1|a stop request of another rank) after step (\d+)", out)
    assert sorted(s for s, _ in stops) == ["SIGUSR1", "a stop request of another rank"], out
    stop_step = int(stops[0][1])
    assert {int(n) for _, n in stops} == {stop_step} and stop_step % 3 == 0, out
    # both workers exit EXIT_PREEMPTED after their checkpoint and message (never -6: a gloo
    # process ends through end_process, not interpreter teardown)
    assert out.count("exitcode  : 75") == 2, out
    assert ckpt_io.load_checkpoint(run).step == stop_step

    # 2. SIGKILL of rank 1: rank 0 names the failure and exits at once, never hangs
    job = Torchrun(cfg, run, tmp_path / "2.log")
    job.wait_for_step(stop_step + 4)
    tic = time.monotonic()
    job.signal_rank(1, signal.SIGKILL)
    assert job.wait(limit_s=120) != 0  # bounded: far below dist_timeout_s (1800 s)
    ended_s = time.monotonic() - tic
    # Rank 0 either notices the lost peer itself (a one-line DistributedError) or is torn down
    # first by torchrun's agent, which SIGTERMs the surviving workers: both end the job well
    # before any collective timeout. Which comes first depends on the machine's load.
    out = job.text()
    assert ("rank 0 lost the other ranks at step" in out or "stopped by SIGTERM" in out
            or "Signal 15 (SIGTERM) received by PID" in out), out  # fmt: skip
    print(f"\ntorchrun ended the job {ended_s:.1f} s after rank 1 was killed")
    killed_at = ckpt_io.load_checkpoint(run).step  # the newest checkpoint loads
    assert killed_at > stop_step

    # 3. resume to the end; equal (to float tolerance) to one process with grad_accum=2
    job = Torchrun(cfg, run, tmp_path / "3.log")
    assert job.wait() == 0, job.text()
    one = train(load_train_config(cfg, ["grad_accum=2"]), tmp_path / "one", quiet=True)
    a, b = ckpt_io.load_checkpoint(run), ckpt_io.load_checkpoint(one)
    assert a.step == b.step == STEPS
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    rows_a = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    rows_b = [r for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    assert [r["loss"] for r in rows_a] == pytest.approx([r["loss"] for r in rows_b], rel=1e-4)


def _hang_worker(rank: int, port: int, out: Path, result: Path) -> int:
    """One forked rank of a 2-rank run; rank 1 stops itself (SIGSTOP) after step 3."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    cfg = from_dict(TrainConfig, {**DDP_RUN, "dist_timeout_s": 3})

    def hang(state) -> None:
        if rank == 1 and state.step == 3:
            os.kill(os.getpid(), signal.SIGSTOP)

    tic = time.monotonic()
    try:
        Trainer(cfg, out, callbacks=[hang], quiet=True).run()
    except DistributedError as e:
        result.write_text(f"{time.monotonic() - tic:.2f}\n{e}")
        return 2
    return 0


@pytest.mark.slow
@pytest.mark.integration
def test_hung_rank_fails_the_others_after_dist_timeout(tmp_path):
    from .test_faults import run_forked

    port = _free_port()
    result = tmp_path / "rank0.txt"
    pid1 = os.fork()
    if pid1 == 0:  # pragma: no cover - rank 1
        os._exit(_hang_worker(1, port, tmp_path / "run", tmp_path / "rank1.txt"))
    try:
        code = run_forked(lambda: _hang_worker(0, port, tmp_path / "run", result), limit_s=120)
    finally:
        os.kill(pid1, signal.SIGKILL)
        os.waitpid(pid1, 0)
    assert code == 2, code
    seconds, message = result.read_text().split("\n", 1)
    assert "rank 0 lost the other ranks at step 3" in message, message
    assert "dist_timeout_s=3" in message and "resume with --resume" in message
    print(f"\nrank 0 gave up on the hung rank after {float(seconds):.1f} s of training")


def _resume_worker(rank: int, port: int, source: Path, out: Path, result: Path) -> int:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    try:
        Trainer(from_dict(TrainConfig, {**DDP_RUN, "dist_timeout_s": 20}), out, resume=source,
                quiet=True)  # fmt: skip
    except ckpt_io.CheckpointError as e:
        result.write_text(str(e))
        return 2
    return 0


@pytest.mark.integration
def test_ranks_that_resume_from_different_checkpoints_refuse_to_train(tmp_path):
    """Each rank reads the checkpoint itself; if one could only read an older one, both
    stop with a named error instead of training different steps."""
    from .test_faults import run_forked

    cfg = from_dict(TrainConfig, {**DDP_RUN, "device": "cpu", "duration_nimg": 32,
                                  "ckpt_every_nimg": 16})  # fmt: skip
    run = train(cfg, tmp_path / "run", quiet=True)
    older, newer = ckpt_io.list_checkpoints(run / "checkpoints")
    port = _free_port()
    pid1 = os.fork()
    if pid1 == 0:  # pragma: no cover - rank 1 sees only the older checkpoint
        os._exit(_resume_worker(1, port, older, tmp_path / "out", tmp_path / "1.txt"))
    code = run_forked(lambda: _resume_worker(0, port, newer, tmp_path / "out", tmp_path / "0.txt"))
    code1 = os.waitstatus_to_exitcode(os.waitpid(pid1, 0)[1])
    assert (code, code1) == (2, 2)
    for name in ("0.txt", "1.txt"):
        assert "resumed from different checkpoints (steps 2 to 4)" in (tmp_path / name).read_text()
