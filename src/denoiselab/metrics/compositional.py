"""A GenEval-like compositional score on ``shapes``, with no download.

Prompts with known attributes are drawn from the caption grammar
(:func:`shapes_prompts`); a generator turns them into images; the attribute probe
(:mod:`.attribute_probe`, never used in training) predicts each attribute; the score is the
per-attribute accuracy against the prompted attributes and the all-attributes-correct
accuracy over the ``judged`` attributes. When the training config holds (colour, shape)
pairs out (``data.holdout_pairs``), a share of the prompts asks for exactly those pairs, and
the score is reported on them apart (``unseen``) and on the others (``seen``).

The generator is any callable ``generate(prompts: list[str], seed: int) -> uint8 [n, 3, H, W]``;
batch ``i`` gets the seed :func:`~.batches.batch_seed` ``(seed, i)`` (under a process group
the batches are shared out over the ranks, with the same result). The probe's own
accuracy on real images (``probe_real_accuracy``) is returned beside the score, and
:func:`real_images` renders the scenes behind the prompts: the score of that "generator"
is the best a perfect model can get from this judge.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .attribute_probe import (
    AttributeProbe,
    AttributeProbeConfig,
    check_shapes_config,
    load_attribute_probe,
)
from .batches import rank_zero_first, run_batches
from .images import dataset_uint8

__all__ = [
    "DEFAULT_JUDGED",
    "ShapePrompt",
    "compositional_score",
    "real_images",
    "shapes_prompts",
]

PromptGenerate = Callable[[list[str], int], Tensor]
# The attributes that all-correct requires by default: GenEval's object + colour, and the
# background (colour and pattern) the issue asks for. Size and position are scored apart.
DEFAULT_JUDGED = ("shape", "colour", "background", "texture")
PROMPT_BASE = 1 << 40  # prompt scenes use indices far above any training index
MAX_PROMPT_SEED = 1 << 20  # prompt-set seeds: index blocks PROMPT_BASE·(1 + seed) + k
_PROMPT_STREAM = 0x9E0  # phrasings and re-colouring of prompt scenes


@dataclass(frozen=True)
class ShapePrompt:
    """One prompt: its text, the attribute indices it asks for, whether its (colour, shape)
    pair was held out of training, and the scene it describes (``ShapeSpec``)."""

    prompt: str
    attributes: Mapping[str, int]
    unseen: bool
    spec: Any


def shapes_prompts(
    dataset_cfg: Any, num: int, seed: int = 0, unseen_fraction: float = 0.5
) -> list[ShapePrompt]:
    """``num`` prompts drawn from the scenes and caption grammar of ``dataset_cfg`` (a shapes
    ``DataConfig``), pure in ``(dataset_cfg, num, seed)``.

    Scenes are drawn as the data draws them, at indices ``PROMPT_BASE·(1 + seed) + k`` that no
    training run reaches, in a phrasing drawn per prompt. With ``data.holdout_pairs`` set, an
    evenly spread ``unseen_fraction`` of the prompts asks for the held-out pairs in turn (the
    scene's shape set to the pair's shape and its colour to the pair's colour, the background
    redrawn when it would not contrast).
    """
    from ..data.shapes import ShapesDataset, recolour
    from ..data.shapes_caption import compose, parse_pair

    check_shapes_config(dataset_cfg)
    if not (1 <= num < PROMPT_BASE and 0 <= seed < MAX_PROMPT_SEED and 0 <= unseen_fraction <= 1):
        raise ValueError(
            f"num={num}, seed={seed}, unseen_fraction={unseen_fraction}; valid: 1 ≤ num < 2^40, "
            f"0 ≤ seed < 2^20, 0 ≤ unseen_fraction ≤ 1"
        )
    source = ShapesDataset(
        num_images=PROMPT_BASE * (MAX_PROMPT_SEED + 1),
        seed=dataset_cfg.seed,
        textures=dataset_cfg.textures,
        difficulty=dataset_cfg.difficulty,
    )
    shapes = tuple(source.class_names)
    held = sorted(parse_pair(p, shapes) for p in dataset_cfg.holdout_pairs or ())
    prompts = []
    for k in range(num):
        index = PROMPT_BASE * (1 + seed) + k
        rng = np.random.default_rng((_PROMPT_STREAM, dataset_cfg.seed, seed, k))
        forced = bool(held) and math.floor((k + 1) * unseen_fraction) > math.floor(
            k * unseen_fraction
        )
        if forced:
            shape, colour = held[k % len(held)]
            index += (shapes.index(shape) - index) % len(shapes)  # label = index mod classes
        spec = source.spec(index)
        if forced:
            spec = recolour(spec, colour, rng)
        words = spec.words(with_position="position" in source.attribute_names)
        attributes = {k: names.index(words[k]) for k, names in source.attribute_names.items()}
        text = compose(words, int(rng.integers(1 << 30)))
        prompts.append(ShapePrompt(text, attributes, (spec.shape, spec.fg) in held, spec))
    return prompts


def real_images(prompts: Sequence[ShapePrompt], image_size: int) -> Tensor:
    """The scenes behind ``prompts`` rendered at ``image_size``: ``uint8 [n, 3, S, S]``."""
    from ..data.shapes import render

    items = [(torch.from_numpy(render(p.spec, image_size, 3) * 2 - 1), 0) for p in prompts]
    return dataset_uint8(items, range(len(items)))[0]


def compositional_score(
    generate: PromptGenerate,
    prompts: Sequence[ShapePrompt | tuple[str, Mapping[str, int | str]]],
    *,
    dataset_cfg: Any = None,
    probe: AttributeProbe | None = None,
    probe_config: AttributeProbeConfig | None = None,
    judged: Sequence[str] = DEFAULT_JUDGED,
    batch: int = 64,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Score ``generate`` on ``prompts`` (:class:`ShapePrompt` or ``(text, attributes)``
    with attribute indices or names, e.g. ``("a red star", {"shape": "star", "colour": "red"})``).

    The probe is ``probe`` or the cached one of ``dataset_cfg``. Returns ``accuracy``
    (``{attribute: fraction of samples whose predicted attribute is the prompted one}``, for
    every attribute the prompts give), ``all_correct`` (every ``judged`` attribute right),
    the same two under ``seen`` and ``unseen`` (prompts whose pair was held out of training;
    ``None`` when there are none), ``probe_real_accuracy`` (the judge's held-out accuracy on
    real images) and what reproduces the run.
    """
    start = time.perf_counter()
    if probe is None:
        if dataset_cfg is None:
            raise ValueError("compositional_score needs a probe or the dataset_cfg to load one")
        with rank_zero_first():  # rank 0 trains it into the cache, the others read it
            probe = load_attribute_probe(dataset_cfg, probe_config, cache_dir, device)
    items = [p if isinstance(p, ShapePrompt) else ShapePrompt(*p, False, None) for p in prompts]
    if not items or batch < 1:
        raise ValueError(f"need at least one prompt (got {len(items)}) and batch ≥ 1 (got {batch})")
    keys = list(items[0].attributes)
    bad = [k for k in [*keys, *judged] if k not in probe.names]
    if bad:
        raise ValueError(
            f"attributes {bad} are not judged by the probe; valid: {list(probe.names)}"
        )
    items = [_as_indices(p, probe.names) for p in items]
    judged = [k for k in judged if k in keys]

    def judge(images: Tensor, first: int, stop: int) -> dict[str, Tensor]:
        return {k: v for k, v in probe.predict(images).items() if k in keys}

    run = run_batches(
        lambda first, stop, seed_i: generate([p.prompt for p in items[first:stop]], seed_i),
        judge,
        len(items),
        batch,
        seed,
        "prompts",
    )
    predicted = {k: torch.cat([r[k] for r in run.results]) for k in keys}
    hits = {k: predicted[k] == torch.tensor([p.attributes[k] for p in items]) for k in keys}
    unseen = torch.tensor([p.unseen for p in items])
    return {
        **_summary(hits, judged, torch.ones_like(unseen)),
        "seen": _summary(hits, judged, ~unseen),
        "unseen": _summary(hits, judged, unseen),
        "judged": judged,
        "num": len(items),
        "num_unseen": int(unseen.sum()),
        "probe_real_accuracy": probe.meta.get("val_accuracy"),
        "probe_real_all_correct": probe.meta.get("val_all_correct"),
        "probe": {"weights_id": probe.weights_id, "config": probe.meta.get("config")},
        "seed": seed,
        "batch": batch,
        "batch_seeds": run.seeds,
        "world_size": run.world,
        "image_shape": run.image_shape,
        "wall_time_s": time.perf_counter() - start,
    }


def _as_indices(prompt: ShapePrompt, names: Mapping[str, list[str]]) -> ShapePrompt:
    """Attribute values given by name (``{"colour": "red"}``) as indices; a clear error for
    a name the probe does not know."""
    out = {}
    for key, value in prompt.attributes.items():
        if isinstance(value, str):
            if value not in names[key]:
                raise ValueError(
                    f"{key}={value!r} in prompt {prompt.prompt!r}; valid: {names[key]}"
                )
            value = names[key].index(value)
        out[key] = int(value)
    return dataclasses.replace(prompt, attributes=out)


def _summary(hits: dict[str, Tensor], judged: Sequence[str], rows: Tensor) -> dict[str, Any] | None:
    if not rows.any():
        return None
    accuracy = {k: h[rows].double().mean().item() for k, h in hits.items()}
    together = torch.stack([hits[k][rows] for k in judged]).all(0) if judged else rows[rows]
    return {"accuracy": accuracy, "all_correct": together.double().mean().item()}
