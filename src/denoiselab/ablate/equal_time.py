"""Scores at equal training time: what each variant reached in the baseline's training time.

A technique that costs time per step (REPA's teacher forward) must win at equal wall-clock,
not only at equal images. Each variant ``v`` trains at ``r_v`` images/s (the median over its
log intervals, periodic evaluation excluded: :func:`~denoiselab.ablate.scoreboard.training_time`).
In the baseline's training time ``T = N / r_b`` it would have seen

    n_v = N · r_v / r_b        images,

and its periodic-evaluation metrics (``eval.jsonl``, every ``eval.every_nimg`` images) are
interpolated linearly in images at ``n_v`` (``None`` before the first evaluation). Rates come
from the suite's own runs: on a shared machine they carry its load; the paired step cost of
``denoiselab bench --repa`` is the cleaner cross-check.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from denoiselab.ablate.files import read_jsonl


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at ``x`` of ``(x_i, y_i)`` points (sorted by x); ``None``
    outside their range."""
    for (x0, y0), (x1, y1) in pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and x == points[-1][0]:
        return points[-1][1]
    return None


def equal_time_rows(
    out: Path, rows: Sequence[dict[str, Any]], baseline: str
) -> list[dict[str, Any]] | None:
    """One row per variant: ``{"variant", "nimg", "img_per_s", <periodic metrics>}`` at
    the baseline's training time; ``None`` without periodic evaluations or rates."""
    by_name = {r["variant"]: r for r in rows}
    base = by_name.get(baseline, {})
    total, rate_b = base.get("nimg"), base.get("img_per_s")
    if not total or not rate_b:
        return None
    result = []
    for row in rows:
        evals = read_jsonl(out / "variants" / row["variant"] / "eval.jsonl")
        rate = row.get("img_per_s")
        if not evals or not rate:
            continue
        n = min(total * rate / rate_b, float(row.get("nimg") or total))
        metrics = [k for k in evals[-1] if k not in ("step", "nimg", "kimg", "seconds")]
        entry: dict[str, Any] = {"variant": row["variant"], "nimg": round(n), "img_per_s": rate}
        for m in metrics:
            pts = sorted((e["nimg"], e[m]) for e in evals if isinstance(e.get(m), (int, float)))
            entry[m] = interpolate(pts, n)
        result.append(entry)
    return result or None


def markdown(result: Sequence[dict[str, Any]], seconds: float | None) -> str:
    """A table of :func:`equal_time_rows`."""
    metrics = [k for k in result[0] if k not in ("variant", "nimg", "img_per_s")]
    when = f" ({seconds:.0f} s of training)" if seconds else ""
    head = ["variant", "images in the baseline's time", "img/s", *metrics]
    lines = [
        f"\nAt the baseline's training time{when}, periodic metrics interpolated:\n\n",
        "| " + " | ".join(head) + " |\n",
        "|" + "---|" * len(head) + "\n",
    ]
    for r in result:
        cells = [r["variant"], f"{r['nimg']:,}", f"{r['img_per_s']:.1f}"]
        cells += ["—" if r[m] is None else f"{r[m]:.4g}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |\n")
    return "".join(lines)
