"""Speed, measured: training and sampling throughput, peak memory and model FLOP utilisation
(MFU) against the machine's own measured matmul rate (``denoiselab bench``).

``bench_main(argv)`` is the command; ``run_bench(BenchConfig(...), out_dir)`` the library call.
"""

from denoiselab.bench.ceiling import matmul_ceiling
from denoiselab.bench.cli import bench_main, build_parser
from denoiselab.bench.machine import load_average, machine_facts
from denoiselab.bench.runner import BenchConfig, run_bench, summary_line

__all__ = [
    "BenchConfig",
    "bench_main",
    "build_parser",
    "load_average",
    "machine_facts",
    "matmul_ceiling",
    "run_bench",
    "summary_line",
]
