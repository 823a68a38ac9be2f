"""One autoencoder interface for training, sampling and evaluation: pixels ⇄ raw latents.

``ae.encode(x [B, C, H, W] in [-1, 1]) -> z [B, c, H/f, W/f]`` (raw, un-normalised) and
``ae.decode(z) -> x``; ``ae.normalization()`` is the autoencoder's own ``(shift, scale)``.

Kinds (``load_autoencoder(path)`` detects the kind from ``path/config.json``):

- ``identity``: pixels (``c = C``, ``f = 1``).
- ``tiny``: the small KL autoencoder trained by ``denoiselab train-ae`` (:mod:`.tiny`).
- ``diffusers-kl``: a diffusers ``AutoencoderKL`` (FLUX.1: 16 channels, f = 8), posterior mode;
  normalisation from its config (``shift_factor``, ``scaling_factor``).
- ``flux2``: diffusers ``AutoencoderKLFlux2`` (32 channels, f = 8; diffusers ≥ 0.36), posterior
  mode folded 2×2 into 128 channels at f = 16 and normalised with the VAE's BatchNorm running
  statistics, exactly as ``Flux2Pipeline`` does (JLT's representation).

Weights load from local directories only (``local_files_only=True``, safetensors only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from denoiselab.latents.fold import fold, unfold
from denoiselab.latents.norm import LatentNorm
from denoiselab.latents.tiny import TINY_FORMAT, TinyAE, load_tiny_ae

AutoencoderKind = Literal["identity", "tiny", "diffusers-kl", "flux2"]
DIFFUSERS_CLASSES = {"AutoencoderKL": "diffusers-kl", "AutoencoderKLFlux2": "flux2"}
FLUX2_MIN_DIFFUSERS = "0.36.0"


class Autoencoder(nn.Module):
    """A frozen pixels ⇄ latents map. Subclasses implement ``_encode`` / ``_decode``.

    Attributes:
        kind: one of :data:`AutoencoderKind`.
        path: the local directory it was loaded from (``None`` for identity).
        image_channels: C of the pixel images (1 or 3).
        latent_channels: c of the latents.
        downsample: f, the spatial reduction (latent side = image side / f).
    """

    kind: str
    path: str | None = None
    image_channels: int
    latent_channels: int
    downsample: int

    def _encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def normalization(self) -> LatentNorm:
        """The autoencoder's own per-channel ``(shift, scale)`` (read in float32 at load time)."""
        return LatentNorm.identity(self.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters(), torch.zeros(())).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters(), torch.zeros(())).device

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Pixels ``[B, C, H, W]`` in ``[-1, 1]`` → raw latents ``float32 [B, c, H/f, W/f]``."""
        _, c, h, w = _check4(x, "encode")
        if c != self.image_channels or h % self.downsample or w % self.downsample:
            raise ValueError(
                f"{self.kind} autoencoder encodes [B, {self.image_channels}, H, W] with H, W "
                f"divisible by {self.downsample}; got {tuple(x.shape)}"
            )
        return self._encode(x.to(self.device, self.dtype)).float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Raw latents ``[B, c, h, w]`` → pixels ``float32 [B, C, h·f, w·f]`` (≈ ``[-1, 1]``)."""
        _, c, _, _ = _check4(z, "decode")
        if c != self.latent_channels:
            raise ValueError(
                f"{self.kind} autoencoder decodes {self.latent_channels}-channel latents; "
                f"got shape {tuple(z.shape)}"
            )
        return self._decode(z.to(self.device, self.dtype)).float()

    def decode_with_grad(self, z: Tensor) -> Tensor:
        """As :meth:`decode`, keeping the autograd graph: gradients flow back to ``z`` (the
        weights stay frozen). For losses on decoded predictions (``terms.lpips``)."""
        _check4(z, "decode")
        return self._decode(z.to(self.device, self.dtype)).float()

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """``(c, h, w)`` of the latent of a square ``image_size`` image."""
        if image_size % self.downsample:
            raise ValueError(
                f"image_size={image_size} is not divisible by the {self.kind} autoencoder's "
                f"downsample factor {self.downsample}"
            )
        side = image_size // self.downsample
        return (self.latent_channels, side, side)


def _check4(t: Tensor, what: str) -> tuple[int, int, int, int]:
    if t.ndim != 4:
        raise ValueError(f"{what}: expected a [B, C, H, W] tensor, got shape {tuple(t.shape)}")
    return tuple(t.shape)  # type: ignore[return-value]


class IdentityAutoencoder(Autoencoder):
    """Pixels are their own latents."""

    kind = "identity"

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.image_channels = self.latent_channels = channels
        self.downsample = 1

    def _encode(self, x: Tensor) -> Tensor:
        return x

    def _decode(self, z: Tensor) -> Tensor:
        return z


class TinyAutoencoder(Autoencoder):
    """The denoiselab KL autoencoder (posterior mean); statistics measured after training."""

    kind = "tiny"

    def __init__(self, net: TinyAE, config: dict[str, Any], path: str) -> None:
        super().__init__()
        self.net, self.config, self.path = net.eval().requires_grad_(False), config, path
        self.image_channels = net.cfg.image_channels
        self.latent_channels = net.cfg.latent_channels
        self.downsample = net.cfg.downsample

    def _encode(self, x: Tensor) -> Tensor:
        return self.net.encode(x)

    def _decode(self, z: Tensor) -> Tensor:
        return self.net.decode(z)

    def normalization(self) -> LatentNorm:
        c = self.latent_channels
        return LatentNorm.from_values(self.config["latent_mean"], self.config["latent_std"], c)


class DiffusersKLAutoencoder(Autoencoder):
    """diffusers ``AutoencoderKL`` (FLUX.1, SD, …): posterior mode; config's scaling/shift."""

    kind = "diffusers-kl"

    def __init__(self, vae: nn.Module, path: str) -> None:
        super().__init__()
        self.vae, self.path = vae.eval().requires_grad_(False), path
        cfg = vae.config
        self.image_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self._norm = self._config_norm(cfg, self.latent_channels)

    @staticmethod
    def _config_norm(cfg: Any, c: int) -> LatentNorm:
        """``(z − shift_factor)·scaling_factor``; per-channel ``latents_mean/std`` if configured."""
        scaling = float(cfg.scaling_factor)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            return LatentNorm.from_values(
                mean, torch.as_tensor(std, dtype=torch.float64) / scaling, c
            )
        return LatentNorm.from_values(
            float(getattr(cfg, "shift_factor", None) or 0.0), 1 / scaling, c
        )

    def _encode(self, x: Tensor) -> Tensor:
        return self.vae.encode(x).latent_dist.mode()

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample

    def normalization(self) -> LatentNorm:
        return self._norm


class Flux2Autoencoder(Autoencoder):
    """diffusers ``AutoencoderKLFlux2``: mode → 2×2 fold (32 → 128 channels) → BatchNorm stats."""

    kind = "flux2"

    def __init__(self, vae: nn.Module, path: str) -> None:
        super().__init__()
        self.vae, self.path = vae.eval().requires_grad_(False), path
        cfg = vae.config
        ph, pw = tuple(cfg.patch_size)
        if ph != pw:
            raise ValueError(f"{path}: FLUX.2 patch_size={cfg.patch_size} must be square")
        self.patch = ph
        self.image_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels * ph * pw
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1) * ph
        # shift = bn.running_mean, scale = sqrt(bn.running_var + batch_norm_eps) (Flux2Pipeline)
        bn, eps = vae.bn, float(cfg.batch_norm_eps)
        std = torch.sqrt(bn.running_var.double() + eps)
        self._norm = LatentNorm.from_values(bn.running_mean.double(), std, self.latent_channels)

    def _encode(self, x: Tensor) -> Tensor:
        return fold(self.vae.encode(x).latent_dist.mode(), self.patch)

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(unfold(z, self.patch)).sample

    def normalization(self) -> LatentNorm:
        return self._norm


def resolve_ae_dir(path: str | Path) -> Path:
    """``path`` itself if it holds ``config.json``, else ``path/vae`` (a diffusers model repo)."""
    p = Path(path).expanduser().resolve()
    if (p / "config.json").is_file():
        return p
    if (p / "vae" / "config.json").is_file():
        return p / "vae"
    problem = "does not exist" if not p.exists() else "has no config.json (nor vae/config.json)"
    raise FileNotFoundError(
        f"autoencoder {str(path)!r} {problem}; expected 'identity', a directory written by "
        "`denoiselab train-ae`, or a local diffusers AutoencoderKL / AutoencoderKLFlux2 directory"
    )


def detect_kind(path: str | Path) -> str:
    """The :data:`AutoencoderKind` of ``path`` (``"identity"`` for the literal ``"identity"``)."""
    if str(path) == "identity":
        return "identity"
    config = json.loads((resolve_ae_dir(path) / "config.json").read_text())
    if config.get("format") == TINY_FORMAT:
        return "tiny"
    name = config.get("_class_name")
    if name in DIFFUSERS_CLASSES:
        return DIFFUSERS_CLASSES[name]
    raise ValueError(
        f"autoencoder {str(path)!r}: config.json has _class_name={name!r}; supported: "
        f"{', '.join(DIFFUSERS_CLASSES)} (diffusers) or format={TINY_FORMAT!r}"
    )


def fingerprint(path: str | Path) -> str:
    """SHA-256 (16 hex digits) of the ``*.json`` and ``*.safetensors`` files of an AE directory."""
    if str(path) == "identity":
        return "identity"
    h = hashlib.sha256()
    directory = resolve_ae_dir(path)
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _import_diffusers(kind: str) -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f"the {kind!r} autoencoder needs diffusers: pip install 'denoiselab[latents]'"
        ) from e
    if kind == "flux2" and not hasattr(diffusers, "AutoencoderKLFlux2"):
        raise ImportError(
            f"AutoencoderKLFlux2 needs diffusers >= {FLUX2_MIN_DIFFUSERS}; "
            f"installed {diffusers.__version__}"
        )
    return diffusers


def load_autoencoder(
    path: str | Path,
    kind: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    image_channels: int = 3,
) -> Autoencoder:
    """Load the autoencoder at local ``path`` (or ``"identity"``), frozen, in eval mode.

    ``kind`` defaults to :func:`detect_kind`; a given kind that disagrees is an error.
    """
    found = detect_kind(path)
    if kind is not None and kind != found:
        valid = ", ".join(get_args(AutoencoderKind))
        raise ValueError(
            f"autoencoder {str(path)!r} is {found!r}, not kind={kind!r} (kinds: {valid})"
        )
    ae: Autoencoder
    if found == "identity":
        ae = IdentityAutoencoder(image_channels)
    elif found == "tiny":
        directory = resolve_ae_dir(path)
        net, config = load_tiny_ae(directory)
        ae = TinyAutoencoder(net, config, str(directory))
    else:
        diffusers = _import_diffusers(found)
        cls = diffusers.AutoencoderKL if found == "diffusers-kl" else diffusers.AutoencoderKLFlux2
        directory = resolve_ae_dir(path)
        vae = cls.from_pretrained(directory, local_files_only=True, use_safetensors=True)
        wrapper = DiffusersKLAutoencoder if found == "diffusers-kl" else Flux2Autoencoder
        ae = wrapper(vae, str(directory))
    return ae.to(device=device, dtype=dtype)
