"""Command-line entry points: ``denoiselab toy …`` and ``denoiselab analyze gaussian …``.

``toy_main(args)`` and ``analyze_main(args)`` take the arguments after the top-level command
word (``analyze_main`` expects the sub-command ``gaussian`` first) and return an exit code.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from denoiselab.analysis.gaussian_report import DEFAULT_T_GRID, gaussian_analysis, markdown
from denoiselab.analysis.spectra import DEFAULT_SPECTRUM, dataset_spectrum, parse_spectrum
from denoiselab.analysis.toy import QUICK, ToyConfig, reference_sw2, run_toy
from denoiselab.analysis.toy_report import markdown_table, ratios_at_largest_dim, write_report
from denoiselab.cliutil import ArgumentParser


def toy_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="denoiselab toy",
        description="JiT Fig. 2: a 2-D spiral buried in D dims, x/ε/v-prediction with v-loss.",
    )
    p.add_argument("--dims", type=int, nargs="+", default=list(ToyConfig.dims))
    p.add_argument(
        "--pred", nargs="+", default=list(ToyConfig.predictions), choices=["x", "eps", "v"]
    )
    p.add_argument("--quick", action="store_true", help=f"short run for tests: {QUICK}")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, required=True, help="writes toy.png, toy.md, toy.json")
    return p


def toy_main(args: list[str] | None = None) -> int:
    """Train every (D, prediction) cell, write the figure and tables, print the ratios last."""
    ns = toy_parser().parse_args(args)
    cfg = ToyConfig(
        dims=tuple(ns.dims), predictions=tuple(ns.pred), seed=ns.seed, threads=ns.threads
    )
    if ns.quick:
        cfg = replace(cfg, **QUICK)
    if ns.steps is not None:
        cfg = replace(cfg, train_steps=ns.steps)
    start = time.perf_counter()
    results = run_toy(cfg)
    ref = reference_sw2(cfg)
    paths = write_report(results, cfg, ref, ns.out)
    print(markdown_table(results, ref))
    print(
        f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f}s"
    )
    ratios = ratios_at_largest_dim(results)
    dim = max(cfg.dims)
    print(
        f"SW2 ratio to x-prediction at D={dim}: "
        + (", ".join(f"{p}/x = {r:.2f}" for p, r in ratios.items()) or "n/a (x not run)")
    )
    return 0


def analyze_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="denoiselab analyze", description="Closed-form analyses.")
    sub = p.add_subparsers(dest="analysis", required=True)
    g = sub.add_parser(
        "gaussian",
        help="local Gaussian analysis of x/ε/v targets (JLT)",
        description="x ~ N(0, Σ), z = t·x + (1−t)·ε: posterior means, irreducible errors, "
        "and best rank-K linear predictors of x, ε and v converted to x-space.",
    )
    src = g.add_mutually_exclusive_group()
    src.add_argument(
        "--spectrum",
        default=None,
        help=f"eigenvalues, e.g. {DEFAULT_SPECTRUM!r} or 'list:4,2,1,0' (default: the former)",
    )
    src.add_argument(
        "--data",
        choices=["shapes", "digits"],
        default=None,
        help="estimate Σ as the patch covariance of a built-in dataset",
    )
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--patch", type=int, default=4, help="patch side p (Σ is C·p·p square)")
    g.add_argument("--channels", type=int, default=3, choices=[1, 3])
    g.add_argument("--num-images", type=int, default=512)
    g.add_argument("--rank", type=int, default=16, help="K of the rank-K predictors")
    g.add_argument("--noise-scale", type=float, default=1.0, help="s in ε ~ N(0, s²I)")
    g.add_argument("--t", type=float, default=0.5, help="t of the per-direction panels")
    g.add_argument("--t-grid", type=float, nargs="+", default=list(DEFAULT_T_GRID))
    g.add_argument("--out", type=Path, required=True, help="writes gaussian.png/.md/.json")
    return p


def analyze_main(args: list[str] | None = None) -> int:
    """``analyze gaussian …``: print the table and write the plots/tables to ``--out``."""
    parser = analyze_parser()
    ns = parser.parse_args(args)
    times = [ns.t, *ns.t_grid]
    if not all(0 < t < 1 for t in times):
        parser.error(f"--t and --t-grid must lie in (0, 1); got {times}")
    if ns.rank < 1 or ns.noise_scale <= 0:
        parser.error(f"--rank {ns.rank} must be >= 1 and --noise-scale {ns.noise_scale} > 0")
    if ns.data is not None:
        lam = dataset_spectrum(ns.data, ns.image_size, ns.patch, ns.num_images, ns.channels)
        title = f"{ns.data} {ns.image_size}px, {ns.patch}×{ns.patch} patches"
    else:
        spec = ns.spectrum or DEFAULT_SPECTRUM
        lam, title = parse_spectrum(spec), spec
    rank = min(ns.rank, lam.size)
    table = gaussian_analysis(
        lam, rank, ns.out, s=ns.noise_scale, t_grid=ns.t_grid, t_focus=ns.t, title=title
    )
    print(markdown(table, title))
    print(f"wrote {ns.out}/gaussian.png, gaussian.md, gaussian.json")
    return 0
