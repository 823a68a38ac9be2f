"""``denoiselab repa-e``: tune the small autoencoder end to end with a latent model (REPA-E).

PRX logbook (seeds/002, "Alignment in the Token Latent Space"), after Leng et al. 2025:
backpropagating the diffusion loss into the VAE makes the latent "pathologically easy";
REPA-E's fix is a two-signal recipe — "keep the diffusion loss, but apply a stop-gradient so
it only updates the latent diffusion model (not the VAE); update both the VAE and the
diffusion model using an end-to-end REPA alignment loss". Per step, for pixels ``x``:

    μ, log σ² = E(x);  ẑ = (μ − m) / s                 (m, s: running latent statistics)
    denoiser θ, projector φ:  ∇_{θ,φ} [ L_diff(θ; sg(ẑ)) + λ_d·L_REPA(θ, φ; ẑ) ]
    autoencoder ψ:            ∇_ψ [ ‖D(μ + σ·ξ) − x‖² + β·KL + λ_v·L_REPA(θ, φ; ẑ(ψ)) ]

with ``L_REPA = −mean_n cos(y_n, h_φ(h_n))`` against a frozen teacher's features ``y`` of
``x`` (:mod:`denoiselab.algorithms.repa`), λ_d = ``repa.weight`` (REPA-E: 0.5),
λ_v = ``vae_align_weight`` (REPA-E: 1.5), and the autoencoder's own reconstruction and KL
terms (REPA-E keeps its VAE losses; ours are those of ``train-ae``). One forward of the
denoiser serves both: the autoencoder's gradient is taken of a loss that does not contain
``L_diff``, which is the stop-gradient. ``m, s`` follow the batch statistics of ``μ`` with
momentum ``norm_momentum`` (REPA-E's BatchNorm on the latents, momentum 0.1).

Why its own entry point, not a loss term of the training loop: the loop trains a network on
a fixed data set (pixels or cached latents); here the latents themselves move every step, a
second model with its own optimizer and losses is trained, and the output is an autoencoder,
not a denoiser. It reuses the loop's pieces: the step loader, the objective with the REPA
term, the teacher, and the autoencoder's save format. The result is a normal ``tiny``
autoencoder directory (safetensors + latent statistics re-measured after tuning) that
``cache-latents`` and ``train`` accept; the jointly trained denoiser is discarded, as in
REPA-E's E2E-VAE use ("a drop-in replacement" tokenizer for a fresh latent model).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from denoiselab.algorithms import TermContext
from denoiselab.algorithms.repa import REPA, REPAConfig, build_alignment
from denoiselab.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from denoiselab.data import DataConfig, build_dataset
from denoiselab.data.loader import StepLoader
from denoiselab.latents.tiny import TinyAE, load_tiny_ae, save_tiny_ae
from denoiselab.latents.train_ae import latent_statistics, reconstruction_mse
from denoiselab.models import JiT
from denoiselab.models.condition import condition_for
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig
from denoiselab.train.config import has_routing


@dataclass(frozen=True)
class REPAEConfig:
    """REPA-E tuning of a ``train-ae`` autoencoder (defaults: REPA-E's weights, CPU sizes).

    autoencoder: the ``train-ae`` directory to start from. model: a JiT preset and overrides
    for the latent model (its input side, channels and classes come from the latents).
    """

    autoencoder: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(num_images=20_000, cache=True))
    model: dict[str, Any] = field(
        default_factory=lambda: {"name": "JiT-S/8", "patch_size": 2, "bottleneck": None}
    )
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    repa: REPAConfig = field(default_factory=lambda: REPAConfig(weight=0.5))
    vae_align_weight: float = 1.5
    kl_weight: float = 2.5e-4
    norm_momentum: float = 0.1
    steps: int = 800
    batch: int = 32
    lr: float = 1e-3
    ae_lr: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    stats_images: int = 2048

    def __post_init__(self) -> None:
        if not self.autoencoder:
            raise ConfigError("autoencoder: give the train-ae directory to tune (--autoencoder)")
        for key in ("steps", "batch", "stats_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be >= 1")
        if self.seed < 0:  # seeds numpy's batch order, which refuses negatives
            raise ConfigError(f"seed={self.seed!r} must be >= 0")
        if self.data.name == "latents":
            raise ConfigError("repa-e tunes the encoder on pixels; data.name='latents' is a cache")
        if self.repa.schedule != "constant" or not self.repa.weight > 0:
            raise ConfigError("repa-e needs repa.weight > 0 with the constant schedule")
        if has_routing(self.model):
            raise ConfigError(
                f"model.routing={self.model['routing']!r}: repa-e trains its latent model dense (its loss "
                "draws no routes); drop model.routing (route in the JLT run on the tuned latents)"
            )
        if self.vae_align_weight < 0 or self.kl_weight < 0 or not 0 < self.norm_momentum <= 1:
            raise ConfigError("need vae_align_weight, kl_weight >= 0 and norm_momentum in (0, 1]")


class REPAE:
    """The three trained parts (autoencoder, latent model, projector) and one step of each."""

    def __init__(self, cfg: REPAEConfig) -> None:
        from denoiselab.train.build import resolve_model_config

        torch.manual_seed(cfg.seed)
        self.cfg, self.dataset = cfg, build_dataset(cfg.data)
        self.ae, ae_config = load_tiny_ae(cfg.autoencoder)
        self.ae.train().requires_grad_(True)
        self.mean = torch.tensor(ae_config["latent_mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(ae_config["latent_std"]).view(1, -1, 1, 1)
        c, f = self.ae.cfg.latent_channels, self.ae.cfg.downsample
        self.model_cfg = resolve_model_config(
            cfg, image_size=cfg.data.image_size // f, channels=c,
            num_classes=self.dataset.num_classes,
        )  # fmt: skip
        self.net = JiT(self.model_cfg)
        ctx = TermContext(
            self.model_cfg, cfg.objective, cfg.data, self.dataset, torch.device("cpu")
        )
        self.term: REPA = build_alignment(REPA, cfg.repa, ctx, "repa")
        objective = cfg.objective
        if objective.noise_scale == "auto":  # latents: unit noise (TrainConfig.resolved's rule)
            objective = replace(objective, noise_scale=1.0)
        self.objective = DenoisingObjective(
            objective,
            self.dataset.num_classes,
            [self.term],
            condition=condition_for(self.model_cfg),
        )
        self.denoiser_params = [*self.net.parameters(), *self.term.parameters()]
        self.opt = torch.optim.AdamW(self.denoiser_params, lr=cfg.lr, betas=(0.9, 0.95))
        self.ae_opt = torch.optim.AdamW(self.ae.parameters(), lr=cfg.ae_lr, betas=(0.9, 0.99))

    def losses(self, x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        """All loss terms of one batch (scalars), on one forward of each network."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        mu, logvar = self.ae.moments(x)
        noise = torch.randn(mu.shape, generator=gen)
        recon = F.mse_loss(self.ae.decode(mu + (0.5 * logvar).exp() * noise), x)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
        z = (mu - self.mean) / self.std
        with torch.no_grad():
            feats = self.term.teacher(x)  # type: ignore[misc]
        t, eps, yd = self.objective.draw(z, y, gen)
        out = self.objective.terms(
            self.net, z, yd, t, eps, nimg=step * cfg.batch, extras={"teacher": feats}
        )
        align = out["repa"].mean() / cfg.repa.weight  # L_REPA = −mean cos
        return {
            "denoise": out["denoise"].mean(),
            "align": align,
            "recon": recon,
            "kl": kl,
            # every term of the objective (denoise, repa, and e.g. contrastive), as in training
            "denoiser_loss": sum(v.mean() for v in out.values()),
            "ae_loss": recon + cfg.kl_weight * kl + cfg.vae_align_weight * align,
            "latent_mean": mu.detach(),
        }

    def gradients(self, terms: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(denoiser + projector, autoencoder) gradients: the stop-gradient of the module doc."""
        d = torch.autograd.grad(terms["denoiser_loss"], self.denoiser_params, retain_graph=True)
        a = torch.autograd.grad(terms["ae_loss"], list(self.ae.parameters()), allow_unused=True)
        ae = [torch.zeros_like(p) if g is None else g for g, p in zip(a, self.ae.parameters())]
        return list(d), ae

    def step(self, x: Tensor, y: Tensor, step: int) -> dict[str, float]:
        cfg = self.cfg
        terms = self.losses(x, y, step)
        grads_d, grads_a = self.gradients(terms)
        for params, grads, opt in (
            (self.denoiser_params, grads_d, self.opt),
            (list(self.ae.parameters()), grads_a, self.ae_opt),
        ):
            for p, g in zip(params, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        mu = terms.pop("latent_mean")
        m = cfg.norm_momentum
        self.mean = (1 - m) * self.mean + m * mu.mean((0, 2, 3), keepdim=True)
        self.std = (1 - m) * self.std + m * mu.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        return {k: float(v.detach()) for k, v in terms.items()}


def train_repa_e(cfg: REPAEConfig, out: str | Path, log: Any = None) -> Path:
    """Tune, re-measure latent statistics, save a ``tiny`` autoencoder to ``out``."""
    start = time.perf_counter()
    run = REPAE(cfg)
    loader = StepLoader(run.dataset, seed=cfg.seed, global_batch=cfg.batch, end_step=cfg.steps)
    every = max(1, cfg.steps // 10)
    for step, x, y in loader:
        values = run.step(x, y, step)
        if log and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            log(
                f"step {step + 1}/{cfg.steps} | denoise {values['denoise']:.4f} | align "
                f"{values['align']:.4f} | recon {values['recon']:.5f} | "
                f"{time.perf_counter() - start:.0f}s"
            )
    ae: TinyAE = run.ae.eval().requires_grad_(False)
    mean, std = latent_statistics(ae, run.dataset, cfg.stats_images)
    recon = reconstruction_mse(ae, run.dataset, min(512, len(run.dataset)))
    info = {
        "repa_e": to_dict(cfg),
        "recon_mse": recon,
        "psnr_db": 10 * math.log10(4 / max(recon, 1e-12)),
        "seconds": time.perf_counter() - start,
    }
    return save_tiny_ae(ae, out, latent_mean=mean, latent_std=std, info=info)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="denoiselab repa-e",
        description="Tune a train-ae autoencoder end to end with a latent model (REPA-E).",
    )
    p.add_argument("config", nargs="?", help="optional YAML with REPAEConfig fields")
    p.add_argument("overrides", nargs="*", help="key=value overrides (e.g. repa.block=2)")
    p.add_argument("--autoencoder", help="the train-ae directory to start from")
    p.add_argument("--out", required=True, help="output directory of the tuned autoencoder")
    p.add_argument("--steps", type=int)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p


def repa_e_main(argv: list[str] | None = None) -> int:
    """Entry point of ``denoiselab repa-e`` (returns the exit status)."""
    args = _parser().parse_args(argv)
    if args.config and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        raw = load_yaml(args.config) if args.config else {}
        raw = apply_overrides(raw, args.overrides)
        if args.autoencoder:
            raw["autoencoder"] = args.autoencoder
        if args.steps is not None:
            raw["steps"] = args.steps
        cfg = from_dict(REPAEConfig, raw)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        out = train_repa_e(cfg, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"denoiselab repa-e: error: {e}", file=sys.stderr)
        return 2
    print(f"REPA-E-tuned autoencoder → {out}")
    return 0


__all__ = ["REPAE", "REPAEConfig", "repa_e_main", "train_repa_e"]
