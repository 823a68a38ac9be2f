"""The training loop through its real code path: exact resume, checkpoints, bad input, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from denoiselab.cli import main
from denoiselab.config import CONFIG_DIR, ConfigError, apply_overrides, from_dict
from denoiselab.train import checkpoint as ckpt_io
from denoiselab.train.build import load_train_config, restore
from denoiselab.train.config import TrainConfig
from denoiselab.train.loop import NonFiniteLossError, Trainer, train
from denoiselab.train.run import read_metrics

CONFIGS = CONFIG_DIR  # the shipped configs, inside the package

TINY = {
    "data": {"name": "shapes", "image_size": 16, "num_images": 64},
    "model": {"name": "JiT-Micro"},
    "objective": {"label_drop": 0.1},
    "optim": {"lr": 1e-3, "warmup_epochs": 0.25, "grad_clip": 1.0},
    "ema": {"decays": [0.9, 0.99], "warmup": True},
    "sample": {"steps": 3, "num_grid": 4, "cfg": 1.5},
    "global_batch": 8,
    "duration_nimg": 64,
    "log_every_nimg": 8,
    "sample_every_nimg": 1_000_000,
    "ckpt_every_nimg": 32,
    "deterministic": True,
}


def tiny(**overrides) -> TrainConfig:
    return from_dict(TrainConfig, apply_overrides(TINY, [f"{k}={v}" for k, v in overrides.items()]))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ck = ckpt_io.load_checkpoint(run)
    out = {f"model.{k}": v for k, v in ck.model.items()}
    for d, params in ck.ema.items():
        out.update({f"ema{d}.{k}": v for k, v in params.items()})
    return out


def test_resume_is_bit_exact(tmp_path):
    """N steps, then resume for N more == 2N steps in one go: losses, weights, EMAs, Adam."""
    full = train(tiny(), tmp_path / "full", quiet=True)
    half = train(replace(tiny(), duration_nimg=32), tmp_path / "half", quiet=True)
    resumed = train(tiny(), tmp_path / "half", resume=half, quiet=True)
    assert resumed == tmp_path / "half"
    losses_full = [r["loss"] for r in read_metrics(full / "metrics.jsonl")]
    losses_res = [r["loss"] for r in read_metrics(resumed / "metrics.jsonl")]
    assert len(losses_full) == 8 and losses_res == losses_full
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = ckpt_io.load_checkpoint(full).optimizer, ckpt_io.load_checkpoint(resumed).optimizer
    assert all(
        torch.equal(sa["state"][i]["exp_avg_sq"], sb["state"][i]["exp_avg_sq"]) for i in sa["state"]
    )
    # the run folder is complete
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "loss.png"):
        assert (full / name).is_file(), name
    assert list((full / "samples").glob("*.png"))
    assert json.loads((full / "meta.json").read_text())["torch"] == torch.__version__


def test_training_reduces_the_loss(tmp_path):
    cfg = tiny(duration_nimg=8 * 60, log_every_nimg=8 * 10, ckpt_every_nimg=10_000)
    run = train(cfg, tmp_path / "r", quiet=True)
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [r["loss"] for r in rows]


def test_learning_rate_schedule_warm_up_stable_cool_down(tmp_path):
    # 8 steps: warm-up over 0.25 epochs = 2 steps, cool-down over the last half = 4 steps.
    cfg = tiny(**{"optim.cooldown": 0.5, "optim.lr": 1e-3})
    train(cfg, tmp_path / "run", quiet=True)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    logged = {r["step"]: r["lr"] for r in rows}  # row "step" = steps done; lr of the last one
    expected = {1: 0.5e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 1e-3, 6: 0.75e-3, 7: 0.5e-3, 8: 0.25e-3}
    assert logged == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match=r"optim.cooldown=1.5 must lie in \[0, 1\]"):
        tiny(**{"optim.cooldown": 1.5})


def test_grad_accum_equals_larger_micro_batches(tmp_path, monkeypatch):
    """grad_accum=k over a global batch of B images computes the gradient (and the logged
    loss) of one batch of B without accumulation, through the real ``Trainer.train_step``.

    The two differ only in how the noise is drawn (one generator per micro-batch shard), so
    each image gets the same (t, ε) in both runs here, keyed by the image itself. Tolerance:
    float32 re-association of the sums, rtol 1e-5 / atol 1e-7 on every gradient entry."""
    from denoiselab.objectives import DenoisingObjective

    cfg0 = tiny(**{"objective.label_drop": 0.0, "optim.grad_clip": "null"})  # no clip: raw grads
    images = torch.stack(
        [Trainer(cfg0, tmp_path / "d", quiet=True).dataset[i][0] for i in range(8)]
    )
    labels = torch.arange(8) % 8
    g = torch.Generator().manual_seed(0)
    t_all, eps_all = torch.rand(8, generator=g), torch.randn(images.shape, generator=g)

    def draw(self, x, y, generator):  # the same (t, ε) for an image however the batch is split
        idx = [next(i for i in range(8) if torch.equal(images[i], xi)) for xi in x]
        return t_all[idx], eps_all[idx], y

    monkeypatch.setattr(DenoisingObjective, "draw", draw)

    def gradients(accum: int) -> tuple[list[torch.Tensor], dict[str, float]]:
        trainer = Trainer(replace(cfg0, grad_accum=accum), tmp_path / f"a{accum}", quiet=True)
        grads: list[torch.Tensor] = []
        trainer.optimizer.step = lambda: grads.extend(  # capture instead of stepping
            p.grad.clone() for p in trainer.model.parameters()
        )
        terms = trainer.train_step(0, images, labels)
        return grads, {k: float(v) for k, v in terms.items()}

    one, terms1 = gradients(1)
    for accum in (2, 4):
        many, terms_k = gradients(accum)
        assert len(many) == len(one)
        for a, b in zip(one, many):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert terms_k["denoise"] == pytest.approx(terms1["denoise"], rel=1e-6)
    assert sum(float(g.abs().sum()) for g in one) > 0  # a real gradient was compared


def test_checkpoint_save_failure_keeps_previous(tmp_path, monkeypatch):
    run = train(replace(tiny(), duration_nimg=32), tmp_path / "r", quiet=True)
    before = ckpt_io.resolve_checkpoint(run)

    def broken_save(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.tensorfile, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(), run, resume=run, quiet=True)
    assert ckpt_io.resolve_checkpoint(run) == before
    assert ckpt_io.load_checkpoint(run).step == 4
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(state):
        if state.step == 5:
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))

    trainer = Trainer(tiny(), tmp_path / "r", callbacks=[poison], quiet=True)
    with pytest.raises(NonFiniteLossError, match="not finite at step 6"):
        trainer.run()
    assert ckpt_io.load_checkpoint(tmp_path / "r").step == 4
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "r").values())


def test_resume_from_nothing_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint in"):
        ckpt_io.resolve_checkpoint(empty)
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        ckpt_io.resolve_checkpoint(tmp_path / "missing")
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in optim; valid keys: base_lr, lr"):
        from_dict(TrainConfig, {"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"global_batch='big': expected an integer"):
        from_dict(TrainConfig, {"global_batch": "big"})
    with pytest.raises(ConfigError, match=r"sample.solver='rk4' is not valid; choose one of"):
        from_dict(TrainConfig, {"sample": {"solver": "rk4"}})
    with pytest.raises(ConfigError, match="Prediction='z'"):
        from_dict(TrainConfig, {"objective": {"prediction": "z"}})


def test_image_size_not_divisible_by_patch(tmp_path):
    with pytest.raises(ValueError, match="image_size=18 is not divisible by patch_size=4"):
        Trainer(tiny(**{"data.image_size": 18}), tmp_path, quiet=True)


def test_model_data_mismatch_and_unknown_model_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.num_classes=3 but the data gives num_classes=8"):
        Trainer(tiny(**{"model.num_classes": 3}), tmp_path, quiet=True)
    with pytest.raises(ConfigError, match=r"unknown key 'widht' in model; valid keys: name, image"):
        tiny(**{"model.widht": 3})  # at config time, before any Trainer


def test_missing_or_empty_dataset_path(tmp_path):
    cfg = tiny(**{"data.name": "imagefolder", "data.root": str(tmp_path / "nope")})
    with pytest.raises((FileNotFoundError, ValueError), match="nope"):
        Trainer(cfg, tmp_path / "r", quiet=True)
    (tmp_path / "empty").mkdir()
    cfg = tiny(**{"data.name": "imagefolder", "data.root": str(tmp_path / "empty")})
    with pytest.raises((FileNotFoundError, ValueError), match="empty"):
        Trainer(cfg, tmp_path / "r", quiet=True)


def test_every_shipped_config_parses():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for f in files:
        load_train_config(f)


@pytest.mark.integration
def test_cli_train_resume_sample(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--steps", "2", "sample.num_grid=2"]) == 0
    assert ckpt_io.load_checkpoint(out).step == 2
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert ckpt_io.load_checkpoint(out).step == 3
    assert main(["train", str(cfg), "--dry-run", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    samples = tmp_path / "samples"
    assert (
        main(
            ["sample", str(out), "--num", "3", "--steps", "2", "--cfg", "2", "--out", str(samples)]
        )
        == 0
    )
    assert len(list(samples.glob("0*.png"))) == 3 and (samples / "grid.png").is_file()


def test_sample_class_by_number_or_name(tmp_path, capsys):
    from PIL import Image

    from denoiselab.data import SHAPE_NAMES

    run = train(tiny(), tmp_path / "r", quiet=True)  # 8 steps: the class embedding has moved
    args = ["sample", str(run), "--num", "2", "--steps", "2", "--cfg", "3", "--no-ema"]

    def draw(cls: str) -> np.ndarray:
        out = tmp_path / f"class_{cls}"
        assert main([*args, "--class", cls, "--out", str(out)]) == 0
        return np.asarray(Image.open(out / "grid.png"))

    star = SHAPE_NAMES.index("star")
    assert np.array_equal(draw("star"), draw(str(star)))
    assert not np.array_equal(draw("star"), draw("circle"))  # the label reaches the net
    names = ", ".join(SHAPE_NAMES)
    capsys.readouterr()
    assert main([*args, "--class", "8", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"--class 8 is out of range; valid: {names} (or 0 … 7)" in err
    assert main([*args, "--class", "hexagon", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"denoiselab sample: error: --class 'hexagon' is not a class of this run; valid: "
        f"{names} (or 0 … 7)"
    )


def test_sample_defaults_to_the_runs_own_sampler_settings(tmp_path):
    from PIL import Image

    run = train(tiny(), tmp_path / "r", quiet=True)  # sample: Heun-3, CFG 1.5 on [0.1, 1]

    def grid(*flags: str) -> np.ndarray:
        out = tmp_path / "_".join(flags or ("own",))
        assert main(["sample", str(run), "--num", "4", *flags, "--out", str(out)]) == 0
        return np.asarray(Image.open(out / "grid.png"))

    own = grid()
    explicit = grid(
        "--steps", "3", "--solver", "heun", "--cfg", "1.5", "--cfg-interval", "0.1", "1"
    )
    assert np.array_equal(own, explicit)
    assert not np.array_equal(own, grid("--cfg", "1"))
    assert not np.array_equal(own, grid("--steps", "50"))


@pytest.mark.slow
def test_sample_compile_draws_the_eager_images(tmp_path):
    from PIL import Image

    run = train(replace(tiny(), duration_nimg=16), tmp_path / "r", quiet=True)
    grids = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"s{len(flags)}"
        argv = ["sample", str(run), "--num", "4", "--steps", "3", "--cfg", "2", "--out", str(out)]
        assert main([*argv, *flags]) == 0
        grids.append(np.asarray(Image.open(out / "grid.png")).astype(int))
    assert grids[0].std() > 0 and np.abs(grids[0] - grids[1]).max() <= 2  # 8-bit rounding
    compiled = restore(run, compile=True).sampler.net
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # not eager again


def test_restore_picks_weights(tmp_path):
    run = train(replace(tiny(), duration_nimg=16), tmp_path / "r", quiet=True)
    r = restore(run, ema="auto")  # 2 steps: no horizon fits, so the fastest average
    assert r.weights == "ema:0.9"
    r = restore(run, ema=0.99)
    ck = ckpt_io.load_checkpoint(run)
    name = next(iter(ck.ema[0.99]))
    assert torch.equal(r.net.state_dict()[name], ck.ema[0.99][name])
    with pytest.raises(ConfigError, match=r"ema=0.5 not in checkpoint; available: \[0.9, 0.99\]"):
        restore(run, ema=0.5)


def test_auto_ema_is_the_slowest_average_that_fits_a_tenth_of_the_run():
    from denoiselab.train.ema import auto_decay

    jit = (0.9996, 0.9998, 0.9999)  # horizons 2500, 5000, 10000 steps
    assert auto_decay(jit, 3_000_000) == 0.9999
    assert auto_decay(jit, 60_000) == 0.9998
    assert auto_decay(jit, 25_000) == 0.9996
    assert auto_decay(jit, 1_000) == 0.9996  # nothing fits: the fastest
    assert auto_decay((0.999, 0.995), 5_400) == 0.995  # the quickstart (order-free)
    assert auto_decay((0.999, 0.995), 10_000) == 0.999
    with pytest.raises(ValueError, match="no EMA decays"):
        auto_decay((), 10)


def test_training_grid_equals_denoiselab_sample_of_the_same_checkpoint(tmp_path):
    """The run's sample grid and ``restore(...).sample`` (``denoiselab sample``) draw the same
    images from the same weights, seed and settings: one sampler, one ``auto`` EMA rule."""
    from PIL import Image

    from denoiselab.images import save_grid
    from denoiselab.sampling.generate import balanced_labels

    # Without EMA warm-up the two averages differ after 8 steps, so a grid and a restore that
    # picked different decays for "auto" would draw different images.
    cfg = tiny(sample_every_nimg=64, **{"ema.warmup": False})
    run = train(cfg, tmp_path / "r", quiet=True)
    (grid,) = sorted((run / "samples").glob("step_*.png"))
    r = restore(run)  # "auto", as the grid
    s = cfg.sample
    x = r.sample(balanced_labels(s.num_grid, 8), cfg.seed + 1, steps=s.steps, solver=s.solver,
                 cfg_scale=s.cfg, interval=s.interval)  # fmt: skip
    save_grid(x, tmp_path / "again.png", None)
    a = torch.from_numpy(np.asarray(Image.open(grid)).copy())
    b = torch.from_numpy(np.asarray(Image.open(tmp_path / "again.png")).copy())
    assert a.shape == b.shape and a.float().std() > 0
    assert torch.equal(a, b)
    other = restore(run, ema=None).sample(balanced_labels(s.num_grid, 8), cfg.seed + 1,
                                          steps=s.steps, cfg_scale=s.cfg)  # fmt: skip
    assert not torch.allclose(other, x)  # the comparison can tell weights apart
    slow = restore(run, ema=0.99).sample(balanced_labels(s.num_grid, 8), cfg.seed + 1,
                                         steps=s.steps, cfg_scale=s.cfg)  # fmt: skip
    assert not torch.allclose(slow, x)  # ... and the two EMA decays apart


def test_override_values_parse_like_yaml_and_exponents_are_numbers():
    from denoiselab.config import parse_override

    assert parse_override("optim.lr=3e-3") == (["optim", "lr"], 0.003)
    assert parse_override("ema.decays=[0.9, 0.99]") == (["ema", "decays"], [0.9, 0.99])
    assert parse_override("data.name=digits") == (["data", "name"], "digits")
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        parse_override("optim.lr")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_device_without_cuda_is_named():
    from denoiselab.train.distributed import init_distributed

    with pytest.raises(ConfigError, match="device='cuda' but CUDA is not available"):
        init_distributed("cuda")


def test_periodic_eval_logs_probe_metrics_that_match_an_independent_evaluation(tmp_path):
    """``eval.every_nimg`` scores the EMA during training; the logged values equal a separate
    ``metrics.evaluate`` of the restored checkpoint, and evaluating leaves training untouched."""
    from denoiselab.metrics import evaluate, to_uint8
    from denoiselab.metrics.probe_train import ProbeConfig
    from denoiselab.train.run import read_metrics

    probe = {"steps": 5, "num_train": 64, "num_val": 16, "batch": 16}
    ev = {"every_nimg": 32, "metrics": ["fd_probe", "acc_probe"], "num": 16, "batch": 8,
          "steps": 2, "cache_dir": str(tmp_path / "cache"), "probe": probe}  # fmt: skip
    cfg = from_dict(TrainConfig, {**TINY, "eval": ev})
    run = train(cfg, tmp_path / "with_eval", quiet=True)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "eval/fd_probe" in r]
    assert [r["step"] for r in rows] == [4, 8]
    assert all(0 <= r["eval/acc_probe"] <= 1 and r["eval/fd_probe"] > 0 for r in rows)

    r = restore(run, ema=0.9)  # "auto" = the smallest decay of TINY's [0.9, 0.99]
    gen = lambda n, labels, seed: to_uint8(  # noqa: E731
        r.sample(labels, seed, steps=2, cfg_scale=1.5, interval=cfg.sample.interval)
    )
    ref = evaluate(gen, metrics=["fd_probe", "acc_probe"], num=16, dataset_cfg=cfg.data,
                   num_classes=8, batch=8, seed=0, cache_dir=tmp_path / "cache",
                   probe_config=from_dict(ProbeConfig, probe))["metrics"]  # fmt: skip
    assert rows[-1]["eval/fd_probe"] == pytest.approx(ref["fd_probe"], rel=1e-5)
    assert rows[-1]["eval/acc_probe"] == ref["acc_probe"]
    from denoiselab.metrics.probe import load_probe

    judge = load_probe(cfg.data, config=from_dict(ProbeConfig, probe), cache_dir=tmp_path / "cache")
    assert all(r["eval/probe_real_accuracy"] == judge.meta["val_accuracy"] for r in rows)
    assert (run / "eval.png").stat().st_size > 1000  # the curve, redrawn at each evaluation

    plain = train(tiny(), tmp_path / "plain", quiet=True)
    a, b = _weights(run), _weights(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_evaluation_does_not_cost_the_checkpoint_due_at_its_step(tmp_path, monkeypatch):
    """The evaluation at the end of a run fails (an out-of-memory error, say): the final
    checkpoint is already written (it was due at the same step, and was only written after
    the evaluation, so the last steps of the run were lost with it)."""

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated in the evaluation)")

    monkeypatch.setattr("denoiselab.train.periodic.evaluate_network", out_of_memory)
    cfg = tiny(**{"eval.every_nimg": 64})  # at the end only; checkpoints at 32 and 64 images
    with pytest.raises(RuntimeError, match="simulated in the evaluation"):
        train(cfg, tmp_path / "run", quiet=True)
    assert ckpt_io.load_checkpoint(tmp_path / "run", with_state=False).step == cfg.steps()


def test_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"eval\.metrics has \['fid2'\]; valid: fd_probe"):
        from_dict(TrainConfig, {"eval": {"metrics": ["fid2"]}})
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' in eval\.probe"):
        from_dict(TrainConfig, {"eval": {"probe": {"stepz": 3}}})
    with pytest.raises(ConfigError, match=r"eval\.ema=0\.5 is not a kept EMA decay; ema\.decays"):
        from_dict(TrainConfig, {"eval": {"ema": 0.5}})
    with pytest.raises(ConfigError, match=r"sample\.ema=0\.9 is not a kept EMA decay"):
        from_dict(TrainConfig, {"sample": {"ema": 0.9}, "ema": {"decays": [0.99]}})


def test_progress_bar_draws_in_place_on_a_terminal_only():
    import io

    from denoiselab.train.progress import ProgressBar

    clock = iter([0.0, 1.0, 1.1, 2.0, 4.0]).__next__
    out = io.StringIO()
    bar = ProgressBar(total=4, start=0, images_per_step=32, stream=out, enabled=True, clock=clock)
    calls = []
    loss = lambda: calls.append(1) or 0.25  # noqa: E731
    bar.update(1, loss)  # t = 1 s: 32 img/s, 3 steps (96 images) left -> 3 s
    bar.update(2, loss)  # t = 1.1 s: within min_interval, not drawn (and no loss read)
    assert len(calls) == 1
    first = out.getvalue()
    assert (
        first.startswith("\r[") and "25% step 1/4 | loss 0.2500 | 32.0 img/s | ETA 0m03s" in first
    )
    bar.clear()
    assert out.getvalue().endswith("\r") and bar.width == 0
    bar.update(3, loss)  # t = 2 s
    bar.update(4, loss)  # the last step is always drawn
    assert "100% step 4/4" in out.getvalue() and len(calls) == 3
    silent = io.StringIO()  # not a terminal: nothing drawn, loss never read
    ProgressBar(4, 0, 32, silent).update(4, loss)
    assert silent.getvalue() == "" and len(calls) == 3


def test_global_seeding_is_torch_manual_seed_for_the_training_device():
    from denoiselab.train.seeding import seed_global

    torch.manual_seed(1234)
    expected = torch.get_rng_state()
    torch.manual_seed(0)
    seed_global(1234, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), expected)


_PAGE_FAULTS = """
import resource, sys, torch
from denoiselab.train import allocator
print(allocator.retain_freed_memory())
torch.empty(16 << 20).fill_(1)  # 64 MiB: always mmap-ed by glibc's default
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not __import__("denoiselab.train.allocator", fromlist=["_is_glibc"])._is_glibc(),
    reason="glibc malloc only",
)
def test_cpu_allocator_setting_reuses_freed_memory_and_can_be_turned_off():
    """Freed 64 MiB blocks are reused instead of mapped afresh (16384 page faults each):
    without the setting every one of twenty allocations faults; with it only the first few,
    until the heap has room for the pattern (0–2 here idle, 4 once under a full pytest run:
    which small allocations land above a freed block decides whether the next aligned
    request fits in it), so at most a quarter. ``DENOISELAB_RETAIN_MEMORY=0`` leaves malloc
    as it was."""
    import os
    import subprocess
    import sys

    def run(env_value: str) -> tuple[str, int]:
        env = {**os.environ, "DENOISELAB_RETAIN_MEMORY": env_value}
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], env=env, check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        return out[0], int(out[1])

    pages = (64 << 20) // 4096
    applied, faults = run("1")
    default, default_faults = run("0")
    assert applied == "True" and default == "False"
    assert faults <= 5 * pages < 16 * pages <= default_faults, (faults, default_faults)
