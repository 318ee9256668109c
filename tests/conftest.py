"""Fixtures shared across test folders."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch


@pytest.fixture(scope="module")
def frozen_import_objects() -> Any:
    """Every memory probe ends with batchscope.device.release_memory, a full gc.collect():
    right on a GPU, where a step dwarfs it, but torch's imports leave about a million objects
    behind, so a collection takes ~0.25 s here. Freezing what exists now (gc.freeze) keeps
    everything the tests create collectable (leak checks rely on that) and the suite fast."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # its lazy imports first
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
