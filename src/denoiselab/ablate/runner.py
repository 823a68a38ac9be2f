"""Run a suite: train and score every variant, resumably, on one or several devices.

Suite folder::

    OUT/suite.json                      the resolved suite (what `report` rebuilds from)
    OUT/variants/<name>/                a run folder (config.yaml, metrics.jsonl, checkpoints/ …)
        variant.json                    fingerprint: resolved train config + eval spec
        sessions.jsonl                  one row per training session (start step, device)
        eval.jsonl                      periodic probe evaluation during training
        eval.json                       the final evaluation (``metrics.evaluate`` result)
        grid.png                        samples from the suite's shared noise
        done.json                       written last, atomically: the variant is finished
        failed.json                     the error of a failed attempt (retried next time)
    OUT/scoreboard.{csv,json,md}, OUT/report.html, OUT/*.png

A variant with ``done.json`` is skipped; one with a checkpoint resumes from it (exactly,
see ``train/loop.py``); one whose training finished but not its evaluation is only scored.
With one device variants run one after another in this process; with several, one
subprocess per device (``python -m denoiselab.ablate``), each taking the next variant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from denoiselab import __version__
from denoiselab.ablate.evaluation import PeriodicEval, Scorer, ema_decay, final_metrics
from denoiselab.ablate.files import (
    LockedError,
    append_jsonl,
    atomic_write,
    exclusive_lock,
    read_json,
    read_jsonl,
    write_json,
)
from denoiselab.ablate.scoreboard import training_time
from denoiselab.ablate.suite import Suite
from denoiselab.config import ConfigError
from denoiselab.images import make_grid
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.periodic import scored_metrics

Log = Callable[[str], None]


def variant_dir(out: Path, name: str) -> Path:
    return Path(out) / "variants" / name


def parse_devices(text: str) -> list[str]:
    """``"cpu"``, ``"auto"``, ``"cuda:0,cuda:1"`` → device strings, validated."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise ConfigError(f"--devices {text!r}: give at least one device, e.g. cpu or cuda:0")
    for d in devices:
        if d == "auto":
            continue
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise ConfigError(
                f"--devices: {d!r} is not a device; valid: auto, cpu, cuda:N"
            ) from None
        if dev.type == "cuda" and torch.cuda.is_available():
            if (dev.index or 0) >= torch.cuda.device_count():
                raise ConfigError(
                    f"--devices: {d!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
                )
        elif dev.type == "cuda":
            raise ConfigError(f"--devices: {d!r} but CUDA is not available here; use cpu")
    return devices


def check_fingerprint(suite: Suite, name: str, vdir: Path) -> None:
    """Refuse to continue a variant whose config or evaluation changed since it started.

    A setting that did not exist when the variant started and now holds its default is not a
    change: options are added with defaults that keep the old behaviour."""
    new = suite.fingerprint(name)
    path = vdir / "variant.json"
    if not path.is_file() or not started(vdir):  # nothing trained yet: nothing to invalidate
        write_json(path, new)
        return
    diff = _diff(read_json(path), new, default=_fingerprint_defaults())
    if diff:
        raise ConfigError(
            f"variant {name!r} in {vdir} was started with other settings ({'; '.join(diff[:5])}); "
            f"use another --out, or delete {vdir} to start it again"
        )


def started(vdir: Path) -> bool:
    """Whether a variant folder holds results that its settings produced: a checkpoint, the
    final evaluation or ``done.json`` (a variant that failed or was killed before its first
    checkpoint restarts from scratch, so its recorded settings bind nothing)."""
    if any((vdir / f).is_file() for f in ("done.json", "eval.json")):
        return True
    return bool(ckpt_io.list_checkpoints(vdir / "checkpoints"))


_ABSENT = object()


def _fingerprint_defaults() -> dict[str, Any]:
    from denoiselab.ablate.suite import EvalSpec
    from denoiselab.config import to_dict
    from denoiselab.train.config import TrainConfig

    return {"train": to_dict(TrainConfig()), "eval": to_dict(EvalSpec())}


def _diff(old: Any, new: Any, prefix: str = "", default: Any = _ABSENT) -> list[str]:
    """Differences between two fingerprints; a key only in ``new`` at its ``default`` is none."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        defaults = default if isinstance(default, dict) else {}
        return [
            d
            for k in keys
            for d in _diff(
                old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.", defaults.get(k, _ABSENT)
            )
        ]
    if old is _ABSENT and default is not _ABSENT and new == default:
        return []  # an option added since, at the default that keeps the old behaviour
    old, new = (None if v is _ABSENT else v for v in (old, new))
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


def run_variant(
    suite: Suite,
    name: str,
    out: Path,
    *,
    device: str | None = None,
    callbacks: Sequence[Callable[[Any], None]] = (),
    verbose: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Train (or resume) and score one variant; returns its ``done.json`` content."""
    vdir = variant_dir(out, name)
    if (vdir / "done.json").is_file():
        check_fingerprint(suite, name, vdir)
        log(f"{name}: done already, skipped")
        return read_json(vdir / "done.json")
    vdir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(vdir / ".lock"):
        if (vdir / "done.json").is_file():  # finished by another process since the check
            log(f"{name}: done already, skipped")
            return read_json(vdir / "done.json")
        check_fingerprint(suite, name, vdir)
        (vdir / "failed.json").unlink(missing_ok=True)
        cfg = suite.config(name, device=None if device in (None, "auto") else device)
        _train(suite, cfg, vdir, callbacks, verbose, log)
        return _finish(suite, name, vdir, cfg.device, log)


def _train(
    suite: Suite, cfg: Any, vdir: Path, callbacks: Sequence, verbose: bool, log: Log
) -> None:
    from denoiselab.train.loop import Trainer

    total = cfg.steps()
    found = ckpt_io.list_checkpoints(vdir / "checkpoints")
    resume = found[-1] if found else None
    start = ckpt_io.load_checkpoint(resume, with_state=False).step if resume else 0
    if start >= total:
        return
    verb = f"resuming at step {start}/{total}" if start else f"training {total} steps"
    log(f"{vdir.name}: {verb} ({cfg.duration_nimg} images)")
    periodic = PeriodicEval(
        vdir / "eval.jsonl", suite.eval, suite.eval.every_nimg, cfg.global_batch, total
    )
    trainer = Trainer(cfg, vdir, resume=resume, callbacks=[periodic, *callbacks], quiet=not verbose)
    periodic.attach(trainer)
    row = {"start_step": start, "device": str(trainer.device), "pid": os.getpid()}
    append_jsonl(vdir / "sessions.jsonl", {**row, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    trainer.run()


def _finish(suite: Suite, name: str, vdir: Path, device: str, log: Log) -> dict[str, Any]:
    """Final evaluation of the last checkpoint on ``device``, sample grid, then ``done.json``."""
    from denoiselab.models import count_params
    from denoiselab.train.build import restore

    dev = torch.device(_auto_device() if device == "auto" else device)
    ck = ckpt_io.load_checkpoint(vdir, with_state=False)
    decay = ema_decay(suite.eval, tuple(ck.ema), ck.step)
    r = restore(vdir, ema=decay, device=dev)
    scorer = Scorer(r.sampler, r.cfg)
    metrics = scored_metrics(final_metrics(suite.eval), r.sampler.num_classes)  # as score()
    log(f"{name}: scoring {suite.eval.num} samples on {', '.join(metrics)}")
    result = scorer.score(suite.eval, metrics, suite.eval.num)
    write_json(vdir / "eval.json", result)
    grid = make_grid(scorer.grid(suite.eval))
    atomic_write(vdir / "grid.png", lambda tmp: _save_png(grid, tmp))
    train_s, img_per_s = training_time(
        read_jsonl(vdir / "metrics.jsonl"), read_jsonl(vdir / "eval.jsonl")
    )
    rows = read_jsonl(vdir / "metrics.jsonl")
    done = {
        "variant": name,
        "metrics": result["metrics"],
        "params": count_params(r.net),
        "img_per_s": img_per_s,
        "train_wall_s": train_s,
        "eval_wall_s": result["wall_time_s"],
        "wall_s": train_s + result["wall_time_s"],
        "nimg": ck.step * r.cfg.global_batch,
        "steps": ck.step,
        "final_loss": next((row["loss"] for row in reversed(rows) if "loss" in row), None),
        "weights": r.weights,
        "device": str(dev),
        "sessions": len(read_jsonl(vdir / "sessions.jsonl")),
        "denoiselab": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(vdir / "done.json", done)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items() if "_unbiased" not in k)
    log(f"{name}: done — {shown}; {img_per_s:.1f} img/s, {done['wall_s']:.0f} s")
    return done


def _save_png(array: Any, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    devices: Sequence[str] = ("auto",),
    only: Sequence[str] | None = None,
    callbacks: Sequence[Callable[[Any], None]] = (),
    verbose: bool = False,
    threads: int | None = None,
    log: Log = print,
) -> dict[str, str]:
    """Run the variants (``only`` a subset) of ``suite`` into ``out``; returns name → status.

    Status is ``"done"`` or ``"failed: <error>"``. ``callbacks`` are extra training
    callbacks (in-process runs only; tests use one to simulate a kill).
    """
    out = Path(out)
    names = list(only) if only else suite.names
    unknown = [n for n in names if n not in suite.variants]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; valid: {suite.names}")
    if suite.budget == "time" and not set(names) <= set(suite.durations):
        from denoiselab.ablate.budget import apply_time_budget

        suite = apply_time_budget(suite, out, devices[0], log, names=names)
    # settings changed since a variant started: stop before any work. Every variant of the
    # folder, not only those run now: the scoreboard compares them all under this suite.json
    for name in suite.names:
        vdir = variant_dir(out, name)
        if (vdir / "variant.json").is_file() and (name in names or started(vdir)):
            check_fingerprint(suite, name, vdir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "suite.json", suite.to_json())
    if len(devices) > 1:
        return _run_parallel(out, names, devices, threads, verbose, log)
    if threads:
        torch.set_num_threads(threads)
    status = {}
    for i, name in enumerate(names, 1):
        log(f"[{i}/{len(names)}] {name}")
        try:
            run_variant(
                suite, name, out, device=devices[0], callbacks=callbacks, verbose=verbose, log=log
            )
            status[name] = "done"
        except LockedError as e:  # another process runs it: its folder is not ours to mark
            status[name] = f"failed: {type(e).__name__}: {e}"
            log(f"{name}: skipped — {e}")
        except Exception as e:  # one failed variant must not stop the others
            status[name] = f"failed: {type(e).__name__}: {e}"
            _record_failure(variant_dir(out, name), e, log)
    return status


def _record_failure(vdir: Path, error: BaseException, log: Log) -> None:
    message = f"{type(error).__name__}: {error}"
    log(f"{vdir.name}: FAILED — {message}")
    if vdir.is_dir():
        write_json(vdir / "failed.json", {"error": message, "traceback": traceback.format_exc()})


def _run_parallel(
    out: Path,
    names: list[str],
    devices: Sequence[str],
    threads: int | None,
    verbose: bool,
    log: Log,
) -> dict[str, str]:
    """One worker subprocess per device, each given the next pending variant."""
    pending = [n for n in names if not (variant_dir(out, n) / "done.json").is_file()]
    status = {n: "done" for n in names if n not in pending}
    cpu_workers = sum(1 for d in devices if d == "cpu")
    threads = threads or (max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None)
    free, running = list(devices), {}
    while pending or running:
        while pending and free:
            name, device = pending.pop(0), free.pop(0)
            running[name] = (device, *_spawn(out, name, device, threads, verbose))
            log(f"{name}: started on {device} (log: {variant_dir(out, name) / 'worker.log'})")
        for name, (device, proc, log_file) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            log_file.close()
            free.append(device)
            ok = proc.returncode == 0 and (variant_dir(out, name) / "done.json").is_file()
            status[name] = "done" if ok else f"failed: worker exit code {proc.returncode}"
            log(f"{name}: {status[name]} on {device}")
        time.sleep(0.5)
    return status


def _spawn(
    out: Path, name: str, device: str, threads: int | None, verbose: bool
) -> tuple[subprocess.Popen, IO[str]]:
    """Start the worker of variant ``name`` on ``device``; output goes to its worker.log."""
    vdir = variant_dir(out, name)
    vdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "denoiselab.ablate", str(out / "suite.json"), "--out", str(out)]
    cmd += ["--only", name, "--devices", device, "--no-report"]
    cmd += ["--threads", str(threads)] if device == "cpu" and threads else []
    cmd += ["--verbose"] if verbose else []
    log_file = open(vdir / "worker.log", "a")  # noqa: SIM115 - closed when the worker exits
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT), log_file
