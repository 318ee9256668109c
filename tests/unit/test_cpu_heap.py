"""cpu_heap.py: a CPU peak window leaves no heap hole for a large buffer to land in."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from batchscope import cpu_heap
from batchscope import device as devices

KiB, MiB = 2**10, 2**20


@dataclass
class FreeTotal:
    fordblks: int


class HeapWithHoles:
    """glibc's behaviour that matters here, with known holes: a request is served best-fit from
    a hole at least its size (the rest stays a hole), else mmapped; mallinfo2 reports only the
    total of the holes."""

    def __init__(self, holes: list[int]) -> None:
        self.holes = list(holes)
        self.blocks: dict[int, int] = {}  # address -> size taken from a hole
        self.mmapped: set[int] = set()
        self._next = 1

    def mallinfo2(self) -> FreeTotal:
        return FreeTotal(sum(self.holes))

    def malloc(self, size: int) -> int:
        address, self._next = self._next, self._next + 1
        fitting = [hole for hole in self.holes if hole >= size]
        if not fitting:
            self.mmapped.add(address)
            return address
        best = min(fitting)
        self.holes.remove(best)
        if best > size:
            self.holes.append(best - size)
        self.blocks[address] = size
        return address

    def is_mmapped(self, address: int) -> bool:
        return address in self.mmapped

    def free(self, address: int) -> None:
        if address in self.mmapped:
            self.mmapped.remove(address)
        else:
            self.holes.append(self.blocks.pop(address))


@pytest.fixture
def no_open_windows():
    cpu_heap.close_windows()
    yield
    cpu_heap._occupying.clear()  # the fake's addresses: nothing to free


def test_every_hole_a_large_buffer_fits_is_occupied_and_nothing_else(no_open_windows):
    heap = HeapWithHoles([12 * MiB + 5 * KiB, 7 * MiB, 600 * KiB, 300 * KiB, 200 * KiB, 40 * KiB])
    cpu_heap._occupy_free_chunks(heap, heap.is_mmapped)  # type: ignore[arg-type]
    # What is left cannot serve a request of the threshold (256 KiB) or more...
    assert max(heap.holes) < cpu_heap.WINDOW_MMAP_THRESHOLD_BYTES
    # ...and the small holes the heap would use for small requests anyway are untouched.
    assert 200 * KiB in heap.holes and 40 * KiB in heap.holes
    # Every size tried that did not fit a hole was mmapped and handed back at once.
    assert heap.mmapped == set()
    assert sum(heap.blocks.values()) >= 12 * MiB + 7 * MiB + 600 * KiB + 300 * KiB - 3 * 256 * KiB


def test_a_heap_without_holes_is_left_alone(no_open_windows):
    heap = HeapWithHoles([100 * KiB])
    cpu_heap._occupy_free_chunks(heap, heap.is_mmapped)  # type: ignore[arg-type]
    assert heap.blocks == {} and heap.holes == [100 * KiB] and cpu_heap.occupied_blocks() == 0


# In a fresh process, so that the heap holds exactly the one hole made here.
_HOLE_SCENARIO = r"""
import torch
from batchscope import cpu_heap, device as devices

MiB = 2**20
cpu = torch.device("cpu")
libc = cpu_heap._libc()
# A phase before the probe (data loading, training) with glibc's threshold risen: 16 MiB and
# then 8 MiB from the top of the heap, the first one freed: a 16 MiB hole below the second.
libc.mallopt(cpu_heap.M_MMAP_THRESHOLD, 64 * MiB)
earlier = libc.malloc(16 * MiB)
kept_above_it = libc.malloc(8 * MiB)
libc.free(earlier)
hole_mib = libc.mallinfo2().fordblks / MiB


def step_peak_mib():
    # A 10 MiB activation, freed, then a 20 MiB one: never more than 20 MiB live at once.
    base = devices.current_memory_bytes(cpu)
    first = torch.ones(10 * MiB // 4)
    del first
    second = torch.ones(20 * MiB // 4)
    del second
    return (devices.peak_memory_bytes(cpu) - base) / MiB


# Without occupying the hole: the threshold fixed and the heap trimmed, as before.
libc.mallopt(cpu_heap.M_MMAP_THRESHOLD, cpu_heap.WINDOW_MMAP_THRESHOLD_BYTES)
libc.malloc_trim(0)
devices._reset_rss_peak()
unoccupied = step_peak_mib()

devices.reset_peak_memory(cpu)
blocks = cpu_heap.occupied_blocks()
occupied = step_peak_mib()
cpu_heap.close_windows()
print(f"{hole_mib:.2f} {unoccupied:.2f} {occupied:.2f} {blocks} {cpu_heap.occupied_blocks()} "
      f"{libc.mallinfo2().fordblks / MiB:.2f}")
"""


def _run_in_a_fresh_process(scenario: str) -> str:
    """What `scenario` prints, run by a new interpreter (a heap holding only what it made)."""
    done = subprocess.run([sys.executable, "-c", scenario], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not devices.supports_peak_reset(torch.device("cpu")) or not _has_mallinfo2(),
                    reason="needs Linux clear_refs and glibc >= 2.33")
def test_a_window_measures_the_live_peak_in_a_heap_with_a_hole():
    printed = _run_in_a_fresh_process(_HOLE_SCENARIO)
    hole, unoccupied, occupied, blocks, blocks_after, free_after = printed.split()
    assert float(hole) >= 16, printed  # the scenario made its hole
    # The 10 MiB activation landed in the hole and stayed resident after its free: 30 MiB.
    assert float(unoccupied) >= 29.5, printed
    # Occupied, both are mmapped and the first is unmapped on free: the live peak, 20 MiB.
    assert 19.5 <= float(occupied) <= 21.0, printed
    # The window held the holes with a few blocks and gave them all back when it ended.
    assert 1 <= int(blocks) <= 64 and int(blocks_after) == 0, printed
    assert float(free_after) >= 16, printed


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33")
def test_a_blocks_header_says_whether_it_has_a_mapping_of_its_own():
    libc = cpu_heap._libc()
    small, large = libc.malloc(64), libc.malloc(64 * MiB)  # glibc's threshold is <= 32 MiB
    try:
        assert not cpu_heap._is_mmapped(small) and cpu_heap._is_mmapped(large)
    finally:
        libc.free(small)
        libc.free(large)


# Run in a fresh process: in a long test session the heap already holds free chunks that glibc
# reuses before it considers mmap at all, whatever the threshold.
_HEAP_SCENARIO = r"""
import torch
import batchscope
from batchscope import cpu_heap, device as devices

libc = cpu_heap._libc()

def mmapped_while_holding_one_mebibyte():
    before = libc.mallinfo2().hblks
    held = torch.empty(2**20, dtype=torch.uint8)
    during = libc.mallinfo2().hblks
    del held
    return during - before

cpu = torch.device("cpu")
devices.reset_peak_memory(cpu)
in_window = mmapped_while_holding_one_mebibyte()
cpu_heap.close_windows()
after_window = mmapped_while_holding_one_mebibyte()
model = torch.nn.Linear(8, 2)
workload = batchscope.Workload.from_objects(
    model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, batch: m(batch).square().mean(),
    lambda size, device, generator: torch.randn(size, 8, generator=generator).to(device),
    reference_batch_size=8)
batchscope.probe_memory(workload, device="cpu", memory_budget="64MiB", max_batch_size=64)
after_probe = mmapped_while_holding_one_mebibyte()
print(in_window, after_window, after_probe)
"""


@pytest.mark.skipif(not devices.supports_peak_reset(torch.device("cpu")) or not _has_mallinfo2(),
                    reason="needs Linux clear_refs and glibc >= 2.33")
def test_after_a_cpu_memory_probe_mid_sized_buffers_come_from_the_heap_again():
    # Inside a window the 256 KiB threshold mmaps (and faults in afresh) a 1 MiB buffer; once
    # the windows end, glibc's 32 MiB ceiling serves it from the heap, as before any probing.
    # The memory probe ends its windows itself.
    assert _run_in_a_fresh_process(_HEAP_SCENARIO).split() == ["1", "0", "0"]
