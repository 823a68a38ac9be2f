"""Shared test setup."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """A fresh denoiselab cache for the session (probes, reference statistics, teachers):
    results never depend on what earlier runs left in ``~/.cache/denoiselab``, and concurrent
    test runs do not share files. Subprocesses (torchrun) inherit it."""
    before = os.environ.get("DENOISELAB_CACHE")
    os.environ["DENOISELAB_CACHE"] = str(tmp_path_factory.mktemp("denoiselab-cache"))
    yield
    if before is None:
        os.environ.pop("DENOISELAB_CACHE", None)
    else:
        os.environ["DENOISELAB_CACHE"] = before


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread per test: the CI machine has 2 cores, and oversubscribed OpenMP
    threads make small models many times slower (and timings meaningless)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """Tests must not leak process-wide torch settings (the trainer may turn on
    deterministic algorithms; a maths test may switch the default dtype)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    dtype = torch.get_default_dtype()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_default_dtype(dtype)
