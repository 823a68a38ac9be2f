"""The ablation runner through its real code path: suites, resume, scoreboard, report, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from denoiselab.ablate import ablate_main, builtin_suites, load_suite, report_main
from denoiselab.ablate.runner import parse_devices, run_suite
from denoiselab.ablate.scoreboard import build_rows, training_time, verdict
from denoiselab.config import ConfigError, to_dict
from denoiselab.models import model_config
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.config import TrainConfig

TINY = {
    "name": "tiny",
    "description": "two variants at smoke size",
    "base": {
        "data": {"name": "shapes", "image_size": 16, "num_images": 64},
        "model": {"name": "JiT-Micro"},
        "optim": {"lr": 1e-3, "warmup_epochs": 0.25, "grad_clip": 1.0},
        "ema": {"decays": [0.9, 0.99], "warmup": True},
        "sample": {"steps": 2, "num_grid": 4},
        "global_batch": 8,
        "duration_nimg": 32,
        "log_every_nimg": 8,
        "sample_every_nimg": 1_000_000,
        "ckpt_every_nimg": 16,
        "deterministic": True,
    },
    "baseline": "x",
    "variants": {"x": {"objective.prediction": "x"}, "v": {"objective": {"prediction": "v"}}},
    "eval": {
        "num": 16,
        "batch": 16,
        "every_nimg": 16,
        "periodic_num": 8,
        "grid_num": 4,
        "probe": {"steps": 10, "num_train": 64, "num_val": 16, "batch": 16},
    },
    "verdict": {"claim": "x wins", "group_by": "objective.prediction", "expect": "x"},
}
REPORT_FILES = (
    "suite.json",
    "scoreboard.csv",
    "scoreboard.json",
    "scoreboard.md",
    "report.html",
    "curves_fd_probe.png",
    "loss.png",
    "throughput.png",
    "samples.png",
)


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so the runner does not catch it."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One probe/reference cache for the module (the probe trains once)."""
    return tmp_path_factory.mktemp("cache")


def write_suite(path: Path, cache: Path, **changes) -> Path:
    data = json.loads(json.dumps(TINY))
    data["eval"]["cache_dir"] = str(cache)
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def steps_of(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration
def test_suite_end_to_end_and_report_rebuilds(tmp_path, cache, capsys):
    suite_file = write_suite(tmp_path / "tiny.yaml", cache)
    out = tmp_path / "out"
    assert ablate_main([str(suite_file), "--out", str(out), "--devices", "cpu"]) == 0
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "## Scoreboard: tiny" in printed and "**Verdict:**" in printed
    board = json.loads((out / "scoreboard.json").read_text())
    base, other = board["rows"]
    assert [base["variant"], other["variant"]] == ["x", "v"]
    assert base["status"] == other["status"] == "done"
    assert base["fd_probe_delta"] == 0.0
    assert other["fd_probe_delta"] == pytest.approx(other["fd_probe"] - base["fd_probe"])
    assert other["img_per_s"] > 0 and other["params"] == base["params"] > 0
    assert board["verdict"]["holds"] in (True, False)
    assert re.match(r"(HOLDS|DOES NOT HOLD) — x wins", board["verdict"]["text"])
    for name in ("x", "v"):  # periodic evaluation every 2 steps, the last step included
        assert steps_of(jsonl(out / "variants" / name / "eval.jsonl")) == [2, 4]
    html = (out / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert len(images) == 4 and all(s.startswith("data:image/png;base64,") for s in images)
    # the report is rebuilt from the results alone
    for name in ("report.html", "scoreboard.json", "samples.png"):
        (out / name).unlink()
    assert report_main([str(out)]) == 0
    rebuilt = json.loads((out / "scoreboard.json").read_text())
    assert rebuilt["rows"] == board["rows"] and (out / "report.html").is_file()
    assert (out / "samples.png").is_file()


@pytest.mark.integration
def test_interrupted_suite_resumes_and_skips_finished_variants(tmp_path, cache):
    suite = load_suite(write_suite(tmp_path / "tiny.yaml", cache))
    out = tmp_path / "out"
    assert run_suite(suite, out, devices=["cpu"], only=["x"], log=lambda m: None) == {"x": "done"}
    x_dir, v_dir = out / "variants" / "x", out / "variants" / "v"
    x_files = {p: p.stat().st_mtime_ns for p in x_dir.rglob("*") if p.is_file()}

    def kill_at_step_3(state):
        if state.step == 3:
            raise Killed

    with pytest.raises(Killed):  # x is skipped; v is killed after its step-2 checkpoint
        run_suite(suite, out, devices=["cpu"], callbacks=[kill_at_step_3], log=lambda m: None)
    assert ckpt_io.load_checkpoint(v_dir).step == 2 and not (v_dir / "done.json").exists()

    logged: list[str] = []
    assert run_suite(suite, out, devices=["cpu"], log=logged.append) == {"x": "done", "v": "done"}
    assert "x: done already, skipped" in logged
    assert {p: p.stat().st_mtime_ns for p in x_dir.rglob("*") if p.is_file()} == x_files
    assert [s["start_step"] for s in jsonl(v_dir / "sessions.jsonl")] == [0, 2]
    assert steps_of(jsonl(v_dir / "eval.jsonl")) == [2, 4]
    assert steps_of(jsonl(v_dir / "metrics.jsonl")) == [1, 2, 3, 4]

    # the resumed variant equals an uninterrupted run of it, weights and scores
    fresh = tmp_path / "fresh"
    run_suite(suite, fresh, devices=["cpu"], only=["v"], log=lambda m: None)
    a = load_file(ckpt_io.resolve_checkpoint(v_dir))
    b = load_file(ckpt_io.resolve_checkpoint(fresh / "variants" / "v"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((v_dir / "done.json").read_text())
    assert done["metrics"] == json.loads((fresh / "variants/v/done.json").read_text())["metrics"]

    # changed settings are refused for started variants, before any work
    assert ablate_main([suite.source, "--out", str(out), "--set", "optim.lr=0.5"]) == 2
    assert {p: p.stat().st_mtime_ns for p in x_dir.rglob("*") if p.is_file()} == x_files


MALFORMED = [
    ({"variantz": {}}, r"unknown key\(s\) \['variantz'\]; valid: name, description, base"),
    (
        {"variants": {"x": {}, "a": {"objective.predicton": "x"}}},
        r"unknown key 'predicton' in objective",
    ),
    ({"variants": {"x": {}, "a": {"model.widht": 8}}}, r"unknown key 'widht' in model; valid keys"),
    (
        {"variants": {"x": {}, "a": {"model.patch_size": 5}}},
        r"image_size=16 is not divisible by patch",
    ),
    (
        {"variants": {"x": {}, "a": {"seed": 3}}},
        r"variant 'a' overrides 'seed'; every variant shares",
    ),
    ({"variants": {"x": {}, "a": {"data.image_size": 32}}}, r"overrides 'data.image_size'"),
    (
        {"variants": {"x": {}, "a": {"optim.lr": "fast"}}},
        r"variant 'a': optim.lr='fast' is not a float",
    ),
    ({"baseline": "nope"}, r"baseline 'nope' is not a variant; valid: \['x', 'v'\]"),
    ({"base": "nope.yaml"}, r"base config 'nope.yaml' not found"),
    ({"eval": {"metrics": ["fid_probe"]}}, r"unknown metric 'fid_probe'; valid: auto, fd_probe"),
    ({"eval": {"nmu": 3}}, r"unknown key 'nmu' in eval; valid keys: metrics, num"),
    (
        {"verdict": {"claim": "c", "group_by": "objective.prediction", "expect": "z"}},
        r"verdict.expect='z' but objective.prediction takes \['v', 'x'\]",
    ),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_malformed_suite_fails_before_training(tmp_path, cache, capsys, change, message):
    suite_file = write_suite(tmp_path / "bad.yaml", cache, **change)
    out = tmp_path / "out"
    assert ablate_main([str(suite_file), "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(ConfigError, match=message):
        load_suite(suite_file)


def test_unknown_suite_and_variant_are_named(tmp_path, cache, capsys):
    assert ablate_main(["no_such_suite", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'no_such_suite' is neither a file nor a built-in suite" in err
    assert "prediction_targets" in err
    suite_file = write_suite(tmp_path / "tiny.yaml", cache)
    assert ablate_main([str(suite_file), "--out", str(tmp_path / "o"), "--only", "w"]) == 2
    assert "unknown variant(s) ['w']; valid: ['x', 'v']" in capsys.readouterr().err


def test_every_builtin_suite_parses_and_validates():
    names = builtin_suites()
    assert {"prediction_targets", "noise_shift", "bottleneck", "jit_components"} <= set(names)
    for name in names:
        for quick in (False, True):
            suite = load_suite(name, quick=quick)
            configs = [suite.config(v) for v in suite.names]
            assert all(isinstance(c, TrainConfig) for c in configs)
            tokenizer = ("root", "autoencoder", "latent_norm")  # latent suites may vary these
            data = [
                json.dumps({k: v for k, v in to_dict(c.data).items()
                            if c.data.name != "latents" or k not in tokenizer}, sort_keys=True)
                for c in configs
            ]  # fmt: skip
            shared = {(c.seed, c.global_batch, c.duration_nimg, d) for c, d in zip(configs, data)}
            assert len(shared) == 1, f"{name}: variants differ in seed/batch/budget/data"
    table2 = load_suite("prediction_targets")
    combos = {
        (c.objective.prediction, c.objective.loss_space) for c in map(table2.config, table2.names)
    }
    assert combos == {(p, q) for p in ("x", "eps", "v") for q in ("x", "eps", "v")}
    cfg = table2.config("x_v")
    mc = model_config(cfg.model["name"], **{k: v for k, v in cfg.model.items() if k != "name"})
    assert mc.patch_size**2 * 3 > mc.hidden_size  # patch dimension above the width
    assert [v for v in load_suite("bottleneck").variants.values()] == [
        {"model.bottleneck": d} for d in (16, 32, 64, 128, None)
    ]


def test_verdict_is_computed_from_the_numbers(tmp_path, cache):
    variants = {n: {"objective.prediction": p} for n, p in (("x", "x"), ("e", "eps"), ("v", "v"))}
    suite = load_suite(write_suite(tmp_path / "s.yaml", cache, variants=variants))
    rows, _ = build_rows(suite, tmp_path / "nothing")
    assert verdict(suite, rows)["holds"] is None  # nothing finished yet
    for row, fd in zip(rows, (10.0, 300.0, 40.0)):
        row["fd_probe"] = fd
    result = verdict(suite, rows)
    assert result["holds"] is True and result["ratio"] == pytest.approx(4.0)
    assert result["best"] == ["x", 10.0] and result["best_other"] == ["v", 40.0]
    rows[2]["fd_probe"] = 12.0  # v-prediction nearly as good: no clear win
    result = verdict(suite, rows)
    assert result["holds"] is False and result["ratio"] == pytest.approx(1.2)
    assert result["text"].startswith("DOES NOT HOLD — x wins")


def test_throughput_excludes_periodic_evaluation():
    rows = [{"nimg": 100, "img_per_s": 50.0}, {"nimg": 200, "img_per_s": 10.0}]
    rows += [{"nimg": 300, "img_per_s": 50.0}, {"nimg": 400, "img_per_s": 50.0}]
    evals = [{"nimg": 200, "seconds": 8.0}]  # interval 2: 10 s, of which 8 s evaluation
    seconds, rate = training_time(rows, evals)
    assert seconds == pytest.approx(2 + 10 + 2 + 2)
    assert rate == pytest.approx(50.0)


def test_devices_are_validated():
    assert parse_devices("cpu") == ["cpu"] and parse_devices("cpu, cpu") == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        parse_devices("gpu0")
    with pytest.raises(ConfigError, match="give at least one device"):
        parse_devices(",")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:0' but CUDA is not available"):
            parse_devices("cuda:0")


@pytest.mark.slow
@pytest.mark.integration
def test_variants_spread_over_worker_processes(tmp_path, cache):
    """--devices cpu,cpu: one worker subprocess per device, same results as in-process."""
    suite_file = write_suite(tmp_path / "tiny.yaml", cache)
    out = tmp_path / "out"
    args = [str(suite_file), "--out", str(out), "--devices", "cpu,cpu", "--threads", "1"]
    assert ablate_main(args) == 0
    for name in ("x", "v"):
        assert (out / "variants" / name / "done.json").is_file()
        assert (out / "variants" / name / "worker.log").is_file()
    serial = tmp_path / "serial"
    run_suite(load_suite(suite_file), serial, devices=["cpu"], only=["x"], log=lambda m: None)
    a = json.loads((out / "variants/x/done.json").read_text())["metrics"]
    assert a == json.loads((serial / "variants/x/done.json").read_text())["metrics"]
