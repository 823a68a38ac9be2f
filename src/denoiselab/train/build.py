"""Build the pieces of a run from a ``TrainConfig``, and rebuild them from a checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from denoiselab.algorithms import TermContext, build_terms
from denoiselab.config import (
    ConfigError,
    apply_overrides,
    find_config,
    from_dict,
    load_yaml,
    to_dict,
)
from denoiselab.models import JiTConfig, model_config
from denoiselab.models.condition import condition_for
from denoiselab.models.registry import build_network
from denoiselab.models.routing import RouteSampler
from denoiselab.objectives import DenoisingObjective
from denoiselab.sampling.generate import Sampler, compile_for_sampling
from denoiselab.train.checkpoint import Checkpoint, load_checkpoint
from denoiselab.train.config import TrainConfig
from denoiselab.train.ema import auto_decay


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A YAML file or a shipped config's name (or nothing: the defaults) plus
    ``key.sub=value`` overrides."""
    data = load_yaml(find_config(path)) if path else {}
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


def config_from_yaml_text(text: str) -> TrainConfig:
    """Parse a run's ``config.yaml`` (the ``resolved_model`` section is ignored here)."""
    data = yaml.safe_load(text) or {}
    data.pop("resolved_model", None)
    return from_dict(TrainConfig, data)


def resolve_model_config(
    cfg: TrainConfig, *, image_size: int, channels: int, num_classes: int
) -> JiTConfig:
    """Preset + overrides; image size, channels and classes come from the data.

    An explicit model field that disagrees with the data is an error, not a silent change.
    """
    overrides: dict[str, Any] = {k: v for k, v in cfg.model.items() if k != "name"}
    from_data = {"image_size": image_size, "in_channels": channels, "num_classes": num_classes}
    for key, value in from_data.items():
        if key in overrides and overrides[key] != value:
            raise ConfigError(
                f"model.{key}={overrides[key]!r} but the data gives {key}={value!r}; "
                f"remove model.{key} or change data"
            )
        overrides[key] = value
    valid = set(JiTConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(
            f"unknown model key(s) {unknown}; valid: name, {', '.join(sorted(valid))}"
        )
    try:
        return model_config(cfg.model["name"], **overrides)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e


def model_config_for(cfg: TrainConfig, dataset: Any) -> JiTConfig:
    """The network a run of ``cfg`` on ``dataset`` (its pixel or latent data, built) trains:
    :func:`resolve_model_config` from the data's size, channels and classes, then for a text
    run ``D_text``/``max_len`` from the encoder's files and the vocabulary from the captions
    (:func:`~denoiselab.text.data.resolve_text`)."""
    from denoiselab.text.data import resolve_text

    mc = resolve_model_config(
        cfg,
        image_size=dataset.image_size,
        channels=dataset.channels,
        num_classes=dataset.num_classes,
    )
    return resolve_text(mc, dataset)


def build_objective(
    cfg: TrainConfig, model_cfg: JiTConfig, terms: TermContext | None = None
) -> DenoisingObjective:
    """The objective of a run of network ``model_cfg``; with ``terms`` (training) also its
    extra loss terms (``cfg.terms``) and the route sampler of a routing network, built for
    the run that ``terms`` describes. Without it (sampling, evaluation) the network runs
    dense. Its condition kind (``condition_for(model_cfg)``) gives the null that label
    dropout trains and the run's sampler (:func:`run_sampler`) guides with."""
    n, condition = model_cfg.num_classes, condition_for(model_cfg)
    if terms is None:
        return DenoisingObjective(cfg.objective, n, condition=condition)
    extra = build_terms(cfg.terms, terms)
    routes = RouteSampler.for_model(terms.model_cfg)
    until = cfg.objective.routing_until * cfg.duration_nimg  # then the full-token stage
    return DenoisingObjective(cfg.objective, n, extra, routes, until, condition=condition)


def run_sampler(
    net: nn.Module,
    objective: DenoisingObjective,
    cfg: TrainConfig,
    model_cfg: JiTConfig,
    decode: Callable[[Tensor], Tensor],
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Sampler:
    """``net`` (a run's network or an EMA copy) ready to draw decoded images: input shape,
    classes and noise scale from the run's configs; CFG's null from the objective's condition
    kind, the null that label dropout trained."""
    mc = model_cfg
    return Sampler(
        net,
        objective.velocity,
        (mc.in_channels, mc.image_size, mc.image_size),
        num_classes=mc.num_classes,
        noise_scale=cfg.objective.noise_scale,
        decode=decode,
        device=device,
        autocast=autocast,
        routes=RouteSampler.for_model(mc),
        condition=objective.condition,
    )


def text_sampler(
    sampler: Sampler, model_cfg: JiTConfig, table: Callable[[], list[list[str]]]
) -> Any:
    """A text run's ``sampler`` keyed by labels (``table()[y]``: prompts of class y, see
    :func:`~denoiselab.text.data.class_prompts`) or prompts
    (:class:`~denoiselab.text.sampling.PromptSampler`); a class run's unchanged."""
    if model_cfg.text is None:
        return sampler
    from denoiselab.text import tokenizer_for
    from denoiselab.text.sampling import PromptSampler

    return PromptSampler(sampler, tokenizer_for(model_cfg.text), table)


@dataclass
class Restored:
    """A trained network ready to sample: weights from the model or one EMA copy."""

    cfg: TrainConfig
    model_cfg: JiTConfig
    net: nn.Module
    objective: DenoisingObjective
    checkpoint: Checkpoint
    weights: str  # "model" or "ema:<decay>"
    device: torch.device | str = "cpu"
    compile: bool = False  # sample through torch.compile (static shapes per batch size)

    @property
    def sampler(self) -> Sampler:
        """The network ready to draw decoded images (the decoder is built on first use)."""
        if self._sampler is None:
            from denoiselab.latents import decoder_for

            decode = decoder_for(self.cfg.data, self.device)
            net = compile_for_sampling(self.net) if self.compile else self.net
            sampler = run_sampler(
                net, self.objective, self.cfg, self.model_cfg, decode, self.device
            )
            self._sampler = text_sampler(sampler, self.model_cfg, self._class_prompts)
        return self._sampler

    def _class_prompts(self) -> list[list[str]]:
        from denoiselab.data import build_dataset
        from denoiselab.text.data import class_prompts

        return class_prompts(build_dataset(self.cfg.data))

    @property
    def is_text(self) -> bool:
        """Whether the run is text-conditioned (``model.text``): sampled from prompts."""
        return self.model_cfg.text is not None

    def settings(
        self,
        steps: int | None = None,
        solver: str | None = None,
        cfg_scale: float | None = None,
        interval: tuple[float, float] | list[float] | None = None,
        eta: float | None = None,
    ) -> dict[str, Any]:
        """Sampler settings for :meth:`sample`: those given, the rest from the run's own
        ``sample`` config (what its training grids and periodic evaluation used)."""
        own = self.cfg.sample
        return {
            "steps": own.steps if steps is None else steps,
            "solver": own.solver if solver is None else solver,
            "cfg_scale": own.cfg if cfg_scale is None else cfg_scale,
            "interval": tuple(own.interval if interval is None else interval),
            "eta": own.eta if eta is None else eta,
        }

    def sample(self, labels: Tensor, seed: int, **settings: Any) -> Tensor:
        """Decoded samples ``float [n, C, H, W]`` in ``[-1, 1]`` (pixels, also for latent runs)
        for ``labels [n]``; ``settings`` as :class:`~denoiselab.sampling.generate.Sampler`
        (``steps``, ``solver``, ``cfg_scale``, ``interval``, ``eta``)."""
        return self.sampler(labels, seed, **settings)

    def sample_prompts(
        self,
        prompts: list[str],
        seed: int,
        *,
        negative_prompt: str | None = None,
        **settings: Any,
    ) -> Tensor:
        """A text run's decoded samples ``float [n, C, H, W]`` in ``[-1, 1]`` for ``prompts``
        (one image each; the initial noise a function of ``seed`` alone); CFG's
        unconditional branch is ``negative_prompt`` (default: the empty prompt)."""
        if not self.is_text:
            raise ConfigError(
                f"{self.checkpoint.path} is a class-conditional run: prompts need a text run "
                "(model.text); sample it with class labels (--class)"
            )
        return self.sampler.prompts(prompts, seed, negative_prompt=negative_prompt, **settings)

    _sampler: Any = None


def restore(
    path: str | Path,
    *,
    ema: float | str | None = "auto",
    device: str | torch.device = "cpu",
    compile: bool = False,
) -> Restored:
    """Load a run folder or checkpoint for sampling/evaluation.

    ``ema="auto"`` picks :func:`~denoiselab.train.ema.auto_decay` of the checkpoint's decays
    and step (the raw weights if it keeps no EMA), ``None`` the raw weights. ``compile``:
    sample through ``torch.compile`` (:func:`~denoiselab.sampling.generate.compile_for_sampling`).
    """
    ckpt = load_checkpoint(path, with_state=False)
    cfg = config_from_yaml_text(ckpt.config_yaml).resolved()  # runs record a number already
    model_cfg = _model_cfg_from_checkpoint(ckpt, cfg)
    net = build_network(model_cfg)
    if ema == "auto":
        ema = auto_decay(tuple(ckpt.ema), ckpt.step) if ckpt.ema else None
    if ema is None:
        net.load_state_dict(ckpt.model)
        which = "model"
    else:
        decay = float(ema)
        if decay not in ckpt.ema:
            raise ConfigError(f"ema={decay!r} not in checkpoint; available: {sorted(ckpt.ema)}")
        state = dict(ckpt.model)
        state.update(ckpt.ema[decay])
        net.load_state_dict(state)
        which = f"ema:{decay!r}"
    net.to(device).eval()
    objective = build_objective(cfg, model_cfg)
    return Restored(cfg, model_cfg, net, objective, ckpt, which, device, compile)


def _model_cfg_from_checkpoint(ckpt: Checkpoint, cfg: TrainConfig) -> JiTConfig:
    data = yaml.safe_load(ckpt.config_yaml)
    resolved = data.get("resolved_model")
    if resolved is None:
        raise ConfigError(f"{ckpt.path}: config lacks resolved_model; not a denoiselab checkpoint")
    return from_dict(JiTConfig, resolved)


def config_yaml_with_model(cfg: TrainConfig, model_cfg: JiTConfig) -> str:
    """The resolved config written to the run folder and every checkpoint."""
    data = to_dict(cfg)
    data["resolved_model"] = to_dict(model_cfg)
    return yaml.safe_dump(data, sort_keys=False)
