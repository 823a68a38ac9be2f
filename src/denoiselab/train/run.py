"""The run folder: resolved config, provenance, metrics, samples, checkpoints, plots.

<run>/config.yaml        resolved TrainConfig (what `--resume` and `sample` rebuild from)
<run>/meta.json          git revision, versions, devices, command line
<run>/metrics.jsonl      one JSON object per log point (appended, flushed)
<run>/samples/*.png      grids from fixed noise and labels
<run>/checkpoints/       step_<N>.safetensors + step_<N>.state.safetensors
<run>/loss.png           loss curve
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from denoiselab.io import atomic_write_text


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
    """Owns the files of one run; only the main rank writes."""

    def __init__(self, root: str | Path, is_main: bool = True) -> None:
        self.root = Path(root)
        self.is_main = is_main
        if is_main:
            (self.root / "samples").mkdir(parents=True, exist_ok=True)
            (self.root / "checkpoints").mkdir(parents=True, exist_ok=True)

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
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

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
    """Loss (and each loss term) against images seen, log-scale y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    keys = [k for k in rows[-1] if k.startswith("loss/")] or ["loss"]
    for key in keys:
        ax.plot([r["kimg"] for r in rows], [r.get(key, float("nan")) for r in rows], label=key)
    ax.set_xlabel("kimg")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, out)


def plot_eval(metrics_path: Path, out: Path, chance: float | None = None) -> None:
    """Periodic evaluation against images seen: the accuracies (``acc_probe``; the probe's own
    accuracy on held-out real images dashed; ``chance`` dotted) on the left, every other
    ``eval/`` metric (distances) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if any(k.startswith("eval/") for k in r)]
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval/")))
    accs = [k for k in keys if "acc" in k and k != "eval/probe_real_accuracy"]
    others = [k for k in keys if "acc" not in k]
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(5 + 4 * bool(others), 3.5), dpi=100)
    axes = list(axes) if others else [axes]
    kimg = [r["kimg"] for r in rows]
    for key in accs:
        axes[0].plot(kimg, [r.get(key, float("nan")) for r in rows], "o-", label=key[5:])
    real = [r.get("eval/probe_real_accuracy") for r in rows]
    if real[-1] is not None:
        axes[0].axhline(real[-1], ls="--", color="grey", label="probe on real images")
    if chance is not None:
        axes[0].axhline(chance, ls=":", color="grey", label="chance")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_ylabel("accuracy")
    for key in others:
        axes[1].plot(kimg, [r.get(key, float("nan")) for r in rows], "o-", label=key[5:])
    if others:
        axes[1].set_ylabel("distance (lower is better)")
    for ax in axes:
        ax.set_xlabel("kimg")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out)


def _save_figure(fig: Any, out: Path) -> None:
    """Write ``fig`` to ``out`` atomically (a kill never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
