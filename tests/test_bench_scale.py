"""``bench --data``, ``bench --strategy fsdp --activation-checkpointing`` and the scale table
(``denoiselab.bench.scale``, what ``benchmarks/gpu_suite.sh`` runs) end to end on CPU with
JiT-Micro. Nothing here is about speed: the reports hold what they say they hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from denoiselab.bench import bench_main
from denoiselab.bench import scale as scale_mod
from denoiselab.data import prepare as prep

from .test_prepared import make_folder

COMMON = ["--model", "JiT-Micro", "--batch", "4", "--dtype", "fp32", "--threads", "1",
          "--warmup", "1", "--repeats", "2", "--matmul-max-size", "256"]  # fmt: skip


@pytest.mark.parametrize("prepared", [False, True])
def test_bench_data_times_loader_step_and_fed_step(tmp_path, capsys, prepared):
    folder = make_folder(tmp_path / "images")
    root = folder
    if prepared:
        root = tmp_path / "prep"
        prep.prepare(folder, root, image_size=16)
    argv = [*COMMON, "--what", "train", "--data", str(root), "--workers", "1",
            "--data-batches", "3", "--out", str(tmp_path / "b")]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    d = result["data"]
    assert d["kind"] == ("prepared" if prepared else "imagefolder") and d["workers"] == 1
    assert d["images"] == 14 and d["batch_shape"] == [4, 3, 16, 16]
    for key in ("loader_images_per_s", "per_worker_images_per_s", "fed_images_per_s"):
        assert d[key] > 0, key
    assert d["step_images_per_s"] == result["train"]["images_per_s"]
    slower = (
        "input pipeline" if d["loader_images_per_s"] < d["step_images_per_s"] else "training step"
    )
    assert d["bottleneck"] == slower
    assert f"bottleneck: {slower}" in capsys.readouterr().out
    # the loader alone (no model step, no ceiling)
    assert bench_main([*COMMON, "--what", "data", "--data", str(root), "--workers", "0",
                       "--data-batches", "2", "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    only = json.loads((tmp_path / "d" / "bench.json").read_text())
    assert "train" not in only and "ceiling" not in only and only["data"]["workers"] == 0
    assert "fed_images_per_s" not in only["data"]


def test_bench_data_bad_input(tmp_path, capsys):
    assert bench_main([*COMMON, "--what", "data", "--out", str(tmp_path)]) == 2
    assert "give --data PATH" in capsys.readouterr().err
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    assert bench_main([*COMMON, "--data", str(empty.parent), "--out", str(tmp_path)]) == 2
    assert "contain no files" in capsys.readouterr().err


def test_bench_fsdp_with_activation_checkpointing_reports_peak_memory(tmp_path, capsys):
    argv = [*COMMON, "--what", "train", "--strategy", "fsdp", "--activation-checkpointing",
            "--out", str(tmp_path)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["config"]["strategy"] == "fsdp" and result["config"]["activation_checkpointing"]
    assert result["train"]["peak_memory_mib"] > 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert " fsdp +AC " in line and "peak " in line and " GiB" in line
    assert not torch.distributed.is_initialized()  # the one-rank group was released


def test_scale_table_rows_budget_and_out_of_memory(tmp_path, monkeypatch, capsys):
    from denoiselab.train.loop import Trainer

    real = Trainer.train_step

    def step(self, s, images, labels):  # "out of memory" from batch 16 on
        if images.shape[0] >= 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, s, images, labels)

    monkeypatch.setattr(Trainer, "train_step", step)
    argv = ["--device", "cpu", "--rows", "JiT-Micro@16:4,JiT-Micro@16:2", "--strategies",
            "ddp,fsdp+ac", "--dtype", "fp32", "--no-compile", "--warmup", "1", "--repeats", "1",
            "--max-batch", "64", "--matmul-max-size", "256", "--threads", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert scale_mod.scale_main(argv) == 0
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [(r["batch"], r["strategy"]) for r in rows] == [
        (4, "ddp"), (4, "fsdp+ac"), (2, "ddp"), (2, "fsdp+ac")]  # fmt: skip
    for r in rows:
        assert r["largest_batch"] == 8 and r["first_oom"] == 16 and r["images_per_s"] > 0
        assert 0 < r["mfu"] < 1 and r["peak_gib"] > 0
    md = (tmp_path / "scale.md").read_text()
    assert md.count("| JiT-Micro | 16 |") == 4 and "8 (OOM at 16)" in md
    assert md in capsys.readouterr().out
    # a budget already spent: rows are listed as not measured, not silently dropped
    assert scale_mod.scale_main([*argv[:-2], "--budget-s", "0", "--out", str(tmp_path / "z")]) == 0
    md = (tmp_path / "z" / "scale.md").read_text()
    assert md.count("not measured (time budget)") == 4
    with pytest.raises(ValueError, match="MODEL@SIZE:BATCH"):
        scale_mod.Row.parse("JiT-B/16:128", "ddp")


def test_gpu_suite_script_is_valid_bash():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "tests/test_gpu.py" in text and "denoiselab.bench.scale" in text
