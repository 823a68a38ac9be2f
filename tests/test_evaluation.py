"""`denoiselab eval` through the real path: a tiny run, the probe metrics, the CFG/EMA sweep."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from denoiselab.cli import main
from denoiselab.evaluation import parse_range, primary_key
from denoiselab.train.loop import train

from .test_train import tiny


def test_parse_range_inclusive_and_errors():
    assert parse_range("1:4:0.5") == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    assert parse_range("1.0:4.0:0.1")[-1] == 4.0 and len(parse_range("1.0:4.0:0.1")) == 31
    with pytest.raises(ValueError, match="LO:HI:STEP"):
        parse_range("1-4")


def test_primary_key_direction():
    assert primary_key({"metrics": {"fd_probe": 3.0}}, "fd_probe") == ("fd_probe", 3.0)
    assert primary_key({"metrics": {"acc_probe": 0.9}}, "acc_probe") == ("acc_probe", -0.9)


@pytest.mark.integration
def test_eval_sweep_then_final(tmp_path, capsys):
    run = train(replace(tiny(), duration_nimg=16), tmp_path / "run", quiet=True)
    out = tmp_path / "eval"
    args = [
        "eval",
        str(run),
        "--metrics",
        "fd_probe,acc_probe",
        "--num",
        "16",
        "--steps",
        "2",
        "--sweep-cfg",
        "1:2:1",
        "--sweep-num",
        "8",
        "--probe-steps",
        "20",
        "--batch",
        "8",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num"] == 16 and result["step"] == 2
    assert len(result["sweep"]) == 2 * 2  # two EMA decays × two CFG scales
    best = min(result["sweep"], key=lambda r: r["metrics"]["fd_probe"])
    assert (result["ema"], result["cfg"]) == (best["ema"], best["cfg"])
    assert set(result["metrics"]) >= {"fd_probe", "acc_probe"}
    assert 0.0 <= result["metrics"]["acc_probe"] <= 1.0
    assert "generation_images_per_s" in result
    from denoiselab.metrics.probe import load_probe
    from denoiselab.metrics.probe_train import ProbeConfig

    probe = load_probe(tiny().data, config=ProbeConfig(steps=20), cache_dir=tmp_path / "cache")
    real = probe.meta["val_accuracy"]
    assert 0 < real <= 1 and result["probe_real_accuracy"] == real
    shown = capsys.readouterr().out
    assert f"(the probe on held-out real images: {real:.4g})" in shown
    assert main(["eval", str(run), "--metrics", "fid_typo", "--out", str(out)]) == 2
    assert "unknown metric(s) ['fid_typo']" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_compile_scores_like_eager(tmp_path):
    run = train(replace(tiny(), duration_nimg=16), tmp_path / "run", quiet=True)
    results = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"eval{len(flags)}"
        argv = ["eval", str(run), "--metrics", "fd_probe,acc_probe", "--num", "16", "--steps",
                "2", "--cfg", "2", "--probe-steps", "20", "--batch", "8", "--cache-dir",
                str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
        assert main([*argv, *flags]) == 0
        result = json.loads((out / "eval.json").read_text())
        assert result["compile"] is bool(flags)
        results.append(result["metrics"])
    eager, compiled = results
    assert compiled["acc_probe"] == eager["acc_probe"]
    assert compiled["fd_probe"] == pytest.approx(eager["fd_probe"], rel=1e-3)


def test_eval_samples_with_the_runs_own_settings_by_default(tmp_path):
    run = train(replace(tiny(), duration_nimg=16), tmp_path / "run", quiet=True)
    out = tmp_path / "eval"
    argv = ["eval", str(run), "--metrics", "acc_probe", "--num", "8", "--probe-steps", "5",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    own = tiny().sample  # Heun-3, CFG 1.5 on [0.1, 1]
    assert (result["cfg"], result["sampling_steps"], result["solver"]) == (1.5, 3, "heun")
    assert result["cfg_interval"] == list(own.interval)
    assert main([*argv[:-2], "--cfg", "2", "--steps", "4", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (result["cfg"], result["sampling_steps"]) == (2.0, 4)


def test_an_unwritable_out_fails_before_any_sample(tmp_path, capsys, monkeypatch):
    """``--out`` that cannot become a folder (a file there) is a one-line error before the
    evaluation: it came after every sample was drawn and scored, losing the results."""
    import denoiselab.evaluation as evaluation

    run = train(replace(tiny(), duration_nimg=8), tmp_path / "run", quiet=True)

    def never(*args, **kwargs):
        raise AssertionError("evaluated although --out cannot be written")

    monkeypatch.setattr(evaluation, "evaluate", never)
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        argv = ["eval", str(run), "--metrics", "fd_probe", "--num", "4", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--out {str(out)!r}" in err and "not a directory" in err
    assert (tmp_path / "afile").read_text() == "x"


def test_one_class_data_skips_acc_probe_and_eval_refuses_it(tmp_path, capsys):
    """On one flat folder (one class) every sample is of the class: periodic evaluation skips
    acc_probe, saying so at the start (it logged 1.0 at every evaluation), and ``denoiselab
    eval --metrics acc_probe`` is a named error; fd_probe is still scored."""
    from PIL import Image

    from denoiselab.cli import main
    from denoiselab.train.loop import train
    from denoiselab.train.run import read_metrics

    from .test_train import tiny

    root = tmp_path / "pics"
    root.mkdir()
    for k in range(16):
        Image.new("RGB", (16, 16), (16 * k, 255 - 16 * k, 90)).save(root / f"{k}.png")
    probe = '{"steps": 5, "num_train": 16, "num_val": 8, "batch": 8}'
    cfg = tiny(**{"data.name": "imagefolder", "data.root": str(root), "data.num_images": 16,
                  "duration_nimg": 16, "eval.every_nimg": 16, "eval.num": 8, "eval.batch": 8,
                  "eval.steps": 1, "eval.cache_dir": str(tmp_path / "cache"),
                  "eval.probe": probe})  # fmt: skip
    assert cfg.eval.metrics == ("fd_probe", "acc_probe")  # the defaults
    run = train(cfg, tmp_path / "run")
    assert "eval.metrics ['acc_probe'] skipped: the data has one class" in capsys.readouterr().err
    (row,) = [r for r in read_metrics(run / "metrics.jsonl") if "eval_seconds" in r]
    assert "eval/fd_probe" in row and "eval/acc_probe" not in row
    argv = ["eval", str(run), "--metrics", "fd_probe,acc_probe", "--num", "8", "--batch", "8",
            "--steps", "1", "--probe-steps", "5", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "e")]  # fmt: skip
    assert main(argv) == 2
    assert "acc_probe: this run's data (imagefolder) has 1 class" in capsys.readouterr().err
