"""``denoiselab report RUN [RUN …]``: several runs' curves overlaid in one HTML page.

The page stands alone: a table of the runs (model, data, images seen, last loss and last
periodic evaluation, the final ``eval.json`` where the run folder holds one), the training
loss of every run against images seen, one figure per periodic metric (``eval/*`` rows of
``metrics.jsonl``), each run's latest sample grid, and the plotted numbers themselves as JSON
(``<script type="application/json" id="curves">``) for anyone who wants to re-plot them. The
figures come from the ablation report's renderer (:func:`.report.draw_loss`,
:func:`.report.draw_metric`).
"""

from __future__ import annotations

import html
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from denoiselab.ablate.files import atomic_write_text, read_json, read_jsonl
from denoiselab.ablate.report import CSS, _img, draw_loss, draw_metric
from denoiselab.ablate.scoreboard import arrowed, fmt


def is_run_folder(path: Path) -> bool:
    """A training run: ``metrics.jsonl`` or ``config.yaml`` beside ``checkpoints/``."""
    return (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()


def run_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"the same run folder is given twice: {[str(p) for p in paths]}")


def _summary(path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: what the run is and where it got to."""
    cfg = (
        yaml.safe_load((path / "config.yaml").read_text())
        if (path / "config.yaml").is_file()
        else {}
    )
    model = cfg.get("resolved_model") or {}
    loss_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    final = path / "eval.json"
    return {
        "model": cfg.get("model", {}).get("name", "?")
        + (
            f" (D={model['hidden_size']}, depth {model['depth']}, p={model['patch_size']})"
            if model
            else ""
        ),
        "data": (cfg.get("data") or {}).get("name", "?"),
        "kimg": loss_rows[-1]["kimg"] if loss_rows else None,
        "loss": loss_rows[-1]["loss"] if loss_rows else None,
        "eval": {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")},
        "final": read_json(final).get("metrics", {}) if final.is_file() else {},
    }


def _table(names: list[str], paths: list[Path], info: dict[str, dict[str, Any]]) -> str:
    evals = sorted({k for i in info.values() for k in i["eval"]})
    finals = sorted({k for i in info.values() for k in i["final"]})
    head = ["run", "model", "data", "kimg", "last loss", *map(arrowed, evals)]
    head += [f"eval.json {arrowed(k)}" for k in finals]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for name, path in zip(names, paths):
        i = info[name]
        cells = [name, i["model"], i["data"], fmt(i["kimg"]), fmt(i["loss"])]
        cells += [fmt(i["eval"].get(k)) for k in evals] + [fmt(i["final"].get(k)) for k in finals]
        title = html.escape(str(path.resolve()))
        tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
        out.append(f'<tr title="{title}">{tds}</tr>')
    return "\n".join(out) + "</table>\n"


def _latest_grid(path: Path) -> Path | None:
    grids = sorted((path / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def build_runs_report(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write the report of run folders ``paths`` to the HTML file ``out`` (atomically)."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not is_run_folder(p):
            raise FileNotFoundError(
                f"{str(p)!r} is not a run folder (no metrics.jsonl / config.yaml)"
            )
    names = run_names(paths)
    series = {n: read_jsonl(p / "metrics.jsonl") for n, p in zip(names, paths)}
    metrics = list(
        dict.fromkeys(
            k for rows in series.values() for r in rows for k in r if k.startswith("eval/")
        )
    )
    info = {n: _summary(p, series[n]) for n, p in zip(names, paths)}
    curves = {
        n: {
            "path": str(p.resolve()),
            **{
                key: [[r["kimg"], r[key]] for r in series[n] if key in r]
                for key in ("loss", *metrics)
            },
        }
        for n, p in zip(names, paths)
    }
    with tempfile.TemporaryDirectory() as tmp:
        figures = [draw_loss(series, Path(tmp) / "loss.png", "each run in its own loss space")]
        figures += [draw_metric(series, m, Path(tmp) / f"{i}.png") for i, m in enumerate(metrics)]
        images = "".join(_img(f, f.stem) for f in figures if f is not None)
        grids = "".join(
            f"<h3>{html.escape(n)}</h3>" + _img(g, n)
            for n, p in zip(names, paths)
            if (g := _latest_grid(p))
        )
    data = json.dumps({"runs": curves}).replace("</", "<\\/")
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>denoiselab runs</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{len(paths)} runs</h1>",
        _table(names, paths, info),
        "<h2>Curves</h2>",
        images,
        "<h2>Latest samples</h2>" if grids else "",
        grids,
        f'<script type="application/json" id="curves">{data}</script>',
        f"<p><small>generated {time.strftime('%Y-%m-%d %H:%M:%S')} by "
        f"<code>denoiselab report {html.escape(' '.join(map(str, paths)))}</code></small></p>",
        "</body></html>",
    ]
    out = Path(out)
    atomic_write_text(out, "\n".join(p for p in page if p) + os.linesep)
    return out
