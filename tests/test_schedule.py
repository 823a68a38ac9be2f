"""The event schedule (issue #22): any combination of log, sample, checkpoint and evaluation
intervals and durations trains to the end, leaves a loadable last checkpoint and a
metrics.jsonl with increasing steps, is due exactly at the documented steps, and resumes
bit-exactly from any retained checkpoint."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from denoiselab.cli import main
from denoiselab.config import ConfigError
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.loop import train
from denoiselab.train.run import read_metrics
from denoiselab.train.schedule import Schedule, crosses

from .test_train import tiny

G = 8  # the tiny config's global batch


def reference_due(every_nimg: int, batch: int, total: int) -> set[int]:
    """Steps (1-based) at which each multiple m·N of the interval is first reached: step
    ``ceil(m·N / batch)``, enumerated over the multiples (independent of ``crosses``)."""
    if every_nimg == 0:
        return set()
    due, m = set(), 1
    while m * every_nimg <= total * batch:
        due.add(-(-m * every_nimg // batch))
        m += 1
    return due


def test_every_n_images_is_the_first_step_reaching_each_multiple():
    rng = random.Random(0)
    for _ in range(300):
        batch, total = rng.randint(1, 64), rng.randint(1, 40)
        every = rng.choice([0, 1, batch, 2 * batch, rng.randint(1, 5 * batch), 10**9])
        got = {s for s in range(1, total + 1) if crosses(s, every, batch)}
        assert got == reference_due(every, batch, total), (batch, total, every)
    # a few by hand: N = 2.5 batches → after steps 3, 5, 8, 10
    assert [s for s in range(1, 11) if crosses(s, 20, 8)] == [3, 5, 8, 10]
    assert [s for s in range(1, 4) if crosses(s, 3, 8)] == [1, 2, 3]  # smaller than a batch


@pytest.mark.parametrize(
    "key", ["log_every_nimg", "sample_every_nimg", "ckpt_every_nimg", "eval.every_nimg"]
)
def test_negative_interval_is_a_config_error(key):
    with pytest.raises(ConfigError, match=rf"{key}=-8 must be >= 0"):
        tiny(**{key: -8})


def test_impossible_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"global_batch=8 must be divisible by grad_accum=3"):
        tiny(grad_accum=3)
    with pytest.raises(ConfigError, match=r"sample.num_grid=0 must be >= 1"):
        tiny(**{"sample.num_grid": 0})
    with pytest.raises(ConfigError, match=r"duration_nimg=0 must be >= 1"):
        tiny(duration_nimg=0)
    with pytest.raises(ConfigError, match=r"keep_checkpoints=0 must be >= 1"):
        tiny(keep_checkpoints=0)
    with pytest.raises(ConfigError, match=r"dist_timeout_s=0.0 must be > 0"):
        tiny(dist_timeout_s=0)
    with pytest.raises(ConfigError, match=r"stop_check_steps=0 must be >= 1"):
        tiny(stop_check_steps=0)


def test_evaluation_that_cannot_run_fails_before_the_first_step(tmp_path):
    from denoiselab.train.loop import Trainer

    cfg = tiny(**{"eval.every_nimg": 8, "eval.metrics": "[acc_probe, fid]",
                  "eval.cache_dir": str(tmp_path / "cache")})  # fmt: skip
    with pytest.raises(ConfigError, match=r"eval.metrics has 'fid', which needs the inception"):
        Trainer(cfg, tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()  # nothing started


def test_checkpoint_before_the_first_log_row(tmp_path, capsys):
    """Issue #22: the loss plot after a checkpoint read a metrics.jsonl that did not exist."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    args = ["train", str(cfg), "--out", str(tmp_path / "x"), "--steps", "3"]
    args += [f"{k}={v}" for k, v in _TINY_FLAT.items()]
    args += ["ckpt_every_nimg=8", "log_every_nimg=1000"]
    assert main(args) == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "x" / "metrics.jsonl")] == [3]
    assert ckpt_io.load_checkpoint(tmp_path / "x").step == 3


_TINY_FLAT = {
    "data.name": "shapes", "data.image_size": 16, "data.num_images": 64,
    "model.name": "JiT-Micro", "optim.lr": 1e-3, "optim.warmup_epochs": 0.25,
    "ema.decays": "[0.9]", "sample.steps": 2, "sample.num_grid": 2, "global_batch": 8,
    "deterministic": "true",
}  # fmt: skip

_INTERVALS = [0, 3, 8, 12, 16, 20, 24, 1000]  # 0 off, < batch, = batch, not multiples, > run


def _probe_eval(cache: Path, every: int) -> dict:
    probe = "{steps: 5, num_train: 64, num_val: 16, batch: 16}"
    return {"eval.every_nimg": every, "eval.metrics": "[acc_probe]", "eval.num": 8,
            "eval.batch": 8, "eval.steps": 1, "eval.cache_dir": str(cache),
            "eval.probe": probe}  # fmt: skip


def _random_settings(rng: random.Random, cache: Path) -> dict:
    settings = {
        "duration_nimg": rng.choice([5, 8, 20, 24, 33, 40]),
        "log_every_nimg": rng.choice([i for i in _INTERVALS if i]) if rng.random() < 0.8 else 0,
        "sample_every_nimg": rng.choice(_INTERVALS),
        "ckpt_every_nimg": rng.choice(_INTERVALS),
        "keep_checkpoints": rng.choice([1, 2, 3]),
        "grad_accum": rng.choice([1, 2]),
        "sample.num_grid": 2,
        "sample.steps": 2,
    }
    eval_every = rng.choice(_INTERVALS) if rng.random() < 0.3 else 0
    return {**settings, **_probe_eval(cache, eval_every)}


def _state(run: Path) -> dict[str, torch.Tensor]:
    ck = ckpt_io.load_checkpoint(run)
    out = {f"model.{k}": v for k, v in ck.model.items()}
    out.update({f"ema.{d}.{k}": v for d, p in ck.ema.items() for k, v in p.items()})
    out.update({f"opt.{i}.{k}": v for i, s in ck.optimizer["state"].items()
                for k, v in s.items() if isinstance(v, torch.Tensor)})  # fmt: skip
    return out


def _rows(run: Path) -> list[dict]:
    keep = ("step", "nimg", "loss", "loss/denoise", "grad_norm", "lr", "eval/acc_probe")
    return [{k: r[k] for k in keep if k in r} for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.slow
def test_any_schedule_trains_to_the_end_and_resumes(tmp_path):
    """Seeded combinations of the intervals; each run is checked against the rule computed
    independently (``reference_due``), then resumed from its oldest retained checkpoint."""
    rng = random.Random(22)
    cache = tmp_path / "cache"
    for trial in range(14):
        settings = _random_settings(rng, cache)
        cfg = tiny(**settings)
        total = cfg.steps()
        run = train(cfg, tmp_path / f"r{trial}", quiet=True)
        ctx = f"trial {trial}: {settings}"

        def due(every: int, at_end: bool = False, total: int = total) -> set[int]:
            """Reference steps of an interval (plus the last step where the end is due)."""
            return reference_due(every, G, total) | ({total} if at_end else set())

        rows = read_metrics(run / "metrics.jsonl")
        steps = [r["step"] for r in rows]
        assert steps == sorted(steps) and steps[-1] == total, ctx
        log_steps = [r["step"] for r in rows if "loss" in r]
        assert log_steps == sorted(due(cfg.log_every_nimg, at_end=True)), ctx
        eval_steps = [r["step"] for r in rows if "eval/acc_probe" in r]
        assert eval_steps == sorted(due(cfg.eval.every_nimg, cfg.eval.every_nimg > 0)), ctx
        grids = sorted(int(p.stem.split("_")[1]) for p in (run / "samples").glob("*.png"))
        assert grids == sorted(due(cfg.sample_every_nimg, cfg.sample_every_nimg > 0)), ctx
        kept = [ckpt_io.step_of(p) for p in ckpt_io.list_checkpoints(run / "checkpoints")]
        expect_ckpt = sorted(due(cfg.ckpt_every_nimg, at_end=True))[-cfg.keep_checkpoints :]
        assert kept == expect_ckpt, ctx
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
            n
            for s in kept
            for n in (f"step_{s:09d}.safetensors", f"step_{s:09d}.state.safetensors")
        ), ctx  # nothing else is left in the folder
        assert ckpt_io.load_checkpoint(run).step == total, ctx
        # the schedule object agrees with the rows the loop wrote
        sched = Schedule.of(cfg)
        assert [s for s in range(1, total + 1) if sched.due(s).log] == log_steps, ctx

        # resume from the oldest retained checkpoint (bit-exact rows and state), or, if only
        # the last is kept, continue the run past its end
        if kept[0] < total:
            expect_rows, expect_state = _rows(run), _state(run)
            copy = tmp_path / f"r{trial}-resumed"
            shutil.copytree(run, copy)
            train(cfg, copy, resume=ckpt_io.list_checkpoints(copy / "checkpoints")[0], quiet=True)
            assert _rows(copy) == expect_rows, ctx
            got = _state(copy)
            assert got.keys() == expect_state.keys()
            assert all(torch.equal(got[k], expect_state[k]) for k in got), ctx
        else:
            longer = tiny(**{**settings, "duration_nimg": settings["duration_nimg"] + 16})
            train(longer, run, resume=run, quiet=True)
            assert ckpt_io.load_checkpoint(run).step == longer.steps(), ctx
            more = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
            assert more == sorted(more) and more[-1] == longer.steps(), ctx
