"""DDP under torchrun (gloo, 2 CPU processes) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from denoiselab.cli import main
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics

from .test_train import TINY


@pytest.mark.slow
@pytest.mark.integration
def test_two_ddp_ranks_match_one_process_with_grad_accum(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg = dict(TINY, duration_nimg=32, ckpt_every_nimg=32, sample={"steps": 2, "num_grid": 2})
    cfg["device"] = "cpu"  # gloo on CPU, also where a GPU is present
    probe = {"steps": 5, "num_train": 64, "num_val": 16, "batch": 16}
    cfg["eval"] = {"every_nimg": 32, "metrics": ["fd_probe", "acc_probe"], "num": 16, "batch": 4,
                   "steps": 2, "cache_dir": str(tmp_path / "cache"), "probe": probe}  # fmt: skip
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "denoiselab",
        "train",
        str(cfg_path),
        "--out",
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = yaml.safe_load((tmp_path / "ddp" / "meta.json").read_text())
    assert meta["world_size"] == 2

    # one process: the same global batch as two micro-batches (shards 0 and 1)
    single = load_train_config(cfg_path, ["grad_accum=2"])
    train(single, tmp_path / "one", quiet=True)
    a = ckpt_io.load_checkpoint(tmp_path / "ddp")
    b = ckpt_io.load_checkpoint(tmp_path / "one")
    assert a.step == b.step == 4
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-5, msg=k)
    # Periodic evaluation: under DDP each rank generated half of the batches.
    (ev_ddp,) = [
        r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "eval/fd_probe" in r
    ]
    (ev_one,) = [
        r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "eval/fd_probe" in r
    ]
    assert ev_ddp["step"] == ev_one["step"] == 4
    assert ev_ddp["eval/fd_probe"] == pytest.approx(ev_one["eval/fd_probe"], rel=1e-3)

    # `denoiselab eval` under torchrun: the same numbers as one process, for the same weights.
    args = ["eval", str(tmp_path / "ddp"), "--metrics", "fd_probe,acc_probe", "--num-samples", "16",
            "--batch", "4", "--steps", "2", "--probe-steps", "5", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "denoiselab", *args, "--out", str(tmp_path / "eval2")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "eval1")]) == 0
    two = json.loads((tmp_path / "eval2" / "eval.json").read_text())
    one = json.loads((tmp_path / "eval1" / "eval.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["batch_seeds"] == one["batch_seeds"]
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-9)

    # The comparison is sensitive: one process without the shard split draws other noise.
    train(load_train_config(cfg_path), tmp_path / "other", quiet=True)
    c = ckpt_io.load_checkpoint(tmp_path / "other")
    assert max((a.model[k] - c.model[k]).abs().max().item() for k in a.model) > 1e-3
