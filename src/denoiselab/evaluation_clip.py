"""``denoiselab eval --metrics clipscore``: the prompts a text run is scored on, and its
CLIPScore (:mod:`denoiselab.metrics.clipscore`) from the local CLIP of ``--clip``.

``--clip`` serves both CMMD and CLIPScore: the directory a user downloads
(openai/clip-vit-large-patch14-336) holds both towers and the tokenizer, and CMMD reads
only its vision tower — from the scorer's model when both run (one load). Periodic evaluation
during training (``eval.metrics: [clipscore]``, ``eval.clip``) scores the same prompts
through the same functions. Class-conditional runs are refused rather than prompted with their
class names: imagefolder class names are folder names (``n01440764``), not captions, and the
probe's ``acc_probe`` already measures class fidelity.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import Tensor

from denoiselab.metrics import to_uint8
from denoiselab.metrics.compositional import PromptGenerate
from denoiselab.train.build import Restored
from denoiselab.train.config import CLIPSCORE

__all__ = ["CLIPSCORE", "eval_prompts", "prompt_generator", "score_clipscore"]


def check_clipscore_run(r: Restored, run: str) -> None:
    """A named error for a run CLIPScore cannot score (before anything is generated)."""
    if not r.is_text:
        raise ValueError(
            f"metric {CLIPSCORE!r} scores samples against their prompts: {run} is a "
            "class-conditional run (no model.text); class names are no captions (imagefolder "
            "classes are folder names) — use acc_probe for class fidelity"
        )


def check_acc_probe_run(r: Restored, metrics: list[str]) -> None:
    """``acc_probe`` asks whether each sample shows its class (on a text run: the class of the
    image whose caption prompted it); on data with a single class (a flat imagefolder) every
    sample is of that class and the accuracy is 1 by construction."""
    if "acc_probe" not in metrics or r.model_cfg.num_classes >= 2:
        return
    if r.is_text:
        raise ValueError(
            f"acc_probe: this text run's data ({r.cfg.data.name}) has "
            f"{r.model_cfg.num_classes} class, so no prompt has a class to check; drop "
            "acc_probe (fd_probe, mmd_probe, kid, fid, cmmd and clipscore still apply)"
        )
    raise ValueError(
        f"acc_probe: this run's data ({r.cfg.data.name}) has {r.model_cfg.num_classes} class, "
        "so every sample is of it and the accuracy is 1 by construction; drop acc_probe "
        "(fd_probe, mmd_probe, kid, fid and cmmd still apply)"
    )


def eval_prompts(
    data_cfg: Any, num: int, seed: int, prompts_file: str | None = None
) -> tuple[list[str], str]:
    """``num`` prompts to score a text run on data ``data_cfg`` (the run's ``cfg.data``), and
    where they come from: ``prompts_file`` (one
    a line, cycled to ``num``), else on ``shapes`` the held-out prompts of
    :func:`~denoiselab.metrics.shapes_prompts` (scenes no training index reaches), else the
    captions of ``num`` images of the data drawn with ``seed`` (a latent cache: of its source
    data, whose scenes the decoded samples show)."""
    from denoiselab.latents import pixel_data_config

    data_cfg = pixel_data_config(data_cfg)
    if prompts_file is not None:
        from denoiselab.text.cli import read_prompt_file

        lines = read_prompt_file(prompts_file)
        return list(itertools.islice(itertools.cycle(lines), num)), f"file {prompts_file}"
    if data_cfg.name == "shapes":
        from denoiselab.metrics import shapes_prompts

        texts = [p.prompt for p in shapes_prompts(data_cfg, num, seed)]
        return texts, "shapes_prompts (held-out scenes of the caption grammar)"
    from denoiselab.data import build_dataset

    data = build_dataset(data_cfg)
    order = np.random.default_rng((0xC119, seed)).permutation(len(data))
    picks = [int(order[k % len(order)]) for k in range(num)]
    return [data.caption(i) for i in picks], "captions of the data (seeded draw)"


def prompt_generator(
    sample_prompts: Callable[..., Tensor],
    own: dict[str, Any],
    scale: float,
    remember: bool = False,
) -> PromptGenerate:
    """``generate(prompts, batch_seed) -> uint8 [B, 3, H, W]``: samples of a text run drawn by
    ``sample_prompts(prompts, seed, **settings)`` (``Restored.sample_prompts``, a training
    ``PromptSampler.prompts``) with sampler settings ``own`` at CFG scale ``scale``. ``remember``: keep every batch, so a
    second metric over the same prompts and seeds (compositional and clipscore on shapes, both
    scored on ``shapes_prompts``) reuses the samples instead of drawing them again."""
    settings = {**own, "cfg_scale": scale}
    drawn: dict[tuple[tuple[str, ...], int], Tensor] = {}

    def generate(prompts: list[str], batch_seed: int) -> Tensor:
        key = (tuple(prompts), batch_seed)
        if key in drawn:
            return drawn[key]
        images = to_uint8(sample_prompts(list(prompts), batch_seed, **settings).cpu())
        if remember:
            drawn[key] = images
        return images

    return generate


def score_clipscore(
    prompts: tuple[list[str], str],
    generate: PromptGenerate,
    seed: int,
    scorer: Any,
    batch: int,
) -> dict[str, Any]:
    """CLIPScore of a text run's samples drawn by ``generate`` (:func:`prompt_generator`), one
    per prompt of ``prompts`` (:func:`eval_prompts`' prompts and where they come from)."""
    from denoiselab.metrics.clipscore import clip_score

    texts, source = prompts
    return {**clip_score(generate, texts, scorer, batch=batch, seed=seed), "prompts": source}
