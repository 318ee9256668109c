"""The one module that knows the differences between cuda, mps, xpu and cpu.

Everything else asks here: resolve a device name, synchronise before reading a clock, reset and
read the peak memory of a region, know the total memory, and hand freed memory back.

On CPU there is no allocator with statistics, so peak memory is the process's resident-set
high-water mark (Linux `VmHWM`), which the kernel lets us reset through `/proc/self/clear_refs`.
That is real memory, measured by the OS, which makes a CPU memory budget meaningful and testable.

The resident set only measures a step if glibc's allocator hands freed buffers back and has
no holes to reuse: `reset_peak_memory` on CPU opens a window that sees to both, and
`release_peak_windows` puts the allocator back to full speed (see `batchscope.cpu_heap`, which also
says what each setting cost and measured). Only the memory probe opens CPU windows;
`release_memory` changes no setting.
"""

from __future__ import annotations

import gc
import os
import platform
from functools import lru_cache

import torch

from batchscope import cpu_heap
from batchscope.errors import UsageError

_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"


def local_device(name: str | torch.device | None, local_rank: int) -> torch.device:
    """This process's device in a job with one process per device: `name` resolved, and an
    accelerator without an index becomes the one numbered `local_rank` (made current, as
    collectives on it expect)."""
    device = resolve_device(name)
    if device.type in ("cuda", "xpu") and device.index is None:
        count = torch.cuda.device_count() if device.type == "cuda" else torch.xpu.device_count()
        if local_rank >= count:
            raise UsageError(f"LOCAL_RANK {local_rank} has no {device.type} device of its own (this "
                             f"host has {count}); launch at most {count} processes a host "
                             "(torchrun --nproc-per-node)")
        device = torch.device(device.type, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "xpu":
        torch.xpu.set_device(device)
    return device


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for collectives on `device`'s tensors."""
    return {"cuda": "nccl", "xpu": "xccl"}.get(device.type, "gloo")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`None`/`"auto"` picks the best available accelerator, else the CPU.

    A device that is not available is a usage error naming what is.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        for kind in ("cuda", "mps", "xpu"):
            if is_available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"device {name!r} is not a device name; use cpu, cuda, cuda:N, mps or xpu"
        ) from None
    if not is_available(device.type):
        raise UsageError(
            f"device {name!r} is not available on this machine; available: "
            f"{', '.join(available_devices())}"
        )
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def is_available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return False


def available_devices() -> list[str]:
    return [kind for kind in ("cpu", "cuda", "mps", "xpu") if is_available(kind)]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read after this covers the work before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Return cached blocks to the driver/OS so the next measurement starts clean (on CPU,
    `malloc_trim`; no allocator setting is changed)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    elif device.type == "xpu":
        torch.xpu.empty_cache()
    else:
        cpu_heap.trim()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window.

    On CPU (glibc) this also sets the allocator up until `release_peak_windows`, so that freed
    buffers leave the resident set and no heap hole serves a large one (`batchscope.cpu_heap`):
    otherwise memory the step already gave back counts in its peak. Only the memory probe
    opens CPU windows.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu":
        torch.xpu.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        cpu_heap.open_window()
        _reset_rss_peak()


def claim_peak_windows(device: torch.device) -> bool:
    """Whether the caller may open peak windows on `device` now. On CPU the resident set and
    the allocator's settings are the whole process's, so one measurement at a time holds the
    claim until `release_peak_windows`; an accelerator's counters need no claim."""
    return cpu_heap.claim_windows() if device.type == "cpu" else True


def release_peak_windows(device: torch.device) -> None:
    """After the last window: on CPU, free what held the heap's holes, put malloc's thresholds
    where its dynamic rule would settle in a long-running process, and give the claim back;
    elsewhere nothing."""
    if device.type == "cpu":
        cpu_heap.release_windows()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_peak_memory` (allocated by the framework on
    accelerators; resident set of the process on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xpu":
        return int(torch.xpu.max_memory_allocated(device))
    if device.type == "mps":
        # MPS keeps no peak counter; the driver's current allocation is the closest reading.
        return int(torch.mps.driver_allocated_memory())
    return _read_status_kib("VmHWM") * 1024


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now (the baseline a peak is compared with)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "xpu":
        return int(torch.xpu.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    return _read_status_kib("VmRSS") * 1024


def library_pages_bytes(device: torch.device) -> int:
    """Of `current_memory_bytes` on CPU, the file-backed pages (shared libraries' code and data,
    memory-mapped files): the OS can drop and re-read them, and any process running the same
    code holds them whatever its batch. 0 on accelerators, whose counters hold tensors only."""
    if device.type == "cpu":
        return _read_status_kib("RssFile") * 1024
    return 0


def total_memory_bytes(device: torch.device) -> int:
    """The device's capacity (physical RAM on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "xpu":
        return int(torch.xpu.get_device_properties(device).total_memory)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xpu":
        return torch.xpu.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return platform.processor() or platform.machine() or "cpu"


def supports_peak_reset(device: torch.device) -> bool:
    """Whether `peak_memory_bytes` can be scoped to a region on this device/OS."""
    if device.type == "cpu":
        return _clear_refs_works()
    return device.type in ("cuda", "xpu")


def manual_seed_device(device: torch.device, seed: int) -> None:
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)
    elif device.type == "xpu":
        torch.xpu.manual_seed(seed)


# -- CPU internals ----------------------------------------------------------------------------


def _read_status_kib(key: str) -> int:
    with open(_PROC_STATUS) as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in {_PROC_STATUS}")


@lru_cache(maxsize=1)
def _clear_refs_works() -> bool:
    try:
        _reset_rss_peak()
        _read_status_kib("VmHWM")
        return True
    except OSError:
        return False
    except RuntimeError:
        return False


def _reset_rss_peak() -> None:
    # Writing "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open(_PROC_CLEAR_REFS, "w") as clear_refs:
        clear_refs.write("5")
