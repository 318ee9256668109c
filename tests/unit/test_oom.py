"""OOM classification against the wording the allocators really emit, and run_catching_oom's
promises: OOM becomes a result after memory is released, everything else propagates untouched."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import traceback
import weakref

import numpy as np
import pytest
import torch

import batchscope.device
from batchscope.oom import Outcome, is_oom, oom_message, run_catching_oom

# Copied from what torch (c10 caching allocators, C10_CUDA_CHECK, cuBLAS/cuDNN checks, the MPS
# heap allocator, alloc_cpu.cpp) and the Intel runtime print.
CUDA_CACHING_ALLOCATOR = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB "
    "of which 3.81 MiB is free. Including non-PyTorch memory, this process has 79.14 GiB memory "
    "in use. Of the allocated memory 78.50 GiB is allocated by PyTorch, and 155.02 MiB is "
    "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try "
    "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
    "documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
CUDA_CACHING_ALLOCATOR_PRE_2_1 = (
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity; 13.32 GiB "
    "already allocated; 1.21 GiB free; 13.46 GiB reserved in total by PyTorch) If reserved "
    "memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.  See "
    "documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
)
CUDA_DRIVER = (
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some "
    "other API call, so the stacktrace below might be incorrect.\nFor debugging consider "
    "passing CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side "
    "assertions.\n"
)
CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN_8 = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
CUDNN_9 = "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"
HIP_CACHING_ALLOCATOR = (
    "HIP out of memory. Tried to allocate 512.00 MiB. GPU 0 has a total capacity of 63.98 GiB "
    "of which 0 bytes is free. Of the allocated memory 63.05 GiB is allocated by PyTorch, and "
    "441.96 MiB is reserved by PyTorch but unallocated."
)
HIP_DRIVER = (
    "HIP error: out of memory\nHIP kernel errors might be asynchronously reported at some other "
    "API call, so the stacktrace below might be incorrect.\nFor debugging consider passing "
    "AMD_SERIALIZE_KERNEL=3\nCompile with `TORCH_USE_HIP_DSA` to enable device-side assertions.\n"
)
HIP_ERROR_CODE = "hipMalloc(&ptr, size) failed: hipErrorOutOfMemory"
MPS = (
    "MPS backend out of memory (MPS allocated: 17.36 GB, other allocations: 613.56 MB, max "
    "allowed: 18.13 GB). Tried to allocate 192.00 MB on private pool. Use "
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations (may "
    "cause system failure)."
)
XPU_CACHING_ALLOCATOR = (
    "XPU out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 11.93 GiB of "
    "which 5.62 MiB is free. Of the allocated memory 10.43 GiB is allocated by PyTorch, and "
    "94.57 MiB is reserved by PyTorch but unallocated."
)
XPU_RUNTIME = "Native API failed. Native API returns: 39 (UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)"
CPU_LINUX = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)"
)
CPU_WINDOWS = (
    "[enforce fail at alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried "
    "to allocate 1073741824 bytes."
)

OOM_MESSAGES = [
    CUDA_CACHING_ALLOCATOR,
    CUDA_CACHING_ALLOCATOR_PRE_2_1,
    CUDA_DRIVER,
    CUBLAS,
    CUDNN_8,
    CUDNN_9,
    HIP_CACHING_ALLOCATOR,
    HIP_DRIVER,
    HIP_ERROR_CODE,
    MPS,
    XPU_CACHING_ALLOCATOR,
    XPU_RUNTIME,
    CPU_LINUX,
    CPU_WINDOWS,
]

NOT_OOM_MESSAGES = [
    "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
    "asynchronously reported at some other API call, so the stacktrace below might be incorrect.",
    "CUDA error: device-side assert triggered",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
    "non-contiguous input.",
    "Unable to find a valid cuDNN algorithm to run convolution",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, "
    "n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`",
    "HIP error: invalid device function",
    "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64. "
    "Please use float32 instead.",
    "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!",
    "ran out of memory budget for the cache",  # a user's own words are not an allocator's
    "",
]


def _raise(exc: BaseException) -> None:
    raise exc


def _caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the tests inspect whatever was raised
        return exc
    raise AssertionError("expected an exception")


@pytest.mark.parametrize("message", OOM_MESSAGES)
def test_every_backend_wording_is_an_oom_even_as_a_plain_runtime_error(message):
    assert is_oom(RuntimeError(message))


@pytest.mark.parametrize("message", NOT_OOM_MESSAGES)
def test_other_errors_with_similar_words_are_not_ooms(message):
    assert not is_oom(RuntimeError(message))


def test_typed_errors_are_ooms_whatever_their_message():
    assert is_oom(torch.OutOfMemoryError("anything"))
    assert is_oom(torch.cuda.OutOfMemoryError())
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("anything"))


def test_real_allocation_failures_raised_by_torch_and_numpy_in_process():
    # 2**60 bytes can never be mapped, so both allocators fail at once without touching memory.
    torch_error = _caught(lambda: torch.empty(2**60, dtype=torch.uint8))
    numpy_error = _caught(lambda: np.empty(2**60, dtype=np.uint8))
    shape_error = _caught(lambda: torch.ones(4, 3) @ torch.ones(4, 5))
    assert type(torch_error) is RuntimeError and "DefaultCPUAllocator" in str(torch_error)
    assert is_oom(torch_error)
    assert is_oom(numpy_error)
    assert not is_oom(shape_error)


def test_oom_wrapped_with_raise_from_is_found():
    def wrapped():
        try:
            _raise(torch.OutOfMemoryError(CUDA_CACHING_ALLOCATOR))
        except torch.OutOfMemoryError as oom:
            raise RuntimeError("step 3 of the training loop failed") from oom

    assert is_oom(_caught(wrapped))


def test_oom_as_context_of_an_error_raised_while_handling_it_is_found():
    def handler_fails():
        try:
            _raise(RuntimeError(CUDA_DRIVER))
        except RuntimeError:
            raise ValueError("cleanup failed")  # noqa: B904 - an implicit context on purpose

    exc = _caught(handler_fails)
    assert exc.__cause__ is None and isinstance(exc.__context__, RuntimeError)
    assert is_oom(exc)


def test_oom_deep_in_a_chain_is_found_and_context_hidden_by_from_none_is_not():
    deep = ValueError("outer")
    middle = KeyError("middle")
    deep.__cause__ = middle
    middle.__context__ = RuntimeError(CUBLAS)
    assert is_oom(deep)

    hidden = ValueError("replaced on purpose")
    hidden.__context__ = RuntimeError(CUBLAS)
    hidden.__suppress_context__ = True  # what `raise ValueError(...) from None` sets
    assert not is_oom(hidden)


def test_cyclic_chains_terminate():
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not is_oom(first)
    third = RuntimeError(MPS)
    second.__cause__ = third
    third.__context__ = first
    assert is_oom(first)


def test_keyboard_interrupt_is_never_an_oom_even_during_oom_handling():
    interrupt = KeyboardInterrupt()
    interrupt.__context__ = torch.OutOfMemoryError(CUDA_CACHING_ALLOCATOR)
    assert not is_oom(interrupt)
    wrapper = RuntimeError("while stopping")
    wrapper.__context__ = interrupt
    assert not is_oom(wrapper)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_catching_oom(interrupted, "cpu")


def test_oom_message_is_the_first_line_of_the_oom_link_with_its_type():
    assert oom_message(RuntimeError(CUDA_DRIVER)) == "RuntimeError: CUDA error: out of memory"
    assert oom_message(MemoryError()) == "MemoryError"

    wrapper = RuntimeError("step failed")
    wrapper.__cause__ = torch.OutOfMemoryError(CPU_WINDOWS)
    assert oom_message(wrapper) == f"OutOfMemoryError: {CPU_WINDOWS}"

    long = oom_message(torch.OutOfMemoryError(CUDA_CACHING_ALLOCATOR))
    assert long.startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB.")
    assert long.endswith(" ...") and "\n" not in long and "  " not in long
    assert len(long) <= len("OutOfMemoryError: ") + 300 + len(" ...")
    assert oom_message(ValueError("bad\nthing")) == "ValueError: bad"


def test_success_returns_the_value_and_releases_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(batchscope.device, "release_memory", calls.append)
    assert run_catching_oom(lambda: 42, "cpu") == Outcome(value=42, oom=False, message=None)
    assert calls == []


def test_oom_is_reported_and_memory_released_after_the_except_block(monkeypatch):
    seen = []

    def spy(device):
        seen.append((device, sys.exc_info()))

    monkeypatch.setattr(batchscope.device, "release_memory", spy)
    outcome = run_catching_oom(lambda: _raise(RuntimeError(CUDA_CACHING_ALLOCATOR)), "cpu")
    assert outcome.oom and outcome.value is None
    assert outcome.message == oom_message(RuntimeError(CUDA_CACHING_ALLOCATOR))
    # No exception being handled any more when memory is released: the traceback is gone.
    assert seen == [(torch.device("cpu"), (None, None, None))]


def test_non_oom_error_propagates_as_the_same_object_with_its_traceback(monkeypatch):
    calls = []
    monkeypatch.setattr(batchscope.device, "release_memory", calls.append)
    original = ValueError("a bug in the user's loss")

    def users_step():
        raise original

    with pytest.raises(ValueError) as info:
        run_catching_oom(users_step, "cpu")
    assert info.value is original
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "users_step" and "run_catching_oom" in frames
    assert calls == []


def _step_that_pins_a_tensor_in_a_cycle(refs: list) -> None:
    activations = torch.ones(256, 256)
    refs.append(weakref.ref(activations))
    try:
        raise torch.OutOfMemoryError(CUDA_CACHING_ALLOCATOR)
    except torch.OutOfMemoryError as exc:
        # frame -> `kept` -> exception -> traceback -> frame: only the collector can free it.
        kept = exc  # noqa: F841
        raise


@pytest.fixture
def no_automatic_gc():
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def test_tensors_of_the_failed_step_are_freed_when_it_returns(no_automatic_gc):
    refs: list = []
    outcome = run_catching_oom(lambda: _step_that_pins_a_tensor_in_a_cycle(refs), "cpu")
    assert outcome.oom
    assert refs[0]() is None


def test_without_the_release_the_failed_steps_tensor_would_survive(no_automatic_gc, monkeypatch):
    # The control for the test above: the cycle really pins the tensor.
    monkeypatch.setattr(batchscope.device, "release_memory", lambda device: None)
    refs: list = []
    assert run_catching_oom(lambda: _step_that_pins_a_tensor_in_a_cycle(refs), "cpu").oom
    assert refs[0]() is not None
    gc.collect()
    assert refs[0]() is None


REAL_CPU_OOM = textwrap.dedent(
    """
    import json, re, resource
    import torch
    from batchscope.oom import run_catching_oom

    with open("/proc/self/status") as status:
        used = int(re.search(r"VmSize:\\s+(\\d+)", status.read()).group(1)) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + 512 * 2**20, hard))

    too_big = run_catching_oom(lambda: torch.empty(4 * 2**30, dtype=torch.uint8), "cpu")
    small = run_catching_oom(lambda: torch.ones(1024, 1024).sum().item(), "cpu")
    print(json.dumps({"too_big": [too_big.oom, too_big.message],
                      "small": [small.oom, small.value]}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, uses RLIMIT_AS")
def test_a_real_cpu_oom_under_an_address_space_limit_is_survived():
    result = subprocess.run(
        [sys.executable, "-c", REAL_CPU_OOM], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["too_big"][0] is True
    assert "DefaultCPUAllocator: can't allocate memory" in report["too_big"][1]
    assert report["small"] == [False, 1024.0 * 1024.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_oom_is_caught_and_what_the_step_held_is_returned_to_the_driver():
    device = torch.device("cuda")
    torch.cuda.synchronize(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    capacity = torch.cuda.get_device_properties(device).total_memory

    def step():
        held = torch.empty(capacity // 4, dtype=torch.uint8, device=device)  # fits
        try:
            torch.empty(capacity * 2, dtype=torch.uint8, device=device)  # never fits
        except torch.OutOfMemoryError as exc:
            kept = exc  # noqa: F841 - a frame/exception cycle, as real code makes
            raise
        return held

    outcome = run_catching_oom(step, device)
    assert outcome.oom and outcome.message.startswith("OutOfMemoryError: CUDA out of memory.")
    assert torch.cuda.memory_allocated(device) == allocated
    assert torch.cuda.memory_reserved(device) < reserved + capacity // 8
    assert torch.ones(1024, device=device).sum().item() == 1024.0
