"""Ablation suites: run a baseline and its variants under one protocol, score and report them.

``denoiselab ablate SUITE`` trains every variant with the same seeds, data order, step
budget and evaluation (resumably, on one or several devices), then writes a scoreboard and a
self-contained HTML report; ``denoiselab report DIR`` rebuilds them from the results.
Built-in suites live in ``ablate/suites/*.yaml`` (``denoiselab ablate --list``).
"""

from denoiselab.ablate.cli import ablate_main, report_main
from denoiselab.ablate.suite import EvalSpec, Suite, VerdictSpec, builtin_suites, load_suite

__all__ = [
    "EvalSpec",
    "Suite",
    "VerdictSpec",
    "ablate_main",
    "builtin_suites",
    "load_suite",
    "report_main",
]
