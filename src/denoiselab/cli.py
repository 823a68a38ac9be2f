"""The ``denoiselab`` command (also ``python -m denoiselab``).

Each subcommand imports what it needs lazily, so ``denoiselab info`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from denoiselab.cliutil import ArgumentParser, guarded


def _train(args: argparse.Namespace) -> int:
    from denoiselab.config import ConfigError, apply_overrides, dump_yaml, from_dict, to_dict
    from denoiselab.train import checkpoint as ckpt_io
    from denoiselab.train.build import config_from_yaml_text, load_train_config
    from denoiselab.train.config import TrainConfig
    from denoiselab.train.loop import train
    from denoiselab.train.preempt import EXIT_PREEMPTED, Preempted

    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config and not Path(args.config).is_file():
        overrides.insert(0, args.config)  # `train --resume RUN key=value`: no CONFIG given
        args.config = None
    source = args.resume
    if args.auto_resume:
        if args.resume or args.config is None:
            raise SystemExit("denoiselab train: --auto-resume takes a CONFIG (not --resume)")
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        source = out if ckpt_io.list_checkpoints(out / "checkpoints") else None
    if source:
        ck = ckpt_io.load_for_resume(source, warn=lambda m: _warn(f"warning: {m}"))
        if args.config is not None and not args.auto_resume:
            _warn(f"note: resuming; the run's own config is used, not {args.config}")
        base = to_dict(config_from_yaml_text(ck.config_yaml))
        cfg = from_dict(TrainConfig, apply_overrides(base, overrides))
        out = Path(args.out) if args.out else ck.path.parent.parent
    else:
        if args.config is None:
            raise ConfigError("give a CONFIG file (e.g. configs/quickstart.yaml) or --resume RUN")
        cfg = load_train_config(args.config, overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        ck = None
    if args.steps is not None:
        from dataclasses import replace

        cfg = replace(cfg, duration_nimg=args.steps * cfg.global_batch)
    if args.dry_run:  # as the run will record it (noise_scale "auto" as its number)
        print(dump_yaml(cfg.resolved()), end="")
        return 0
    try:
        train(cfg, out, resume=ck)
    except Preempted as e:
        # the process only exits now: torchrun, seeing another rank exit first, would
        # otherwise kill this one with SIGTERM while it shuts down (exit -15, not 75)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"denoiselab train: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _warn(message: str) -> None:
    """One line on stderr, from the first process only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def _sample(args: argparse.Namespace) -> int:
    import torch

    from denoiselab.images import save_grid, save_images
    from denoiselab.sampling.generate import balanced_labels
    from denoiselab.train.build import restore
    from denoiselab.train.distributed import resolve_device

    for flag, value in (("--num", args.num), ("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    lo, hi = args.cfg_interval
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"--cfg-interval {lo} {hi} must satisfy 0 <= LO <= HI <= 1")
    if not args.eta >= 0:
        raise ValueError(f"--eta {args.eta} must be >= 0 (0: the ODE)")
    device = resolve_device(args.device or "auto")
    ema: float | str | None = "auto" if args.ema is None else args.ema
    if args.no_ema:
        ema = None
    r = restore(args.run, ema=ema, device=device)
    num_classes = r.model_cfg.num_classes
    if args.class_id is not None and not 0 <= args.class_id < num_classes:
        raise ValueError(f"--class {args.class_id} is out of range; valid: 0 … {num_classes - 1}")
    out = Path(args.out)
    images = []
    for start in range(0, args.num, args.batch):
        n = min(args.batch, args.num - start)
        if args.class_id is not None:
            labels = torch.full((n,), args.class_id, dtype=torch.long)
        else:
            labels = balanced_labels(n, num_classes, offset=start)
        x = r.sample(
            labels,
            args.seed + start,
            steps=args.steps,
            solver=args.solver,
            cfg_scale=args.cfg,
            interval=tuple(args.cfg_interval),
            eta=args.eta,
        )
        save_images(x, out, start=start)
        images.append(x.cpu())
    save_grid(torch.cat(images)[:256], out / "grid.png")
    print(f"{args.num} samples ({r.weights}, step {r.checkpoint.step}) → {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from denoiselab.models.flops import describe
    from denoiselab.models.registry import MODEL_PRESETS

    if args.model in ("terms", "optimizers"):
        print(_registry_listing(args.model))
        return 0
    names = list(MODEL_PRESETS) if args.model == "all" else [args.model]
    for name in names:
        if len(names) > 1:
            print(f"== {name}")
        print(describe(name, image_size=args.image_size))
    return 0


def _registry_listing(kind: str) -> str:
    """The registered loss terms (``terms:`` keys) or optimizers (``optim.name``)."""
    if kind == "terms":
        from denoiselab.algorithms import TERMS, parse_terms

        parse_terms({})  # registers the built-in terms
        rows = [f"{name:<16} {spec.summary}" for name, spec in TERMS.items()]
        return "\n".join(rows) or "(no loss terms registered)"
    from denoiselab.train.optim import OPTIMIZERS

    return "\n".join(
        f"{name:<16} {(f.__doc__ or '').strip().splitlines()[0]}" for name, f in OPTIMIZERS.items()
    )


def _passthrough(module: str, func: str) -> Callable[[list[str]], int]:
    """A subcommand that owns its argparse (imported only when used)."""

    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(argv)

    return run


# name → (module, function, help). Each takes its own `-h`.
PASSTHROUGH_SPECS = {
    "eval": ("denoiselab.evaluation", "eval_main", "score a run: probe metrics, FID, CMMD, …"),
    "ablate": (
        "denoiselab.ablate.cli",
        "ablate_main",
        "run an ablation suite, write the scoreboard",
    ),
    "report": (
        "denoiselab.ablate.cli",
        "report_main",
        "rebuild an ablation report, or overlay several runs' curves",
    ),
    "bench": (
        "denoiselab.bench.cli",
        "bench_main",
        "measure throughput and model FLOP utilisation",
    ),
    "toy": ("denoiselab.analysis.cli", "toy_main", "JiT Fig. 2 toy experiment"),
    "analyze": ("denoiselab.analysis.cli", "analyze_main", "JLT local Gaussian analysis"),
    "convert": (
        "denoiselab.interop.cli",
        "convert_main",
        "turn an official JiT checkpoint into a run folder",
    ),
    "export": (
        "denoiselab.interop.export",
        "export_main",
        "write a shareable model folder (weights, config.json, model card)",
    ),
    "consolidate": (
        "denoiselab.train.sharded",
        "consolidate_main",
        "write a sharded (FSDP) checkpoint as one safetensors pair",
    ),
    "prepare-data": (
        "denoiselab.data.prepare",
        "prepare_main",
        "decode and centre-crop an image folder once into uint8 shards",
    ),
    "train-ae": ("denoiselab.latents", "train_ae_main", "train the small offline autoencoder"),
    "cache-latents": ("denoiselab.latents", "cache_latents_main", "encode a dataset to latents"),
}
PASSTHROUGH: dict[str, Callable[[list[str]], int]] = {
    name: _passthrough(module, func) for name, (module, func, _) in PASSTHROUGH_SPECS.items()
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="denoiselab",
        description="Train, sample, evaluate and ablate diffusion Transformers that predict clean data.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (e.g. configs/quickstart.yaml)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.add_argument("--out", help="run folder (default runs/<config name>)")
    t.add_argument("--steps", type=int, help="total optimizer steps (overrides duration_nimg)")
    t.add_argument(
        "--resume",
        help="run folder (its newest checkpoint that loads) or checkpoint file to resume from",
    )
    t.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume the run in --out if it has a checkpoint, else start CONFIG there "
        "(one command line for requeued jobs)",
    )
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="generate images from a run or checkpoint")
    s.add_argument("run", help="run folder or checkpoint file")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--solver", choices=["heun", "euler", "euler_maruyama"], default="heun")
    s.add_argument(
        "--eta", type=float, default=1.0, help="euler_maruyama: SDE noise g² = 2·eta·(1−t)·s²"
    )
    s.add_argument("--cfg", type=float, default=1.0, help="guidance scale ω")
    s.add_argument("--cfg-interval", type=float, nargs=2, default=[0.1, 1.0], metavar=("LO", "HI"))
    s.add_argument(
        "--ema",
        type=float,
        help="EMA decay to use (default: the slowest whose horizon 1/(1-d) fits a tenth of "
        "the run, else the fastest)",
    )
    s.add_argument("--no-ema", action="store_true", help="use the raw weights")
    s.add_argument("--class", dest="class_id", type=int, help="only this class")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--device")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_sample)

    i = sub.add_parser("info", help="parameters and forward cost of a model preset")
    i.add_argument(
        "model",
        help="preset name (e.g. JiT-B/16), 'all', or 'terms' / 'optimizers' (the registries)",
    )
    i.add_argument("--image-size", type=int)
    i.set_defaults(func=_info)

    for name, (_, _, help_text) in PASSTHROUGH_SPECS.items():
        sub.add_parser(name, help=f"{help_text} (`denoiselab {name} -h`)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Bad input of any subcommand (passthrough ones included) ends in
    one line on stderr and exit status 2 (:mod:`denoiselab.cliutil`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return guarded(f"denoiselab {argv[0]}", lambda: PASSTHROUGH[argv[0]](argv[1:]))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`train cfg.yaml --steps 5 optim.lr=1e-3`)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad or (extra and args.command != "train"):
        prog = f"denoiselab {args.command}"
        print(f"{prog}: error: unrecognized arguments: {' '.join(bad or extra)} (see `{prog} -h`)",
              file=sys.stderr)  # fmt: skip
        return 2
    if extra:
        args.overrides = [*args.overrides, *extra]
    return guarded(f"denoiselab {args.command}", lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
