"""``denoiselab sample`` for text runs: ``--prompt`` (repeatable), ``--prompts FILE``,
``--negative-prompt``, ``--per-prompt``; and the named errors when the condition flags do not
fit the run (prompts for a class run, ``--class`` for a text run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from denoiselab.images import save_images, save_labelled_grid
from denoiselab.text.sampling import write_prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of ``--prompts FILE``: one a line, blank lines skipped; a missing or
    empty file is a named error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {str(path)!r}: no such file (one prompt a line)")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"--prompts {str(path)!r} holds no prompt (one prompt a line)")
    return prompts


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) then ``--prompts FILE`` (one a line)."""
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        prompts += read_prompt_file(args.prompts)
    if args.per_prompt < 1:
        raise ValueError(f"--per-prompt {args.per_prompt} must be >= 1")
    return prompts


def check_condition_flags(args: argparse.Namespace, r: Any, prompts: list[str]) -> None:
    """Prompts for text runs, classes for class runs: the other is a named error."""
    run = f"{args.run} ({r.weights}, step {r.checkpoint.step})"
    if prompts and not r.is_text:
        raise ValueError(
            f"--prompt/--prompts: {run} is class-conditional (no model.text); sample it with "
            "--class or without a condition flag"
        )
    if args.negative_prompt and not prompts:
        raise ValueError("--negative-prompt needs --prompt or --prompts")
    if r.is_text and args.class_id is not None:
        raise ValueError(
            f"--class {args.class_id}: {run} is text-conditioned; give --prompt TEXT "
            "(or no condition flag: one caption of the data per class)"
        )
    if prompts and args.num is not None:
        raise ValueError("--num is for sampling without prompts; with prompts use --per-prompt")


def sample_prompts(
    args: argparse.Namespace, r: Any, prompts: list[str], settings: dict[str, Any], out: Path
) -> int:
    """``--per-prompt`` images per prompt; grid rows = prompts, labelled with their text."""

    k = args.per_prompt
    wanted = [p for p in prompts for _ in range(k)]
    images = []
    for start in range(0, len(wanted), args.batch):
        batch = wanted[start : start + args.batch]
        x = r.sample_prompts(
            batch,
            args.seed + start,
            negative_prompt=args.negative_prompt,
            guidance=args.guidance,
            sparse_ratio=args.sparse_ratio,
            **settings,
        )
        save_images(x, out, start=start)
        images.append(x.cpu())
    write_prompts(out / "prompts.txt", wanted)
    shown = min(len(prompts), max(1, 256 // k))
    save_labelled_grid(torch.cat(images)[: shown * k], prompts[:shown], out / "grid.png", k)
    print(
        f"{len(wanted)} samples of {len(prompts)} prompt(s) ({r.weights}, step "
        f"{r.checkpoint.step}) → {out}"
    )
    return 0
