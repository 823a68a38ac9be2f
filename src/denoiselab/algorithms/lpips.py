"""LPIPS on the clean-image prediction x̂ (``terms.lpips``; Zhang et al. 2018, as in the PRX code).

x-prediction gives x̂ directly, so a perceptual loss between x̂ and x is natural:

    lpips(x̂, x) = Σ_l mean_hw( w_l · (f̂_l − f_l)² ),   f_l = φ_l(s(x)) / (‖φ_l(s(x))‖₂ + 1e-10)

φ_l: VGG16's relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 activations, normalised to unit
length over channels at every pixel; w_l ≥ 0: the LPIPS v0.1 linear heads (1×1 convolutions
without bias); s: LPIPS's input scaling ``(x − shift)/scale`` of ``[-1, 1]`` images. The
per-sample term is ``weight · lpips(x̂, x)`` for samples with ``t ≥ t_min`` (t = 1 is data:
only the less noisy ones, whose x̂ can be sharp), 0 for the others; x is a constant target.
Latent runs decode both through the run's frozen autoencoder, differentiably for x̂.

Weights are never downloaded: torchvision's ImageNet VGG16 state dict and the ``lpips``
package's ``weights/v0.1/vgg.pth`` are read from local files (safetensors, or
``torch.load(weights_only=True)``); a missing file is a ConfigError when the run is built.
VGG16 is implemented here with torchvision's ``features.<i>`` layout (torchvision does not run
in this environment), so its state dict loads as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from denoiselab.algorithms import TermContext, register
from denoiselab.algorithms.pixel_terms import (
    PixelDistanceTerm,
    check_image_channels,
    check_weight_and_window,
)
from denoiselab.config import ConfigError

# torchvision VGG16 ``features`` up to relu5_3: conv widths, "M" = 2×2 max-pool
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in features
TAP_WIDTHS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer
SCALE = (0.458, 0.448, 0.450)
VGG_FILES = ("vgg16.safetensors", "vgg16-397923af.pth", "vgg16.pth")
LIN_FILES = ("lpips_vgg.safetensors", "vgg.pth", "lpips_vgg.pth")
SOURCES = (
    "torchvision's ImageNet VGG16 state dict (https://download.pytorch.org/models/"
    "vgg16-397923af.pth) and the LPIPS v0.1 linear heads for VGG (the lpips package's "
    "lpips/weights/v0.1/vgg.pth)"
)


@dataclass(frozen=True)
class LPIPSConfig:
    """``terms.lpips``: ``weight`` of the per-sample term; ``t_min``: apply it only where
    ``t ≥ t_min`` (0: everywhere); ``vgg`` / ``lin``: the weight files (None: looked up in
    ``<cache root>/lpips/`` as one of ``VGG_FILES`` / ``LIN_FILES``)."""

    weight: float = 1.0
    t_min: float = 0.0
    vgg: str | None = None
    lin: str | None = None

    def __post_init__(self) -> None:
        check_weight_and_window("terms.lpips", self.weight, self.t_min)


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features[:30]`` (same module indices): x [B, 3, H, W] ->
    the five LPIPS taps ``[B, C_l, H/2^l, W/2^l]``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG16_LAYOUT:
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(width), 3, padding=1), nn.ReLU()]
                channels = int(width)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


class LPIPS(nn.Module):
    """``lpips(a, b) -> [B]`` for images ``[B, 3, H, W]`` in ``[-1, 1]`` (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.vgg = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_WIDTHS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        n = a.shape[0]
        feats = self.vgg(torch.cat([a, b]).sub(self.shift).div(self.scale))
        total = a.new_zeros(n)
        for f, lin in zip(feats, self.lins):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((f[:n] - f[n:]).pow(2)).mean((1, 2, 3))
        return total


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _find(given: str | None, names: tuple[str, ...], what: str, root: Path) -> Path:
    candidates = [Path(given).expanduser()] if given else [root / n for n in names]
    for p in candidates:
        if p.is_file():
            return p
    key = "vgg" if what == "VGG16" else "lin"
    raise ConfigError(
        f"terms.lpips: no {what} weights at {', '.join(map(str, candidates))}. LPIPS needs "
        f"{SOURCES}; set terms.lpips.{key} to the local file or place it in {root}"
    )


def load_lpips(vgg: str | None = None, lin: str | None = None, root: Path | None = None) -> LPIPS:
    """A frozen, eval-mode :class:`LPIPS` from local weight files (see :class:`LPIPSConfig`)."""
    from denoiselab.metrics.cache import cache_root

    root = root if root is not None else cache_root() / "lpips"
    net = LPIPS()
    vgg_state = _read(_find(vgg, VGG_FILES, "VGG16", root))
    features = {k: v for k, v in vgg_state.items() if k.startswith("features.")}
    lin_state = {f"lins.{k[3]}.weight": v for k, v in _read(_find(lin, LIN_FILES, "LPIPS linear", root)).items()
                 if k.startswith("lin") and k.endswith(".model.1.weight")}  # fmt: skip
    try:
        net.vgg.load_state_dict(features)
        net.lins.load_state_dict({k.removeprefix("lins."): v for k, v in lin_state.items()})
    except RuntimeError as e:
        raise ConfigError(
            f"terms.lpips: the weight files do not have the expected layout: {e}"
        ) from e
    return net.eval().requires_grad_(False)


class LPIPSTerm(PixelDistanceTerm):
    """``weight · lpips(x̂, x)`` per sample where ``t ≥ t_min`` (module docstring; the window,
    decode and weighting are :class:`~denoiselab.algorithms.pixel_terms.PixelDistanceTerm`'s)."""

    name = "lpips"

    def __init__(self, cfg: LPIPSConfig, net: LPIPS, decode: Callable[[Tensor], Tensor]) -> None:
        super().__init__(cfg, decode)
        self.net = net  # frozen: never saved or trained

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.net(_rgb(pred).float(), _rgb(target).float())


def _rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@register("lpips", LPIPSConfig, "LPIPS (VGG16) between x̂ and x, on decoded pixels")
def build_lpips(cfg: LPIPSConfig, ctx: TermContext) -> LPIPSTerm:
    from denoiselab.latents import differentiable_decoder

    check_image_channels("terms.lpips", ctx)
    net = load_lpips(cfg.vgg, cfg.lin).to(ctx.device)
    return LPIPSTerm(cfg, net, differentiable_decoder(ctx.data, ctx.device))


__all__ = ["LPIPS", "LPIPSConfig", "LPIPSTerm", "VGG16Features", "load_lpips"]
