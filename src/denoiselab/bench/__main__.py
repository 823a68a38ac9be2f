"""``python -m denoiselab.bench ARGS`` = ``denoiselab bench ARGS``."""

from denoiselab.bench.cli import bench_main

raise SystemExit(bench_main())
