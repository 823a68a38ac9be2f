"""Periodic outputs of ``denoiselab train``: evaluation (``TrainConfig.eval``) and sample grids.

The training run scores its own EMA weights with :func:`denoiselab.metrics.evaluate`: the
offline probe metrics by default, on the run's data in pixels (the source images of a latent
cache), samples decoded through the run's autoencoder. Probe and reference statistics are
cached by content hash, so only the first evaluation of a dataset pays for them (the probe
trains with gradients: only the sampling runs under ``no_grad``). A text run may list
``clipscore``: scored as ``denoiselab eval --metrics clipscore`` does (the same held-out
prompts and batch seeds, :mod:`denoiselab.evaluation_clip`), with the CLIP of ``eval.clip``,
whose vision tower then also serves ``cmmd`` (one load per run).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from denoiselab.config import ConfigError
from denoiselab.images import save_grid
from denoiselab.metrics import evaluate
from denoiselab.metrics.images import to_uint8
from denoiselab.models.text_jit import share_text_encoder
from denoiselab.sampling.generate import Sampler, balanced_labels
from denoiselab.text.sampling import write_prompts
from denoiselab.train.config import CLIPSCORE, TrainConfig
from denoiselab.train.ema import auto_decay
from denoiselab.train.run import plot_eval


def check_eval_ready(cfg: TrainConfig) -> None:
    """Fail before the first step, not at the first evaluation hours later, when
    ``eval.metrics`` needs pretrained weights that are not in place (training looks for
    them only under ``<cache root>/extractors/``; the probe metrics need none)."""
    if cfg.eval.every_nimg <= 0:
        return
    from denoiselab.metrics import METRICS
    from denoiselab.metrics.cache import cache_root
    from denoiselab.metrics.extractors import DEFAULT_NAMES, resolve_extractor_path

    for name in cfg.eval.metrics:
        if name == CLIPSCORE:
            _check_clipscore_dir(cfg)
            continue
        kind = METRICS[name].extractor
        if kind == "probe":
            continue
        given = cfg.eval.clip if kind == "clip" else None
        path = resolve_extractor_path(kind, given, cfg.eval.cache_dir)
        if path is None or not (path.is_file() or (path / "config.json").is_file()):
            where = path or cache_root(cfg.eval.cache_dir) / "extractors" / DEFAULT_NAMES[kind]
            key = "eval.clip" if given else "the cache"
            raise ConfigError(
                f"eval.metrics has {name!r}, which needs the {kind} weights at {where} "
                f"({key}): put them there, or evaluate during training with the probe metrics "
                "(no download)"
            )


def _check_clipscore_dir(cfg: TrainConfig) -> None:
    """``eval.clip`` (or the cache's CLIP) holds a whole CLIP and its tokenizer, or a
    ConfigError says what is missing (no weights are read here)."""
    from denoiselab.metrics.cache import cache_root
    from denoiselab.metrics.clipscore import check_clip_dir
    from denoiselab.metrics.extractors import (
        DEFAULT_NAMES,
        MissingExtractorError,
        resolve_extractor_path,
    )

    path = resolve_extractor_path("clip", cfg.eval.clip, cfg.eval.cache_dir)
    if path is None:  # eval.clip unset and nothing at the cache's default place
        where = cache_root(cfg.eval.cache_dir) / "extractors" / DEFAULT_NAMES["clip"]
        raise ConfigError(
            f"eval.metrics has {CLIPSCORE!r}, which needs eval.clip: a local directory with a "
            "whole CLIP (config.json with model_type 'clip', model.safetensors, tokenizer.json), "
            f"e.g. openai/clip-vit-large-patch14-336 (or that directory at {where})"
        )
    try:
        check_clip_dir(path, flag="eval.clip" if cfg.eval.clip else "the cache's CLIP")
    except MissingExtractorError as err:
        raise ConfigError(f"eval.metrics has {CLIPSCORE!r}: {err}") from None


ONE_CLASS_DROPS = {"acc_probe"}  # metrics that mean nothing on data of one class


def scored_metrics(metrics: Sequence[str], num_classes: int) -> list[str]:
    """``metrics`` without those that mean nothing on data of one class (a flat image folder:
    every sample is of the class, so ``acc_probe`` would be 1 by construction). Periodic
    evaluation and the ablation scorer score these."""
    if num_classes >= 2:
        return list(metrics)
    return [m for m in metrics if m not in ONE_CLASS_DROPS]


def one_class_note(metrics: Sequence[str], num_classes: int) -> str | None:
    """The start-of-run line naming the periodic metrics :func:`scored_metrics` skips."""
    dropped = [m for m in metrics if m not in scored_metrics(metrics, num_classes)]
    if not dropped:
        return None
    return (
        f"note: eval.metrics {dropped} skipped: the data has one class, so every sample is of "
        "it and the accuracy is 1 by construction"
    )


def evaluate_network(
    sampler: Sampler,
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device | str,
    loaded: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``cfg.eval`` metrics of the network behind ``sampler`` -> ``{name: value}``, with
    ``probe_real_accuracy`` (the probe on held-out real images) when a probe scored.
    ``loaded``: scorers an earlier evaluation of the run loaded, reused and added to (the
    CLIP of clipscore and cmmd is read from disk once per run, not once per evaluation)."""
    from denoiselab.latents import pixel_data_config

    ev = cfg.eval
    settings, cfg_scale = _sampling(cfg)

    def sample(n: int, labels: Tensor, seed: int) -> Tensor:
        return to_uint8(sampler(labels[:n], seed, cfg_scale=cfg_scale, **settings).cpu())

    values: dict[str, float] = {}
    loaded = {} if loaded is None else loaded
    registry = [m for m in scored_metrics(ev.metrics, num_classes) if m != CLIPSCORE]
    scorer = None
    if CLIPSCORE in ev.metrics:
        scorer = loaded.get(CLIPSCORE) or _load_clip_scorer(cfg, device)
        loaded[CLIPSCORE] = scorer
        _clipscore(sampler, cfg, scorer, (settings, cfg_scale), values, loaded)
    if not registry:
        return values
    result = evaluate(
        sample,
        metrics=registry,
        num=ev.num,
        dataset_cfg=pixel_data_config(cfg.data),
        num_classes=num_classes,
        batch=ev.batch,
        seed=ev.seed,
        cache_dir=ev.cache_dir,
        probe_config=ev.probe_config(),
        device=device,
        extractor_paths={"clip": ev.clip} if ev.clip else None,
        extractors={"clip": scorer.image_embedder()} if scorer is not None else None,
    )
    values.update({k: float(v) for k, v in result["metrics"].items()})
    if result["probe_real_accuracy"] is not None:  # the judge's own accuracy on real images
        values["probe_real_accuracy"] = result["probe_real_accuracy"]
    return values


def _sampling(cfg: TrainConfig) -> tuple[dict[str, Any], float]:
    """The sampler settings of periodic evaluation (every metric): ``eval.steps`` / ``eval.cfg``
    where set, the run's ``sample.*`` otherwise -> (settings, CFG scale)."""
    own = cfg.sample
    settings = {"steps": cfg.eval.steps or own.steps, "solver": own.solver,
                "interval": tuple(own.interval), "eta": own.eta}  # fmt: skip
    return settings, own.cfg if cfg.eval.cfg is None else cfg.eval.cfg


def _load_clip_scorer(cfg: TrainConfig, device: torch.device | str) -> Any:
    """The CLIP of ``eval.clip`` (or the cache's), for clipscore (and cmmd's image tower)."""
    from denoiselab.metrics.clipscore import load_clip_scorer
    from denoiselab.metrics.extractors import resolve_extractor_path

    path = resolve_extractor_path("clip", cfg.eval.clip, cfg.eval.cache_dir)
    return load_clip_scorer(path, device, flag="eval.clip")


def _clipscore(
    sampler: Any,
    cfg: TrainConfig,
    scorer: Any,
    sampling: tuple[dict[str, Any], float],
    values: dict[str, float],
    loaded: dict[str, Any],
) -> None:
    """CLIPScore of a text run's ``sampler`` (a ``PromptSampler``) into ``values``, as
    ``denoiselab eval --metrics clipscore --num eval.num --seed eval.seed --batch eval.batch``
    scores the checkpoint: :func:`~denoiselab.evaluation_clip.eval_prompts` of the run's data
    (drawn once per run and kept in ``loaded``: on captioned folders that reads the data
    set), the run's sampler with ``sampling`` (:func:`_sampling`); under DDP each rank draws a
    share of the batches (``metrics.batches.run_batches``)."""
    from denoiselab.evaluation_clip import eval_prompts, prompt_generator, score_clipscore

    ev = cfg.eval
    key = f"{CLIPSCORE}/prompts"
    if key not in loaded:
        loaded[key] = eval_prompts(cfg.data, ev.num, ev.seed)
    generate = prompt_generator(sampler.prompts, *sampling)
    result = score_clipscore(loaded[key], generate, ev.seed, scorer, ev.batch)
    values.update({k: float(v) for k, v in result["metrics"].items()})


def ema_network(trainer: Any, ema: float | str, step: int) -> torch.nn.Module:
    """A fresh eval-mode copy of ``trainer``'s network holding EMA weights after ``step``
    steps: ``ema`` a trained decay, ``"auto"`` (:func:`~denoiselab.train.ema.auto_decay`; the
    raw weights if no EMA is kept) or ``"none"`` (the raw weights). Under FSDP the weights
    are gathered whole (a collective: every rank must call it)."""
    from denoiselab.models.registry import build_network

    net = build_network(trainer.model_cfg, load_encoder=False)
    share_text_encoder(net, trainer.model)  # the frozen encoder (if any) is not copied
    net = net.to(trainer.device).eval()
    net.load_state_dict(trainer.parallel.gather(trainer.model.state_dict()))
    decays = trainer.ema.decays
    if ema == "none" or not decays:
        return net
    decay = auto_decay(decays, step) if ema == "auto" else float(ema)
    if decay not in decays:
        raise ConfigError(f"EMA decay {ema!r} is not kept; kept: {list(decays)}")
    with torch.no_grad():
        named = dict(net.named_parameters())
        for name, value in trainer.parallel.gather(trainer.ema.state(decay)).items():
            named[name].copy_(value)
    return net


def evaluate_run(trainer: Any, step: int) -> dict[str, float]:
    """The periodic evaluation (``cfg.eval``) of ``trainer``'s weights at ``step``, logged to
    ``metrics.jsonl`` as ``eval/<metric>``. Under DDP every rank generates a share of the
    samples (``metrics.evaluate`` shards the batches) and all get the same values."""
    tic = time.perf_counter()
    cfg, device = trainer.cfg, trainer.device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # training's random stream stays untouched
        net = trainer.ema_network(cfg.eval.ema, step)
        values = evaluate_network(
            trainer.sampler(net), cfg, trainer.model_cfg.num_classes, device, trainer.eval_models
        )
    row: dict[str, Any] = {"step": step, "nimg": step * cfg.global_batch}
    row["kimg"] = row["nimg"] / 1000
    row.update({f"eval/{k}": v for k, v in values.items()})
    row["eval_seconds"] = time.perf_counter() - tic
    trainer.run_dir.log(row)  # rank 0 only
    if trainer.dist.is_main:
        chance = 1 / trainer.model_cfg.num_classes if "acc_probe" in values else None
        plot_eval(trainer.run_dir.metrics_path, trainer.run_dir.root / "eval.png", chance)
    shown = " | ".join(f"{k} {v:.4g}" for k, v in values.items())
    trainer.log(f"eval step {step} | {shown} | {row['eval_seconds']:.1f}s")
    return values


@torch.no_grad()
def draw_grid(trainer: Any, step: int) -> None:
    """Samples of ``trainer``'s EMA weights at ``step`` from fixed noise and labels, saved as
    ``samples/step_<step>.png`` (rank 0 only; under FSDP every rank helps gather the
    weights)."""
    if not trainer.dist.is_main and not trainer.parallel.sharded:
        return
    cfg, mc = trainer.cfg.sample, trainer.model_cfg
    net = trainer.ema_network(cfg.ema if cfg.ema is not None else "auto", step)
    if not trainer.dist.is_main:
        return
    labels = balanced_labels(cfg.num_grid, mc.num_classes)
    sampler, seed = trainer.sampler(net), trainer.cfg.seed + 1
    images = sampler(
        labels,
        seed,
        steps=cfg.steps,
        solver=cfg.solver,
        cfg_scale=cfg.cfg,
        interval=cfg.interval,
        eta=cfg.eta,
    )
    square = cfg.num_grid % mc.num_classes == 0 and mc.num_classes <= 16
    path = trainer.run_dir.root / "samples" / f"step_{step:09d}.png"
    if mc.text is not None:  # a text run: the prompts beside the grid, in grid order
        write_prompts(path.with_suffix(".txt"), sampler.prompts_for(labels, seed))
    save_grid(images, path, mc.num_classes if square else None)
    trainer.run_dir.log_image("samples", path, step)
