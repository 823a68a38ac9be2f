"""``denoiselab bench --routing/--optim``: variants are the configs they claim to be, are timed
in the same run as the dense AdamW base, and bad specs are one-line errors. No timing claims."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from denoiselab.bench import bench_main
from denoiselab.bench.variants import parse_optim, parse_routing, variant_config
from denoiselab.bench.workloads import TrainWorkload, bench_train_config, resolved_model_config
from denoiselab.models import forward_macs
from denoiselab.train.muon import Muon


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_variant_configs_change_only_what_they_name() -> None:
    tc = bench_train_config("JiT-Micro", None, 4, "fp32", False, "cpu")
    routed = variant_config(tc, parse_routing("sprint:0.75:0:1"))
    assert routed.model["routing"] == {"kind": "sprint", "ratio": 0.75, "start": 0, "end": 1}
    assert routed.optim == tc.optim and routed.global_batch == tc.global_batch
    muon = variant_config(tc, parse_optim("muon:fp32"))
    assert (muon.optim.name, muon.optim.muon.ns_dtype, muon.model) == ("muon", "fp32", tc.model)
    assert muon.optim.betas == tc.optim.betas


def test_bench_times_variants_against_the_dense_step(tmp_path: Path, capsys) -> None:
    argv = ["--model", "JiT-Micro", "--batch", "4", "--dtype", "fp32", "--what", "train",
            "--warmup", "1", "--repeats", "2", "--matmul-max-size", "128",
            "--set", "model.depth=3", "--routing", "tread:0.5:1:1", "--optim", "muon:fp32",
            "--out", str(tmp_path)]  # fmt: skip
    assert bench_main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["variant"]: r for r in result["compare"]["rows"]}
    assert list(rows) == ["base", "tread:0.5:1:1", "muon:fp32"]
    assert result["model"]["config"]["depth"] == 3  # --set reached the network
    for row in rows.values():
        assert len(row["steps_s"]) == 2 and row["images_per_s"] > 0 and row["steps_run"] == 3
    assert all(rows[n]["speedup"] > 0 for n in ("tread:0.5:1:1", "muon:fp32"))
    # the FLOP ratio is the analytic one: block 1 of 3 sees 8 of 16 patch tokens (+ 4 in-context)
    dense = bench_train_config("JiT-Micro", None, 4, "fp32", False, "cpu")
    dense = dataclasses.replace(dense, model={**dense.model, "depth": 3})
    mc = resolved_model_config(variant_config(dense, parse_routing("tread:0.5:1:1")))
    expected = forward_macs(mc, routed=True)["total"] / forward_macs(mc)["total"]
    assert rows["tread:0.5:1:1"]["flop_ratio"] == pytest.approx(expected) and expected < 0.95
    assert rows["muon:fp32"]["flop_ratio"] == 1.0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "step speed-up vs dense AdamW: tread:0.5:1:1 " in summary and "muon:fp32 " in summary


def test_the_muon_variant_runs_denoiselabs_muon_in_the_named_dtype(tmp_path: Path) -> None:
    tc = variant_config(bench_train_config("JiT-Micro", None, 4, "fp32", False, "cpu"),
                        parse_optim("muon:fp32"))  # fmt: skip
    inner = TrainWorkload.build(tc, tmp_path).trainer.optimizer._inner["muon"]
    assert isinstance(inner, Muon) and inner.ns_dtype == torch.float32


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--routing", "tread"], "expected KIND:RATIO[:START:END]"),
        (["--routing", "tread:half"], "RATIO is a number"),
        (["--routing", "tread:1.5"], "model.routing.ratio=1.5 must lie in [0, 1)"),
        (["--routing", "tread:0.5:1:5"], "give blocks 1 … 5, not a range inside the 2 blocks"),
        (["--optim", "sgd"], "--optim 'sgd'; valid: adamw, muon"),
        (["--optim", "muon:fp16"], "--optim 'muon:fp16'"),
    ],
)
def test_bad_variant_specs_are_named(argv, message, tmp_path, capsys) -> None:
    assert bench_main(["--model", "JiT-Micro", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bench.json").exists()
