"""``denoiselab convert FORMAT CKPT --out RUN``: checkpoints of other code bases as runs.

``CONVERTERS`` maps a source format to its converter
``(checkpoint, out, *, train_images, in_context_start, overrides) -> weights file``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from denoiselab.config import ConfigError
from denoiselab.interop import ConvertError, jit_official
from denoiselab.train.checkpoint import CheckpointError

CONVERTERS = {"jit-official": jit_official.convert}


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``denoiselab convert FORMAT CKPT --out RUN [key=value …]`` (one line and exit 2 on errors)."""
    p = argparse.ArgumentParser(
        prog="denoiselab convert",
        description="Convert a checkpoint of another code base into a denoiselab run folder.",
    )
    p.add_argument("format", choices=sorted(CONVERTERS), help="source format")
    p.add_argument("checkpoint", help="the checkpoint file (official JiT: checkpoint-*.pth)")
    p.add_argument("overrides", nargs="*", help="key.sub=value changes of the converted config")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument(
        "--train-images",
        type=int,
        default=jit_official.IMAGENET_TRAIN_IMAGES,
        help="images in the training set, turning epochs into steps (default: ImageNet-1k)",
    )
    p.add_argument(
        "--in-context-start",
        type=int,
        help="block where in-context tokens enter (default: from args.model, e.g. JiT-B: 4)",
    )
    args = p.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    if args.train_images < 1:
        p.error(f"--train-images {args.train_images}: must be >= 1")
    try:
        path = CONVERTERS[args.format](
            args.checkpoint,
            args.out,
            train_images=args.train_images,
            in_context_start=args.in_context_start,
            overrides=args.overrides,
        )
    except (ConvertError, ConfigError, CheckpointError) as e:
        print(f"denoiselab convert: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.checkpoint} → {path}")
    return 0
