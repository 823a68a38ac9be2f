"""``denoiselab train-ae``: train the small KL autoencoder on built-in data, offline, on a CPU.

Loss per batch (Kingma & Welling; β-weighted, per-element means):

    z = μ + σ·ξ,  ξ ~ N(0, I)          (reparameterised posterior sample)
    L = mean((D(z) − x)²) + β · mean(½(μ² + σ² − 1 − log σ²))

Batches come from :class:`StepLoader` (a pure function of ``(seed, step)``); after training,
per-channel mean and std of the posterior means over ``stats_images`` images are saved as
the autoencoder's own normalisation.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from denoiselab.cliutil import ArgumentParser
from denoiselab.config import (
    ConfigError,
    apply_overrides,
    find_config,
    from_dict,
    load_yaml,
    to_dict,
)
from denoiselab.data import DataConfig, build_dataset
from denoiselab.data.loader import StepLoader
from denoiselab.images import save_grid
from denoiselab.latents.tiny import TinyAE, TinyAEConfig, save_tiny_ae


@dataclass(frozen=True)
class AETrainConfig:
    """Training of the small autoencoder (defaults: 7 min on a busy shared 2-core CPU, ≈22 dB)."""

    data: DataConfig = field(default_factory=lambda: DataConfig(num_images=20_000))
    arch: TinyAEConfig = field(default_factory=TinyAEConfig)
    steps: int = 800
    batch: int = 32
    lr: float = 2e-3
    kl_weight: float = 2.5e-4
    seed: int = 0
    stats_images: int = 2048

    def __post_init__(self) -> None:
        for key in ("steps", "batch", "stats_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be >= 1")
        if self.seed < 0:  # seeds numpy's batch order, which refuses negatives
            raise ConfigError(f"seed={self.seed!r} must be >= 0")
        if not self.lr > 0 or self.kl_weight < 0:
            raise ConfigError(f"need lr > 0 and kl_weight >= 0; got {self.lr}, {self.kl_weight}")
        if self.data.name == "latents":
            raise ConfigError("train-ae trains on pixel data; data.name='latents' is a cache")
        if self.data.image_size % self.arch.downsample:
            raise ConfigError(
                f"data.image_size={self.data.image_size} is not divisible by the downsample "
                f"factor {self.arch.downsample} of arch.widths={self.arch.widths}"
            )
        if self.data.channels != self.arch.image_channels:
            raise ConfigError(
                f"data.channels={self.data.channels} but arch.image_channels="
                f"{self.arch.image_channels}"
            )


def ae_loss(net: TinyAE, x: Tensor, gen: torch.Generator, kl_weight: float) -> dict[str, Tensor]:
    """``{"mse": …, "kl": …}`` (scalars) for images ``x [B, C, H, W]`` in ``[-1, 1]``."""
    mean, logvar = net.moments(x)
    noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
    z = mean + (0.5 * logvar).exp() * noise
    mse = F.mse_loss(net.decode(z), x)
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    return {"mse": mse, "kl": kl, "loss": mse + kl_weight * kl}


@torch.no_grad()
def latent_statistics(
    net: TinyAE, dataset: Any, num: int, batch: int = 256
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[c]`` of the posterior means of the first ``num`` images."""
    zs = []
    for start in range(0, min(num, len(dataset)), batch):
        idx = range(start, min(start + batch, num, len(dataset)))
        zs.append(net.encode(torch.stack([dataset[i][0] for i in idx])))
    z = torch.cat(zs).double()
    return z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))


def train_tiny_ae(cfg: AETrainConfig, out: str | Path, log: Any = None) -> Path:
    """Train, measure latent statistics, save to ``out`` (+ ``recon.png``); returns ``out``."""
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.data)
    net = TinyAE(cfg.arch)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    loader = StepLoader(dataset, seed=cfg.seed, global_batch=cfg.batch, end_step=cfg.steps)
    start, every = time.perf_counter(), max(1, cfg.steps // 10)
    for step, x, _ in loader:
        for group in opt.param_groups:  # cosine decay to 10 %
            group["lr"] = cfg.lr * (0.55 + 0.45 * math.cos(math.pi * step / cfg.steps))
        terms = ae_loss(
            net, x, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), cfg.kl_weight
        )
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if log and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            log(
                f"step {step + 1}/{cfg.steps} | mse {terms['mse'].item():.5f} | "
                f"kl {terms['kl'].item():.3f} | {time.perf_counter() - start:.0f}s"
            )
    net.eval()
    mean, std = latent_statistics(net, dataset, cfg.stats_images)
    recon_mse = reconstruction_mse(net, dataset, min(512, len(dataset)))
    info = {
        "train": to_dict(cfg),
        "recon_mse": recon_mse,
        "psnr_db": 10 * math.log10(4 / max(recon_mse, 1e-12)),
        "seconds": time.perf_counter() - start,
    }
    save_tiny_ae(net, out, latent_mean=mean, latent_std=std, info=info)
    _save_recon_grid(net, dataset, Path(out) / "recon.png")
    return Path(out)


@torch.no_grad()
def reconstruction_mse(net: TinyAE, dataset: Any, num: int) -> float:
    """Mean squared error of ``decode(encode(x))`` over the first ``num`` images (in [-1, 1])."""
    x = torch.stack([dataset[i][0] for i in range(num)])
    return float(F.mse_loss(net.decode(net.encode(x)).clamp(-1, 1), x))


@torch.no_grad()
def _save_recon_grid(net: TinyAE, dataset: Any, path: Path, n: int = 8) -> None:
    x = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])
    save_grid(torch.cat([x, net.decode(net.encode(x)).clamp(-1, 1)]), path, nrow=len(x))


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="denoiselab train-ae",
        description="Train the small denoiselab autoencoder (default: shapes 32×32 → 4×8×8).",
    )
    p.add_argument(
        "config",
        nargs="?",
        help="optional YAML or shipped config name; only its `data:` section is read "
        "(e.g. quickstart)",
    )
    p.add_argument("overrides", nargs="*", help="data.key=value / arch.key=value overrides")
    p.add_argument("--out", required=True, help="output directory (safetensors + config.json)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 800)")
    p.add_argument("--batch", type=int, help="batch size (default 32)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    p.add_argument("--kl-weight", type=float, help="β of the KL term (default 2.5e-4)")
    p.add_argument("--latent-channels", type=int, help="c of the latents (default 4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p


def load_ae_train_config(args: argparse.Namespace) -> AETrainConfig:
    data: dict[str, Any] = {}
    if args.config:
        data = {"data": load_yaml(find_config(args.config)).get("data", {})}
    flags = {
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "kl_weight": args.kl_weight,
        "seed": args.seed,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.latent_channels is not None:
        data.setdefault("arch", {})["latent_channels"] = args.latent_channels
    return from_dict(AETrainConfig, apply_overrides(data, args.overrides))


def train_ae_main(argv: list[str] | None = None) -> int:
    """Entry point of ``denoiselab train-ae`` (returns the exit status)."""
    args = _parser().parse_args(argv)
    if args.config and "=" in args.config:  # no CONFIG, only overrides
        args.overrides, args.config = [args.config, *args.overrides], None
    try:
        cfg = load_ae_train_config(args)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        out = train_tiny_ae(cfg, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"denoiselab train-ae: error: {e}", file=sys.stderr)
        return 2
    print(f"autoencoder → {out} (see {out / 'recon.png'})")
    return 0
