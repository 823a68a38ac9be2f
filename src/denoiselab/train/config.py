"""The training configuration: one frozen dataclass per concern, composed into ``TrainConfig``.

Defaults are the JiT paper's Table 9 (ImageNet 256, JiT-B/16); the shipped configs
(``denoiselab/configs/*.yaml``) override them. Durations and intervals are counted in images
seen (``*_nimg``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from denoiselab.config import ConfigError
from denoiselab.data import DataConfig
from denoiselab.objectives import ObjectiveConfig
from denoiselab.train.tracking import LogConfig


@dataclass(frozen=True)
class MuonConfig:
    """Muon's settings (``optim.name: muon``; Jordan et al. 2024; ``train/muon.py``, the update
    of ``torch.optim.Muon``).

    ``lr``: Muon's base rate (``None``: the AdamW rate — meaningful with ``adjust_lr:
    match_rms_adamw``, Moonshot's scaling ``0.2·√max(A, B)`` that gives the orthogonalised
    update AdamW's RMS; ``original`` is Keller Jordan's ``√max(1, A/B)``, which wants a rate
    near 0.02). ``weight_decay``: ``None`` = ``optim.weight_decay``. The loop's warm-up and
    cool-down scale both rates alike. ``ns_dtype``: where the Newton–Schulz iteration runs —
    ``auto`` is bf16 where the device multiplies bf16 natively (CUDA, AVX512-BF16/AMX CPUs)
    and fp32 elsewhere (bf16 is emulated, ~35× slower, on AVX2 CPUs); ``bf16`` is what
    ``torch.optim.Muon`` always does.
    """

    lr: float | None = None
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    weight_decay: float | None = None
    ns_dtype: Literal["auto", "bf16", "fp32"] = "auto"

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"optim.muon.lr={self.lr!r} must be > 0 or null")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.muon.momentum={self.momentum!r} must lie in [0, 1)")
        if self.ns_steps < 1:
            raise ConfigError(f"optim.muon.ns_steps={self.ns_steps!r} must be >= 1")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"optim.muon.weight_decay={self.weight_decay!r} must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (Table 9: β = (0.9, 0.95), wd 0, lr 2e-4 at batch 1024, 5 warm-up epochs).

    ``name`` picks the optimizer from ``denoiselab.train.optim.OPTIMIZERS``: ``adamw``, or
    ``muon`` (Muon on the blocks' 2-D matrices, AdamW with these settings on the rest;
    ``muon`` holds Muon's own settings).
    ``lr`` is absolute when set; otherwise ``lr = base_lr × global_batch / 256``
    (the linear scaling rule; the reference code's ``blr``). ``cooldown``: the fraction of
    the run, at its end, over which the rate falls linearly to zero ("warm-up, stable,
    decay"); 0 keeps it constant to the end, as the paper does.
    """

    base_lr: float = 5e-5
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_epochs: float = 5.0
    grad_clip: float | None = None
    cooldown: float = 0.0
    name: str = "adamw"
    muon: MuonConfig = field(default_factory=MuonConfig)

    def __post_init__(self) -> None:
        from denoiselab.train.optim import OPTIMIZERS

        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={self.name!r}; valid: {', '.join(OPTIMIZERS)}")
        if not 0 <= self.cooldown <= 1:
            raise ConfigError(f"optim.cooldown={self.cooldown!r} must lie in [0, 1]")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr!r} must be > 0")
        if not self.base_lr > 0:
            raise ConfigError(f"optim.base_lr={self.base_lr!r} must be > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas!r} must lie in [0, 1)")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs={self.warmup_epochs!r} must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip!r} must be > 0 or null")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay!r} must be >= 0")

    def resolved_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch / 256


@dataclass(frozen=True)
class EMAConfig:
    """EMA copies of the weights in float32, one per decay (Table 9: 0.9996, 0.9998, 0.9999).

    ``warmup``: use ``min(decay, (1 + n)/(10 + n))`` at update ``n`` so that short runs get a
    useful average instead of one dominated by the random initialisation.
    """

    decays: tuple[float, ...] = (0.9996, 0.9998, 0.9999)
    warmup: bool = False

    def __post_init__(self) -> None:
        bad = [d for d in self.decays if not 0 <= d < 1]
        if bad:
            raise ConfigError(f"ema.decays has {bad!r}; each decay must lie in [0, 1)")


@dataclass(frozen=True)
class SampleConfig:
    """Sampling (Table 9: Heun, 50 steps, linear grid, CFG interval [0.1, 1]).

    ``solver: euler_maruyama`` samples the reverse SDE with the ODE's marginals,
    ``g(t)² = 2·eta·(1−t)·s²`` (``denoiselab.sampling.solvers``); ``eta`` is unused otherwise.
    """

    steps: int = 50
    solver: Literal["heun", "euler", "euler_maruyama"] = "heun"
    cfg: float = 1.0
    interval: tuple[float, float] = (0.1, 1.0)
    ema: float | None = None
    num_grid: int = 64
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"sample.steps={self.steps!r} must be >= 1")
        if self.num_grid < 1:
            raise ConfigError(f"sample.num_grid={self.num_grid!r} must be >= 1")
        if not self.eta >= 0:
            raise ConfigError(f"sample.eta={self.eta!r} must be >= 0 (0: the ODE)")
        lo, hi = self.interval
        if not 0 <= lo <= hi <= 1:
            raise ConfigError(f"sample.interval={self.interval!r} must satisfy 0 <= lo <= hi <= 1")


CLIPSCORE = "clipscore"  # a periodic metric of text runs, scored from prompts (not in METRICS)


@dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation during training, logged to ``metrics.jsonl`` as ``eval/<metric>``.

    ``every_nimg``: every this many images and at the end of the run (0: off). The default
    metrics are the offline probe's (``denoiselab.metrics``; no download): the probe trains
    once per dataset, then it and the reference statistics come from the cache
    (``cache_dir``, default ``~/.cache/denoiselab``). Samples: ``num`` class-balanced images
    from fixed seeds (the same at every evaluation, so the curve moves with training alone),
    with ``steps`` sampling steps and guidance ``cfg`` (``None``: ``sample.steps`` /
    ``sample.cfg``), from the EMA ``ema`` (``"auto"``: ``train.ema.auto_decay`` — the slowest
    average that fits a tenth of the run so far — a decay, or ``"none"`` for the raw weights).
    ``probe`` overrides fields of the probe's recipe (``denoiselab.metrics.ProbeConfig``).
    ``metrics`` may also hold ``clipscore`` (text runs only: ``clipscore`` and
    ``clipscore_cos100`` of ``num`` samples, one per held-out prompt, as ``denoiselab eval``).
    ``clip``: the local CLIP directory of ``cmmd`` and ``clipscore`` (``eval --clip``; a whole
    ``CLIPModel`` with its ``tokenizer.json`` for clipscore); default
    ``<cache_dir>/extractors/clip-vit-large-patch14-336``. Checked before the first step.
    """

    every_nimg: int = 0
    metrics: tuple[str, ...] = ("fd_probe", "acc_probe")
    num: int = 256
    batch: int = 64
    steps: int | None = None
    cfg: float | None = None
    ema: Literal["auto", "none"] | float = "auto"
    seed: int = 0
    cache_dir: str | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    clip: str | None = None

    def __post_init__(self) -> None:
        from denoiselab.metrics import METRICS
        from denoiselab.metrics.evaluate import check_sample_count

        self.probe_config()  # names a bad probe field now, not at the first evaluation

        unknown = [m for m in self.metrics if m not in (*METRICS, CLIPSCORE)]
        if unknown:
            raise ConfigError(
                f"eval.metrics has {unknown!r}; valid: {', '.join([*METRICS, CLIPSCORE])}"
            )
        if self.every_nimg < 0:
            raise ConfigError(f"eval.every_nimg={self.every_nimg!r} must be >= 0 (0: off)")
        if self.num < 2 or self.batch < 1:
            raise ConfigError(f"eval.num={self.num!r} must be >= 2, eval.batch >= 1")
        check_sample_count(self.metrics, self.num, "eval.num", ConfigError)
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"eval.steps={self.steps!r} must be >= 1 or null")

    def probe_config(self) -> Any:
        """The probe network's recipe (``ProbeConfig``) with ``probe`` overrides."""
        from denoiselab.config import from_dict
        from denoiselab.metrics.probe_train import ProbeConfig

        return from_dict(ProbeConfig, self.probe, "eval.probe")


@dataclass(frozen=True)
class TrainConfig:
    """A whole run. ``model`` is a preset name plus any ``JiTConfig`` field overrides; the
    image size, channels and class count default to the dataset's; ``model`` is checked at
    construction (:func:`check_model_section`). ``objective.noise_scale: auto`` is resolved
    by :meth:`resolved` (:func:`auto_noise_scale`); a run records the number it used.
    ``terms`` adds training
    techniques as loss terms: ``{name: fields}`` with names from
    ``denoiselab.algorithms.TERMS`` (validated here, held as their config dataclasses).

    The run lasts ``ceil(duration_nimg / global_batch)`` steps. ``*_every_nimg``: after the
    first step whose image count reaches each multiple of the interval (any value ≥ 0, not
    only multiples of the batch; 0 switches the event off; the end of the run always logs
    and checkpoints): ``denoiselab.train.schedule`` has the exact rule.
    ``dist_timeout_s``: how long a collective waits for the other ranks under torchrun
    before the run fails (a hung rank). ``stop_check_steps``: under torchrun the ranks agree
    on a stop request (SIGTERM/SIGUSR1) every this many steps (one tiny all-reduce), so a
    stop lands at most this many steps after the signal; one process checks every step.

    ``strategy`` (``denoiselab.train.parallel``): ``ddp`` replicates the trained module on
    every rank and averages gradients; ``fsdp`` shards parameters, gradients, optimizer state
    and EMAs over the ranks (FSDP2 ``fully_shard`` per JiT block, then the root; under bf16,
    bf16 compute with fp32 master weights and fp32 gradient reduction) and writes sharded
    ``torch.distributed.checkpoint`` checkpoints (``step_<N>.dcp/``), plus, with
    ``consolidate_at_end``, the usual safetensors pair after the last step.
    ``activation_checkpointing``: recompute each block's activations in the backward pass
    (either strategy; less memory, ~⅓ more compute). ``compile_mode``: the ``torch.compile``
    mode when ``compile`` is on (``reduce-overhead`` adds CUDA graphs; DDP only).
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "JiT-B/16"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    terms: dict[str, Any] = field(default_factory=dict)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    global_batch: int = 1024
    grad_accum: int = 1
    duration_nimg: int = 200 * 1_281_167
    log_every_nimg: int = 100_000
    sample_every_nimg: int = 5_000_000
    ckpt_every_nimg: int = 5_000_000
    keep_checkpoints: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    deterministic: bool = False
    device: str = "auto"
    dist_timeout_s: float = 1800.0
    stop_check_steps: int = 10
    strategy: Literal["ddp", "fsdp"] = "ddp"
    activation_checkpointing: bool = False
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    consolidate_at_end: bool = True

    def __post_init__(self) -> None:
        from denoiselab.algorithms import parse_terms

        object.__setattr__(self, "terms", parse_terms(self.terms))
        check_model_section(self.model, self.data)
        for key in ("global_batch", "grad_accum", "duration_nimg", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be >= 1")
        _check_device_name(self.device)
        if self.seed < 0:  # seeds numpy's order and flip streams, which refuse negatives
            raise ConfigError(f"seed={self.seed!r} must be >= 0")
        if (
            self.objective.noise_scale == "auto"
            and self.data.name == "latents"
            and self.data.latent_norm == "none"
        ):
            raise ConfigError(
                "objective.noise_scale='auto' means 1.0 on normalised latents, but "
                "data.latent_norm='none' keeps the autoencoder's raw scale: set "
                "objective.noise_scale to a number (or use latent_norm autoencoder/dataset)"
            )
        for key in ("log_every_nimg", "sample_every_nimg", "ckpt_every_nimg"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"{key}={getattr(self, key)!r} must be >= 0 (images between events; 0: off)"
                )
        if self.global_batch % self.grad_accum:
            raise ConfigError(
                f"global_batch={self.global_batch} must be divisible by grad_accum="
                f"{self.grad_accum} (each micro-batch has global_batch / grad_accum images)"
            )
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s={self.dist_timeout_s!r} must be > 0 (seconds)")
        _check_parallel(self)
        if self.stop_check_steps < 1:
            raise ConfigError(f"stop_check_steps={self.stop_check_steps!r} must be >= 1")
        if CLIPSCORE in self.eval.metrics and not is_text_model(self.model):
            raise ConfigError(
                f"eval.metrics has {CLIPSCORE!r}, which scores samples against their prompts: "
                f"this is a class-conditional run (model.name={self.model['name']!r} without "
                "model.text); class names are no captions — use acc_probe for class fidelity, "
                "or a text model (model.text, e.g. JiT-S/8-T2I)"
            )
        if self.objective.routing_until < 1 and not has_routing(self.model):
            raise ConfigError(
                f"objective.routing_until={self.objective.routing_until!r} ends a routed stage, "
                "but the network has no token routing (model.routing.kind: none); set "
                "model.routing (tread, sprint) or remove objective.routing_until"
            )
        for key, decay in (("sample.ema", self.sample.ema), ("eval.ema", self.eval.ema)):
            if decay not in (None, "auto", "none") and decay not in self.ema.decays:
                raise ConfigError(
                    f"{key}={decay!r} is not a kept EMA decay; ema.decays = "
                    f"{list(self.ema.decays)} (or 'auto', 'none')"
                )

    def resolved(self) -> TrainConfig:
        """This config with ``objective.noise_scale: auto`` replaced by its number for this
        data (:func:`auto_noise_scale`); configs with a number are returned unchanged."""
        if self.objective.noise_scale != "auto":
            return self
        objective = replace(self.objective, noise_scale=auto_noise_scale(self.data))
        return replace(self, objective=objective)

    def steps(self) -> int:
        """Optimizer steps in the run: ``ceil(duration_nimg / global_batch)``."""
        return -(-self.duration_nimg // self.global_batch)


STRATEGIES = ("ddp", "fsdp")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_parallel(cfg: TrainConfig) -> None:
    """``strategy``, ``compile_mode`` and the combinations FSDP cannot train."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy={cfg.strategy!r}; valid: {', '.join(STRATEGIES)}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode={cfg.compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")
    for key in ("activation_checkpointing", "consolidate_at_end"):
        if not isinstance(getattr(cfg, key), bool):
            raise ConfigError(f"{key}={getattr(cfg, key)!r}; valid: true, false")
    if cfg.strategy != "fsdp":
        return
    if cfg.optim.name == "muon":
        raise ConfigError(
            "optim.name='muon' with strategy='fsdp': Muon orthogonalises whole weight matrices "
            "and FSDP gives each rank a slice of rows; use optim.name=adamw or strategy=ddp"
        )
    if cfg.compile and cfg.compile_mode == "reduce-overhead":
        raise ConfigError(
            "compile_mode='reduce-overhead' (CUDA graphs) with strategy='fsdp': FSDP's "
            "collectives cannot be captured; use 'default' or 'max-autotune-no-cudagraphs'"
        )


def auto_noise_scale(data: DataConfig) -> float:
    """What ``objective.noise_scale: auto`` means for ``data``.

    Pixels: JiT's rule (Table 9) ``s = 1.0 × image_size / 256`` — at a higher resolution
    neighbouring pixels are more redundant, so the same noise destroys less of the image, and
    the noise is scaled up with the side (0.125 at 32 px, 1.0 at 256, 2.0 at 512).
    Latents: 1.0, as JLT trains on latents normalised to unit variance per channel
    (``data.latent_norm``): a compressed latent has no such redundancy to compensate, and its
    side says nothing about the pixel resolution. (``latent_norm: none`` keeps the raw scale;
    ``auto`` is refused there.)
    """
    return 1.0 if data.name == "latents" else data.image_size / 256


def _check_device_name(device: str) -> None:
    """The spelling of ``device`` (whether CUDA exists is checked when the run starts, so a
    GPU config can be dry-run on a machine without one)."""
    import torch

    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device={device!r} is not a device; valid: auto, cpu, cuda, cuda:N"
        ) from None


PIXEL_DATASETS = ("shapes", "digits", "imagefolder", "prepared")


def has_routing(model: dict[str, Any]) -> bool:
    """Whether a ``model:`` section routes tokens (``model.routing.kind`` not none, from the
    preset or the section itself)."""
    from denoiselab.models.registry import MODEL_PRESETS
    from denoiselab.models.routing import routing_config

    preset = MODEL_PRESETS.get(model.get("name"), {})  # an unknown name is named elsewhere
    return routing_config({**preset, **model}.get("routing")).enabled


def is_text_model(model: dict[str, Any]) -> bool:
    """Whether a checked ``model:`` section is text-conditioned (``text`` from the preset or
    the section itself, not null)."""
    from denoiselab.models.registry import MODEL_PRESETS

    return {**MODEL_PRESETS[model["name"]], **model}.get("text") is not None


def check_model_section(model: dict[str, Any], data: DataConfig) -> None:
    """Validate the ``model:`` section now, not when the run starts: ``name`` must be a preset
    (``denoiselab info all``), every other key a ``JiTConfig`` field of the right type, and
    for pixel data the resulting network must be valid at ``data.image_size`` and
    ``data.channels`` (what the run will give it). For latent data the latent side and
    channels come from the cache, so values that depend on them are checked at run time.
    """
    import typing

    from denoiselab.config import _coerce
    from denoiselab.models import JiTConfig
    from denoiselab.models.registry import MODEL_PRESETS

    if not isinstance(model, dict) or "name" not in model:
        raise ConfigError("model.name is required (e.g. 'JiT-B/16'; see `denoiselab info all`)")
    name = model["name"]
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.name={name!r} is not a preset; valid: {', '.join(MODEL_PRESETS)}")
    hints = typing.get_type_hints(JiTConfig)
    unknown = sorted(set(model) - {"name"} - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join(map(repr, unknown))} in model; valid keys: name, "
            + ", ".join(hints)
        )
    fields = {k: _coerce(v, hints[k], f"model.{k}") for k, v in model.items() if k != "name"}
    if data.name not in PIXEL_DATASETS:
        return
    from_data = {"image_size": data.image_size, "in_channels": data.channels}
    for key, value in from_data.items():
        if key in fields and fields[key] != value:
            raise ConfigError(
                f"model.{key}={fields[key]!r} but the data gives {key}={value!r}; "
                f"remove model.{key} or change data"
            )
    try:
        JiTConfig(**{**MODEL_PRESETS[name], **fields, **from_data})
    except ValueError as e:
        raise ConfigError(f"model ({name} at {data.image_size}px): {e}") from None
