"""``python -m denoiselab`` → the ``denoiselab`` command."""

from denoiselab.cli import main

raise SystemExit(main())
