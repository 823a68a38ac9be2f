"""The HTML report of a suite folder, rebuilt from the files alone (``denoiselab report DIR``).

``report.html`` stands alone (every image embedded as base64); the PNGs are also written
beside it: ``curves_<metric>.png`` (periodic evaluation against images seen, final
evaluation as stars), ``loss.png``, ``throughput.png`` and ``samples.png`` (each variant's
grid from the same noise and labels).
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from denoiselab.ablate.files import atomic_write, atomic_write_text, read_json, read_jsonl
from denoiselab.ablate.scoreboard import arrowed, cell, fmt, lower_is_better, write_scoreboard
from denoiselab.ablate.suite import Suite, load_suite


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)
    return path


def _vdir(out: Path, name: str) -> Path:
    return out / "variants" / name


def plot_curves(out: Path, names: Sequence[str]) -> list[Path]:
    """One figure per periodic metric: metric against kimg, one line per variant."""
    series = {n: read_jsonl(_vdir(out, n) / "eval.jsonl") for n in names}
    finals = {n: f for n in names if (f := _final(out, n))}
    metrics = list(
        dict.fromkeys(k for rows in series.values() for r in rows for k in r if _is_metric(k))
    )
    return [draw_metric(series, metric, out / f"curves_{metric}.png", finals) for metric in metrics]


def draw_metric(
    series: Mapping[str, Sequence[dict[str, Any]]],
    metric: str,
    path: Path,
    finals: Mapping[str, dict[str, Any]] | None = None,
) -> Path:
    """``metric`` against images seen (``kimg``), one line per name of ``series`` (rows as in
    ``metrics.jsonl``); ``finals[name]`` (``{"nimg", "metrics"}``) adds a star: the final,
    larger evaluation. Written to ``path``."""
    plt = _pyplot()
    finals = finals or {}
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for i, (name, all_rows) in enumerate(series.items()):
        rows = [r for r in all_rows if metric in r]
        color = f"C{i % 10}"
        if rows:
            xs, ys = [r["kimg"] for r in rows], [r[metric] for r in rows]
            ax.plot(xs, ys, "o-", ms=3, color=color, label=name)
        final = finals.get(name)
        if final and metric in final.get("metrics", {}):
            ax.plot([final["nimg"] / 1000], [final["metrics"][metric]], "*", ms=11, color=color)
    ax.set_xlabel("images seen (kimg)")
    short = metric.removeprefix("eval/")
    ax.set_ylabel(f"{metric} ({'lower' if lower_is_better(short) else 'higher'} is better)")
    _maybe_log(ax, [r[metric] for rows in series.values() for r in rows if metric in r])
    title = f"{metric} during training"
    ax.set_title(title + (" (★: final evaluation, more samples)" if finals else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def _is_metric(key: str) -> bool:
    return key not in ("step", "nimg", "kimg", "seconds") and not key.endswith("_unbiased")


def _maybe_log(ax: Any, values: Sequence[float]) -> None:
    pos = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    if pos and max(pos) / min(pos) > 20:
        ax.set_yscale("log")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _final(out: Path, name: str) -> dict[str, Any] | None:
    path = _vdir(out, name) / "done.json"
    return read_json(path) if path.is_file() else None


def plot_loss(out: Path, names: Sequence[str]) -> Path | None:
    """Training loss of every variant against images seen (log scale)."""
    series = {n: read_jsonl(_vdir(out, n) / "metrics.jsonl") for n in names}
    return draw_loss(series, out / "loss.png", "each variant in its own loss space")


def draw_loss(series: Mapping[str, Sequence[dict[str, Any]]], path: Path, note: str) -> Path | None:
    """Training loss (rows with ``loss``) against images seen, log scale, one line per name;
    None when no row has a loss."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    drawn = False
    for i, (name, all_rows) in enumerate(series.items()):
        rows = [r for r in all_rows if "loss" in r]
        if rows:
            xs, ys = [r["kimg"] for r in rows], [r["loss"] for r in rows]
            ax.plot(xs, ys, color=f"C{i % 10}", label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("images seen (kimg)")
    ax.set_ylabel(f"training loss ({note})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_throughput(out: Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """Horizontal bars of training images/s per variant."""
    plt = _pyplot()
    data = [(r["variant"], r["img_per_s"]) for r in rows if _finite(r.get("img_per_s"))]
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.35 * len(data)), dpi=100)
    names, values = zip(*data)
    ax.barh(range(len(data)), values, color=[f"C{i % 10}" for i in range(len(data))])
    ax.set_yticks(range(len(data)), names, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("training throughput (images/s)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, out / "throughput.png")


def plot_samples(out: Path, names: Sequence[str]) -> Path | None:
    """Each variant's ``grid.png`` side by side (same noise, same labels)."""
    from PIL import Image

    grids = [(n, _vdir(out, n) / "grid.png") for n in names]
    grids = [(n, p) for n, p in grids if p.is_file()]
    if not grids:
        return None
    plt = _pyplot()
    cols = math.ceil(math.sqrt(len(grids)))
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, path) in zip(axes.flat, grids):
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "samples.png")


def _img(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>\n'


def _table(result: dict[str, Any]) -> str:
    metrics = result["metrics"]
    head = ["variant", "overrides", *map(arrowed, metrics), "img/s ↑", "wall s", "params", "status"]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in result["rows"]:
        cells = [r["variant"] + (" (baseline)" if r["baseline"] else ""), r["overrides"]]
        cells += [cell(r, m) for m in metrics]
        cells += [cell(r, "img_per_s"), fmt(r["wall_s"], 3), fmt(r["params"]), r["status"]]
        style = ' class="base"' if r["baseline"] else ""
        out.append(
            f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
        )
    return "\n".join(out) + "</table>\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:nth-child(-n+2),th{text-align:left}tr.base{background:#f3f7ff}img{max-width:100%}
.verdict{padding:.8em 1em;border-radius:6px;margin:1em 0}.yes{background:#e6f6e6}.no{background:#fde8e8}
.undecided{background:#f4f4f4}figure{margin:1em 0}code{background:#f4f4f4;padding:0 3px}"""


def build_report(out: str | Path, suite: Suite | None = None) -> Path:
    """Rebuild scoreboard files, plots and ``report.html`` in suite folder ``out``."""
    out = Path(out)
    if suite is None:
        if not (out / "suite.json").is_file():
            raise FileNotFoundError(f"{out} is not a suite folder (no suite.json)")
        suite = load_suite(out / "suite.json")
    result = write_scoreboard(suite, out)
    names = suite.names
    curves = plot_curves(out, names)
    figures = {
        "loss": plot_loss(out, names),
        "throughput": plot_throughput(out, result["rows"]),
        "samples": plot_samples(out, names),
    }
    atomic_write_text(out / "report.html", _html(suite, result, curves, figures, out))
    return out / "report.html"


def _budget_text(suite: Suite, result: dict[str, Any]) -> str:
    """The training images of the variants: one count, or equal wall-clock's own counts."""
    if suite.budget == "time":
        shown = ", ".join(f"{html.escape(n)} {d:,}" for n, d in suite.durations.items())
        return (
            "the images the baseline's training time buys at each variant's measured step "
            f"speed (equal wall-clock, throughput.json: {shown})"
        )
    base = next((r for r in result["rows"] if r["baseline"]), result["rows"][0])
    return f"{fmt(base.get('nimg'))} training images"


def _html(
    suite: Suite,
    result: dict[str, Any],
    curves: list[Path],
    figures: dict[str, Path | None],
    out: Path,
) -> str:
    v = result["verdict"]
    verdict = ""
    if v:
        kind = {True: "yes", False: "no", None: "undecided"}[v["holds"]]
        verdict = f'<div class="verdict {kind}"><b>Verdict.</b> {html.escape(v["text"])}</div>'
    meta_path = _vdir(out, suite.baseline) / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    env = ", ".join(f"{k} {meta[k]}" for k in ("denoiselab", "torch", "device", "git") if k in meta)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(suite.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Ablation: {html.escape(suite.name)}{' (quick)' if suite.quick else ''}</h1>",
        f"<p>{html.escape(suite.description)}</p>" if suite.description else "",
        verdict,
        "<h2>Scoreboard</h2>",
        _table(result),
        f"<p>Δ against the baseline <code>{html.escape(suite.baseline)}</code>. Every variant: "
        f"same seeds, data order, {_budget_text(suite, result)}, and the "
        f"same evaluation ({suite.eval.num} samples, seed {suite.eval.seed}). Throughput: median "
        "training images/s over log intervals (periodic evaluation excluded), measured under "
        "whatever else the machine was running: on a shared machine, differences between "
        "variants of equal cost are load, not the variant.</p>",
        "<h2>Metrics during training</h2>",
        *(_img(p, p.stem) for p in curves),
        _img(figures["loss"], "loss"),
        "<h2>Throughput</h2>",
        _img(figures["throughput"], "throughput"),
        "<h2>Samples (same noise and labels for every variant)</h2>",
        _img(figures["samples"], "samples"),
        f"<p><small>{html.escape(env)}; generated {html.escape(result['generated'])} from "
        f"{html.escape(str(out.resolve()))} (<code>denoiselab report DIR</code> rebuilds it)."
        f"</small></p></body></html>",
    ]
    return "\n".join(p for p in parts if p) + os.linesep
