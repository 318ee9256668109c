"""One training step the way every probe, sweep and adaptive run takes it.

Keeping it in one place means memory probes, throughput probes and real training see exactly
the same work: autocast when the workload uses it, channels_last when it asks for it, mean-loss
backward, optimizer step, gradients dropped (set to None so their memory is returned between
steps, as in a real training loop).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.utils import _pytree as pytree

from batchscope.errors import UsageError
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
    share: float = 1.0,
) -> torch.Tensor:
    """Forward and backward on one batch; gradients accumulate into `.grad`. Returns the
    detached loss.

    `share`: this batch's part of a larger batch built by accumulation (its size over the
    whole's). A mean loss is scaled by it, so that the accumulated gradients are the whole
    batch's mean; a sum loss already adds up and is not."""
    with autocast(workload, device):
        loss = workload.loss(model, batch)
        if share != 1.0 and workload.loss_reduction == "mean":
            loss = loss * share
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


def accumulated_train_step(
    workload: Workload,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    device: torch.device,
    micro_batch_size: int,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimizer step over `batch`, taken as micro-batches of at most `micro_batch_size`
    examples (along dim 0) whose gradients add up to the whole batch's: a mean loss is weighted
    by each micro-batch's share, a sum loss is not. What differs from one big step is only what
    must: BatchNorm normalises each micro-batch by its own statistics. Returns the detached loss
    of the whole batch."""
    total = examples_in(batch)
    if total <= micro_batch_size:
        return train_step(workload, model, optimizer, batch, device, scaler)
    loss_sum = torch.zeros((), device=device)
    start = 0
    for size in split_sizes(total, math.ceil(total / micro_batch_size)):
        part = slice_batch(batch, start, start + size)
        start += size
        loss_sum += forward_backward(workload, model, part, device, scaler, share=size / total).float()
    optimizer_step(optimizer, scaler)
    return loss_sum


def examples_in(batch: Batch) -> int:
    """Examples in a batch: the first dimension its tensors share. A batch is split for
    accumulation only when every tensor in it holds the examples along dim 0."""
    leaves = pytree.tree_leaves(batch)
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise UsageError(
            f"cannot split a {type(batch).__name__} batch into micro-batches (no tensors found "
            f"in it); return tuples or dicts of tensors from epoch_batches, or drop "
            f"--micro-batch-size / max_micro_batch_size"
        )
    sizes = {tuple(t.shape[:1]) for t in tensors}
    if len(sizes) != 1 or () in sizes:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise UsageError(
            f"cannot split this batch into micro-batches: its tensors do not share a first "
            f"(examples) dimension (shapes {shapes}); drop --micro-batch-size / "
            f"max_micro_batch_size or keep per-batch tensors out of the batch"
        )
    return int(tensors[0].shape[0])


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples `start:stop` of every tensor in the batch (other leaves are kept as they are)."""
    return pytree.tree_map(lambda leaf: leaf[start:stop] if isinstance(leaf, torch.Tensor) else leaf, batch)


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal positive sizes."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
