"""Tables and plots of the local Gaussian analysis (see :mod:`denoiselab.analysis.gaussian`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from denoiselab.analysis.gaussian import (
    TARGETS,
    irreducible_error,
    posterior_gain,
    predictable_variance,
    rank_k_x_error,
    target_variance,
)

DEFAULT_T_GRID = (0.1, 0.25, 0.5, 0.75, 0.9)
COLORS = {"x": "tab:blue", "eps": "tab:orange", "v": "tab:green"}
NAMES = {"x": "x", "eps": "ε", "v": "v"}


def captured_fraction(target: str, lam: np.ndarray, t: float, rank: int, s: float) -> float:
    """Share of the predictable variance ``Σ_i Var(E[y_i|z])`` that the top ``rank``
    directions hold: 1 means a rank-K predictor loses nothing."""
    pv = np.sort(predictable_variance(target, lam, t, s))[::-1]  # type: ignore[arg-type]
    return float(pv[:rank].sum() / pv.sum())


def row_at(lam: np.ndarray, t: float, rank: int, s: float) -> dict[str, Any]:
    """All scalar results at one ``t`` (totals over the ``D`` directions)."""
    row: dict[str, Any] = {"t": t, "bayes_x_error": float(irreducible_error("x", lam, t, s).sum())}
    for tg in TARGETS:
        row[f"irreducible_{tg}"] = float(irreducible_error(tg, lam, t, s).sum())
        row[f"rank_k_x_error_{tg}"] = float(rank_k_x_error(tg, lam, t, rank, s).sum())
        row[f"captured_{tg}"] = captured_fraction(tg, lam, t, rank, s)
    return row


def gaussian_table(lam: np.ndarray, rank: int, s: float, t_grid: Sequence[float]) -> dict[str, Any]:
    """The JSON payload: spectrum summary, target-covariance traces and one row per ``t``."""
    return {
        "dim": int(lam.size),
        "data_rank": int((lam > 1e-12 * max(lam.max(), 1e-300)).sum()),
        "rank_99": int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.99) + 1),
        "rank_k": rank,
        "noise_scale": s,
        "eigenvalues": lam.tolist(),
        "trace_cov": {tg: float(target_variance(tg, lam, s).sum()) for tg in TARGETS},
        "rows": [row_at(lam, t, rank, s) for t in t_grid],
    }


def markdown(table: dict[str, Any], title: str) -> str:
    """Human-readable version of :func:`gaussian_table`."""
    tr = table["trace_cov"]
    k = table["rank_k"]
    lines = [
        f"# Local Gaussian analysis — {title}",
        "",
        f"D = {table['dim']}, data rank = {table['data_rank']} (99 % of tr Σ in "
        f"{table['rank_99']} directions), K = {k}, s = {table['noise_scale']}.",
        f"Target covariance traces: tr Σ = {tr['x']:.4g} (x), D·s² = {tr['eps']:.4g} (ε), "
        f"tr(Σ + s²I) = {tr['v']:.4g} (v).",
        "",
        "x-space error ‖x − x̂‖² (sum over directions): Bayes (any target, full rank) and the best "
        f"rank-{k} linear predictor of each target converted to x. `captured` = share of the "
        f"target's predictable variance held by its top {k} directions.",
        "",
        "| t | Bayes | rank-K x | rank-K ε | rank-K v | captured x | captured ε | captured v |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['t']:.2f} | {r['bayes_x_error']:.4g} | {r['rank_k_x_error_x']:.4g} | "
            f"{r['rank_k_x_error_eps']:.4g} | {r['rank_k_x_error_v']:.4g} | "
            f"{r['captured_x']:.3f} | {r['captured_eps']:.3f} | {r['captured_v']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _positive(values: np.ndarray) -> np.ndarray:
    """Zeros → NaN, so that log axes leave a gap instead of an arbitrary floor."""
    return np.where(values > 0, values, np.nan)


def _panel_spectrum(ax: Axes, lam: np.ndarray, s: float) -> None:
    idx = np.arange(1, lam.size + 1)
    for tg in TARGETS:
        var = _positive(target_variance(tg, lam, s))  # type: ignore[arg-type]
        ax.semilogy(idx, var, color=COLORS[tg], label=f"Var {NAMES[tg]}")
    if (lam == 0).any():
        ax.text(0.98, 0.5, "Var x = 0 where λ = 0", transform=ax.transAxes, ha="right", fontsize=7)
    ax.set(title="target variance per eigendirection", xlabel="direction i (λ descending)")
    ax.legend(fontsize=7)


def _panel_gain(ax: Axes, lam: np.ndarray, t: float, s: float) -> None:
    idx = np.arange(1, lam.size + 1)
    for tg in TARGETS:
        gain = posterior_gain(tg, lam, t, s)  # type: ignore[arg-type]
        ax.plot(idx, gain, color=COLORS[tg], label=f"a for {NAMES[tg]}")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set(title=f"gain a of E[y|z] = a·z, t = {t}", xlabel="direction i (λ descending)")
    ax.legend(fontsize=7)


def _panel_irreducible(ax: Axes, lam: np.ndarray, s: float) -> None:
    ts = np.linspace(0.01, 0.99, 99)
    nonzero = np.flatnonzero(lam > 0)
    picks = {"top λ": nonzero[0], "smallest λ>0": nonzero[-1]}
    for (label, i), style in zip(picks.items(), ("-", "--")):
        for tg in TARGETS:
            err = [irreducible_error(tg, lam[i : i + 1], t, s)[0] for t in ts]  # type: ignore[arg-type]
            ax.semilogy(
                ts, _positive(np.array(err)), style, color=COLORS[tg], label=f"{NAMES[tg]}, {label}"
            )
    ax.set(title="irreducible error (own space)", xlabel="t (1 = data)")
    ax.legend(fontsize=6)


def _panel_rank_dirs(ax: Axes, lam: np.ndarray, t: float, rank: int, s: float) -> None:
    idx = np.arange(1, lam.size + 1)
    for tg in TARGETS:
        err = rank_k_x_error(tg, lam, t, rank, s)  # type: ignore[arg-type]
        ax.plot(idx, err, color=COLORS[tg], label=f"rank-{rank} {NAMES[tg]}", alpha=0.8)
    ax.plot(idx, irreducible_error("x", lam, t, s), "k:", label="Bayes")
    ax.set(title=f"x-space error per direction, t = {t}", xlabel="direction i")
    ax.legend(fontsize=7)


def _panel_rank_t(ax: Axes, lam: np.ndarray, rank: int, s: float) -> None:
    ts = np.linspace(0.02, 0.98, 97)
    ax.semilogy(ts, [irreducible_error("x", lam, t, s).sum() for t in ts], "k:", label="Bayes")
    for tg in TARGETS:
        tot = [rank_k_x_error(tg, lam, t, rank, s).sum() for t in ts]  # type: ignore[arg-type]
        ax.semilogy(ts, tot, color=COLORS[tg], label=f"rank-{rank} {NAMES[tg]}")
    ax.set(title="total x-space error", xlabel="t (1 = data)")
    ax.legend(fontsize=7)


def _panel_captured(ax: Axes, lam: np.ndarray, t: float, s: float) -> None:
    ks = np.arange(1, lam.size + 1)
    for tg in TARGETS:
        ax.plot(
            ks,
            [captured_fraction(tg, lam, t, int(k), s) for k in ks],
            color=COLORS[tg],
            label=NAMES[tg],
        )
    ax.set(title=f"predictable variance held by rank K, t = {t}", xlabel="K", ylim=(0, 1.02))
    ax.legend(fontsize=7)


def save_figure(
    lam: np.ndarray, rank: int, s: float, t_focus: float, path: Path, title: str
) -> None:
    """Six panels: target variances, gains, irreducible errors, and the rank-K analysis."""
    fig = Figure(figsize=(13, 7.5))
    axes = fig.subplots(2, 3)
    _panel_spectrum(axes[0, 0], lam, s)
    _panel_gain(axes[0, 1], lam, t_focus, s)
    _panel_irreducible(axes[0, 2], lam, s)
    _panel_rank_dirs(axes[1, 0], lam, t_focus, rank, s)
    _panel_rank_t(axes[1, 1], lam, rank, s)
    _panel_captured(axes[1, 2], lam, t_focus, s)
    fig.suptitle(f"Local Gaussian analysis — {title} (D = {lam.size}, K = {rank}, s = {s})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def gaussian_analysis(
    lam: np.ndarray,
    rank: int,
    out: Path | None = None,
    s: float = 1.0,
    t_grid: Sequence[float] = DEFAULT_T_GRID,
    t_focus: float = 0.5,
    title: str = "",
) -> dict[str, Any]:
    """Run the analysis for eigenvalues ``lam: [D]``; write PNG/MD/JSON to ``out`` if given."""
    lam = np.sort(np.asarray(lam, dtype=np.float64))[::-1]
    if not 1 <= rank <= lam.size:
        raise ValueError(f"rank={rank!r} must lie in [1, D={lam.size}]")
    table = gaussian_table(lam, rank, s, t_grid)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_figure(lam, rank, s, t_focus, out / "gaussian.png", title)
        (out / "gaussian.md").write_text(markdown(table, title))
        (out / "gaussian.json").write_text(json.dumps({"title": title, **table}, indent=2))
    return table
