"""DDP under torchrun (gloo, 2 CPU processes) equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config
from denoiselab.train.loop import train

from .test_train import TINY


@pytest.mark.slow
@pytest.mark.integration
def test_two_ddp_ranks_match_one_process_with_grad_accum(tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg = dict(TINY, duration_nimg=32, ckpt_every_nimg=32, sample={"steps": 2, "num_grid": 2})
    cfg["device"] = "cpu"  # gloo on CPU, also where a GPU is present
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
    # The comparison is sensitive: one process without the shard split draws other noise.
    train(load_train_config(cfg_path), tmp_path / "other", quiet=True)
    c = ckpt_io.load_checkpoint(tmp_path / "other")
    assert max((a.model[k] - c.model[k]).abs().max().item() for k in a.model) > 1e-3
