"""Faults under ``strategy: fsdp``: kills inside sharded checkpoint writes (and at random
moments), a full disk, and a stop signal under torchrun with two ranks.

A sharded checkpoint is many files; it becomes visible only by the rename of its finished
folder, and old ones are renamed away before they are deleted. Each kill (the injection
points of ``test_faults.py``: before/after every rename, before every fsync — DCP's own file
writes included — plus timed kills) is followed by ``--auto-resume``, which must end bit for
bit where the uninterrupted run ends, with no temporary folder left.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from denoiselab.cli import main
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

from .test_faults import FAULT_RUN, assert_same_run, inject_kill, rows_of, run_forked, state_of
from .test_faults_ddp import DDP_RUN, Torchrun

FSDP_FAULT_RUN = dict(FAULT_RUN, strategy="fsdp", device="cpu")
KINDS = ("before-rename", "after-rename", "before-fsync")


def only_sharded_and_final_pair(directory: Path, final: int) -> bool:
    """Complete sharded folders, the consolidated pair of the last step, set-aside ones."""
    names = {p.name for p in directory.iterdir() if not p.name.endswith(".stale")}
    pair = {f"step_{final:09d}.safetensors", f"step_{final:09d}.state.safetensors"}
    folders = names - pair
    return pair <= names and all(re.fullmatch(r"step_\d{9}\.dcp", n) for n in folders)


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_inside_sharded_checkpoint_writes_then_resume_is_bit_exact(tmp_path):
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(yaml.safe_dump(FSDP_FAULT_RUN))
    counts_file = tmp_path / "counts.yaml"

    def reference() -> int:  # forked: the one-rank group lives and dies in the child
        counts: dict[str, int] = {}
        for kind in KINDS:
            inject_kill(kind, 0, counts)
        code = main(["train", str(cfg), "--out", str(tmp_path / "ref")])
        counts_file.write_text(yaml.safe_dump(counts))
        return code

    assert run_forked(reference) == 0
    ref = (state_of(tmp_path / "ref"), rows_of(tmp_path / "ref"))
    counts = yaml.safe_load(counts_file.read_text())
    rng = random.Random(19)
    trials = [(kind, rng.randint(1, counts[kind])) for kind in KINDS for _ in range(2)]
    report = []
    for i, (kind, k) in enumerate(trials):
        run = tmp_path / f"t{i}"
        args = ["train", str(cfg), "--out", str(run), "--auto-resume"]

        def child(kind=kind, k=k, args=args) -> int:
            inject_kill(kind, k)
            return main(args)

        code = run_forked(child)
        assert run_forked(lambda args=args: main(args)) == 0, f"trial {i}: resume failed"
        assert_same_run(run, ref, f"trial {i} ({kind} at call {k})")
        assert only_sharded_and_final_pair(run / "checkpoints", 6), os.listdir(run / "checkpoints")
        leftovers = [p.name for p in run.rglob("*") if p.name.endswith((".tmp", ".del"))]
        assert not leftovers, leftovers
        report.append(f"{kind:>13} at call {k:>3}: {'killed' if code < 0 else f'exit {code}'}")
    print(f"\ncalls per uninterrupted run: {counts}\n" + "\n".join(report))
    assert sum("killed" in r for r in report) == len(trials)


def test_full_disk_during_a_sharded_save_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    real = HuggingFaceStorageWriter.write_data
    calls = [0]

    def write_data(self, plan, planner):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", write_data)
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(yaml.safe_dump(dict(FSDP_FAULT_RUN, duration_nimg=24)))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not write checkpoint" in err and "step_000000002.dcp" in err, err
    assert "No space left" in err and "newest checkpoint kept is step_000000001.dcp" in err, err
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["step_000000001.dcp"], names  # the half-written folder is gone
    assert ckpt_io.load_checkpoint(tmp_path / "run").step == 1
    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", real)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--auto-resume"]) == 0


@pytest.mark.slow
@pytest.mark.integration
def test_stop_signal_under_fsdp_torchrun_checkpoints_and_resumes(tmp_path):
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(yaml.safe_dump(dict(DDP_RUN, strategy="fsdp")))
    run = tmp_path / "run"
    job = Torchrun(cfg, run, tmp_path / "1.log")
    job.wait_for_step(4)
    job.signal_rank(1, signal.SIGUSR1)
    assert job.wait() != 0
    out = job.text()
    stops = re.findall(r"stopped by (SIGUSR1|a stop request of another rank) after step (\d+)", out)
    assert len(stops) == 2 and len({n for _, n in stops}) == 1, out
    stop_step = int(stops[0][1])
    assert out.count("exitcode  : 75") == 2, out  # both ranks; never -6 (see end_process)
    newest = ckpt_io.list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == f"step_{stop_step:09d}.dcp", newest  # sharded, and it loads
    assert ckpt_io.load_checkpoint(newest).step == stop_step
    job = Torchrun(cfg, run, tmp_path / "2.log")
    assert job.wait() == 0, job.text()
    assert f"resumed from {newest} at step {stop_step}" in job.text()
    # equal (to float tolerance) to one process with the same global batch
    one = train(load_train_config(cfg, ["grad_accum=2", "strategy=ddp"]), tmp_path / "one",
                quiet=True)  # fmt: skip
    a, b = ckpt_io.load_checkpoint(run), ckpt_io.load_checkpoint(one)
    assert a.path.name.endswith(".safetensors") and a.step == b.step  # consolidated at the end
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    rows_a = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    rows_b = [r["loss"] for r in read_metrics(one / "metrics.jsonl") if "loss" in r]
    assert rows_a == pytest.approx(rows_b, rel=1e-4)
