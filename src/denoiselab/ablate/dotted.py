"""Dotted configuration keys: ``{"objective.prediction": "x"}`` ⇄ nested mappings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from denoiselab.config import ConfigError


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": 2}`` → ``{"a.b": 1, "c.d": 2}`` (an empty mapping stays a value)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def split_eval(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate ``eval.*`` keys (for :class:`EvalSpec`) from the training-config keys."""
    train = {k: v for k, v in flat.items() if not k.startswith("eval.")}
    evals = {k.removeprefix("eval."): v for k, v in flat.items() if k.startswith("eval.")}
    nested: dict[str, Any] = {}
    for key, value in evals.items():  # eval.probe.steps → {"probe": {"steps": …}}
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    return train, nested


def set_dotted(data: Mapping[str, Any], items: Any, where: str) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``(dotted.key, value)`` set (sections created)."""
    out = json.loads(json.dumps(data))
    for key, value in items:
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    return out


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """``lookup(cfg_dict, "objective.prediction")``; a missing key is a ConfigError."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"config has no key {dotted!r}")
        node = node[part]
    return node
