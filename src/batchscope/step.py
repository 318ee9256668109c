"""One training step the way every probe, sweep and adaptive run takes it.

Keeping it in one place means memory probes, throughput probes and real training see exactly
the same work: autocast when the workload uses it, channels_last when it asks for it, mean-loss
backward, optimizer step, gradients dropped (set to None so their memory is returned between
steps, as in a real training loop).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from batchscope.guard import StateGuard
from batchscope.workload import Batch, Workload


def build_model(workload: Workload, device: torch.device, guard: StateGuard | None = None) -> nn.Module:
    """The workload's model on `device`, in train mode, in the memory format it asks for.

    A `Workload.from_objects` factory hands back the user's own model, so with a `guard` the
    model is protected BEFORE it is switched to train mode or channels_last; otherwise the
    snapshot would record the already-changed state and restore that.
    """
    model = workload.build_model(device)
    if guard is not None:
        guard.protect(model)
    if workload.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    return model


def autocast(workload: Workload, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for the workload's precision, or a no-op for full precision."""
    if workload.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=workload.autocast_dtype)


def needs_grad_scaler(workload: Workload, device: torch.device) -> bool:
    # fp16 underflows without loss scaling; bf16 has fp32's range and needs none.
    return workload.autocast_dtype == torch.float16 and device.type == "cuda"


def forward_backward(
    workload: Workload,
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward and backward on one batch; gradients accumulate into `.grad`. Returns the
    detached loss."""
    with autocast(workload, device):
        loss = workload.loss(model, batch)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    return loss.detach()


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(
    workload: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward, backward and optimizer step on one batch. Returns the detached loss."""
    loss = forward_backward(workload, model, batch, device, scaler)
    optimizer_step(optimizer, scaler)
    return loss
