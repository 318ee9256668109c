"""The CPU memory meter on a scripted resident set: what each probe reading counts."""

from __future__ import annotations

import pytest
import torch

from batchscope import device as devices
from batchscope.probes.memory_runner import DeviceMemoryMeter


class ScriptedResidentSet:
    """A process's resident set and its high-water mark, moved by hand."""

    def __init__(self, resident: int) -> None:
        self.resident = self.high_water = resident

    def grow(self, amount: int) -> None:
        self.resident += amount
        self.high_water = max(self.high_water, self.resident)

    def step(self, transient: int, left_behind: int = 0) -> None:
        """A training step: `transient` more at its peak, `left_behind` still resident after."""
        self.grow(transient)
        self.resident -= transient - left_behind


@pytest.fixture
def process(monkeypatch) -> ScriptedResidentSet:
    rss = ScriptedResidentSet(1000)

    def reset(device: torch.device) -> None:
        rss.high_water = rss.resident

    monkeypatch.setattr(devices, "reset_peak_memory", reset)
    monkeypatch.setattr(devices, "current_memory_bytes", lambda device: rss.resident)
    monkeypatch.setattr(devices, "peak_memory_bytes", lambda device: rss.high_water)
    return rss


def test_each_probe_counts_the_model_and_its_own_window_only(process):
    meter = DeviceMemoryMeter(torch.device("cpu"), relative=True)
    process.grow(40)                      # the model is built: it holds 40
    before_snapshot = process.resident
    process.grow(15)                      # batchscope's snapshot of it: not the workload's
    process.step(30, left_behind=5)       # the warm-up step leaves 5 behind (kernel caches)
    meter.settle(excluding_growth_since=before_snapshot)
    assert meter.held_bytes == 40

    meter.reset()
    process.step(50, left_behind=8)       # first step at this shape: library pages, caches
    assert meter.peak_bytes() == 40 + 50
    meter.reset()
    process.step(50)
    # From the baseline it would read 98: the 8 the last probe left counted again.
    assert meter.peak_bytes() == 40 + 50
    meter.reset()
    process.step(20)
    assert meter.peak_bytes() == 40 + 20


def test_an_unsettled_or_accelerator_meter_reads_from_its_baseline(process):
    relative = DeviceMemoryMeter(torch.device("cpu"), relative=True)
    process.grow(40)
    relative.reset()
    process.step(50, left_behind=8)
    assert relative.held_bytes is None and relative.peak_bytes() == 90
    absolute = DeviceMemoryMeter(torch.device("cpu"), relative=False)
    absolute.settle(excluding_growth_since=0)  # nothing to settle: the framework's own count
    absolute.reset()
    process.step(7)
    assert absolute.peak_bytes() == process.high_water
