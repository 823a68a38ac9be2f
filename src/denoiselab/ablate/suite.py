"""Ablation suites: a baseline config plus named variants, each a few dotted overrides.

A suite file (YAML)::

    name: prediction_targets          # default: the file name
    description: JiT Table 2 ...
    base: quickstart                  # a shipped config's name, a config path (relative to
                                      # the suite file, the current directory or the
                                      # repository), or an inline mapping of TrainConfig fields
    baseline: x_v                     # default: the first variant
    variants:                         # name -> {dotted.key: value}; {} = the base itself
      x_v: {objective.prediction: x, objective.loss_space: v}
      eps_v: {objective.prediction: eps, objective.loss_space: v}
    eval: {metrics: auto, num: 256, every_nimg: 4096}   # see EvalSpec
    verdict: {claim: ..., metric: fd_probe, group_by: objective.prediction, expect: x}
    quick: {duration_nimg: 64, eval.num: 16}            # applied with --quick
    budget: images                    # or time: equal wall-clock (ablate/budget.py)

Every variant shares the base's seeds, data, data order and step budget: a variant may not
override ``seed``, ``global_batch``, ``duration_nimg``, ``device`` or ``data.*`` — except, on
latent data, the tokenizer (``data.root``, ``data.autoencoder``, ``data.latent_norm``: caches
of the same source images, compared in pixels). With ``budget: time`` the runner gives each
variant the images that the baseline's training time buys at the variant's measured speed
(``durations``, recorded in the resolved suite). Overrides
are applied in the order base → ``quick`` (with ``--quick``) → command-line ``--set`` →
variant. Everything is validated when the suite loads, before any training.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from denoiselab.ablate.dotted import flatten, lookup, set_dotted, split_eval
from denoiselab.config import (
    ConfigError,
    find_config,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
)
from denoiselab.metrics.evaluate import METRICS, check_sample_count
from denoiselab.metrics.probe_train import ProbeConfig
from denoiselab.train.config import TrainConfig

SUITES_DIR = Path(__file__).resolve().parent / "suites"
REPO_ROOT = Path(__file__).resolve().parents[3]
TOP_KEYS = ("name", "description", "base", "baseline", "variants", "eval", "verdict", "quick",
            "budget", "durations")  # fmt: skip
BUDGETS = ("images", "time")
SHARED_KEYS = ("seed", "global_batch", "duration_nimg", "device")  # and every data.* key
TOKENIZER_KEYS = ("data.root", "data.autoencoder", "data.latent_norm")  # latents may vary these
PROBE_METRICS = ("fd_probe", "mmd_probe", "acc_probe", "pr_probe")
PROBE_COLUMNS = ("fd_probe", "mmd_probe", "acc_probe", "precision_probe", "recall_probe")
VARIANT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # also a folder name
OPTIONAL_METRICS = {"fid": "inception", "cmmd": "clip", "dino_mmd": "dinov2"}


@dataclass(frozen=True)
class EvalSpec:
    """How every variant is scored; the same for all variants of a suite.

    metrics: names of ``denoiselab.metrics.METRICS`` or ``"auto"`` (the four probe metrics,
        plus FID, CMMD and DINO-MMD where their weights are found locally).
    num / num_ref / batch / seed: final-evaluation samples, real reference images (default
        ``num``), generation batch and seed (``metrics.evaluate``).
    steps / solver / cfg / interval: sampling; ``None`` takes the variant's ``sample.*``.
    ema: ``"auto"`` (:func:`~denoiselab.train.ema.auto_decay`), a decay, or ``"none"``
        (raw weights).
    every_nimg: periodic probe evaluation during training every this many images (0: off),
        on ``periodic_num`` samples with ``periodic_metrics`` and ``periodic_steps``.
    image_size: score at this resolution (default: the data's): the probe and the real
        reference images use the data at this size; samples are resized to it by the
        extractor (antialiased). A cheap probe for large images.
    grid_num: samples in the side-by-side grids (same noise and labels for every variant).
    probe: ``ProbeConfig`` overrides for the probe network of the probe metrics.
    """

    metrics: Literal["auto"] | list[str] = "auto"
    num: int = 256
    num_ref: int | None = None
    batch: int = 64
    seed: int = 0
    steps: int | None = None
    solver: Literal["heun", "euler", "euler_maruyama"] | None = None
    cfg: float | None = None
    interval: tuple[float, float] | None = None
    ema: Literal["auto", "none"] | float = "auto"
    every_nimg: int = 0
    periodic_num: int = 64
    periodic_metrics: list[str] = field(default_factory=lambda: ["fd_probe"])
    periodic_steps: int | None = None
    image_size: int | None = None
    grid_num: int = 16
    probe: dict[str, Any] = field(default_factory=dict)
    extractor_paths: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        names = [] if self.metrics == "auto" else self.metrics
        for name in [*names, *self.periodic_metrics]:
            if name not in METRICS:
                raise ConfigError(
                    f"eval: unknown metric {name!r}; valid: auto, {', '.join(METRICS)}"
                )
        for key in ("num", "batch", "periodic_num", "grid_num"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key}={getattr(self, key)!r} must be >= 1")
        if self.every_nimg < 0:
            raise ConfigError(f"eval.every_nimg={self.every_nimg!r} must be >= 0 (0: off)")
        if self.num < 2 or self.periodic_num < 2:
            raise ConfigError("eval.num and eval.periodic_num must be >= 2 (covariances)")
        final = list(PROBE_METRICS) if self.metrics == "auto" else self.metrics
        check_sample_count(final, self.num, "eval.num", ConfigError)
        check_sample_count(
            self.periodic_metrics, self.periodic_num, "eval.periodic_num", ConfigError
        )
        self.probe_config()

    def probe_config(self) -> ProbeConfig:
        return from_dict(ProbeConfig, self.probe, "eval.probe")


@dataclass(frozen=True)
class VerdictSpec:
    """A qualitative claim checked from the numbers.

    The variants are grouped by the value of config key ``group_by`` (or by name with
    ``group_by: variant``); the best ``metric``
    among those whose value is ``expect`` is compared with the best of all others. The
    claim holds when the expected group wins by at least ``min_ratio`` (a ratio of metric
    values, oriented so that > 1 means the expected group is better).
    """

    claim: str
    group_by: str
    expect: str
    metric: str = "fd_probe"
    min_ratio: float = 1.5

    def __post_init__(self) -> None:
        if not self.min_ratio >= 1:
            raise ConfigError(f"verdict.min_ratio={self.min_ratio!r} must be >= 1")


@dataclass(frozen=True)
class Suite:
    """A resolved suite: ``quick`` and ``--set`` overrides are already folded into ``base``."""

    name: str
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    baseline: str
    eval: EvalSpec
    description: str = ""
    verdict: VerdictSpec | None = None
    quick: bool = False
    source: str = ""
    budget: str = "images"
    durations: dict[str, int] = field(default_factory=dict)

    def config(self, variant: str, device: str | None = None) -> TrainConfig:
        """The validated ``TrainConfig`` of ``variant`` (optionally on ``device``)."""
        if variant not in self.variants:
            raise ConfigError(f"no variant {variant!r} in suite {self.name!r}; valid: {self.names}")
        data = set_dotted(self.base, self.variants[variant].items(), f"variant {variant!r}")
        if variant in self.durations:  # equal wall-clock: this variant's own image budget
            data["duration_nimg"] = self.durations[variant]
        if device is not None:
            data["device"] = device
        try:
            cfg = from_dict(TrainConfig, data)
        except ConfigError as e:
            raise ConfigError(f"suite {self.name!r}, variant {variant!r}: {e}") from e
        return cfg

    @property
    def names(self) -> list[str]:
        return list(self.variants)

    def fingerprint(self, variant: str) -> dict[str, Any]:
        """What must not change between the sessions of one variant (device, data loader
        workers and cache folder excluded: they do not change results)."""
        train, evals = to_dict(self.config(variant)), to_dict(self.eval)
        train.pop("device", None)
        for key in ("num_workers", "prefetch_factor"):
            train.get("data", {}).pop(key, None)
        evals.pop("cache_dir", None)
        return {"train": train, "eval": evals}

    def to_json(self) -> dict[str, Any]:
        """The resolved suite, loadable again with :func:`load_suite` (written as suite.json)."""
        out = {k: to_dict(getattr(self, k)) for k in ("name", "description", "baseline")}
        out.update(base=self.base, variants=self.variants, eval=to_dict(self.eval))
        out["verdict"] = to_dict(self.verdict) if self.verdict else None
        out.update(budget=self.budget, durations=dict(self.durations))
        out["quick_applied"] = self.quick
        return out


def builtin_suites() -> list[str]:
    """Names of the suites shipped in ``denoiselab/ablate/suites``."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_path: str | Path) -> Path:
    """A suite file path, or the file of a built-in suite name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = SUITES_DIR / f"{p.name}.yaml"
    if p.suffix == "" and builtin.is_file():
        return builtin
    raise ConfigError(
        f"suite {str(name_or_path)!r} is neither a file nor a built-in suite; "
        f"built-in: {', '.join(builtin_suites())}"
    )


def load_suite(
    name_or_path: str | Path,
    *,
    quick: bool = False,
    base: str | Path | None = None,
    sets: Sequence[str] = (),
    budget: str | None = None,
) -> Suite:
    """Load, resolve and fully validate a suite (every variant's config is built).

    ``base`` replaces the suite's base config; ``sets`` (``key=value``, ``eval.key=value``)
    apply to every variant; ``budget`` (``images`` | ``time``) replaces the suite's. A
    resolved ``suite.json`` (``quick_applied``) loads as it is.
    """
    path = suite_path(name_or_path)
    raw = load_yaml(path)  # JSON is YAML
    where = f"suite {str(path)!r}"
    applied = raw.pop("quick_applied", None)  # set in a suite.json written by a run
    if applied is not None:
        quick, raw["quick"] = bool(applied), {}
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(TOP_KEYS)}")
    train = resolve_base(base if base is not None else raw.get("base", {}), path.parent, where)
    eval_data = dict(_mapping(raw.get("eval") or {}, "eval", where))
    layers = [(raw.get("quick") or {}, "quick")] if quick else []
    layers.append(({".".join(k): v for k, v in map(parse_override, sets)}, "--set"))
    for mapping, label in layers:
        train_part, eval_part = split_eval(flatten(_mapping(mapping, label, where)))
        train = set_dotted(train, train_part.items(), f"{where} {label}")
        eval_data.update(eval_part)
    variants = _variants(raw.get("variants"), where)
    suite = Suite(
        name=str(raw.get("name") or path.stem),
        base=train,
        variants=variants,
        baseline=str(raw.get("baseline") or next(iter(variants))),
        eval=from_dict(EvalSpec, eval_data, "eval"),
        description=str(raw.get("description") or ""),
        verdict=from_dict(VerdictSpec, raw["verdict"], "verdict") if raw.get("verdict") else None,
        quick=quick,
        source=str(path),
        budget=budget if budget is not None else str(raw.get("budget") or "images"),
        durations=_durations(raw.get("durations"), where),
    )
    _validate(suite, where)
    return suite


def _variants(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: 'variants' must map variant names to overrides")
    out = {}
    for name, overrides in raw.items():
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: variant name {name!r} is not valid; use letters, digits, _ . - "
                "(not first: . -)"
            )
        flat = flatten(_mapping(overrides or {}, f"variant {name!r}", where))
        for key in flat:
            if key in TOKENIZER_KEYS:
                continue  # checked in _validate: latent data only, same source images
            if key in SHARED_KEYS or key.startswith("data.") or key.startswith("eval."):
                raise ConfigError(
                    f"{where}: variant {name!r} overrides {key!r}; every variant shares seeds, "
                    f"data, data order, step budget and evaluation: set it in base, quick or eval"
                )
        out[name] = flat
    return out


def _check_tokenizers(suite: Suite, where: str) -> None:
    """Variants that change the latent cache: latent data only, and (where the caches exist)
    caches of the same source images in the same order."""
    varying = [n for n, v in suite.variants.items() if set(v) & set(TOKENIZER_KEYS)]
    if not varying:
        return
    if suite.base.get("data", {}).get("name") != "latents":
        raise ConfigError(
            f"{where}: variants {varying} change {list(TOKENIZER_KEYS)}, which only latent "
            "data (data.name: latents) may vary between variants"
        )
    from denoiselab.latents.manifest import MANIFEST, read_manifest

    roots = {suite.config(n).data.root for n in suite.names}
    found = {r: read_manifest(r) for r in roots if r and (Path(r) / MANIFEST).is_file()}
    sources = {json.dumps([m.source, m.num_images], sort_keys=True) for m in found.values()}
    if len(sources) > 1:
        raise ConfigError(
            f"{where}: the latent caches {sorted(found)} encode different source images; a "
            "tokenizer comparison needs caches of the same data"
        )


def _validate(suite: Suite, where: str) -> None:
    _check_tokenizers(suite, where)
    if suite.budget not in BUDGETS:
        raise ConfigError(f"{where}: budget={suite.budget!r}; valid: {', '.join(BUDGETS)}")
    if suite.durations and suite.budget != "time":
        raise ConfigError(f"{where}: durations are for budget: time (equal wall-clock) only")
    bad = {k: v for k, v in suite.durations.items()
           if k not in suite.variants or not isinstance(v, int) or v < 1}  # fmt: skip
    if bad:
        raise ConfigError(
            f"{where}: durations {bad} must map variant names ({suite.names}) to image counts >= 1"
        )
    if suite.baseline not in suite.variants:
        raise ConfigError(
            f"{where}: baseline {suite.baseline!r} is not a variant; valid: {suite.names}"
        )
    for name in suite.variants:
        decays = suite.config(name).ema.decays
        if not isinstance(suite.eval.ema, str) and decays and suite.eval.ema not in decays:
            raise ConfigError(  # else the first evaluation fails, after hours of training
                f"{where}: eval.ema={suite.eval.ema!r} is not a trained EMA decay of variant "
                f"{name!r} (ema.decays={list(decays)}); use one of them, auto or none"
            )
    pretrained = [m for m in metric_columns(suite.eval) if m not in PROBE_COLUMNS]
    if suite.eval.image_size is not None and pretrained:
        raise ConfigError(
            f"{where}: eval.image_size={suite.eval.image_size} resizes the reference data, "
            f"which only the probe metrics allow; {pretrained} need eval.image_size: null"
        )
    if suite.verdict is not None:
        v = suite.verdict
        if v.metric not in metric_columns(suite.eval):
            raise ConfigError(
                f"{where}: verdict.metric={v.metric!r} is not computed; eval computes "
                f"{metric_columns(suite.eval)}"
            )
        values = {group_value(suite, n, v.group_by) for n in suite.variants}
        if v.expect not in values:
            raise ConfigError(
                f"{where}: verdict.expect={v.expect!r} but {v.group_by} takes {sorted(values)}"
            )


def metric_columns(spec: EvalSpec) -> list[str]:
    """The scoreboard columns the requested metrics produce (``pr_probe`` gives two)."""
    names = list(PROBE_METRICS) if spec.metrics == "auto" else list(spec.metrics)
    cols: list[str] = []
    for name in names:
        if name in ("pr_probe", "pr"):
            suffix = "_probe" if name == "pr_probe" else ""
            cols += [f"precision{suffix}", f"recall{suffix}"]
        else:
            cols.append(name)
    return cols


def resolve_base(base: Any, suite_dir: Path, where: str) -> dict[str, Any]:
    """An inline mapping, or a config file found beside the suite, in cwd or the repository, or
    a shipped config's name (:func:`denoiselab.config.find_config`)."""
    if isinstance(base, Mapping):
        return json.loads(json.dumps(dict(base)))  # deep copy of plain data
    if not isinstance(base, (str, Path)):
        raise ConfigError(f"{where}: base={base!r} must be a config path or a mapping")
    p = Path(base).expanduser()
    tried = [p] if p.is_absolute() else [suite_dir / p, Path.cwd() / p, REPO_ROOT / p]
    for candidate in tried:
        if candidate.is_file():
            return load_yaml(candidate)
    try:
        return load_yaml(find_config(p))
    except ConfigError as e:
        raise ConfigError(f"{where}: base {e}; looked in {[str(t) for t in tried]}") from None


def group_value(suite: Suite, variant: str, key: str) -> str:
    """The value of config key ``key`` for ``variant`` as text (``"variant"``: its name)."""
    if key == "variant":
        return variant
    return str(lookup(to_dict(suite.config(variant)), key))


def _durations(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping | None):
        raise ConfigError(
            f"{where}: durations={value!r} must map variant names to image counts >= 1"
        )
    return dict(value or {})


def _mapping(value: Any, label: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {label} must be a mapping of dotted keys, got {value!r}")
    return value


def dump_suite(suite: Suite) -> str:
    """The resolved suite as YAML (for ``--dry-run``)."""
    return yaml.safe_dump(suite.to_json(), sort_keys=False, allow_unicode=True)
