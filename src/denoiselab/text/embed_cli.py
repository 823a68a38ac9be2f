"""``denoiselab cache-text CONFIG --out DIR``: a run's frozen text encoder over every caption of
its data, stored once (:mod:`denoiselab.text.embed_cache`); train with ``model.text.cache=DIR``."""

from __future__ import annotations

import sys
import time

from denoiselab.cliutil import ArgumentParser
from denoiselab.config import ConfigError
from denoiselab.io import is_inside
from denoiselab.text.embed_cache import DTYPES, cache_text


def cache_text_main(argv: list[str] | None = None) -> int:
    """Entry point of ``denoiselab cache-text`` (returns the exit status)."""
    p = ArgumentParser(
        prog="denoiselab cache-text",
        description=(
            "Encode every caption of a run's data once with its frozen text encoder "
            "(model.text: a transformers encoder from a local directory) and store the "
            "embeddings; train with model.text.cache=DIR so the encoder does not run each step."
        ),
    )
    p.add_argument("config", help="training config (YAML or shipped name) with model.text")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="stored dtype")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from denoiselab.data import build_dataset
    from denoiselab.train.build import load_train_config, model_config_for
    from denoiselab.train.distributed import resolve_device

    try:
        device = resolve_device(args.device)
        cfg = load_train_config(args.config, args.overrides)
        root = cfg.data.root
        if is_inside(args.out, root):
            raise ConfigError(
                f"--out {args.out!r} is in data.root {root!r} (an image folder would take it "
                "for a class); choose a directory outside the data"
            )
        ds = build_dataset(cfg.data)
        mc = model_config_for(cfg, ds)
        if mc.text is None:
            raise ConfigError(f"{args.config} has no model.text: nothing to encode")
        start = time.perf_counter()
        m = cache_text(
            ds, mc.text, args.out, dtype=args.dtype, batch_size=args.batch, device=device,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )  # fmt: skip
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"denoiselab cache-text: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{m['num_images']} captions{' (+ mirrored)' if m['flips'] else ''} → [{m['max_len']}, "
        f"{m['dim']}] {m['dtype']} embeddings in {time.perf_counter() - start:.1f}s → {args.out}"
    )
    return 0
