"""The toy experiment of JiT §3.3 / Fig. 2: 2-D data buried in D dimensions.

A spiral ``x̂ ∈ R²`` is embedded as ``x = P x̂ ∈ R^D`` by a fixed random column-orthogonal
``P: [D, 2]`` (``PᵀP = I``) that the model never sees. A 5-layer ReLU MLP (256 wide) is
trained with x-, ε- or v-prediction, all with the v-loss (JiT Table 1 (3)(a–c)), through the
real :class:`~denoiselab.objectives.DenoisingObjective`; samples are drawn with the real ODE
solver and projected back with ``Pᵀ``. Time convention: ``t = 1`` is data, ``t = 0`` noise.

Everything that is not the prediction space (steps, optimizer, time sampler, solver, network
initialisation, data and noise draws) is identical across predictions at a given ``D``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from denoiselab.analysis.distances import off_manifold_energy, sliced_wasserstein2
from denoiselab.models.mlp import ToyMLP
from denoiselab.objectives import DenoisingObjective, ObjectiveConfig, TimeSamplerConfig
from denoiselab.sampling import sample


@dataclass(frozen=True)
class ToyConfig:
    """One run of the toy experiment (every (D, prediction) cell shares these settings).

    ``train_steps`` Adam steps (learning rate ``lr``, cosine-decayed to 0) of ``batch`` fresh
    spiral points each; ``num_samples`` points are generated with ``sample_steps`` steps of
    ``solver`` and compared to as many fresh true points. Time is sampled uniformly rather
    than JiT's image logit-normal(−0.8, 0.8): the toy's thin spiral is resolved near ``t = 1``,
    which that sampler rarely visits; the choice is shared by all three predictions.
    """

    dims: tuple[int, ...] = (2, 8, 16, 512)
    predictions: tuple[str, ...] = ("x", "eps", "v")
    train_steps: int = 2000
    batch: int = 256
    lr: float = 3e-3
    hidden: int = 256
    depth: int = 5
    sample_steps: int = 50
    solver: str = "heun"
    num_samples: int = 2000
    seed: int = 0
    threads: int = 1
    objective: ObjectiveConfig = field(
        default_factory=lambda: ObjectiveConfig(
            loss_space="v",
            label_drop=0.0,
            noise_scale=1.0,
            time=TimeSamplerConfig(kind="uniform"),
        )
    )

    def __post_init__(self) -> None:
        if not self.dims or min(self.dims) < 2:
            raise ValueError(f"toy.dims={self.dims!r}: need at least one D >= 2 (d = 2)")
        for p in self.predictions:
            ObjectiveConfig(prediction=p)  # validates the name
        if self.train_steps < 1 or self.batch < 1 or self.num_samples < 2:
            raise ValueError(
                f"toy: train_steps={self.train_steps}, batch={self.batch}, "
                f"num_samples={self.num_samples} must be positive (num_samples >= 2)"
            )


QUICK = {"train_steps": 400, "batch": 128, "num_samples": 500, "sample_steps": 20}


@dataclass
class ToyResult:
    """One cell of Fig. 2: ``samples_2d = Pᵀx̂: [N, 2]``, distances to the true spiral."""

    dim: int
    prediction: str
    sw2: float
    off_manifold: float
    final_loss: float
    seconds: float
    samples_2d: np.ndarray


# -- data ------------------------------------------------------------------------------------
def spiral(n: int, generator: torch.Generator) -> Tensor:
    """``n`` points ``[n, 2]`` of a 2-D spiral, ``r = 2θ/(4π)``, ``θ ∈ [π/2, 4π]``, jitter 0.03."""
    u = torch.rand(n, generator=generator)
    theta = math.pi * (0.5 + 3.5 * u.sqrt())
    r = 2 * theta / (4 * math.pi)
    pts = torch.stack([r * theta.cos(), r * theta.sin()], dim=1)
    return pts + 0.03 * torch.randn(n, 2, generator=generator)


def random_projection(dim: int, d: int = 2, seed: int = 0) -> Tensor:
    """A fixed random column-orthogonal ``P: [dim, d]`` (``PᵀP = I_d``), via QR of a Gaussian."""
    g = torch.Generator().manual_seed(10_000 + 97 * dim + seed)
    q, r = torch.linalg.qr(torch.randn(dim, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix makes QR unique


# -- model -----------------------------------------------------------------------------------
class Unconditional(nn.Module):
    """Adapts ``net(z, t)`` to the ``net(z, t, y)`` call of the objective (``y`` ignored)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(z, t)


def train_cell(cfg: ToyConfig, prediction: str, proj: Tensor) -> tuple[Unconditional, float]:
    """Train one MLP for one prediction space; returns the net and its mean loss of the
    last 10 % of steps. The seed depends only on ``(cfg.seed, D)``, not on the prediction."""
    dim = proj.shape[0]
    torch.manual_seed(cfg.seed * 1_000 + dim)
    net = Unconditional(ToyMLP(dim, hidden=cfg.hidden, depth=cfg.depth))
    objective = DenoisingObjective(replace(cfg.objective, prediction=prediction), num_classes=1)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train_steps)
    g = torch.Generator().manual_seed(cfg.seed * 1_000 + dim + 1)
    y = torch.zeros(cfg.batch, dtype=torch.long)
    tail: list[float] = []
    tail_start = min(int(0.9 * cfg.train_steps), cfg.train_steps - 1)
    for step in range(cfg.train_steps):
        x = spiral(cfg.batch, g) @ proj.T  # [B, D]
        loss = objective(net, x, y, generator=g)["denoise"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= tail_start:
            tail.append(loss.item())
    return net, float(np.mean(tail))


@torch.no_grad()
def generate(cfg: ToyConfig, net: Unconditional, prediction: str, dim: int) -> Tensor:
    """``cfg.num_samples`` samples ``[N, D]`` by the ODE from the same seeded noise."""
    obj_cfg = replace(cfg.objective, prediction=prediction)
    objective = DenoisingObjective(obj_cfg, num_classes=1)
    g = torch.Generator().manual_seed(cfg.seed * 1_000 + dim + 2)
    noise = torch.randn(cfg.num_samples, dim, generator=g) * obj_cfg.noise_scale

    def velocity(z: Tensor, t: float) -> Tensor:
        t_vec = z.new_full((z.shape[0],), t)
        return objective.velocity(net(z, t_vec), z, t_vec)

    return sample(velocity, noise, steps=cfg.sample_steps, solver=cfg.solver)


def reference_sw2(cfg: ToyConfig) -> float:
    """``SW₂`` between two independent true spiral samples of ``num_samples`` points: the
    floor a perfect generator would reach at this sample size."""
    g = torch.Generator().manual_seed(cfg.seed + 7)
    return sliced_wasserstein2(spiral(cfg.num_samples, g), spiral(cfg.num_samples, g))


def run_cell(cfg: ToyConfig, dim: int, prediction: str) -> ToyResult:
    """Train, sample and score one (D, prediction) cell."""
    start = time.perf_counter()
    proj = random_projection(dim, seed=cfg.seed)
    net, final_loss = train_cell(cfg, prediction, proj)
    x_gen = generate(cfg, net, prediction, dim)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    truth = spiral(cfg.num_samples, g)
    gen_2d = x_gen @ proj
    return ToyResult(
        dim=dim,
        prediction=prediction,
        sw2=sliced_wasserstein2(gen_2d, truth),
        off_manifold=float(off_manifold_energy(x_gen, proj).mean()),
        final_loss=final_loss,
        seconds=time.perf_counter() - start,
        samples_2d=gen_2d.numpy(),
    )


def run_toy(cfg: ToyConfig, log: bool = True) -> list[ToyResult]:
    """All cells, D-major then prediction, in ``cfg`` order (deterministic given ``cfg``)."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    results = []
    try:
        for dim in cfg.dims:
            for prediction in cfg.predictions:
                res = run_cell(cfg, dim, prediction)
                results.append(res)
                if log:
                    print(
                        f"D={dim:4d} {prediction:>3}-pred  SW2={res.sw2:.4f}  "
                        f"off-manifold={res.off_manifold:.4g}  ({res.seconds:.1f}s)",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(prev_threads)
    return results
