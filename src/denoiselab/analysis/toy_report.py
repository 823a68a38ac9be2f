"""Figure (JiT Fig. 2 layout) and tables for the toy experiment."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure

from denoiselab.analysis.toy import ToyConfig, ToyResult

LABELS = {"x": "x-pred", "eps": "ε-pred", "v": "v-pred"}


def ratios_at_largest_dim(results: list[ToyResult]) -> dict[str, float]:
    """``SW₂(p) / SW₂(x)`` for every prediction ``p ≠ x`` at the largest ``D``."""
    dim = max(r.dim for r in results)
    cell = {r.prediction: r.sw2 for r in results if r.dim == dim}
    if "x" not in cell:
        return {}
    return {p: v / cell["x"] for p, v in cell.items() if p != "x"}


def save_figure(results: list[ToyResult], cfg: ToyConfig, path: Path) -> None:
    """Rows = prediction, columns = D; each panel scatters ``Pᵀx̂`` of the samples."""
    rows, cols = cfg.predictions, cfg.dims
    fig = Figure(figsize=(2.4 * len(cols), 2.4 * len(rows)))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    by_cell = {(r.prediction, r.dim): r for r in results}
    for i, pred in enumerate(rows):
        for j, dim in enumerate(cols):
            ax = axes[i][j]
            res = by_cell[(pred, dim)]
            ax.scatter(res.samples_2d[:, 0], res.samples_2d[:, 1], s=1.5, alpha=0.5, lw=0)
            ax.set_xlim(-2.5, 2.5)
            ax.set_ylim(-2.5, 2.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            outside = (abs(res.samples_2d) > 2.5).any(axis=1).mean()
            note = f"SW₂ {res.sw2:.3g}" + (f", {outside:.0%} off-panel" if outside > 0.01 else "")
            ax.text(0.03, 0.03, note, transform=ax.transAxes, fontsize=7)
            if i == 0:
                ax.set_title(f"D = {dim}", fontsize=10)
            if j == 0:
                ax.set_ylabel(LABELS.get(pred, pred), fontsize=10)
    fig.suptitle(
        "2-D spiral buried in D dims (samples projected by Pᵀ); v-loss for all", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(results: list[ToyResult], reference_sw2: float) -> str:
    """One row per (D, prediction): SW₂ to the true spiral, off-manifold energy, loss, time."""
    lines = [
        "| D | prediction | SW₂ (2-D) | ‖(I−PPᵀ)x̂‖² mean | final v-loss | seconds |",
        "| ---: | :--- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.dim} | {r.prediction} | {r.sw2:.4f} | {r.off_manifold:.4g} | "
            f"{r.final_loss:.4f} | {r.seconds:.1f} |"
        )
    lines.append(f"\nSW₂ between two independent true samples (floor): {reference_sw2:.4f}\n")
    return "\n".join(lines)


def write_report(
    results: list[ToyResult], cfg: ToyConfig, reference_sw2: float, out: Path
) -> dict[str, Path]:
    """Write ``toy.png``, ``toy.md`` and ``toy.json`` under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "toy.png", "md": out / "toy.md", "json": out / "toy.json"}
    save_figure(results, cfg, paths["png"])
    ratios = ratios_at_largest_dim(results)
    ratio_lines = "".join(
        f"- SW₂({p}) / SW₂(x) at D = {max(cfg.dims)}: {v:.2f}\n" for p, v in ratios.items()
    )
    paths["md"].write_text(
        "# Toy experiment (JiT §3.3, Fig. 2)\n\n"
        + markdown_table(results, reference_sw2)
        + "\n"
        + ratio_lines
    )
    cfg_dict = asdict(cfg)
    payload = {
        "config": cfg_dict,
        "reference_sw2": reference_sw2,
        "ratios_at_largest_dim": ratios,
        "cells": [{k: v for k, v in asdict(r).items() if k != "samples_2d"} for r in results],
    }
    paths["json"].write_text(json.dumps(payload, indent=2))
    return paths
