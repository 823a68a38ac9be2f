"""The scoreboard of a suite folder: one row per variant, deltas to the baseline, a verdict.

Read from the files alone (``suite.json`` and each variant's ``done.json``), so it can be
rebuilt at any time, also while variants are still running (they show as pending).
Written as ``scoreboard.csv``, ``scoreboard.json`` and ``scoreboard.md``.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from denoiselab import __version__
from denoiselab.ablate.equal_time import equal_time_rows
from denoiselab.ablate.equal_time import markdown as equal_time_markdown
from denoiselab.ablate.files import atomic_write_text, read_json, read_jsonl, write_json
from denoiselab.ablate.suite import Suite, group_value

HIGHER_IS_BETTER = ("acc", "precision", "recall", "is", "img_per_s", "clipscore")
COST_COLUMNS = ("img_per_s", "train_wall_s", "eval_wall_s", "wall_s", "params")


def lower_is_better(metric: str) -> bool:
    """FD, MMD, KID are distances (lower is better); accuracy, precision, recall, IS and
    CLIPScore are not. A run's ``metrics.jsonl`` names them ``eval/<metric>``."""
    metric = metric.removeprefix("eval/")
    return not (metric == "is" or metric.startswith(HIGHER_IS_BETTER))


def arrowed(metric: str) -> str:
    """``"fd_probe ↓"``: the metric name with the direction of better."""
    return f"{metric} {'↓' if lower_is_better(metric) else '↑'}"


def training_time(
    metric_rows: Sequence[dict[str, Any]], eval_rows: Sequence[dict[str, Any]]
) -> tuple[float, float]:
    """``(training seconds, images/s)`` from ``metrics.jsonl`` and ``eval.jsonl`` rows.

    Each log row covers ``Δnimg`` images at ``img_per_s``, i.e. ``Δnimg / img_per_s``
    seconds (periodic evaluation included); their sum is the training time, also across
    resumed sessions. Throughput is the median over log intervals, with the seconds of the
    periodic evaluations inside an interval removed and the first (warm-up) interval
    dropped when there are others.
    """
    prev, total, rates = 0, 0.0, []
    for row in metric_rows:
        nimg, rate = row.get("nimg"), row.get("img_per_s")
        if not nimg or not rate or nimg <= prev:
            continue
        seconds = (nimg - prev) / rate
        total += seconds
        evals = sum(e.get("seconds", 0.0) for e in eval_rows if prev < e.get("nimg", 0) <= nimg)
        rates.append((nimg - prev) / max(seconds - evals, 1e-9))
        prev = nimg
    if not rates:
        return total, math.nan
    return total, statistics.median(rates[1:] if len(rates) > 1 else rates)


def metric_names(results: Sequence[dict[str, Any]]) -> list[str]:
    """Scoreboard metric columns, in first-seen order (``*_unbiased`` and ``*_std`` omitted)."""
    names: dict[str, None] = {}
    for r in results:
        for key in r.get("metrics", {}):
            if not key.endswith(("_unbiased", "_std")):
                names[key] = None
    return list(names)


def variant_status(vdir: Path, total_steps: int) -> str:
    """``done``, ``failed: …``, ``running/interrupted at step k/N`` or ``pending``."""
    if (vdir / "done.json").is_file():
        return "done"
    if (vdir / "failed.json").is_file():
        return "failed: " + str(read_json(vdir / "failed.json").get("error", "?"))[:200]
    rows = read_jsonl(vdir / "metrics.jsonl")
    if rows:
        return f"incomplete: step {rows[-1].get('step', 0)}/{total_steps}"
    return "pending"


def build_rows(suite: Suite, out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per variant (suite order) and the metric column names."""
    results = {}
    for name in suite.names:
        done = out / "variants" / name / "done.json"
        results[name] = read_json(done) if done.is_file() else {}
    metrics = metric_names(list(results.values()))
    base = results.get(suite.baseline, {})
    rows = []
    for name in suite.names:
        res, cfg = results[name], suite.config(name)
        row: dict[str, Any] = {
            "variant": name,
            "baseline": name == suite.baseline,
            "overrides": ", ".join(f"{k}={v}" for k, v in suite.variants[name].items()) or "—",
            "status": variant_status(out / "variants" / name, cfg.steps()),
        }
        for key in [*metrics, *COST_COLUMNS]:
            value = res.get("metrics", {}).get(key, res.get(key))
            ref = base.get("metrics", {}).get(key, base.get(key))
            row[key] = value
            row[f"{key}_delta"] = value - ref if _num(value) and _num(ref) else None
            row[f"{key}_rel"] = (
                (value - ref) / abs(ref) if _num(value) and _num(ref) and ref else None
            )
        row.update(nimg=res.get("nimg"), final_loss=res.get("final_loss"))
        rows.append(row)
    return rows, metrics


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def verdict(suite: Suite, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Check ``suite.verdict`` against the rows: does the expected group clearly win?"""
    spec = suite.verdict
    if spec is None:
        return None
    groups: dict[bool, list[tuple[float, str]]] = {True: [], False: []}
    for row in rows:
        value = row.get(spec.metric)
        if _num(value):
            key = group_value(suite, row["variant"], spec.group_by) == spec.expect
            groups[key].append((value, row["variant"]))
    out: dict[str, Any] = {"claim": spec.claim, "metric": spec.metric, "min_ratio": spec.min_ratio}
    if not groups[True] or not groups[False]:
        out.update(holds=None, text=f"UNDECIDED — {spec.claim}: not enough finished variants.")
        return out
    low = lower_is_better(spec.metric)
    pick = min if low else max
    (best_v, best_n), (other_v, other_n) = pick(groups[True]), pick(groups[False])
    num, den = (other_v, best_v) if low else (best_v, other_v)
    ratio = num / den if den > 0 else (math.inf if num > 0 else math.nan)
    holds = bool(ratio >= spec.min_ratio)
    word = "HOLDS" if holds else "DOES NOT HOLD"
    text = (
        f"{word} — {spec.claim}. Best {spec.group_by}={spec.expect} variant '{best_n}' has "
        f"{spec.metric} {best_v:.4g}; the best other, '{other_n}', has {other_v:.4g}: "
        f"{ratio:.2f}× {'better' if ratio >= 1 else 'worse'} ({'lower' if low else 'higher'} is "
        f"better; the claim needs ≥ {spec.min_ratio:g}×)."
    )
    out.update(
        holds=holds, ratio=ratio, text=text, best=[best_n, best_v], best_other=[other_n, other_v]
    )
    return out


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def cell(row: dict[str, Any], key: str) -> str:
    """``value (+Δ, +r%)`` against the baseline; the baseline's own cell is just the value."""
    value, delta, rel = row.get(key), row.get(f"{key}_delta"), row.get(f"{key}_rel")
    if row["baseline"] or delta is None:
        return fmt(value)
    rel_text = f", {rel:+.0%}" if rel is not None else ""
    return f"{fmt(value)} ({delta:+.3g}{rel_text})"


def markdown_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> str:
    head = ["variant", "overrides", *map(arrowed, metrics), "img/s ↑", "wall s", "params", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"**{r['variant']}** (baseline)" if r["baseline"] else r["variant"]
        cells = [name, r["overrides"], *(cell(r, m) for m in metrics)]
        cells += [cell(r, "img_per_s"), fmt(r["wall_s"], 3), fmt(r["params"]), r["status"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_scoreboard(suite: Suite, out: str | Path) -> dict[str, Any]:
    """Write ``scoreboard.{json,csv,md}`` into ``out``; returns the JSON content."""
    out = Path(out)
    rows, metrics = build_rows(suite, out)
    result = {
        "suite": suite.name,
        "description": suite.description,
        "baseline": suite.baseline,
        "quick": suite.quick,
        "metrics": metrics,
        "lower_is_better": {m: lower_is_better(m) for m in metrics},
        "rows": rows,
        "verdict": verdict(suite, rows),
        "equal_time": equal_time_rows(out, rows, suite.baseline),
        "budget": suite.budget,
        "durations": dict(suite.durations),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "denoiselab": __version__,
    }
    write_json(out / "scoreboard.json", result)
    atomic_write_text(out / "scoreboard.csv", _csv(rows))
    atomic_write_text(out / "scoreboard.md", scoreboard_markdown(result))
    return result


def scoreboard_markdown(result: dict[str, Any]) -> str:
    parts = [f"## Scoreboard: {result['suite']}{' (quick)' if result['quick'] else ''}\n"]
    if result["description"]:
        parts.append(result["description"].strip() + "\n")
    parts.append(markdown_table(result["rows"], result["metrics"]))
    parts.append(f"\nΔ against the baseline `{result['baseline']}`; ↓ lower is better, ↑ higher.\n")
    if result.get("equal_time"):
        base = next((r for r in result["rows"] if r["baseline"]), {})
        seconds = base["nimg"] / base["img_per_s"] if base.get("img_per_s") else None
        parts.append(equal_time_markdown(result["equal_time"], seconds))
    if result.get("budget") == "time":
        shown = ", ".join(f"{n} {d:,}" for n, d in result["durations"].items())
        parts.append(
            "\nEqual wall-clock budget: each variant trained for the images the baseline's "
            f"training time buys at its measured step speed (throughput.json): {shown} images.\n"
        )
    if result["verdict"]:
        parts.append(f"\n**Verdict:** {result['verdict']['text']}\n")
    parts.append(f"\n_denoiselab {result['denoiselab']}, {result['generated']}_\n")
    return "".join(parts)


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in keys})
    return buf.getvalue()
