"""Equal wall-clock suites (``budget: time``): durations from measured speeds, recorded once and
reused, through the real runner; the built-in token_routing and optimizer suites."""

from __future__ import annotations

import json

import pytest

from denoiselab.ablate import ablate_main, load_suite
from denoiselab.ablate import budget as budget_mod
from denoiselab.ablate.budget import durations_for, measure_speeds
from denoiselab.ablate.runner import run_suite
from denoiselab.config import ConfigError

from .test_ablate import write_suite


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One probe/reference cache for the module (the probe trains once)."""
    return tmp_path_factory.mktemp("cache")


def test_durations_scale_the_baseline_budget_by_speed(tmp_path, cache) -> None:
    suite = load_suite(write_suite(tmp_path / "s.yaml", cache, budget="time"))
    assert suite.config("x").duration_nimg == 32 and suite.config("x").global_batch == 8
    got = durations_for(suite, {"x": 1.0, "v": 1.6})
    assert got == {"x": 32, "v": 48}  # 32 · 1.6 = 51.2 → 6 batches of 8 (round(6.4))
    assert durations_for(suite, {"x": 1.0, "v": 0.1}) == {"x": 32, "v": 8}  # at least one batch
    with pytest.raises(ConfigError, match=r"no speed for variant\(s\) \['v'\]"):
        durations_for(suite, {"x": 1.0})


def test_time_budget_runs_each_variant_for_its_images_and_reuses_the_measurement(
    tmp_path, cache, monkeypatch
) -> None:
    calls = []

    def fake(suite, device, warmup, repeats, names=None):
        calls.append((warmup, repeats))
        return {"speed": {"x": 1.0, "v": 1.5}, "img_per_s": {"x": 100.0, "v": 150.0}}

    monkeypatch.setattr(budget_mod, "measure_speeds", fake)
    path = write_suite(tmp_path / "s.yaml", cache, budget="time")
    out = tmp_path / "out"
    status = run_suite(load_suite(path, quick=True), out, devices=["cpu"], log=lambda m: None)
    assert status == {"x": "done", "v": "done"} and calls == [(1, 3)]  # quick: a short measurement
    done = {n: json.loads((out / "variants" / n / "done.json").read_text()) for n in ("x", "v")}
    assert (done["x"]["nimg"], done["v"]["nimg"]) == (32, 48)
    saved = json.loads((out / "suite.json").read_text())
    assert saved["budget"] == "time" and saved["durations"] == {"x": 32, "v": 48}
    assert json.loads((out / "throughput.json").read_text())["speed"] == {"x": 1.0, "v": 1.5}
    # a second session reuses throughput.json (no new measurement) and finds everything done
    assert run_suite(load_suite(path, quick=True), out, devices=["cpu"], log=lambda m: None)
    assert len(calls) == 1
    # the report (rebuilt from suite.json) states the budget; an images run is the default
    assert ablate_main([str(path), "--quick", "--out", str(out), "--devices", "cpu"]) == 0
    board = (out / "scoreboard.md").read_text()
    assert "Equal wall-clock budget" in board and "v 48" in board
    assert (
        load_suite(path).budget == "time" and load_suite(path, budget="images").budget == "images"
    )


def test_only_times_the_variants_it_runs(tmp_path, cache, monkeypatch) -> None:
    """``--only x,v --budget time`` measures the baseline and v alone: a variant that cannot
    be built on this machine (LPIPS without its weight files) does not stop the others. A
    later ``--only w`` times w against the baseline and adds it, keeping v's speed."""
    monkeypatch.setenv("DENOISELAB_CACHE", str(tmp_path / "empty-cache"))  # no LPIPS weights
    variants = {
        "x": {"objective.prediction": "x"},
        "v": {"objective.prediction": "v"},
        "w": {"objective.prediction": "eps"},
        "lp": {"terms.lpips.weight": 0.1},
    }
    path = write_suite(tmp_path / "s.yaml", cache, budget="time", variants=variants)
    suite = load_suite(path, quick=True)
    with pytest.raises(ConfigError, match="lpips"):  # all variants: the LPIPS one is timed too
        measure_speeds(suite, "cpu", warmup=1, repeats=1)
    out = tmp_path / "out"
    status = run_suite(suite, out, devices=["cpu"], only=["x", "v"], log=lambda m: None)
    assert status == {"x": "done", "v": "done"}
    first = json.loads((out / "throughput.json").read_text())
    assert set(first["speed"]) == {"x", "v"}
    assert set(json.loads((out / "suite.json").read_text())["durations"]) == {"x", "v"}
    status = run_suite(load_suite(path, quick=True), out, devices=["cpu"], only=["w"],
                       log=lambda m: None)  # fmt: skip
    assert status == {"w": "done"}
    merged = json.loads((out / "throughput.json").read_text())
    assert set(merged["speed"]) == {"x", "v", "w"} and merged["speed"]["v"] == first["speed"]["v"]
    assert merged["added"][0]["variants"] == ["w"] and "lp" not in merged["speed"]
    assert set(json.loads((out / "suite.json").read_text())["durations"]) == {"x", "v", "w"}


def test_measured_speeds_are_paired_and_relative_to_the_baseline(tmp_path, cache) -> None:
    """A real (untimed-for-the-test) measurement: every variant gets a speed, the baseline 1."""
    suite = load_suite(write_suite(tmp_path / "s.yaml", cache, budget="time"), quick=True)
    record = measure_speeds(suite, "cpu", warmup=1, repeats=2)
    assert record["speed"]["x"] == 1.0 and record["speed"]["v"] > 0
    assert set(record["img_per_s"]) == {"x", "v"} and len(record["step_s"]["v"]) == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"budget": "weeks"}, "budget='weeks'; valid: images, time"),
        ({"durations": {"x": 32}}, "durations are for budget: time"),
        ({"budget": "time", "durations": {"y": 32}}, r"durations \{'y': 32\} must map variant"),
    ],
)
def test_bad_budgets_are_named(tmp_path, cache, changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_suite(write_suite(tmp_path / "s.yaml", cache, **changes))


@pytest.mark.parametrize("name", ["token_routing", "optimizer"])
def test_issue_18_suites_vary_only_their_technique(name) -> None:
    suite = load_suite(name)
    base = suite.config(suite.baseline)
    for variant in suite.names:
        cfg = suite.config(variant)
        assert cfg.duration_nimg == base.duration_nimg and cfg.data == base.data
        assert cfg.objective == base.objective
        if name == "token_routing":
            assert cfg.optim == base.optim
        else:
            assert cfg.model == base.model
    quick = load_suite(name, quick=True, budget="time")
    assert quick.budget == "time" and quick.config(quick.baseline).duration_nimg < 1000
