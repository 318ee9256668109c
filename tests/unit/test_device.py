"""device.py: resolution errors and real CPU peak-memory measurement."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
import torch

from batchscope import cpu_heap
from batchscope import device as devices
from batchscope.errors import UsageError


def test_auto_resolves_to_an_available_device():
    assert devices.resolve_device(None).type in devices.available_devices()
    assert devices.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_unavailable_device_names_what_is_available():
    with pytest.raises(UsageError, match=r"device 'cuda' is not available on this machine; available: cpu"):
        devices.resolve_device("cuda")


def test_garbage_device_name_is_a_usage_error():
    with pytest.raises(UsageError, match="'gpu0' is not a device name"):
        devices.resolve_device("gpu0")


@pytest.mark.skipif(not devices.supports_peak_reset(torch.device("cpu")), reason="needs Linux clear_refs")
def test_cpu_peak_memory_sees_a_real_allocation_and_resets():
    cpu = torch.device("cpu")
    size = 256 * 1024 * 1024
    devices.release_memory(cpu)
    devices.reset_peak_memory(cpu)
    baseline = devices.peak_memory_bytes(cpu)
    block = torch.ones(size // 4, dtype=torch.float32)  # touch every page so it is resident
    peak_with_block = devices.peak_memory_bytes(cpu)
    del block
    devices.release_memory(cpu)
    devices.reset_peak_memory(cpu)
    peak_after_reset = devices.peak_memory_bytes(cpu)
    cpu_heap.close_windows()
    assert peak_with_block - baseline >= 0.95 * size
    # After the block is freed and the window reset, the peak no longer includes it.
    assert peak_after_reset < peak_with_block - 0.9 * size


class RecordingLibc:
    """Stands in for glibc behind ctypes: records the allocator calls batchscope makes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    """Every libc handle batchscope loads while the test runs is a RecordingLibc; the real
    handle is loaded afresh afterwards. Windows an earlier test left open are closed first, so
    that no block the real allocator gave is handed to the fake."""
    cpu_heap.close_windows()
    libc = RecordingLibc()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    cpu_heap._libc.cache_clear()
    yield libc
    cpu_heap._libc.cache_clear()


def test_release_memory_trims_but_changes_no_malloc_setting(fake_libc):
    devices.release_memory(torch.device("cpu"))
    devices.release_memory(torch.device("cpu"))
    assert fake_libc.calls == [("malloc_trim", 0), ("malloc_trim", 0)]


@pytest.mark.skipif(not devices.supports_peak_reset(torch.device("cpu")), reason="needs Linux clear_refs")
def test_opening_a_cpu_peak_window_fixes_the_mmap_threshold(fake_libc):
    devices.reset_peak_memory(torch.device("cpu"))
    m_mmap_threshold = -3  # glibc <malloc.h>
    assert fake_libc.calls == [("mallopt", m_mmap_threshold, 256 * 1024), ("malloc_trim", 0)]


def test_ending_the_peak_windows_sets_glibcs_dynamic_ceiling(fake_libc):
    cpu_heap.close_windows()
    assert fake_libc.calls == [("mallopt", -3, 32 * 2**20), ("mallopt", -1, 64 * 2**20)]
