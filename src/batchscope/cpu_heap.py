"""glibc's malloc, set up so that the resident set measures what a CPU step holds.

On CPU the memory probe reads real memory: the process's resident-set high-water mark (see
`batchscope.device`). Two habits of glibc's allocator make that mark say more than the step
ever held at once, and a probe window (`open_window` ... `close_windows`) undoes both:

1. **The dynamic mmap threshold.** glibc raises its mmap threshold each time a large mmapped
   block is freed; freed tensors then stay in the heap, and the next probe's peak includes
   memory the previous one gave back. A window fixes the threshold at 256 KiB, so every large
   buffer gets its own mapping, handed back to the OS on free. There is no way to read the old
   setting back or to turn the dynamic rule on again, and leaving 256 KiB in place cost later
   training steps of a small CNN 10-17% on the 2-core CI box (every activation mmapped and
   faulted in afresh). So `close_windows` sets the threshold where glibc's own rule tops out
   (32 MiB on 64-bit, trim threshold twice that), which measured as fast as a process that never
   probed.
2. **Free chunks in the heap.** glibc serves a request from a free chunk of its heap before it
   considers mmap at all, whatever the threshold. A process that has run for a while (loaded
   data, trained, run a test suite) has holes of many MiB in its heap, whose pages
   `malloc_trim` gave back. A tensor placed in a hole faults its pages in, and when it is freed
   they stay resident (only munmap or a trim gives them back): within one step a freed
   activation still counts while the next one is mapped afresh. Measured on the CI box, in a
   test process that had loaded CIFAR-10: a tiny conv net's step at batch 100 read 28 to 49 MiB
   over 15 identical probes (in quanta of one 6.4 MiB activation); with the holes occupied it
   read 20.8 MiB every time. A window therefore allocates, without touching, every free chunk
   of at least the threshold in the calling thread's arena (where the probe's tensors are
   allocated), so large buffers can only be mmapped. The occupying blocks cost address space,
   not memory (malloc writes one header page per block); `close_windows` frees them.

The resident set, the settings and the occupying blocks belong to the whole process, so only one
thread at a time may measure: `claim_windows` says whether this one may.

Elsewhere than glibc (musl, macOS) there is nothing to set, and every function here does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from functools import lru_cache

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
WINDOW_MMAP_THRESHOLD_BYTES = 256 * 1024
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its dynamic threshold stops rising.
AFTER_WINDOWS_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
MAX_OCCUPYING_BLOCKS = 10_000
"""A bound on the loop, not a limit met in practice (a few dozen blocks in a test process)."""
_IS_MMAPPED = 0x2
"""The bit glibc sets in a chunk's size field (the word before the pointer malloc returns) when
the chunk has a mapping of its own: stable in malloc.c's chunk layout since glibc 2.0."""

_occupying: list[int] = []
_occupying_lock = threading.Lock()
_windows_claim = threading.Lock()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)  # a handle of our own: the prototypes set below are ours alone
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):  # not glibc (musl, macOS): nothing to tune or trim
        return None
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33; occupying the holes needs it
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
    return libc


def trim() -> None:
    """Hand the heap's free pages back to the OS (no setting changes)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def open_window() -> None:
    """Before a peak reading: the threshold fixed, free pages handed back, the holes occupied.
    Idempotent, so repeating it per window also catches holes the last probe left."""
    libc = _libc()
    if libc is None:
        return
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, WINDOW_MMAP_THRESHOLD_BYTES)
    libc.malloc_trim(0)
    if hasattr(libc, "mallinfo2"):
        _occupy_free_chunks(libc)


def close_windows() -> None:
    """After the last window: the occupying blocks freed, and the thresholds where glibc's
    dynamic rule would settle in a long-running process."""
    libc = _libc()
    if libc is None:
        return
    with _occupying_lock:
        while _occupying:
            libc.free(_occupying.pop())
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, AFTER_WINDOWS_MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * AFTER_WINDOWS_MMAP_THRESHOLD_BYTES)


def claim_windows() -> bool:
    """Whether this caller may open CPU peak windows now: True at most once until
    `release_windows`, for the one measurement allowed in the process at a time."""
    return _windows_claim.acquire(blocking=False)


def release_windows() -> None:
    """Close the windows (see `close_windows`) and let another measurement claim them."""
    try:
        close_windows()
    finally:
        if _windows_claim.locked():
            _windows_claim.release()


def occupied_blocks() -> int:
    """How many blocks hold heap holes now (0 outside windows)."""
    return len(_occupying)


def _occupy_free_chunks(libc: ctypes.CDLL,
                        is_mmapped: Callable[[int], bool] | None = None) -> None:
    # mallinfo2 does not list the holes, only their total (`fordblks`), so the sizes are found
    # by asking, from the total down: a block that came from a hole is kept and the same size
    # asked again; an mmapped one (no hole that large) is freed at once and half the size asked
    # next. Requests below the threshold are left alone: the heap serves those in any case.
    # mallinfo2 walks every free chunk (8 ms with half a million of them), so it is read once;
    # where a block came from is in its own header.
    is_mmapped = is_mmapped or _is_mmapped
    size = 1 << max(0, int(libc.mallinfo2().fordblks)).bit_length()
    with _occupying_lock:
        while size >= WINDOW_MMAP_THRESHOLD_BYTES and len(_occupying) < MAX_OCCUPYING_BLOCKS:
            block = libc.malloc(size)
            if block and not is_mmapped(block):
                _occupying.append(block)
                continue
            if block:
                libc.free(block)
            size //= 2


def _is_mmapped(block: int) -> bool:
    return bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
                & _IS_MMAPPED)
