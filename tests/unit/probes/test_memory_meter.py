"""The CPU memory meter on a scripted resident set: what each probe reading counts."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from batchscope import device as devices
from batchscope.errors import UsageError
from batchscope.probes.memory_runner import DeviceMemoryMeter, tensor_bytes


class ScriptedResidentSet:
    """A process's resident set (anonymous memory plus library pages) and its high-water mark,
    moved by hand."""

    def __init__(self, anonymous: int, library: int) -> None:
        self.anonymous, self.library = anonymous, library
        self.high_water = self.resident

    @property
    def resident(self) -> int:
        return self.anonymous + self.library

    def grow(self, amount: int) -> None:
        self.anonymous += amount
        self.high_water = max(self.high_water, self.resident)

    def step(self, transient: int, left_behind: int = 0, pages_in: int = 0) -> None:
        """A training step: library pages mapped first, `transient` more memory at its peak,
        `left_behind` of it still resident after."""
        self.library += pages_in
        self.grow(transient)
        self.anonymous -= transient - left_behind


@pytest.fixture
def process(monkeypatch) -> ScriptedResidentSet:
    rss = ScriptedResidentSet(anonymous=1000, library=300)

    def reset(device: torch.device) -> None:
        rss.high_water = rss.resident

    monkeypatch.setattr(devices, "reset_peak_memory", reset)
    monkeypatch.setattr(devices, "current_memory_bytes", lambda device: rss.resident)
    monkeypatch.setattr(devices, "peak_memory_bytes", lambda device: rss.high_water)
    monkeypatch.setattr(devices, "library_pages_bytes", lambda device: rss.library)
    return rss


def cpu_meter() -> DeviceMemoryMeter:
    return DeviceMemoryMeter(torch.device("cpu"), relative=True)


def test_a_probe_counts_the_model_its_step_and_what_stayed_but_not_library_pages(process):
    meter = cpu_meter()
    try:
        process.grow(40)                       # the model is built: it holds 40
        before_snapshot = process.resident
        process.grow(15)                       # batchscope's snapshot of it: not the workload's
        process.step(30, left_behind=5, pages_in=9)  # the warm-up: a thread pool, kernels
        meter.settle(excluding_growth_since=before_snapshot, model_bytes=40)

        meter.reset()
        process.step(50, left_behind=8, pages_in=6)  # first step at this shape
        assert meter.peak_bytes() == 40 + 50
        meter.reset()
        process.step(50)
        # The 8 the last probe kept (a workspace as large as its batch) count, as an
        # accelerator's allocator would count them; the 6 of library pages do not.
        assert meter.peak_bytes() == 40 + 8 + 50
    finally:
        meter.close()


def test_a_model_resident_before_the_meter_counts_in_full(process):
    meter = cpu_meter()  # the user's own model (Workload.from_objects) exists already
    try:
        before = process.resident
        meter.settle(excluding_growth_since=before, model_bytes=64)
        meter.reset()
        process.step(20)
        assert meter.peak_bytes() == 64 + 20
    finally:
        meter.close()


def test_one_cpu_measurement_at_a_time(process):
    first = cpu_meter()
    try:
        errors: list[BaseException] = []

        def second() -> None:
            try:
                cpu_meter()
            except UsageError as error:
                errors.append(error)

        other = threading.Thread(target=second)
        other.start()
        other.join()
        assert len(errors) == 1 and "isolate=True" in str(errors[0])
    finally:
        first.close()
    cpu_meter().close()  # free again once the first gave its claim back


def test_an_accelerator_meter_reads_its_counter_as_it_is(process):
    absolute = DeviceMemoryMeter(torch.device("cpu"), relative=False)
    absolute.settle(excluding_growth_since=0, model_bytes=10**9)  # nothing to settle
    absolute.reset()
    process.step(7, pages_in=3)
    assert absolute.peak_bytes() == process.high_water
    absolute.close()


def test_tied_weights_count_once():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head, nn.BatchNorm1d(10))
    # 40 shared floats, BatchNorm's weight, bias, running mean and var (10 each) and its count.
    assert tensor_bytes(model) == 40 * 4 + 4 * 10 * 4 + 8


def test_a_meter_never_closed_gives_its_claim_back_when_collected(process):
    abandoned = cpu_meter()
    del abandoned  # a runner dropped without close(): nothing else refers to its meter
    cpu_meter().close()


def test_tensors_without_a_plain_storage_count_their_elements():
    sparse = nn.Linear(3, 3)
    sparse.weight = nn.Parameter(torch.eye(3).to_sparse())  # no untyped_storage for sparse
    lazy = nn.LazyLinear(4)  # uninitialised until its first forward: nothing to count yet
    model = nn.Sequential(sparse, lazy)
    # The sparse weight by its elements (9 floats, as numel counts them) and the dense bias.
    assert tensor_bytes(model) == 9 * 4 + 3 * 4
