"""Training techniques that add loss terms to the objective, behind one registry.

A technique is a :class:`~denoiselab.objectives.LossTerm` in its own file, with a frozen
config dataclass, registered here under the key a training config uses::

    terms:
      repa: {weight: 0.5, block: 4}      # a key of TERMS, then fields of its config class

``TERMS`` lists every technique in the order its terms are built and summed (a fixed order,
so a run's loss is the same float sum on every machine); ``denoiselab info terms`` prints it.
Terms only exist while training: sampling and evaluation rebuild the objective without them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from denoiselab.config import ConfigError, from_dict
from denoiselab.objectives import LossTerm, ObjectiveConfig


@dataclass(frozen=True)
class TermContext:
    """What a term's builder may read about the run it joins.

    ``model_cfg``: the resolved network config (a ``JiTConfig``); ``data``: the data config;
    ``dataset``: the training dataset (for image size, channels, class names);
    ``device``: where training runs.
    """

    model_cfg: Any
    objective: ObjectiveConfig
    data: Any
    dataset: Any
    device: torch.device


@dataclass(frozen=True)
class TermSpec:
    """A registered technique: its config class, builder and a one-line summary;
    ``describe(config, model_cfg) -> str`` (optional) says what the term adds to a given
    network, e.g. its parameter count (``denoiselab info CONFIG``)."""

    config: type
    build: Callable[[Any, TermContext], LossTerm]
    summary: str
    describe: Callable[[Any, Any], str] | None = None


TERMS: dict[str, TermSpec] = {}


def register(
    name: str, config: type, summary: str, describe: Callable[[Any, Any], str] | None = None
) -> Callable:
    """Decorator for a builder ``(config, TermContext) -> LossTerm`` under ``terms.<name>``."""

    def wrap(build: Callable[[Any, TermContext], LossTerm]) -> Callable:
        if name in TERMS:
            raise ValueError(f"loss term {name!r} is registered twice")
        TERMS[name] = TermSpec(config, build, summary, describe)
        return build

    return wrap


def parse_terms(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: mapping or config}`` → ``{name: config}`` in registry order; names and fields
    are checked here, at config time."""
    _load_builtin()
    unknown = sorted(set(raw) - set(TERMS))
    if unknown:
        valid = ", ".join(TERMS) or "(none registered)"
        raise ConfigError(f"unknown loss term(s) {unknown} under terms; valid: {valid}")
    out: dict[str, Any] = {}
    for name, spec in TERMS.items():
        if name in raw:
            value = raw[name]
            if isinstance(value, spec.config):
                out[name] = value
            elif isinstance(value, Mapping):
                out[name] = from_dict(spec.config, value, f"terms.{name}")
            else:
                raise ConfigError(f"terms.{name}={value!r}: expected a mapping of its fields")
    return out


def build_terms(configs: Mapping[str, Any], ctx: TermContext) -> list[LossTerm]:
    """The loss terms of ``configs`` (as :func:`parse_terms` returns them), in registry order."""
    parsed = parse_terms(configs)
    return [TERMS[name].build(cfg, ctx) for name, cfg in parsed.items()]


def _load_builtin() -> None:
    """Import the modules that register the built-in techniques (once)."""
    # Each import registers its technique; the import order is the registry order.
    import denoiselab.algorithms.repa  # noqa: I001 - registers "repa"
    import denoiselab.algorithms.irepa
    import denoiselab.algorithms.lpips
    import denoiselab.algorithms.pdino  # noqa: F401 - registers "pdino"


__all__ = ["TERMS", "TermContext", "TermSpec", "build_terms", "parse_terms", "register"]
