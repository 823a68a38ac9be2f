"""The run folder: resolved config, provenance, metrics, samples, checkpoints, plots.

<run>/config.yaml        resolved TrainConfig (what `--resume` and `sample` rebuild from)
<run>/meta.json          git revision, versions, devices, command line
<run>/metrics.jsonl      one JSON object per log point (appended, flushed)
<run>/samples/*.png      grids from fixed noise and labels
<run>/checkpoints/       step_<N>.safetensors + step_<N>.state.safetensors
<run>/loss.png           loss curve
<run>/tensorboard/, <run>/wandb/, <run>/tracking.json   trackers (``log.backends``)
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from denoiselab.io import atomic_write, atomic_write_text
from denoiselab.train.tracking import LogConfig, Tracker, open_trackers


def git_revision(cwd: Path | None = None) -> str:
    """``<sha>[-dirty]`` of the source tree, or ``"unknown"`` outside a git checkout."""
    src = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    from denoiselab import __version__

    env: dict[str, Any] = {
        "denoiselab": __version__,
        "git": git_revision(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


class RunFolder:
    """Owns the files of one run; only the main rank writes (and reports to trackers)."""

    def __init__(self, root: str | Path, is_main: bool = True) -> None:
        self.root = Path(root)
        self.is_main = is_main
        self.trackers: list[Tracker] = []
        if is_main:
            (self.root / "samples").mkdir(parents=True, exist_ok=True)
            (self.root / "checkpoints").mkdir(parents=True, exist_ok=True)
            for folder in (self.root, self.root / "samples"):  # left by a killed writer
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def write_text(self, name: str, text: str) -> None:
        if not self.is_main:
            return
        atomic_write_text(self.root / name, text)

    def write_meta(self, extra: dict[str, Any] | None = None) -> None:
        self.write_text("meta.json", json.dumps({**environment(), **(extra or {})}, indent=2))

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl`` and hand it to every tracker."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        for tracker in self.trackers:
            tracker.log_row(row)

    def start_tracking(self, cfg: LogConfig, config_yaml: str, step: int) -> None:
        """Open the trackers of ``log.backends`` (main rank only), starting at ``step``."""
        if self.is_main and not self.trackers:
            self.trackers = open_trackers(cfg, self.root, config_yaml, step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """Report an image file the run wrote (a sample grid) to every tracker."""
        for tracker in self.trackers:
            tracker.log_image(tag, path, step)

    def close(self) -> None:
        """Flush and close the trackers (idempotent)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows past ``after_step`` (logged after the checkpoint we resume from)."""
        if not (self.is_main and self.metrics_path.is_file()):
            return
        rows = read_metrics(self.metrics_path)
        keep = "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= after_step)
        self.write_text("metrics.jsonl", keep)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return rows


def plot_loss(metrics_path: Path, out: Path) -> None:
    """Loss (and each loss term) against images seen, log-scale y; nothing before the first
    log row (``metrics_path`` absent or without loss rows)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in read_metrics(metrics_path) if "loss" in r] if metrics_path.is_file() else []
    if not rows:
        return
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    # fixed margins: tight_layout measured every tick label and cost half the plot's time
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.95)
    ax = fig.add_subplot()
    keys = [k for k in rows[-1] if k.startswith("loss/")] or ["loss"]
    for key in keys:
        ax.plot([r["kimg"] for r in rows], [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("kimg")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))


def plot_eval(metrics_path: Path, out: Path, chance: float | None = None) -> None:
    """Periodic evaluation against images seen: the accuracies (``acc_probe``; the probe's own
    accuracy on held-out real images dashed; ``chance`` dotted) in one panel, every other
    ``eval/`` metric (distances; CLIPScore, higher is better) in another; a panel only where
    it has curves; nothing before the first evaluation row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval/")))
    accs = [k for k in keys if "acc" in k and k != "eval/probe_real_accuracy"]
    others = [k for k in keys if "acc" not in k]
    panels = [group for group in (accs, others) if group]
    if not panels:
        return
    fig = Figure(figsize=(1 + 4 * len(panels), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]
    kimg = [r["kimg"] for r in rows]
    for ax, group in zip(axes, panels, strict=True):
        for key in group:
            ax.plot(kimg, [r.get(key, float("nan")) for r in rows], "o-", label=key[5:])
        ax.set_xlabel("kimg")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    if accs:
        real = [r.get("eval/probe_real_accuracy") for r in rows]
        if real[-1] is not None:
            axes[0].axhline(real[-1], ls="--", color="grey", label="probe on real images")
        if chance is not None:
            axes[0].axhline(chance, ls=":", color="grey", label="chance")
        axes[0].set_ylim(0, 1.02)
        axes[0].set_ylabel("accuracy")
    if others:
        clip = any("clipscore" in k for k in others)
        axes[-1].set_ylabel("distance ↓, clipscore ↑" if clip else "distance (lower is better)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
