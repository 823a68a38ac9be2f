"""REPA (Yu et al. 2024) and its λ schedules (early stop, Wang et al. 2025), as PRX uses them.

From the PRX logbook (seeds/002, "REPA"): a frozen encoder ``f`` gives patch embeddings
``y₀ = f(x₀) ∈ R^{N×D}`` of the clean image; the denoiser's hidden tokens ``h_t`` after
block k (one per patch) go through a small projection head ``h_φ``; the auxiliary loss is

    L_REPA(θ, φ) = −E[ (1/N) Σ_n sim(y₀,[n], h_φ(h_t,[n])) ],    sim = cosine similarity
    L = L_FM + λ·L_REPA

Here, per sample, ``repa = −λ(nimg) · (1/N) Σ_n cos(y_n, h_φ(h_n))`` ``[B]``.

- Projector ``h_φ``: Linear(D, H) → SiLU → Linear(H, H) → SiLU → Linear(H, D_t), the 3-layer
  SiLU MLP of REPA; ``projector_dim`` H defaults to D_t (PRX's MLP); REPA used H = 2048.
- Block: the tokens after the first ``block`` blocks (REPA's ``encoder_depth``: 8 of 28 for
  SiT-XL/2, 4 of 12 for SiT-B/2; PRX aligns near the middle); default ``depth // 2``.
- Weight: λ = 0.5 (the REPA paper's and PRX's default).
- Grids: the teacher's ``(h_t, w_t)`` token grid is interpolated (bilinear, antialiased) to
  the student's ``(g, g)``; a transformers teacher is by default fed ``g × patch`` pixels so
  the grids already match (as REPA's 224-px DINOv2 input for a 16×16 SiT grid, and PRX).
- Early stop (seeds/002, "About Using REPA During the Full Training": "keep alignment for the
  burn-in phase, then turn it off"; PRX dropped it after ~200K steps): ``schedule`` is
  ``constant``, ``stop`` (λ → 0 at ``until_nimg``) or ``linear`` (λ falls linearly to 0 over
  the ``decay_nimg`` images before ``until_nimg``). Logged as ``repa/lambda``.

Token routing (``model.routing``, :mod:`denoiselab.models.routing`): when block k is one of
the routed blocks, only the K kept tokens went through it; the rows of the others carry the
value they had entering the routed range. The sum then runs over the kept tokens only,
``repa = −λ·(1/K) Σ_{n ∈ kept} cos(y_n, h_φ(h_n))`` (``StepContext.tokens_through``), as
PRX's REPA gathers TREAD's visible tokens; the teacher still sees the whole image, so its
features are those of the full grid, gathered at the kept positions.

Gradients reach the projector and the network's blocks up to k; the teacher runs under
``no_grad`` in eval mode (in the run's autocast) and is held outside the module tree, so it is
never trained, averaged or checkpointed. When λ = 0 the teacher is not run at all; the term
then returns ``0·Σφ`` so every projector parameter still gets an (exact zero) gradient and
DDP's gradient reduction stays complete without ``find_unused_parameters``.

Latent runs: the teacher must see pixels. Their features come from the latent cache
(``denoiselab cache-latents --teacher``, both flips) as the batch extra ``"teacher"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from denoiselab.algorithms import TermContext, register
from denoiselab.config import ConfigError
from denoiselab.encoders import (
    ImageEncoder,
    TeacherConfig,
    accepted_teacher_ids,
    build_teacher,
    teacher_dim,
    teacher_weights_id,
)
from denoiselab.models.routing import gather_tokens
from denoiselab.objectives import LossTerm, StepContext

Schedule = Literal["constant", "stop", "linear"]


class GridError(ConfigError):
    """A teacher's token grid cannot be matched to the student's; the message names both."""


@dataclass(frozen=True)
class AlignConfig:
    """What REPA and iREPA share: weight λ, block, teacher and the λ schedule.

    weight: λ (REPA / PRX: 0.5). block: align the tokens after the first ``block`` blocks
    (1 … depth; ``None``: ``depth // 2``). schedule / until_nimg / decay_nimg: see the module
    doc; images are counted before the step (``StepContext.nimg``).
    """

    weight: float = 0.5
    block: int | None = None
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    schedule: Schedule = "constant"
    until_nimg: int | None = None
    decay_nimg: int | None = None

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ConfigError(f"weight={self.weight!r} must be >= 0")
        if self.block is not None and self.block < 1:
            raise ConfigError(f"block={self.block!r} must be >= 1 (tokens after that block)")
        if self.schedule not in ("constant", "stop", "linear"):
            raise ConfigError(f"schedule={self.schedule!r}; valid: constant, stop, linear")
        if self.schedule == "constant" and (self.until_nimg, self.decay_nimg) != (None, None):
            raise ConfigError("until_nimg / decay_nimg need schedule 'stop' or 'linear'")
        if self.schedule != "constant" and (self.until_nimg is None or self.until_nimg < 0):
            raise ConfigError(
                f"schedule={self.schedule!r} needs until_nimg >= 0 (λ = 0 from there)"
            )
        if self.schedule == "stop" and self.decay_nimg is not None:
            raise ConfigError("decay_nimg is for schedule 'linear'; 'stop' drops λ at once")
        if self.schedule == "linear" and not (
            self.decay_nimg is not None and 0 < self.decay_nimg <= (self.until_nimg or 0)
        ):
            raise ConfigError(
                f"schedule 'linear' needs 0 < decay_nimg <= until_nimg; got decay_nimg="
                f"{self.decay_nimg!r}, until_nimg={self.until_nimg!r}"
            )

    def weight_at(self, nimg: int) -> float:
        """λ after ``nimg`` images: ``w``; ``w·[nimg < until]``; ``w·clip((until − nimg)/decay, 0, 1)``."""
        if self.schedule == "constant":
            return self.weight
        assert self.until_nimg is not None
        if self.schedule == "stop":
            return self.weight if nimg < self.until_nimg else 0.0
        assert self.decay_nimg is not None
        return self.weight * min(1.0, max(0.0, (self.until_nimg - nimg) / self.decay_nimg))


@dataclass(frozen=True)
class REPAConfig(AlignConfig):
    """REPA: :class:`AlignConfig` plus the MLP projector's hidden width ``projector_dim``
    (``None``: the teacher's feature width, as PRX; REPA used 2048)."""

    projector_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projector_dim is not None and self.projector_dim < 1:
            raise ConfigError(f"projector_dim={self.projector_dim!r} must be >= 1")


def match_grid(y: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Teacher features ``[B, h·w, D]`` on ``grid`` → ``[B, g_h·g_w, D]`` on ``target``
    (bilinear, antialiased when shrinking; identity when the grids agree)."""
    check_grids(grid, target, y.shape[1])
    if tuple(grid) == tuple(target):
        return y
    b, _, d = y.shape
    img = y.transpose(1, 2).reshape(b, d, *grid).float()
    out = F.interpolate(img, size=target, mode="bilinear", align_corners=False, antialias=True)
    return out.flatten(2).transpose(1, 2).to(y.dtype)


def check_grids(grid: tuple[int, int], target: tuple[int, int], tokens: int | None = None) -> None:
    """:class:`GridError` unless ``grid`` holds ``tokens`` and has ``target``'s aspect ratio."""
    h, w = grid
    if tokens is not None and tokens != h * w:
        raise GridError(f"teacher features have {tokens} tokens, not the {h}×{w} of their grid")
    if h < 1 or w < 1 or h * target[1] != w * target[0]:
        raise GridError(
            f"the teacher's {h}×{w} token grid cannot be matched to the student's "
            f"{target[0]}×{target[1]} grid by interpolation (different aspect ratio); "
            "set teacher.resolution so the shapes agree"
        )


class REPA(nn.Module, LossTerm):
    """``repa [B] = −λ(nimg)·mean_n cos(y_n, h_φ(h_n))`` (module doc). ``teacher`` may be
    ``None`` when the batches carry the features (``extras["teacher"]``, latent runs)."""

    name = "repa"

    def __init__(
        self,
        cfg: AlignConfig,
        width: int,
        grid: int,
        teacher: ImageEncoder | None,
        teacher_grid: tuple[int, int],
        teacher_dim: int,
    ) -> None:
        super().__init__()
        self.cfg, self.grid, self.teacher_grid = cfg, (grid, grid), tuple(teacher_grid)
        if cfg.block is None:
            raise ValueError("REPA needs a resolved block (see resolve_block)")
        self.hidden_blocks = (cfg.block - 1,)
        check_grids(self.teacher_grid, self.grid)
        self.projector = self.build_projector(width, teacher_dim)
        self._teacher = (teacher,)  # a tuple: outside the module tree (never trained or saved)

    def build_projector(self, width: int, teacher_dim: int) -> nn.Module:
        hidden = getattr(self.cfg, "projector_dim", None) or teacher_dim
        return nn.Sequential(
            nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, teacher_dim),
        )  # fmt: skip

    @property
    def teacher(self) -> ImageEncoder | None:
        return self._teacher[0]

    def project(self, h: Tensor) -> Tensor:
        """Student tokens ``[B, N, D]`` → ``[B, N, D_t]``."""
        return self.projector(h)

    def targets(self, ctx: StepContext) -> Tensor:
        """Teacher features on the student's grid ``[B, N, D_t]`` (no gradient)."""
        if "teacher" in ctx.extras:
            y = ctx.extras["teacher"]
        elif self.teacher is not None:
            y = self.teacher(ctx.x)
        else:
            raise RuntimeError("REPA has no teacher and the batch carries no 'teacher' features")
        return match_grid(y.detach(), self.teacher_grid, self.grid)

    def forward(self, ctx: StepContext) -> Tensor:
        lam = self.cfg.weight_at(ctx.nimg)
        block = self.hidden_blocks[0]
        h = ctx.hidden[block]
        if lam == 0.0:  # no teacher forward; exact zero gradients keep DDP's reduction complete
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return h.new_zeros(h.shape[0], dtype=torch.float32) + zero
        with torch.no_grad():
            y = self.targets(ctx)
        keep = ctx.tokens_through(block)
        if keep is not None:  # a routed step: only the rows that went through block k count
            h, y = gather_tokens(h, keep), gather_tokens(y, keep)
        p = self.project(h)
        cos = (F.normalize(p.float(), dim=-1) * F.normalize(y.float(), dim=-1)).sum(-1)
        return -lam * cos.mean(1)

    @classmethod
    def check_routing(cls, block: int, model_cfg: Any, key: str) -> None:
        """Whether this alignment can be computed when ``model.routing`` routes block
        ``block`` (1-based, the tokens after it); REPA's per-token MLP can (it uses only the
        tokens that went through), so nothing to check here."""

    def logs(self, nimg: int) -> dict[str, float]:
        return {f"{self.name}/lambda": self.cfg.weight_at(nimg)}


def resolve_block(cfg: AlignConfig, depth: int, key: str) -> int:
    """``cfg.block`` checked against the network depth (``None`` → ``depth // 2``)."""
    block = cfg.block if cfg.block is not None else max(1, depth // 2)
    if not 1 <= block <= depth:
        raise ConfigError(
            f"{key}.block={block} is past the network's depth {depth}; valid: 1 … {depth} "
            "(the tokens after that many blocks)"
        )
    return block


def build_alignment(
    cls: type[REPA], cfg: AlignConfig, ctx: TermContext, key: str, **kwargs: Any
) -> REPA:
    """Build ``cls`` for the run ``ctx`` describes (shared by REPA and iREPA).

    Pixel data: the teacher is built (the offline one trains once) and run on each batch.
    Latent data: the cache must hold this teacher's features; the dataset is asked to
    return them (batch extra ``"teacher"``) and no teacher is loaded."""
    from dataclasses import replace

    mc = ctx.model_cfg
    cfg = replace(cfg, block=resolve_block(cfg, mc.depth, key))
    cls.check_routing(cfg.block, mc, key)
    if ctx.data.name == "latents":
        record = _cached_teacher(cfg.teacher, ctx, key)
        grid, dim = tuple(record["grid"]), int(record["dim"])
        ctx.dataset.request_extras(("teacher",))
        return cls(cfg, mc.hidden_size, mc.grid_size, None, grid, dim, **kwargs)
    # build_teacher leaves the global RNG (which then initialises the projector) as it was
    teacher = build_teacher(
        cfg.teacher, ctx.data, ctx.device, grid=mc.grid_size, key=f"{key}.teacher"
    )
    return cls(cfg, mc.hidden_size, mc.grid_size, teacher, teacher.grid, teacher.dim, **kwargs)


def _cached_teacher(cfg: TeacherConfig, ctx: TermContext, key: str) -> dict[str, Any]:
    """The teacher record of the latent cache, checked against ``cfg``."""
    from denoiselab.latents import pixel_data_config

    record = getattr(ctx.dataset.manifest, "teacher", None)
    root = ctx.data.root
    if record is None:
        raise ConfigError(
            f"{key} on latents needs teacher features of the original pixels, but the cache "
            f"{root!r} has none: re-cache with `denoiselab cache-latents CONFIG --teacher "
            f"{cfg.kind}{' --teacher-path DIR' if cfg.kind != 'offline' else ''} --out DIR`"
        )
    pixels, teacher_key = pixel_data_config(ctx.data), f"{key}.teacher"
    weights_id = teacher_weights_id(cfg, pixels, teacher_key)
    wanted: dict[str, Any] = {"kind": cfg.kind, "weights_id": weights_id}
    if cfg.resolution is not None:
        wanted["resolution"] = cfg.resolution
    found = {k: record.get(k) for k in wanted}
    if found.get("weights_id") in accepted_teacher_ids(cfg, pixels, teacher_key):
        found["weights_id"] = weights_id  # cached under this teacher's older id
    if found != wanted:
        raise ConfigError(
            f"{key}.teacher {wanted} does not match the teacher whose features the cache "
            f"{root!r} holds ({found}); re-cache with this teacher or configure that one"
        )
    return record


def describe_alignment(cls: type[REPA], cfg: AlignConfig, model_cfg: Any, key: str) -> str:
    """Block, projector and its parameter count for a network (``denoiselab info CONFIG``),
    from the teacher's width alone (nothing is loaded or trained)."""
    from dataclasses import replace

    cfg = replace(cfg, block=resolve_block(cfg, model_cfg.depth, key))
    cls.check_routing(cfg.block, model_cfg, key)
    dim = teacher_dim(cfg.teacher, f"{key}.teacher")
    grid = (model_cfg.grid_size, model_cfg.grid_size)
    term = cls(cfg, model_cfg.hidden_size, model_cfg.grid_size, None, grid, dim)
    params = sum(p.numel() for p in term.parameters())
    return (
        f"{key}: tokens after block {cfg.block}/{model_cfg.depth} → {cfg.teacher.kind} "
        f"teacher ({dim}-d); projector {params:,} params (trained, checkpointed)"
    )


@register(
    "repa",
    REPAConfig,
    "REPA: align block-k tokens to a frozen teacher (λ 0.5, PRX)",
    lambda cfg, mc: describe_alignment(REPA, cfg, mc, "terms.repa"),
)
def _build(cfg: REPAConfig, ctx: TermContext) -> REPA:
    return build_alignment(REPA, cfg, ctx, "terms.repa")
