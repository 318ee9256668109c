"""One memory probe: real training steps at one batch size, and their peak memory.

A probe is what the batch will meet in training: a fresh optimizer (its state is allocated by
the first step, so at least two steps run), the workload's worst-case batch, forward, backward
and optimizer step through `batchscope.step` (so autocast and channels_last are the workload's),
optionally an eval-mode forward under `no_grad`. It fits when every step completed without an
out-of-memory error and the measured peak stays within the budget. Between probes the gradients
and the optimizer are dropped and the allocator's cache released, so an OOM leaves nothing
behind that could make a later, smaller probe fail.

How memory is read is pluggable (`MemoryMeter`), so tests can drive the real probe with a fake
allocator of known behaviour. The default reads the device (`batchscope.device`): on an
accelerator the framework's peak allocation, on CPU the growth of the process's resident set
since just before the model was built (so the peak counts model, gradients, optimizer state,
activations and what the job keeps between steps, but not the interpreter, the libraries' pages
or the loaded dataset; `DeviceMemoryMeter` says exactly what).
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from batchscope import device as devices
from batchscope import step
from batchscope.errors import ProbeFailedError, UsageError
from batchscope.guard import StateGuard
from batchscope.oom import Outcome, run_catching_oom
from batchscope.units import format_bytes
from batchscope.workload import Workload

# `format_bytes` is re-exported: the CLI imports it from here (new code: batchscope.units).
__all__ = [
    "DeviceMemoryMeter",
    "InProcessRunner",
    "MemoryMeter",
    "MemoryProbe",
    "ProbePlan",
    "format_bytes",
    "judge",
]


class MemoryMeter(Protocol):
    """Reads the peak memory of a region: `reset()` opens it, `peak_bytes()` reads it."""

    def reset(self) -> None: ...

    def peak_bytes(self) -> int: ...


class DeviceMemoryMeter:
    """The device's own peak-memory counter.

    With `relative=True` (CPU) a probe's peak is the process's resident-set high-water mark over
    its resident set just before the model was built (so the interpreter, the libraries and the
    data loaded so far are not the job's), less what `settle` leaves out, less library pages
    paged in since, plus the model's tensors when they were resident before (a model handed in
    by `Workload.from_objects`). Library pages: the first step at a new shape maps kernels that
    every process running the job holds whatever its batch (7.8 MiB for the tiny test conv net's
    first step at batch 100, counted in every later probe before they were left out). All other
    memory earlier probes left resident counts, as an accelerator's allocator counts what is
    allocated whoever holds it: a model that keeps a workspace as large as the largest batch it
    saw is charged for it.

    Construction claims the process's CPU peak windows (one measurement at a time: the resident
    set and glibc's settings are process-wide, see `batchscope.cpu_heap`) and opens the first,
    so that glibc is set up before the model and the warm-up step allocate. `close` gives the
    claim back. Create the meter just before the model is built; `settle` it once the model is
    built and warmed up.
    """

    def __init__(self, device: torch.device, *, relative: bool) -> None:
        self.device, self.relative = device, relative
        self._release: weakref.finalize | None = None
        if relative:
            if not devices.claim_peak_windows(device):
                raise UsageError(
                    "another CPU memory measurement is running in this process, and peak memory "
                    "on CPU is the whole process's; probe one workload at a time, or pass "
                    "isolate=True to measure each probe in a process of its own")
            # Given back by close, or when the meter is collected (a runner never closed).
            self._release = weakref.finalize(self, devices.release_peak_windows, device)
            devices.reset_peak_memory(device)
        self.baseline_bytes = devices.current_memory_bytes(device) if relative else 0
        self._library_bytes = devices.library_pages_bytes(device) if relative else 0
        self._uncounted_model_bytes = 0

    def settle(self, excluding_growth_since: int, model_bytes: int = 0) -> None:
        """The model is built and warmed up. Memory allocated since `excluding_growth_since` (a
        `current_memory_bytes` reading) is not the workload's: batchscope's own snapshot of the
        model, and what a first step leaves behind for good (thread pools, the dataset a
        workload loads on first use: 60+ MiB on CPU, independent of the batch). `model_bytes`
        (its parameters and buffers) counts in full even if the model was resident before the
        meter was created. Only a relative meter settles."""
        if not self.relative:
            return
        now = devices.current_memory_bytes(self.device)
        self.baseline_bytes += max(0, now - excluding_growth_since)
        self._library_bytes = devices.library_pages_bytes(self.device)
        self._uncounted_model_bytes = max(0, model_bytes - (now - self.baseline_bytes))

    def reset(self) -> None:
        devices.reset_peak_memory(self.device)

    def peak_bytes(self) -> int:
        peak = devices.peak_memory_bytes(self.device) - self.baseline_bytes
        if self.relative:
            paged_in = max(0, devices.library_pages_bytes(self.device) - self._library_bytes)
            peak += self._uncounted_model_bytes - paged_in
        return max(0, peak)

    def close(self) -> None:
        """End the windows and give the claim back (idempotent)."""
        if self._release is not None:
            self._release()


@dataclass(frozen=True)
class ProbePlan:
    """What every probe of one search runs."""

    budget_bytes: int
    steps: int = 2
    eval_batch_factor: float | None = None


@dataclass(frozen=True)
class MemoryProbe:
    """One probe: the batch size, whether it fit, its measured peak (None after an OOM: the
    reading would only be a lower bound), wall time, training steps completed, and why."""

    batch_size: int
    fits: bool
    peak_bytes: int | None
    seconds: float
    steps: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryProbe":
        return cls(
            batch_size=int(data["batch_size"]),
            fits=bool(data["fits"]),
            peak_bytes=None if data["peak_bytes"] is None else int(data["peak_bytes"]),
            seconds=float(data["seconds"]),
            steps=int(data["steps"]),
            reason=str(data["reason"]),
        )


class InProcessRunner:
    """Runs probes in this process on one model built up front and, when a `guard` is given,
    protected by it (the model may be the user's own)."""

    def __init__(
        self,
        workload: Workload,
        device: torch.device,
        plan: ProbePlan,
        guard: StateGuard | None,
        meter: MemoryMeter | None = None,
        warm_batch_size: int = 1,
    ) -> None:
        self.workload, self.device, self.plan = workload, device, plan
        # Garbage collected later would otherwise sit in the baseline, and the peaks measured
        # against it would come out too small (even zero).
        devices.release_memory(device)
        # Only built when used: on CPU it opens a peak window, which changes malloc settings.
        self._own_meter: DeviceMemoryMeter | None = None
        if meter is None:
            self._own_meter = DeviceMemoryMeter(device, relative=device.type == "cpu")
            meter = self._own_meter
        self.meter: MemoryMeter = meter
        try:
            self._prepare(guard, warm_batch_size)
        except BaseException:
            # A bug in the workload or a model too large: the windows must not outlive us.
            if self._own_meter is not None:
                self._own_meter.close()
            raise

    def _prepare(self, guard: StateGuard | None, warm_batch_size: int) -> None:
        self.model = self._build_model()
        # What follows (the snapshot, the warm-up) is left out of the job's memory: see settle.
        before = devices.current_memory_bytes(self.device)
        if guard is not None:
            guard.protect(self.model)
        if self.workload.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self._warm_up(warm_batch_size)
        if self._own_meter is not None and self._own_meter.relative:
            # After the warm-up: a lazy module's parameters exist only from its first forward.
            self._own_meter.settle(excluding_growth_since=before,
                                   model_bytes=tensor_bytes(self.model))

    def _build_model(self) -> nn.Module:
        # Not step.build_model: the factory may hand back the user's own model
        # (Workload.from_objects), which must be protected before its memory format or
        # train/eval flag change; the caller does those after the snapshot.
        outcome = run_catching_oom(lambda: self.workload.build_model(self.device), self.device)
        if outcome.oom or outcome.value is None:
            raise ProbeFailedError(
                f"the model of workload {self.workload.name!r} alone does not fit on "
                f"{self.device}: {outcome.message}"
            )
        return outcome.value

    def _warm_up(self, batch_size: int) -> None:
        """One untimed, unmeasured step at a small batch. An OOM here is left for the search
        to find and report as a probe; an error in the workload's code surfaces now."""

        def one_step() -> None:
            workload, device = self.workload, self.device
            optimizer = workload.build_optimizer(self.model.parameters(), workload.reference_lr)
            batch = workload.worst_case(batch_size, device)
            step.train_step(workload, self.model, optimizer, batch, device)

        try:
            run_catching_oom(one_step, self.device)
        finally:
            self.model.zero_grad(set_to_none=True)
            devices.release_memory(self.device)

    def probe(self, batch_size: int) -> MemoryProbe:
        completed = [0]

        def steps() -> int:
            workload, device = self.workload, self.device
            try:
                optimizer = workload.build_optimizer(self.model.parameters(),
                                                     workload.reference_lr)
                scaler = (torch.amp.GradScaler(device.type)
                          if step.needs_grad_scaler(workload, device) else None)
                self.meter.reset()  # the batch itself is part of the step's memory
                batch = workload.worst_case(batch_size, device)
                for _ in range(self.plan.steps):
                    step.train_step(workload, self.model, optimizer, batch, device, scaler)
                    completed[0] += 1
                if self.plan.eval_batch_factor is not None:
                    del batch  # a training loop drops its last batch before evaluating
                    eval_size = max(1, math.ceil(self.plan.eval_batch_factor * batch_size))
                    _evaluation_pass(workload, self.model, eval_size, device)
                devices.synchronize(device)
                return self.meter.peak_bytes()
            finally:
                # Partial gradients of a step that died in backward must not outlive it.
                self.model.zero_grad(set_to_none=True)

        started = time.perf_counter()
        outcome = run_catching_oom(steps, self.device)
        if not outcome.oom:  # after an OOM, run_catching_oom has released the memory already
            devices.release_memory(self.device)
        seconds = time.perf_counter() - started
        return judge(batch_size, outcome, completed[0], seconds, self.plan)

    def close(self) -> None:
        del self.model
        devices.release_memory(self.device)
        if self._own_meter is not None:  # the rest of the process allocates at full speed
            self._own_meter.close()


def tensor_bytes(model: nn.Module) -> int:
    """The bytes of the model's parameters and buffers, each storage once (tied weights).
    Tensors without a plain storage (a wrapper subclass such as a quantised weight, a sparse
    tensor) count their elements; an uninitialised lazy parameter counts nothing."""
    storages: dict[int, int] = {}
    loose = 0
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            continue
        try:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            loose += tensor.numel() * tensor.element_size()
    return sum(storages.values()) + loose


def judge(
    batch_size: int, outcome: Outcome[int], completed: int, seconds: float, plan: ProbePlan
) -> MemoryProbe:
    """Fits only when every step ran, no OOM happened and the peak is within the budget."""
    if outcome.oom:
        return MemoryProbe(batch_size, False, None, seconds, completed,
                           f"out of memory: {outcome.message}")
    peak = int(outcome.value) if outcome.value is not None else None
    if completed < plan.steps or peak is None:  # a run with missing steps proves nothing
        return MemoryProbe(batch_size, False, peak, seconds, completed,
                           f"only {completed} of {plan.steps} steps ran")
    if peak > plan.budget_bytes:
        return MemoryProbe(batch_size, False, peak, seconds, completed,
                           f"over budget: peak {format_bytes(peak)} > "
                           f"{format_bytes(plan.budget_bytes)}")
    return MemoryProbe(batch_size, True, peak, seconds, completed, "fits")


def _evaluation_pass(
    workload: Workload, model: nn.Module, batch_size: int, device: torch.device
) -> None:
    batch = workload.worst_case(batch_size, device)
    model.eval()
    try:
        with torch.no_grad(), step.autocast(workload, device):
            workload.loss(model, batch)
    finally:
        model.train()
