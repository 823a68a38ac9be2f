"""Ablation runner review: comparisons stay fair across ``--only`` sessions, a variant run by
another process is not marked failed, one-class data, the final loss, malformed suites."""

from __future__ import annotations

import json
import re

import pytest

from denoiselab.ablate import ablate_main, load_suite
from denoiselab.ablate.runner import run_suite
from denoiselab.config import ConfigError
from denoiselab.train import checkpoint as ckpt_io

from .test_ablate import TINY, jsonl, write_suite

QUIET = {"devices": ["cpu"], "log": lambda m: None}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One probe/reference cache for the module (the probe trains once)."""
    return tmp_path_factory.mktemp("cache")


class Crash(Exception):
    """A variant that fails (an Exception: the runner records it and goes on)."""


def test_only_sessions_with_other_settings_are_refused_for_the_whole_folder(tmp_path, cache):
    """``--only x`` then ``--only v --set optim.lr=…`` would put an x trained at one rate
    beside a v trained at another on one scoreboard: refused, naming x, before v trains."""
    path = write_suite(tmp_path / "s.yaml", cache)
    out = tmp_path / "out"
    assert run_suite(load_suite(path), out, only=["x"], **QUIET) == {"x": "done"}
    changed = load_suite(path, sets=["optim.lr=0.5"])
    with pytest.raises(
        ConfigError, match=r"variant 'x' .* other settings \(train\.optim\.lr: 0\.001 → 0\.5"
    ):
        run_suite(changed, out, only=["v"], **QUIET)
    assert not (out / "variants" / "v").exists()
    assert json.loads((out / "suite.json").read_text())["base"]["optim"]["lr"] == 1e-3
    # the same settings still add a variant to the folder
    assert run_suite(load_suite(path), out, only=["v"], **QUIET) == {"v": "done"}


def test_a_variant_that_failed_before_its_first_checkpoint_takes_new_settings(tmp_path, cache):
    """Nothing was trained: its recorded settings bind nothing (nor block other variants)."""
    path = write_suite(tmp_path / "s.yaml", cache)
    out = tmp_path / "out"

    def crash_at_step_1(state):
        if state.step == 1:  # the first checkpoint is at step 2
            raise Crash("boom")

    status = run_suite(load_suite(path), out, only=["v"], callbacks=[crash_at_step_1], **QUIET)
    vdir = out / "variants" / "v"
    assert status["v"].startswith("failed: Crash") and (vdir / "variant.json").is_file()
    assert not ckpt_io.list_checkpoints(vdir / "checkpoints")
    changed = load_suite(path, sets=["optim.lr=0.002"])
    assert run_suite(changed, out, only=["x"], **QUIET) == {"x": "done"}  # v does not block x
    assert run_suite(changed, out, only=["v"], **QUIET) == {"v": "done"}
    assert json.loads((vdir / "variant.json").read_text())["train"]["optim"]["lr"] == 0.002
    assert not (vdir / "failed.json").exists()


def test_a_variant_locked_by_another_process_is_not_marked_failed(tmp_path, cache):
    """A second invocation meets the live lock of the first: it skips the variant and leaves
    the folder alone (a failed.json there made the scoreboard call a running variant failed)."""
    import os
    import socket

    from denoiselab.ablate.scoreboard import variant_status

    path = write_suite(tmp_path / "s.yaml", cache)
    out = tmp_path / "out"
    vdir = out / "variants" / "v"
    vdir.mkdir(parents=True)
    lock = {"pid": os.getpid(), "host": socket.gethostname()}  # a live owner
    (vdir / ".lock").write_text(json.dumps(lock))
    status = run_suite(load_suite(path), out, only=["v"], **QUIET)
    assert status["v"].startswith("failed: LockedError") and "is being run by pid" in status["v"]
    assert not (vdir / "failed.json").exists()
    assert variant_status(vdir, 4) == "pending"
    assert json.loads((vdir / ".lock").read_text()) == lock


@pytest.mark.integration
def test_one_class_data_scores_no_acc_probe(tmp_path, cache):
    """A flat image folder has one class: acc_probe would be 1 for every variant and every
    periodic row; it is skipped in both, fd_probe is still scored."""
    from PIL import Image

    root = tmp_path / "pics"
    root.mkdir()
    for k in range(16):
        Image.new("RGB", (16, 16), (16 * k, 255 - 16 * k, 90)).save(root / f"{k}.png")
    data = {"name": "imagefolder", "root": str(root), "image_size": 16, "num_images": 16}
    base = json.loads(json.dumps(TINY["base"])) | {"data": data}
    evals = {"num": 8, "batch": 8, "every_nimg": 16, "periodic_num": 8, "grid_num": 4,
             "periodic_metrics": ["fd_probe", "acc_probe"], "cache_dir": str(cache),
             "probe": {"steps": 5, "num_train": 16, "num_val": 8, "batch": 8}}  # fmt: skip
    path = write_suite(tmp_path / "s.yaml", cache, base=base, eval=evals, verdict=None)
    out = tmp_path / "out"
    assert run_suite(load_suite(path), out, only=["x"], **QUIET) == {"x": "done"}
    done = json.loads((out / "variants/x/done.json").read_text())
    assert "fd_probe" in done["metrics"] and "acc_probe" not in done["metrics"]
    rows = jsonl(out / "variants/x/eval.jsonl")
    assert rows and all("fd_probe" in r and "acc_probe" not in r for r in rows)


@pytest.mark.integration
def test_final_loss_is_the_last_logged_loss(tmp_path, cache):
    """A base whose own ``eval.every_nimg`` is on (as ``quickstart``'s) logs an evaluation row
    after the last loss row: done.json's final_loss must still be that loss (it was None)."""
    base = json.loads(json.dumps(TINY["base"]))
    base["eval"] = {"every_nimg": 32, "metrics": ["fd_probe"], "num": 8, "batch": 8,
                    "steps": 1, "cache_dir": str(cache),
                    "probe": {"steps": 5, "num_train": 16, "num_val": 8, "batch": 8}}  # fmt: skip
    path = write_suite(tmp_path / "s.yaml", cache, base=base)
    out = tmp_path / "out"
    assert run_suite(load_suite(path), out, only=["x"], **QUIET) == {"x": "done"}
    rows = jsonl(out / "variants/x/metrics.jsonl")
    assert "loss" not in rows[-1]  # the base's own evaluation row comes last
    losses = [r["loss"] for r in rows if "loss" in r]
    done = json.loads((out / "variants/x/done.json").read_text())
    assert done["final_loss"] == losses[-1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eval": 5}, r"eval must be a mapping of dotted keys, got 5"),
        ({"eval": [1, 2]}, r"eval must be a mapping of dotted keys, got \[1, 2\]"),
        ({"budget": "time", "durations": [1]}, r"durations=\[1\] must map variant names"),
    ],
)
def test_non_mapping_sections_are_named(tmp_path, cache, capsys, change, message):
    path = write_suite(tmp_path / "bad.yaml", cache, **change)
    assert ablate_main([str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_an_eval_ema_that_a_variant_does_not_train_is_refused_at_load(tmp_path, cache):
    """eval.ema names a decay; a variant (or a --base) without it failed at its first
    evaluation, after training (the GPU command of the bottleneck suite: hours)."""
    variants = {"x": {}, "v": {"ema.decays": [0.5]}}
    evals = json.loads(json.dumps(TINY["eval"])) | {"ema": 0.99, "cache_dir": str(cache)}
    path = write_suite(tmp_path / "s.yaml", cache, variants=variants, verdict=None, eval=evals)
    with pytest.raises(
        ConfigError, match=r"eval.ema=0.99 is not a trained EMA decay of variant 'v'"
    ):
        load_suite(path)
    with pytest.raises(ConfigError, match=r"ema.decays=\[0.9996, 0.9998, 0.9999\]"):
        load_suite("bottleneck", base="jit_b16_imagenet256")
    assert load_suite("bottleneck", base="jit_b16_imagenet256", sets=["eval.ema=auto"])


def test_the_paper_size_commands_in_the_suite_headers_load(capsys):
    """Each built-in suite's documented GPU command (``--base …`` in its header) resolves and
    validates (``--dry-run``; ``...`` and ``--devices`` dropped: no GPU here)."""
    import shlex

    from denoiselab.ablate.suite import SUITES_DIR

    checked = 0
    for path in sorted(SUITES_DIR.glob("*.yaml")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "denoiselab ablate" not in line or "--base" not in line:
                continue
            text, j = line.lstrip("# ").rstrip("\\"), i
            while lines[j].rstrip().endswith("\\"):
                j += 1
                text += " " + lines[j].lstrip("# ").rstrip("\\")
            args = [a for a in shlex.split(text)[2:] if a != "..."]
            if "--devices" in args:
                del args[args.index("--devices") : args.index("--devices") + 2]
            assert ablate_main([*args, "--dry-run"]) == 0, (path.name, capsys.readouterr().err)
            checked += 1
    assert checked >= 8


def test_a_variant_finished_while_waiting_for_its_lock_is_not_run_again(
    tmp_path, cache, monkeypatch
):
    """Another invocation finishes the variant between this one's done.json check and its
    taking the lock: the lock holder must not train and score it again (a 50k-sample FID)."""
    import contextlib

    from denoiselab.ablate import runner

    path = write_suite(tmp_path / "s.yaml", cache)
    out = tmp_path / "out"
    finished = {"variant": "x", "metrics": {"fd_probe": 1.0}}
    real_lock = runner.exclusive_lock

    @contextlib.contextmanager
    def lock_after_the_other_finished(lock_path):
        runner.write_json(lock_path.parent / "done.json", finished)  # the other process
        with real_lock(lock_path):
            yield

    monkeypatch.setattr(runner, "exclusive_lock", lock_after_the_other_finished)
    assert run_suite(load_suite(path), out, only=["x"], **QUIET) == {"x": "done"}
    vdir = out / "variants" / "x"
    assert json.loads((vdir / "done.json").read_text()) == finished
    assert not (vdir / "checkpoints").exists() and not (vdir / "eval.json").exists()


def test_the_report_does_not_claim_one_image_count_at_equal_wall_clock(tmp_path, cache):
    """With budget: time each variant trains for its own images; report.html said "same …
    N training images" with the first row's N."""
    import dataclasses

    from denoiselab.ablate.files import write_json
    from denoiselab.ablate.report import build_report

    suite = load_suite(write_suite(tmp_path / "s.yaml", cache, budget="time"))
    suite = dataclasses.replace(suite, durations={"x": 32, "v": 48})
    out = tmp_path / "out"
    for name, nimg in suite.durations.items():
        done = {"variant": name, "metrics": {"fd_probe": 1.0}, "nimg": nimg, "img_per_s": 1.0}
        write_json(out / "variants" / name / "done.json", done)
    write_json(out / "suite.json", suite.to_json())
    page = (build_report(out)).read_text()
    assert "32 training images" not in page and "48 training images" not in page
    assert "equal wall-clock, throughput.json: x 32, v 48" in page


@pytest.mark.integration
def test_periodic_evaluation_off_means_off(tmp_path, cache):
    """eval.every_nimg: 0 is "off" (EvalSpec, and the training loop's rule); the suite still
    scored periodic_num samples at the last step."""
    evals = json.loads(json.dumps(TINY["eval"])) | {"every_nimg": 0, "cache_dir": str(cache)}
    path = write_suite(tmp_path / "s.yaml", cache, eval=evals)
    out = tmp_path / "out"
    assert run_suite(load_suite(path), out, only=["x"], **QUIET) == {"x": "done"}
    assert not jsonl_or_empty(out / "variants/x/eval.jsonl")
    assert "fd_probe" in json.loads((out / "variants/x/done.json").read_text())["metrics"]


def jsonl_or_empty(path):
    return jsonl(path) if path.is_file() else []


def test_a_row_appended_after_a_cut_line_is_kept(tmp_path):
    """A kill mid-append leaves a last line without its newline; the next row (sessions.jsonl,
    eval.jsonl) was glued onto it and both were unreadable."""
    from denoiselab.ablate.files import append_jsonl, read_jsonl

    path = tmp_path / "rows.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as f:
        f.write('{"b": 2, "cu')  # killed here
    append_jsonl(path, {"c": 3})
    append_jsonl(path, {"d": 4})
    assert read_jsonl(path) == [{"a": 1}, {"c": 3}, {"d": 4}]
    assert path.read_text().count("\n") == 4


def test_directions_of_run_metrics_and_clipscore(tmp_path):
    """The runs report heads ``eval/acc_probe`` columns (a run's metrics.jsonl names); they
    and CLIPScore were marked "lower is better"."""
    from denoiselab.ablate.runs_report import build_runs_report
    from denoiselab.ablate.scoreboard import arrowed

    assert [arrowed(m) for m in ("eval/acc_probe", "eval/fd_probe", "clipscore")] == [
        "eval/acc_probe ↑",
        "eval/fd_probe ↓",
        "clipscore ↑",
    ]
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "nimg": 8, "kimg": 0.008, "loss": 1.0},
            {"step": 1, "nimg": 8, "kimg": 0.008, "eval/acc_probe": 0.5,
             "eval/clipscore": 0.3, "eval/fd_probe": 2.0}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = build_runs_report([run], tmp_path / "r.html").read_text()
    for head in ("eval/acc_probe ↑", "eval/clipscore ↑", "eval/fd_probe ↓"):
        assert f"<th>{head}</th>" in page
