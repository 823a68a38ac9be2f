"""``python -m denoiselab.ablate …`` (what the per-device worker subprocesses run)."""

from denoiselab.ablate.cli import ablate_main

raise SystemExit(ablate_main())
