"""Command lines ``denoiselab ablate SUITE …`` and ``denoiselab report DIR``.

``ablate_main`` and ``report_main`` take the arguments after the subcommand and return an
exit status: 0 success, 1 a variant failed, 2 a bad suite, option or folder.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from denoiselab.ablate.files import LockedError
from denoiselab.cliutil import ArgumentParser
from denoiselab.config import ConfigError

if TYPE_CHECKING:
    from denoiselab.ablate.suite import Suite


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ablate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="denoiselab ablate",
        description="Run an ablation suite (a baseline and its variants), then write the "
        "scoreboard and report. Finished variants are skipped; interrupted ones resume.",
    )
    p.add_argument("suite", nargs="?", help="suite YAML file or built-in name (see --list)")
    p.add_argument("--out", help="suite folder (default runs/ablate/<suite>[-quick])")
    p.add_argument("--quick", action="store_true", help="shrink every variant to smoke size")
    p.add_argument(
        "--devices",
        default="auto",
        help="comma-separated devices: one runs the variants in turn in this process; several "
        "(cuda:0,cuda:1 or cpu,cpu) run one worker subprocess per device (default auto: "
        "cuda if available, else cpu)",
    )
    p.add_argument("--only", help="comma-separated variant names to run (default all)")
    p.add_argument("--base", help="replace the suite's base config (e.g. a GPU-size config)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every variant (train keys or eval.*); repeatable",
    )
    p.add_argument(
        "--budget",
        choices=("images", "time"),
        help="images: every variant sees the base's images; time: equal wall-clock, each "
        "variant gets the images the baseline's training time buys at its measured speed "
        "(default: the suite's budget key, else images)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--verbose", action="store_true", help="print the training log lines")
    p.add_argument("--no-report", action="store_true", help="skip scoreboard and report")
    p.add_argument("--dry-run", action="store_true", help="print the resolved suite and exit")
    p.add_argument("--list", action="store_true", help="list the built-in suites and exit")
    return p


def ablate_main(argv: Sequence[str] | None = None) -> int:
    """``denoiselab ablate``: see :func:`ablate_parser`."""
    from denoiselab.ablate.suite import builtin_suites, dump_suite, load_suite

    args = ablate_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        for name in builtin_suites():
            print(f"{name:20s} {_summary(name)}")
        return 0
    if not args.suite:
        ablate_parser().error(
            "give a SUITE (a YAML file or one of: " + ", ".join(builtin_suites()) + ")"
        )
    if args.threads is not None and args.threads < 1:
        ablate_parser().error(f"--threads {args.threads}: must be >= 1")
    try:
        from denoiselab.ablate.runner import parse_devices

        suite = load_suite(
            args.suite, quick=args.quick, base=args.base, sets=args.sets, budget=args.budget
        )
        parse_devices(args.devices)  # a bad device is named before anything runs
        if args.dry_run:
            print(dump_suite(suite), end="")
            return 0
        return _run(suite, args)
    except (ConfigError, LockedError, FileNotFoundError) as e:
        print(f"denoiselab ablate: error: {e}", file=sys.stderr)
        return 2


def _summary(name: str) -> str:
    """The first sentence of a built-in suite's description."""
    from denoiselab.ablate.suite import suite_path
    from denoiselab.config import load_yaml

    text = str(load_yaml(suite_path(name)).get("description") or "")
    return re.split(r"\.\s+(?=[A-Z])", text)[0].strip()


def _run(suite: Suite, args: argparse.Namespace) -> int:
    from denoiselab.ablate.report import build_report
    from denoiselab.ablate.runner import parse_devices, run_suite

    devices = parse_devices(args.devices)
    suffix = ("-time" if suite.budget == "time" else "") + ("-quick" if suite.quick else "")
    default = Path("runs") / "ablate" / (suite.name + suffix)
    out = Path(args.out) if args.out else default
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    status = run_suite(
        suite, out, devices=devices, only=only, verbose=args.verbose, threads=args.threads, log=_log
    )
    failed = {n: s for n, s in status.items() if s != "done"}
    if not args.no_report:
        report = build_report(out)  # from suite.json: it holds the equal-time durations
        print((out / "scoreboard.md").read_text(encoding="utf-8"))
        print(f"report: {report}")
    for name, s in failed.items():
        _log(f"{name}: {s}")
    return 1 if failed else 0


def report_main(argv: Sequence[str] | None = None) -> int:
    """``denoiselab report DIR``: rebuild a suite folder's scoreboard and report.html;
    ``denoiselab report RUN [RUN …] [--out FILE]``: overlay the curves of run folders.
    Which one is decided by what the paths hold (``suite.json`` or ``metrics.jsonl``)."""
    from denoiselab.ablate.report import build_report
    from denoiselab.ablate.runs_report import build_runs_report, is_run_folder

    p = ArgumentParser(
        prog="denoiselab report",
        description="A suite folder (holds suite.json): rebuild the scoreboard (CSV, JSON, "
        "Markdown) and report.html written by `denoiselab ablate`. One or more run folders "
        "(hold metrics.jsonl): one HTML page overlaying their loss and evaluation curves.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="one suite folder, or run folders")
    p.add_argument("--out", help="run folders: the HTML file to write (default runs_report.html)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    paths = [Path(d) for d in args.dirs]
    suites = [d for d in paths if (d / "suite.json").is_file()]
    try:
        if suites:
            if len(paths) > 1:
                raise ConfigError(
                    f"{str(suites[0])!r} is a suite folder: give one suite folder alone, or "
                    "run folders only"
                )
            if args.out:
                raise ConfigError("--out is for run folders; a suite's report.html stays in it")
            report = build_report(paths[0])
            print((paths[0] / "scoreboard.md").read_text(encoding="utf-8"))
        else:
            for d in paths:
                if not is_run_folder(d):
                    raise FileNotFoundError(
                        f"{str(d)!r} is neither a suite folder (suite.json) nor a run folder "
                        "(metrics.jsonl, config.yaml)"
                    )
            report = build_runs_report(paths, args.out or "runs_report.html")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"denoiselab report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0
