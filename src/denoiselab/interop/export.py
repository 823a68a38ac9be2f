"""``denoiselab export RUN --out DIR [--ema DECAY] [--push-to-hub REPO]``: a shareable model.

``DIR`` gets ``model.safetensors`` (the chosen weights: an EMA decay, ``auto`` as in
``denoiselab sample``, or ``none`` for the raw weights), ``config.json`` (read by
:func:`denoiselab.from_pretrained`: network, prediction space and noise scale, recommended
sampler settings, class names, the training recipe), ``README.md`` (a Hugging Face model card:
recipe, evaluation numbers from the run's ``eval.json``, a sample grid) and ``samples.png``.
``--push-to-hub`` uploads the folder where ``huggingface_hub`` is installed and a token is
available; offline (``HF_HUB_OFFLINE``), without a token or without the package it does nothing
and says why.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from denoiselab import __version__
from denoiselab.config import ConfigError, to_dict
from denoiselab.interop import ConvertError
from denoiselab.interop.model_card import model_card
from denoiselab.interop.pretrained import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    hub_offline,
)
from denoiselab.io import atomic_write, atomic_write_text
from denoiselab.train.build import Restored, restore
from denoiselab.train.checkpoint import CheckpointError
from denoiselab.train.run import read_metrics


def export_config(r: Restored, class_names: list[str] | None) -> dict[str, Any]:
    """What ``from_pretrained`` needs, plus the recipe (the run's whole resolved config)."""
    cfg, ema = r.cfg, r.weights.removeprefix("ema:")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "denoiselab_version": __version__,
        "architecture": "JiT",
        "model": to_dict(r.model_cfg),
        "prediction": cfg.objective.prediction,
        "loss_space": cfg.objective.loss_space,
        "noise_scale": cfg.objective.noise_scale,
        "t_eps": cfg.objective.t_eps,
        "time_convention": "t = 1 is data, t = 0 is noise: z_t = t·x + (1 − t)·ε",
        "class_names": class_names,
        "sampling": {
            "steps": cfg.sample.steps,
            "solver": cfg.sample.solver,
            "cfg": cfg.sample.cfg,
            "interval": list(cfg.sample.interval),
        },
        "weights": {
            "file": WEIGHTS_NAME,
            "ema": None if r.weights == "model" else float(ema),
            "step": r.checkpoint.step,
            "nimg": r.checkpoint.step * cfg.global_batch,
        },
        "train_config": to_dict(cfg),
    }


def class_names_of(data_cfg: Any) -> list[str] | None:
    """The data's class names without reading its images (None when unavailable)."""
    import os

    try:
        if data_cfg.name == "imagefolder":
            root = Path(data_cfg.root)
            return sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
        if data_cfg.name == "latents":
            from denoiselab.latents import read_manifest

            return list(read_manifest(data_cfg.root).class_names)
        from denoiselab.data import build_dataset

        return list(build_dataset(data_cfg).class_names)
    except (OSError, ValueError):
        return None


def find_eval(run: Path, given: str | Path | None) -> dict[str, Any] | None:
    """The run's final evaluation: ``given``, else ``RUN/eval.json`` or ``RUN/eval/eval.json``."""
    candidates = [Path(given)] if given else [run / "eval.json", run / "eval" / "eval.json"]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    if given:
        raise FileNotFoundError(f"--eval {str(given)!r} does not exist")
    return None


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    ema: float | str | None = "auto",
    eval_json: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the export folder ``out`` of run ``run`` (see the module docstring); returns it."""
    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{str(out)!r} exists and is not empty; pass --overwrite to replace it")
    r = restore(run, ema=ema)
    if r.is_text:  # from_pretrained builds class-conditional networks only
        raise ConvertError(
            f"{str(run)!r} is a text-to-image run (model.text): export holds class-conditional "
            "models only; sample the run folder itself (denoiselab sample RUN --prompt …)"
        )
    if r.cfg.data.name == "latents":
        raise ConvertError(
            "export holds pixel-space models only: a latent run also needs its autoencoder, "
            "which is not bundled"
        )
    run_dir = r.checkpoint.path.parent.parent
    config = export_config(r, class_names_of(r.cfg.data))
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in r.net.state_dict().items()}
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, {"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if grids:
        atomic_write(out / "samples.png", lambda tmp: shutil.copyfile(grids[-1], tmp))
    metrics = run_dir / "metrics.jsonl"
    periodic = (
        [row for row in read_metrics(metrics) if any(k.startswith("eval/") for k in row)]
        if metrics.is_file()
        else []
    )
    card = model_card(
        config,
        r,
        evaluation=find_eval(run_dir, eval_json),
        periodic=periodic[-1] if periodic else None,
        has_grid=bool(grids),
        name=out.resolve().name,
    )
    atomic_write_text(out / "README.md", card)
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> tuple[str, str]:
    """Upload ``folder`` to model repository ``repo_id``: ``("pushed", url)``, ``("skipped",
    why)`` when offline, without a token or without ``huggingface_hub`` (nothing is sent), or
    ``("failed", why)`` when the upload was tried and failed."""
    try:
        import huggingface_hub
    except ImportError:
        return "skipped", 'not pushed: huggingface_hub is not installed (pip install -e ".[hub]")'
    if huggingface_hub.constants.HF_HUB_OFFLINE or hub_offline():
        return "skipped", "not pushed: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)"
    token = huggingface_hub.get_token()
    if token is None:
        return "skipped", "not pushed: no Hugging Face token (`hf auth login` or HF_TOKEN)"
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except (OSError, huggingface_hub.errors.HfHubHTTPError) as e:
        return "failed", f"not pushed: {type(e).__name__}: {e}"
    return "pushed", f"pushed to {getattr(info, 'commit_url', repo_id)}"


def export_main(argv: Sequence[str] | None = None) -> int:
    """``denoiselab export RUN --out DIR``; one line and exit 2 on bad input."""
    p = argparse.ArgumentParser(
        prog="denoiselab export",
        description="Write a shareable model folder (weights, config.json, model card) of a run; "
        "load it with denoiselab.from_pretrained(DIR).",
    )
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--ema", default="auto", help="EMA decay to export, 'auto' (default) or 'none'")
    p.add_argument("--eval", dest="eval_json", help="eval.json to quote (default RUN/eval.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload to hub repository owner/name")
    p.add_argument("--private", action="store_true", help="create the hub repository private")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        ema = (
            {"auto": "auto", "none": None}[args.ema]
            if args.ema in ("auto", "none")
            else float(args.ema)
        )
    except ValueError:
        p.error(f"--ema {args.ema!r}: a decay (e.g. 0.9999), 'auto' or 'none'")
    try:
        out = export_run(
            args.run, args.out, ema=ema, eval_json=args.eval_json, overwrite=args.overwrite
        )
    except (ConvertError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"denoiselab export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.run} → {out}")
    if args.push_to_hub:
        status, message = push_to_hub(out, args.push_to_hub, args.private)
        print(message, file=sys.stdout if status == "pushed" else sys.stderr)
        return 1 if status == "failed" else 0
    return 0
