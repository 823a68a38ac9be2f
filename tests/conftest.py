"""Shared test setup."""

from __future__ import annotations

import pytest
import torch


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
