"""Workloads whose step time is known, for the throughput probe's tests.

The fake workload's loss takes `a + b * B` seconds (its model is a tiny linear layer), so the true
throughput is `B / (a + b * B)` and every derived answer (knee, early stop, data wait) is known in
advance. On a `SimulatedClock` the loss advances the clock instead of sleeping: the answers are
then exact, and immune to a loaded machine.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from batchscope.workload import Workload


class SimulatedClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait(seconds: float, clock: SimulatedClock | None) -> None:
    if clock is None:
        time.sleep(seconds)
    else:
        clock.advance(seconds)


class TimedLoss:
    """Mean-squared error that takes `a + b * B` seconds (plus `slow_extra` during its first
    `slow_calls` calls, like cuDNN autotuning or allocator growth), on `clock` or for real."""

    def __init__(self, a: float, b: float, clock: SimulatedClock | None = None,
                 slow_calls: int = 0, slow_extra: float = 0.0,
                 oom_from: int | None = None) -> None:
        self.a, self.b, self.clock = a, b, clock
        self.slow_calls, self.slow_extra = slow_calls, slow_extra
        self.oom_from = oom_from
        self.calls = 0

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        size = inputs.shape[0]
        if self.oom_from is not None and size >= self.oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seconds = self.a + self.b * size
        if self.calls < self.slow_calls:
            seconds += self.slow_extra
        self.calls += 1
        wait(seconds, self.clock)
        return nn.functional.mse_loss(model(inputs).float(), targets)


def make_batch(batch_size: int, device: torch.device, generator: torch.Generator):
    return (torch.randn(batch_size, 4, generator=generator).to(device),
            torch.randn(batch_size, 1, generator=generator).to(device))


def timed_workload(loss, **changes) -> Workload:
    fields = dict(
        name="timed",
        build_model=lambda device: nn.Linear(4, 1).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
        loss=loss,
        make_batch=make_batch,
        reference_batch_size=32,
        reference_lr=0.01,
    )
    fields.update(changes)
    return Workload(**fields)


def timed_loader(seconds: float, clock: SimulatedClock | None = None):
    """A data loader whose every batch takes `seconds` to produce (a finite epoch of 4 batches,
    so the probe must restart it)."""

    def data_loader(batch_size: int, device: torch.device):
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            wait(seconds, clock)
            yield make_batch(batch_size, device, generator)

    return data_loader


def simulated(a: float, b: float, **loss_options):
    """A simulated clock and a workload whose loss advances it by `a + b * B` per step."""
    clock = SimulatedClock()
    return clock, timed_workload(TimedLoss(a, b, clock, **loss_options))
