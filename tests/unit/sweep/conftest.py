"""Fixtures for the sweep's unit tests: the tiny synthetic workload factory."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def tiny(monkeypatch):
    """`tiny_workload(...)` from sweep_fixtures.py, which is also made importable (the CLI tests
    name it as the entry point `sweep_fixtures:tiny_workload`)."""
    monkeypatch.syspath_prepend(str(HERE))
    import sweep_fixtures

    return sweep_fixtures.tiny_workload


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models here run fastest on one thread, and a shared 2-core machine makes a
    thread pool wait for cores; restored afterwards for other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
