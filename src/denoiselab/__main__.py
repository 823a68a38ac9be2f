"""``python -m denoiselab`` → the ``denoiselab`` command."""

from denoiselab.cli import run

run()
