"""Out-of-memory classification, and running a step so that an OOM becomes a result.

A memory probe must tell "this batch does not fit" apart from "the user's code is broken": the
first is an answer, the second must reach the user untouched. Every backend words its OOM
differently, and frameworks often wrap it (`raise WorkloadError(...) from oom`), so
classification looks at the typed exceptions, then at the exact wording each allocator emits,
along the whole `__cause__` / `__context__` chain.

Choices worth knowing:
- Matching is case-sensitive on the allocators' own wording, never on a bare "out of memory", so
  a user's `ValueError("ran out of memory budget")` is not mistaken for an OOM.
- cuDNN: `CUDNN_STATUS_ALLOC_FAILED` (cuDNN <= 8) and cuDNN 9's
  `CUDNN_STATUS_INTERNAL_ERROR_{HOST,DEVICE}_ALLOCATION_FAILED` are allocation failures. A bare
  `CUDNN_STATUS_INTERNAL_ERROR`, `CUDNN_STATUS_NOT_SUPPORTED` ("non-contiguous input", also
  seen with batches over 2**31 elements) and "Unable to find a valid cuDNN algorithm" are NOT
  classified as OOM: each is also raised for real bugs, and calling a bug "does not fit" would
  silently shrink the recommended batch instead of showing the error.
- `raise X from None` hides the context on purpose; like the traceback printer, we do not look
  behind it. `__cause__` is always followed.
- KeyboardInterrupt, SystemExit and GeneratorExit are never OOMs, and the walk does not pass
  through them: an interrupt that happened while handling an OOM is still an interrupt.
- Exception groups are not searched: one OOM among several failures is not "did not fit".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from batchscope import device as _device

T = TypeVar("T")

# Substrings of the messages each backend emits for an allocation failure.
OOM_MARKERS: tuple[str, ...] = (
    # CUDA caching allocator (torch.OutOfMemoryError): "CUDA out of memory. Tried to allocate ..."
    "CUDA out of memory.",
    # A failed cudaMalloc/cudaMemcpy surfaced by C10_CUDA_CHECK: "CUDA error: out of memory\n..."
    "CUDA error: out of memory",
    # The driver API (cuMemAlloc, as used by Triton and NVRTC kernels).
    "CUDA_ERROR_OUT_OF_MEMORY",
    # CUDA libraries that allocate their own workspace or handles.
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUBLASLT_STATUS_ALLOC_FAILED",
    "CUSOLVER_STATUS_ALLOC_FAILED",
    "CUSPARSE_STATUS_ALLOC_FAILED",
    "CUFFT_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    # ROCm builds are hipified: the caching allocator says "HIP out of memory. Tried to ...".
    "HIP out of memory.",
    "HIP error: out of memory",
    "hipErrorOutOfMemory",
    "HIPBLAS_STATUS_ALLOC_FAILED",
    "rocblas_status_memory_error",
    "miopenStatusAllocFailed",
    # Apple: "MPS backend out of memory (MPS allocated: ..., max allowed: ...)".
    "MPS backend out of memory",
    # Intel: the XPU caching allocator, and the Unified Runtime / Level Zero result codes.
    "XPU out of memory.",
    "UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
    "UR_RESULT_ERROR_OUT_OF_HOST_MEMORY",
    "ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY",
    # CPU allocator: Linux/macOS "[enforce fail at alloc_cpu.cpp:127] err == 0.
    # DefaultCPUAllocator: can't allocate memory: ...", Windows "... not enough memory: ...".
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)

# torch.cuda.OutOfMemoryError (torch >= 1.13) became torch.OutOfMemoryError, shared by every
# caching allocator, in torch 2.5; the CUDA name stays an alias of it.
_TYPED_OOMS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    torch.cuda.OutOfMemoryError,
    MemoryError,  # Python's own, and numpy's _ArrayMemoryError subclass
)

_MAX_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What `run_catching_oom` saw: the function's value, or an OOM and its one-line summary."""

    value: T | None
    oom: bool
    message: str | None = None


def is_oom(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or during, is an out-of-memory error."""
    return _find_oom(exc) is not None


def oom_message(exc: BaseException) -> str:
    """One line naming the OOM in `exc`'s chain (or `exc` itself when there is none), e.g.
    `"OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ..."`,
    cut at a word boundary near 300 characters."""
    culprit = _find_oom(exc) or exc
    # The first line carries the facts ("Tried to allocate ..."); later lines of driver errors
    # are generic debugging advice (CUDA_LAUNCH_BLOCKING=1 ...).
    lines = [line for line in _text(culprit).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if len(text) > _MAX_MESSAGE_CHARS:
        cut = text.rfind(" ", 0, _MAX_MESSAGE_CHARS)
        text = text[: cut if cut > 0 else _MAX_MESSAGE_CHARS] + " ..."
    name = type(culprit).__name__
    return f"{name}: {text}" if text else name


def run_catching_oom(fn: Callable[[], T], device: torch.device | str) -> Outcome[T]:
    """Call `fn()`. An OOM becomes `Outcome(oom=True)` after the memory it held is released;
    any other exception propagates as the same object with its traceback."""
    device = torch.device(device)
    try:
        return Outcome(value=fn(), oom=False)
    except Exception as exc:  # KeyboardInterrupt & co. are BaseException: never caught here
        if not is_oom(exc):
            raise
        message = oom_message(exc)
    # Only here, after the except block, has Python dropped `exc` and sys.exc_info(): until then
    # the traceback keeps every frame of `fn` alive, and with it the tensors of the failed step.
    # Frames that reference their own exception form cycles, hence the collection before the
    # allocator hands its cache back (release_memory collects garbage first).
    _device.release_memory(device)
    return Outcome(value=None, oom=True, message=message)


def _find_oom(exc: BaseException) -> BaseException | None:
    for link in _chain(exc):
        if isinstance(link, _TYPED_OOMS):
            return link
        text = _text(link)
        if any(marker in text for marker in OOM_MARKERS):
            return link
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception reachable through `__cause__` and (unsuppressed)
    `__context__`, each once, stopping at interrupts."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        link = pending.pop()
        if id(link) in seen or not isinstance(link, Exception):
            continue
        seen.add(id(link))
        yield link
        if link.__context__ is not None and not link.__suppress_context__:
            pending.append(link.__context__)
        if link.__cause__ is not None:
            pending.append(link.__cause__)  # popped first: the explicit cause is the likelier OOM


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ in user code must not turn into a different error
        return ""
