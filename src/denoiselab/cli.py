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
from typing import NoReturn

from denoiselab.cliutil import ArgumentParser, add_sampler_arguments, check_sampler_flags, guarded


def _train(args: argparse.Namespace) -> int:
    from denoiselab.config import ConfigError, apply_overrides, dump_yaml, from_dict, to_dict
    from denoiselab.train import checkpoint as ckpt_io
    from denoiselab.train.build import config_from_yaml_text, load_train_config
    from denoiselab.train.config import TrainConfig
    from denoiselab.train.distributed import shutdown
    from denoiselab.train.loop import train
    from denoiselab.train.preempt import EXIT_PREEMPTED, Preempted

    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config and not Path(args.config).is_file():
        overrides.insert(0, args.config)  # `train --resume RUN key=value`: no CONFIG given
        args.config = None
    source = args.resume
    if args.auto_resume:
        if args.resume or args.config is None:
            raise ConfigError("--auto-resume takes a CONFIG (not --resume)")
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
            from denoiselab.config import shipped_configs

            raise ConfigError(
                "give a CONFIG: a YAML file or a shipped config "
                f"({', '.join(shipped_configs())}), or --resume RUN"
            )
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
        shutdown()
        print(f"denoiselab train: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    shutdown()
    return 0


def _warn(message: str) -> None:
    """One line on stderr, from the first process only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def class_label(value: str, names: list[str] | None, num_classes: int) -> int:
    """The label ``--class VALUE`` asks for: a number ``0 … num_classes-1`` or, where the run's
    data set has them, a class name (``denoiselab sample runs/quickstart --class star``)."""
    from denoiselab.config import ConfigError

    valid = f"0 … {num_classes - 1}"
    if names:
        valid = f"{', '.join(names)} (or {valid})"
    if names and value in names:  # a name first: image folders may be named "001", "002", …
        return names.index(value)
    if value.strip().lstrip("-").isdigit():
        label = int(value)
        if 0 <= label < num_classes:
            return label
        raise ConfigError(f"--class {value} is out of range; valid: {valid}")
    if not names:
        valid += "; the run's data set has no class names on this machine"
    raise ConfigError(f"--class {value!r} is not a class of this run; valid: {valid}")


def _sample(args: argparse.Namespace) -> int:
    import torch

    from denoiselab.data.config import class_names
    from denoiselab.images import save_grid, save_images
    from denoiselab.sampling.generate import balanced_labels
    from denoiselab.text.sampling import write_prompts
    from denoiselab.train.build import restore
    from denoiselab.train.distributed import resolve_device

    if args.batch < 1:
        raise ValueError(f"--batch {args.batch} must be >= 1")
    check_sampler_flags(args)
    device = resolve_device(args.device or "auto")
    ema: float | str | None = "auto" if args.ema is None else args.ema
    if args.no_ema:
        ema = None
    from denoiselab.text.cli import check_condition_flags, read_prompts, sample_prompts

    prompts = read_prompts(args)
    r = restore(args.run, ema=ema, device=device, compile=args.compile)
    check_condition_flags(args, r, prompts)
    out = Path(args.out)
    settings = r.settings(args.steps, args.solver, args.cfg, args.cfg_interval, args.eta)
    if prompts:
        return sample_prompts(args, r, prompts, settings, out)
    num_classes = r.model_cfg.num_classes
    label = None
    if args.class_id is not None:
        label = class_label(args.class_id, class_names(r.cfg.data), num_classes)
    args.num = 64 if args.num is None else args.num
    images, used = [], []  # used: a text run's prompt of each sample, as the sampler drew it
    for start in range(0, args.num, args.batch):
        n = min(args.batch, args.num - start)
        if label is not None:
            labels = torch.full((n,), label, dtype=torch.long)
        else:
            labels = balanced_labels(n, num_classes, offset=start)
        x = r.sample(
            labels,
            args.seed + start,
            **settings,
            guidance=args.guidance,
            sparse_ratio=args.sparse_ratio,
        )
        save_images(x, out, start=start)
        images.append(x.cpu())
        if r.is_text:  # each batch's labels → captions of the data, as the sampler chose them
            used += r.sampler.prompts_for(labels, args.seed + start)
    save_grid(torch.cat(images)[:256], out / "grid.png")
    if r.is_text:
        write_prompts(out / "prompts.txt", used)
    print(f"{args.num} samples ({r.weights}, step {r.checkpoint.step}) → {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from denoiselab.models.flops import describe
    from denoiselab.models.registry import MODEL_PRESETS

    if args.model in ("terms", "optimizers"):
        print(_registry_listing(args.model))
        return 0
    from denoiselab.config import shipped_configs

    is_config = args.model.endswith((".yaml", ".yml")) or args.model in shipped_configs()
    if is_config and args.model not in MODEL_PRESETS:
        print(_describe_run(args.model, args.overrides))
        return 0
    names = list(MODEL_PRESETS) if args.model == "all" else [args.model]
    for name in names:
        if len(names) > 1:
            print(f"== {name}")
        print(describe(name, image_size=args.image_size))
    return 0


def _describe_run(path: str, overrides: list[str]) -> str:
    """The network a training config builds and what its loss terms add (projector params)."""
    from denoiselab.algorithms import TERMS
    from denoiselab.data import build_dataset
    from denoiselab.models.flops import describe_config
    from denoiselab.train.build import load_train_config, model_config_for

    cfg = load_train_config(path, overrides)
    # as training resolves it (a text projection's size depends on D_text and the vocabulary)
    mc = model_config_for(cfg, build_dataset(cfg.data))
    lines = [describe_config(cfg.model["name"], mc)]
    for name, term_cfg in cfg.terms.items():
        describe = TERMS[name].describe
        lines.append(describe(term_cfg, mc) if describe else f"terms.{name}: no parameters")
    return "\n".join(lines)


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
    "cache-text": (
        "denoiselab.text.embed_cli",
        "cache_text_main",
        "encode every caption once with a run's frozen text encoder (model.text.cache)",
    ),
    "repa-e": (
        "denoiselab.latents.repa_e",
        "repa_e_main",
        "tune the small autoencoder end to end with a latent model (REPA-E)",
    ),
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
    t.add_argument(
        "config", nargs="?", help="a shipped config's name (e.g. quickstart) or a YAML file"
    )
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
    s.add_argument("--num", type=int, help="samples without prompts (default 64)")
    s.add_argument("--prompt", action="append", help="a text run: sample this prompt (repeatable)")
    s.add_argument("--prompts", metavar="FILE", help="a text run: prompts, one a line")
    s.add_argument(
        "--negative-prompt",
        help="CFG's unconditional branch instead of the empty prompt",
    )
    s.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default 4)")
    add_sampler_arguments(s)
    s.add_argument(
        "--ema",
        type=float,
        help="EMA decay to use (default: the slowest whose horizon 1/(1-d) fits a tenth of "
        "the run, else the fastest)",
    )
    s.add_argument("--no-ema", action="store_true", help="use the raw weights")
    s.add_argument(
        "--class",
        dest="class_id",
        metavar="CLASS",
        help="only this class: its number or, where the data has them, its name (e.g. star)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--device")
    s.add_argument(
        "--compile", action="store_true", help="torch.compile the network (pays off for many)"
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=_sample)

    i = sub.add_parser("info", help="parameters and forward cost of a model preset")
    i.add_argument(
        "model",
        help="preset name (e.g. JiT-B/16), 'all', 'terms' / 'optimizers' (the registries), or "
        "a training config (a .yaml file or a shipped name such as quickstart): its network "
        "and what its loss terms add",
    )
    i.add_argument("overrides", nargs="*", help="key=value overrides of a training config")
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


def run() -> NoReturn:
    """The process entry point (the ``denoiselab`` script and ``python -m denoiselab``):
    :func:`main`, then exit with its status. A process that torchrun started (``WORLD_SIZE``
    > 1) ends through :func:`denoiselab.train.distributed.end_process`, so that gloo's
    worker threads cannot abort it in interpreter teardown after its work was done."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise SystemExit(main())
    try:
        code = main()
    except SystemExit as e:  # argparse: -h, usage errors
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:
        print("denoiselab: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # a bug: its traceback, then the same way out as any failure
        import traceback

        traceback.print_exc()
        code = 1
    from denoiselab.train.distributed import end_process

    end_process(code)


if __name__ == "__main__":  # pragma: no cover
    run()
